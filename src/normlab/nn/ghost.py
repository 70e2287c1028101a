r"""Ghost batch normalization (Hoffer, Hubara & Soudry 2017): batch norm over virtual batches.

"Train longer, generalize better": a large batch is split into virtual batches of g samples and
each is normalized with its own statistics, which keeps batch norm's regularizing noise at large
batch sizes. Inference uses the running statistics (as batch norm).
"""

from __future__ import annotations

from torch import Tensor

from normlab import functional as F
from normlab._checks import check_positive_int
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class _GhostBatchNorm(_BatchNorm):
    r"""Ghost batch normalization over (N, C, \*): batch norm of each virtual batch of g samples.

    .. math:: y_{n} = \gamma_c \frac{x_{n} - \mu_{j(n),c}}{\sqrt{\sigma^2_{j(n),c} + \epsilon}} + \beta_c,
              \qquad j(n) = \lfloor n / g \rfloor

    μ_jc, σ²_jc over the g samples of virtual batch j and every position. g =
    ``virtual_batch_size`` (keyword-only, default 32) must divide the batch size N — a clear
    ``ValueError`` otherwise (no remainder rule: a silently smaller last virtual batch would have
    noisier statistics). g = N is batch norm exactly.

    Training: virtual-batch statistics; the running statistics are updated once per forward with
    the average of the virtual-batch means and of the unbiased virtual-batch variances. Eval:
    batch norm with the running statistics (independent of how the eval batch is split), or,
    without running statistics, virtual-batch statistics. A subclass of BatchNorm{1,2,3}d (fold,
    freeze and recalibrate apply); ``stats_mode`` works as for BatchNorm. The output is contiguous.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        virtual_batch_size: int = 32,
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        g = virtual_batch_size
        check_positive_int(g, "virtual_batch_size")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, backend=backend)
        self.virtual_batch_size = g

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        if not F.traced(input):
            self._check_input_dim(input)
        mode = self._stats_mode
        if mode is None:
            momentum = self._momentum_for_step()
            batch_stats = self.training or (self.running_mean is None and self.running_var is None)
            track = not self.training or self.track_running_stats
        elif mode == "batch":
            momentum = self._momentum_for_step()
            batch_stats, track = True, self.training and self.track_running_stats
        else:
            momentum = 0.0 if self.momentum is None else self.momentum
            batch_stats, track = False, True
        return F.ghost_batch_norm(
            input,
            self.virtual_batch_size,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            batch_stats,
            momentum,
            self.eps,
            backend=self.backend,
        )


class GhostBatchNorm1d(_GhostBatchNorm, BatchNorm1d):
    """Ghost batch normalization of (N, C) or (N, C, L) input. See :class:`_GhostBatchNorm`."""

    _dims = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm, BatchNorm2d):
    """Ghost batch normalization of (N, C, H, W) input. See :class:`_GhostBatchNorm`."""

    _dims = (4,)


class GhostBatchNorm3d(_GhostBatchNorm, BatchNorm3d):
    """Ghost batch normalization of (N, C, D, H, W) input. See :class:`_GhostBatchNorm`."""

    _dims = (5,)
