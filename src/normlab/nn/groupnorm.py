"""Group normalization (Wu & He 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab import functional as F
from normlab.nn._base import check_num_features


class GroupNorm(nn.Module):
    r"""Group normalization of (N, C, \*) input.

    The C channels are split into G = ``num_groups`` groups; μ and σ² are computed per (sample,
    group) over the C/G channels of the group and every spatial position; γ, β are per channel:

    .. math:: y = \gamma_c \frac{x - \mu_{ng}}{\sqrt{\sigma_{ng}^2 + \epsilon}} + \beta_c

    Independent of the batch size, same in train and eval. G = 1 is LayerNorm over (C, \*) and
    G = C is InstanceNorm. Same constructor, defaults and state_dict keys as torch.nn.GroupNorm
    (keyword-only ``bias=False`` drops β).
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_num_features(num_channels, "num_channels")
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or num_channels % num_groups:
            raise ValueError(f"num_groups: expected a positive divisor of num_channels={num_channels}, got {num_groups!r}")
        F.check_eps(eps)
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.backend = backend
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            if bias:
                self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        F.check_input(input, min_dim=2)
        F.check_channels(input, self.num_channels)
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
