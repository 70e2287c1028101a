r"""Weight Standardization (Qiao, Wang, Liu, Shen & Yuille 2019) as a ``torch.nn.utils.parametrize`` parametrization.

.. math:: \hat W_{o} = \frac{W_{o} - \mu_{o}}{\sqrt{\sigma^2_{o} + \epsilon}}

per output filter o (``weight[o]``: input channels × kernel; biased variance). With GroupNorm
(``ws+gn``) it trains at 1–2 images per GPU as well as BatchNorm at large batch. The stored
parameter stays the raw W (state_dict key ``parametrizations.weight.original``); ``module.weight``
is the standardized filter bank, recomputed on access (cached inside ``parametrize.cached()``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from normlab import functional as F
from normlab._checks import check_eps

__all__ = [
    "WeightStandardization",
    "is_weight_standardized",
    "remove_weight_standardization",
    "weight_standardization",
]

_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class WeightStandardization(nn.Module):
    r"""The parametrization :math:`W \mapsto (W - \mu_o) / \sqrt{\sigma^2_o + \epsilon}` per output filter.

    Computed by :func:`normlab.functional.weight_standardize` (a layer norm of the (out, in·k)
    matrix through ``normlab::layer_norm``). Not invertible: registering it keeps the raw W as
    the stored parameter (no ``right_inverse``).
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        check_eps(eps)
        self.eps = float(eps)

    def forward(self, weight: Tensor) -> Tensor:
        return F.weight_standardize(weight, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def is_weight_standardized(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` carries a :class:`WeightStandardization` parametrization."""
    return parametrize.is_parametrized(module, name) and any(
        isinstance(p, WeightStandardization) for p in module.parametrizations[name]  # type: ignore[index]
    )


def weight_standardization(module: nn.Module, name: str = "weight", eps: float = 1e-5) -> nn.Module:
    """Standardize each output filter of ``module.<name>`` on every access (Weight Standardization).

    Args:
        module: a Conv1d/2d/3d or Linear (any module whose parameter ``name`` has the output
            units on dim 0 and at least 2 dims). ConvTranspose layers are rejected (their output
            units are on dim 1).
        name: the parameter to standardize.
        eps: ε under the square root (default 1e-5).

    Returns:
        ``module`` (modified in place; the parameter object is kept, so an optimizer holding it
        stays valid).

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or the parameter is not floating point.
        ValueError: ``name`` is not a parameter, has fewer than 2 dims, is already standardized,
            ``module`` is a ConvTranspose, or ``eps`` < 0.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, _CONV_TRANSPOSE):
        raise ValueError(
            f"module: expected a layer with output filters on dim 0 (Conv, Linear), got {type(module).__name__}"
        )
    if is_weight_standardized(module, name):
        raise ValueError(f"module.{name}: expected a plain parameter, got one already weight-standardized")
    tensor = module._parameters.get(name)
    if tensor is None and not parametrize.is_parametrized(module, name):
        raise ValueError(f"name: expected a parameter of {type(module).__name__}, got {name!r}")
    if tensor is not None:
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"module.{name}: expected a floating-point parameter, got {tensor.dtype}")
        if tensor.dim() < 2:
            raise ValueError(f"module.{name}: expected a weight with >= 2 dims, got shape {tuple(tensor.shape)}")
    parametrize.register_parametrization(module, name, WeightStandardization(eps), unsafe=True)
    return module


def remove_weight_standardization(module: nn.Module, name: str = "weight", *, leave_parametrized: bool = False) -> nn.Module:
    """Remove weight standardization: ``module.<name>`` becomes the raw W again (default) or, with
    ``leave_parametrized=True``, the standardized filters as a plain parameter (same outputs)."""
    if not is_weight_standardized(module, name):
        raise ValueError(f"module.{name}: expected a weight-standardized parameter, got a plain one")
    if len(module.parametrizations[name]) != 1:  # type: ignore[index,arg-type]
        raise ValueError(f"module.{name}: has other parametrizations too; remove them with torch.nn.utils.parametrize")
    with torch.no_grad() if not leave_parametrized else torch.enable_grad():
        parametrize.remove_parametrizations(module, name, leave_parametrized=leave_parametrized)
    return module
