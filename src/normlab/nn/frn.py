r"""Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan 2020)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab import functional as F
from normlab._checks import check_channels, check_dims, check_eps, check_positive_int

__all__ = ["FilterResponseNorm2d"]


class FilterResponseNorm2d(nn.Module):
    r"""FRN + TLU of (N, C, H, W) input: batch-independent, no centring.

    .. math::

        \nu^2_{nc} = \frac{1}{HW}\sum_{h,w} x_{nchw}^2,\qquad
        y = \max\Big(\gamma_c \frac{x}{\sqrt{\nu^2_{nc} + \epsilon}} + \beta_c,\ \tau_c\Big)

    Parameters ``weight`` (γ, ones), ``bias`` (β, zeros), ``tau`` (τ, the learned TLU threshold,
    zeros). ``learnable_eps=True`` adds a scalar parameter ``learned_eps`` (init 1e-4; a
    positive init because |·| has no gradient at 0) and uses ε + |learned_eps| — the paper's
    learned ε for layers with small spatial extent (1×1); ``eps`` is then the lower bound. The
    paper uses FRN in place of BN+ReLU: do not add another activation after it.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, learnable_eps: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int(num_features, "num_features")
        check_eps(eps)
        if not isinstance(learnable_eps, bool):
            raise TypeError(f"learnable_eps: expected a bool, got {type(learnable_eps).__name__}")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.learnable_eps = num_features, float(eps), learnable_eps
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.tau = nn.Parameter(torch.zeros(num_features, **factory))
        if learnable_eps:
            self.learned_eps = nn.Parameter(torch.full((1,), 1e-4, **factory))
        else:
            self.register_parameter("learned_eps", None)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.tau)
        if self.learned_eps is not None:
            nn.init.constant_(self.learned_eps, 1e-4)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, learnable_eps={self.learnable_eps}"

    def forward(self, input: Tensor) -> Tensor:
        if not F.traced(input):
            check_dims(input, (4,), type(self).__name__)
            check_channels(input, self.num_features)
        return F.filter_response_norm(input, self.weight, self.bias, self.tau, self.eps, learned_eps=self.learned_eps)
