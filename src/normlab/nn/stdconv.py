r"""``StdConv2d``: a Conv2d with Weight Standardization (Qiao et al. 2019) built in.

.. math:: y = \hat W * x + b, \qquad \hat W_{o} = \frac{W_{o} - \mu_{o}}{\sqrt{\sigma^2_{o} + \epsilon}}
"""

from __future__ import annotations

from torch import Tensor, nn

from normlab import functional as F
from normlab._checks import check_eps

__all__ = ["StdConv2d"]


class StdConv2d(nn.Conv2d):
    r"""Conv2d whose filters are standardized on every forward (Weight Standardization).

    Same constructor as :class:`torch.nn.Conv2d` plus keyword-only ``eps`` (default 1e-5). The
    state_dict is a Conv2d's (``weight`` is the raw W), so a Conv2d checkpoint loads into it.
    Equivalent to ``normlab.nn.utils.weight_standardization(nn.Conv2d(...))``; use that to add
    WS to an existing model (``normlab.convert(model, "ws+gn")`` does both WS and GN).
    """

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        check_eps(eps)
        super().__init__(*args, **kwargs)
        self.eps = float(eps)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, F.weight_standardize(self.weight, self.eps), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"
