"""Group normalization (Wu & He 2018)."""

from __future__ import annotations

from torch import Tensor, nn

from normlab import functional as F
from normlab.nn._base import check_num_features


class GroupNorm(nn.GroupNorm):
    r"""Group normalization of (N, C, \*) input.

    The C channels are split into G = ``num_groups`` groups; μ and σ² are computed per (sample,
    group) over the C/G channels of the group and every spatial position; γ, β are per channel:

    .. math:: y = \gamma_c \frac{x - \mu_{ng}}{\sqrt{\sigma_{ng}^2 + \epsilon}} + \beta_c

    Independent of the batch size, same in train and eval. G = 1 is LayerNorm over (C, \*) and
    G = C is InstanceNorm. A subclass of torch.nn.GroupNorm: same constructor, defaults and
    state_dict keys (keyword-only ``bias=False`` drops β, ``backend`` forces a backend).
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
        check_num_features(num_channels, "num_channels")
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or num_channels % num_groups:
            raise ValueError(f"num_groups: expected a positive divisor of num_channels={num_channels}, got {num_groups!r}")
        F.check_eps(eps)
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        if F.traced(input):
            return super().forward(input)
        F.check_input(input, min_dim=2)
        F.check_channels(input, self.num_channels)
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend)
