"""Fused layers: residual add + LayerNorm/RMSNorm, GroupNorm + SiLU, BatchNorm + ReLU (issue 13 §1).

Each forward is one ``normlab::`` operator (see :mod:`normlab.core.ops`). The layers keep the
parameter and buffer names (and so the state_dict keys) of their unfused torch twins, so a
checkpoint of ``LayerNorm`` loads into ``AddLayerNorm``, ``GroupNorm`` into ``GroupNormSiLU`` and
``BatchNorm2d`` into ``BatchNormReLU2d``. AddLayerNorm, AddRMSNorm and GroupNormSiLU are *not*
subclasses of torch's norm layers: their forward differs (two inputs and outputs, an
activation), so a tool that swaps every ``nn.LayerNorm``/``nn.GroupNorm`` must not take them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from normlab import functional as F
from normlab._checks import check_channels, check_divisor, check_eps, check_input, check_normalized_shape
from normlab._checks import check_positive_int
from normlab.nn.batchnorm import _BatchNorm

__all__ = ["AddLayerNorm", "AddRMSNorm", "GroupNormSiLU", "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d"]


class _AddNorm(nn.Module):
    def __init__(self, normalized_shape, eps, elementwise_affine: bool, bias: bool, device, dtype, backend) -> None:
        super().__init__()
        self.normalized_shape = check_normalized_shape(normalized_shape)
        if eps is not None:
            check_eps(eps)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.normalized_shape, **kw)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.empty(self.normalized_shape, **kw)) if (elementwise_affine and bias) else None
        self.backend = backend
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class AddLayerNorm(_AddNorm):
    r"""``forward(x, residual) -> (y, s)``: s = x + residual, y = LayerNorm(s).

    .. math:: s = x + r,\qquad y = \gamma \odot \frac{s - \mu(s)}{\sqrt{\sigma^2(s) + \epsilon}} + \beta

    The pre-norm transformer block's ``h = h + f(h); y = norm(h)`` in one operator; ``s`` is the
    residual stream the next block adds to. Constructor as :class:`torch.nn.LayerNorm`
    (keyword-only ``backend``). See :func:`normlab.functional.add_layer_norm`.
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: str | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype, backend)

    def forward(self, input: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        return F.add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps,
                                backend=self.backend)


class AddRMSNorm(_AddNorm):
    r"""``forward(x, residual) -> (y, s)``: s = x + residual, :math:`y = \gamma \odot s / \sqrt{\overline{s^2} + \epsilon}`.

    Constructor as :class:`torch.nn.RMSNorm` (``eps=None``: the compute dtype's machine epsilon).
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *, backend: str | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, False, device, dtype, backend)

    def forward(self, input: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        return F.add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps, backend=self.backend)


class GroupNormSiLU(nn.Module):
    r"""GroupNorm followed by SiLU, :math:`y = z\,\sigma(z)` with z = GroupNorm(x): the norm +
    activation of a diffusion UNet's ResNet block in one operator.

    Constructor, parameters and state_dict keys as :class:`torch.nn.GroupNorm` (keyword-only
    ``bias=False`` drops β, ``backend`` forces a backend). See
    :func:`normlab.functional.group_norm_silu`.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, *, bias: bool = True, backend: str | None = None) -> None:
        super().__init__()
        check_positive_int(num_channels, "num_channels")
        check_divisor(num_groups, num_channels, "num_groups", f"num_channels={num_channels}")
        check_eps(eps)
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_channels, **kw)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels, **kw)) if (affine and bias) else None
        self.backend = backend

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if not F.traced(input):
            check_input(input, min_dim=2)
            check_channels(input, self.num_channels)
        return F.group_norm_silu(input, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class _BatchNormReLU(_BatchNorm, nn.modules.batchnorm._NormBase):
    r"""Batch normalization followed by ReLU, :math:`y = \max(0, \mathrm{BN}(x))`, one operator.

    Everything about the statistics is :class:`normlab.nn.BatchNorm2d`'s (the same code decides
    them: training/eval, ``momentum=None``, ``track_running_stats``, ``stats_mode``), so the
    running statistics evolve exactly as that layer's; state_dict keys are torch's. Not a
    subclass of ``torch.nn.BatchNorm2d`` (BN folding into a convolution would drop the ReLU);
    no ``mask``.
    """

    def forward(self, input: Tensor) -> Tensor:
        traced = F.traced(input)
        if traced and self._stats_mode is None:
            # torch's own BN layer then ReLU: standard operators in an exported graph
            return torch.relu(nn.modules.batchnorm._BatchNorm.forward(self, input))
        if not traced:
            self._check_input_dim(input)
        running_mean, running_var, batch_stats, momentum = self._statistics()
        return F.batch_norm_relu(input, running_mean, running_var, self.weight, self.bias, batch_stats, momentum,
                                 self.eps, backend=self.backend)


class BatchNormReLU1d(_BatchNormReLU):
    """BatchNorm1d + ReLU of (N, C) or (N, C, L) input."""

    _dims = (2, 3)


class BatchNormReLU2d(_BatchNormReLU):
    """BatchNorm2d + ReLU of (N, C, H, W) input."""

    _dims = (4,)


class BatchNormReLU3d(_BatchNormReLU):
    """BatchNorm3d + ReLU of (N, C, D, H, W) input."""

    _dims = (5,)

