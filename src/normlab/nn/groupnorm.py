"""Group normalization (Wu & He 2018)."""

from __future__ import annotations

from torch import Tensor, nn

from normlab import functional as F
from normlab._checks import check_channels, check_divisor, check_eps, check_input, check_positive_int


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
        check_positive_int(num_channels, "num_channels")
        check_divisor(num_groups, num_channels, "num_groups", f"num_channels={num_channels}")
        check_eps(eps)
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        if F.traced(input):
            return super().forward(input)
        check_input(input, min_dim=2)
        check_channels(input, self.num_channels)
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend)
