"""Instance normalization (Ulyanov, Vedaldi & Lempitsky 2016)."""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from normlab import functional as F
from normlab._checks import check_channels, check_dims
from normlab.nn._base import RunningStats


class _InstanceNorm(RunningStats):
    r"""Instance normalization: one (μ, σ²) per sample and channel, over the spatial positions.

    .. math:: y_{nc} = \gamma_c \frac{x_{nc} - \mu_{nc}}{\sqrt{\sigma_{nc}^2 + \epsilon}} + \beta_c

    As torch.nn: ``affine`` and ``track_running_stats`` default to False; with running statistics
    the layer uses them in eval mode (the batch average of the per-instance statistics is
    tracked), so it is usable at test time either way. Unbatched (C, \*) input is accepted.
    Equal to GroupNorm with one group per channel. Each class is a subclass of its torch.nn twin.
    """

    _spatial = 0

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        self._validate(num_features, eps, momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            # torch's forward branches on the rank (unbatched input), which a Proxy lacks: record
            # one call of a function that does it at run time (torch.fx.wrap below)
            return _instance_norm_fx(input, self._spatial + 2, self.running_mean, self.running_var, self.weight,
                                     self.bias, self.training or not self.track_running_stats,
                                     0.0 if self.momentum is None else self.momentum, self.eps)
        if F.traced(input):
            return super().forward(input)
        batched = self._spatial + 2
        check_dims(input, (batched - 1, batched), type(self).__name__)
        unbatched = input.dim() == batched - 1
        x = input.unsqueeze(0) if unbatched else input
        check_channels(x, self.num_features)
        # As torch.nn.InstanceNorm: batches are not counted and momentum=None means 0 (no update).
        momentum = 0.0 if self.momentum is None else self.momentum
        use_input_stats = self.training or not self.track_running_stats
        y = F.instance_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_input_stats,
            momentum,
            self.eps,
            backend=self.backend,
        )
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    """Instance normalization of (N, C, L) or (C, L) input."""

    _spatial = 1


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    """Instance normalization of (N, C, H, W) or (C, H, W) input."""

    _spatial = 2


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    """Instance normalization of (N, C, D, H, W) or (C, D, H, W) input."""

    _spatial = 3


def _instance_norm_fx(input, batched_ndim, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
    """What a torch.fx GraphModule calls for an InstanceNorm layer: torch's forward, at run time."""
    unbatched = input.dim() == batched_ndim - 1
    x = input.unsqueeze(0) if unbatched else input
    y = nn.functional.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    return y.squeeze(0) if unbatched else y


torch.fx.wrap("_instance_norm_fx")
