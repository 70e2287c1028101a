r"""EvoNorm-S0 and EvoNorm-B0 (Liu, Brock, Simonyan & Le 2020): normalization–activation layers found by search."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab import functional as F
from normlab._checks import check_channels, check_dims, check_divisor, check_eps, check_momentum, check_positive_int

__all__ = ["EvoNormB0", "EvoNormS0"]


class EvoNormS0(nn.Module):
    r"""EvoNorm-S0 of (N, C, \*) input: batch-independent norm + activation (replaces GN/BN + ReLU/SiLU).

    .. math:: y = \frac{x \cdot \operatorname{sigmoid}(v_c\, x)}{\sqrt{s^2_{g}(x) + \epsilon}}\,\gamma_c + \beta_c

    s²_g: biased variance per (sample, group) over the C/G channels of the group and every
    position. Parameters ``weight`` (γ, ones), ``bias`` (β, zeros), ``v`` (ones). ``groups`` must
    divide ``num_features`` (default 32, as the paper).
    """

    def __init__(self, num_features: int, groups: int = 32, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int(num_features, "num_features")
        check_eps(eps)
        check_divisor(groups, num_features, "groups", f"num_features={num_features}")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.groups, self.eps = num_features, groups, float(eps)
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.v = nn.Parameter(torch.ones(num_features, **factory))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.v)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}"

    def forward(self, input: Tensor) -> Tensor:
        if not F.traced(input):
            check_dims(input, (2, 3, 4, 5), type(self).__name__)
            check_channels(input, self.num_features)
        return F.evonorm_s0(input, self.groups, self.weight, self.bias, self.v, self.eps)


class EvoNormB0(nn.Module):
    r"""EvoNorm-B0 of (N, C, \*S) input (\*S non-empty): batch-dependent norm + activation.

    .. math::

        y = \frac{x}{\max\big(\sqrt{s^2_{b,c} + \epsilon},\ v_c\, x + \sqrt{s^2_{i}(x) + \epsilon}\big)}\,\gamma_c + \beta_c

    s²_b: biased batch variance of channel c over (N, \*S) in training, ``running_var`` in eval
    (updated in training with the unbiased batch variance and ``momentum``); s²_i: biased
    variance per (sample, channel) over the positions. Parameters ``weight`` (ones), ``bias``
    (zeros), ``v`` (ones); buffer ``running_var`` (ones).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int(num_features, "num_features")
        check_eps(eps)
        check_momentum(momentum)
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, float(eps), momentum
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.v = nn.Parameter(torch.ones(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.v)
        self.running_var.fill_(1.0)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def forward(self, input: Tensor) -> Tensor:
        if not F.traced(input):
            check_dims(input, (3, 4, 5), type(self).__name__)
            check_channels(input, self.num_features)
        return F.evonorm_b0(input, self.running_var, self.weight, self.bias, self.v, self.training,
                            self.momentum, self.eps)
