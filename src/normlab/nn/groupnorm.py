"""Group normalization (Wu & He 2018)."""

from __future__ import annotations

from torch import Tensor, nn

from normlab import functional as F
from normlab._checks import check_channels, check_divisor, check_eps, check_input, check_positive_int
from normlab.core import masked


class GroupNorm(nn.GroupNorm):
    r"""Group normalization of (N, C, \*) input.

    The C channels are split into G = ``num_groups`` groups; μ and σ² are computed per (sample,
    group) over the C/G channels of the group and every spatial position; γ, β are per channel:

    .. math:: y = \gamma_c \frac{x - \mu_{ng}}{\sqrt{\sigma_{ng}^2 + \epsilon}} + \beta_c

    Independent of the batch size, same in train and eval. G = 1 is LayerNorm over (C, \*) and
    G = C is InstanceNorm. A subclass of torch.nn.GroupNorm: same constructor, defaults and
    state_dict keys (keyword-only ``bias=False`` drops β, ``backend`` forces a backend).

    ``forward(input, mask=None)``: ``mask`` is a boolean tensor broadcastable to the input, True
    = valid position (e.g. (N, 1, H, W) for padded images). Per (sample, group) with n = Σ m
    valid values, μ = Σ m·x / n, σ² = Σ m·(x − μ)² / n and y = m·(γ (x − μ)/sqrt(σ² + ε) + β):
    zero at masked positions (padding cannot change any output, its gradient is exactly zero),
    zeros for a group with n = 0 (pytorch#81985). See :func:`normlab.functional.group_norm`.
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

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = None if mask is None else masked.layer_mask(mask, self)
        if mask is None and F.traced(input):
            return super().forward(input)
        check_input(input, min_dim=2)
        check_channels(input, self.num_channels)
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, mask=mask, backend=self.backend)
