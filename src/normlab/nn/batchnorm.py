"""Batch normalization (Ioffe & Szegedy 2015) and mean-only batch normalization (Salimans & Kingma 2016)."""

from __future__ import annotations

from torch import Tensor, fx, nn

from normlab import functional as F
from normlab.nn._base import NormBase, RunningStats, check_dims


class _BatchNorm(RunningStats):
    r"""Batch normalization over (N, C, \*): one (μ, σ²) per channel from N and every position.

    .. math:: y = \gamma_c \frac{x - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}} + \beta_c

    Training: batch statistics (biased variance to normalize, unbiased variance into
    ``running_var``), running averages with ``momentum`` (``None``: cumulative average over
    ``num_batches_tracked`` batches). Eval: running statistics when ``track_running_stats``,
    batch statistics otherwise. Each class **is** its torch.nn twin (``normlab.BatchNorm2d`` is a
    subclass of ``torch.nn.BatchNorm2d``): same constructor, defaults, state_dict keys, and every
    isinstance-based tool (``swa_utils.update_bn``, ``convert_sync_batchnorm``, BN folding and
    freezing) treats it as one. Extras (keyword-only): ``backend`` forces a backend for this layer.
    A channels_last input gives a channels_last output; an empty batch gives an empty output and
    leaves the running statistics untouched.
    """

    _dims: tuple[int, ...] = ()

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
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        self._validate(num_features, eps, momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.backend = backend

    def _check_input_dim(self, input: Tensor) -> None:
        if isinstance(input, fx.Proxy):
            return  # torch.fx.symbolic_trace: a Proxy has no rank or shape to check
        check_dims(input, self._dims, type(self).__name__)
        F.check_channels(input, self.num_features)

    def forward(self, input: Tensor) -> Tensor:
        if F.traced(input):
            return super().forward(input)  # torch's own layer: standard operators in the graph
        self._check_input_dim(input)
        momentum = self._momentum_for_step()
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            batch_stats,
            momentum,
            self.eps,
            backend=self.backend,
        )


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """Batch normalization of (N, C) or (N, C, L) input. See :class:`_BatchNorm` for the formula."""

    _dims = (2, 3)


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """Batch normalization of (N, C, H, W) input. See :class:`_BatchNorm` for the formula."""

    _dims = (4,)


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """Batch normalization of (N, C, D, H, W) input. See :class:`_BatchNorm` for the formula."""

    _dims = (5,)


class MeanOnlyBatchNorm(NormBase):
    r"""Mean-only batch normalization: :math:`y = x - \mu_c + \beta_c` on (N, C) or (N, C, \*) input.

    Subtracts the per-channel batch mean (the running mean in eval) and adds a learnable bias; it
    does not divide by the standard deviation. Salimans & Kingma (2016, §2.2) pair it with weight
    normalization, which already fixes each unit's scale: the centring keeps activations
    zero-mean while the noise it adds is milder than full batch norm's. ``affine`` controls the
    bias; there is no weight. state_dict: ``bias``, ``running_mean``, ``num_batches_tracked``.
    """

    _tracks_var = False
    _has_weight = False

    def __init__(
        self,
        num_features: int,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(num_features, 1e-5, momentum, affine, track_running_stats, device, dtype, backend=backend)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def forward(self, input: Tensor) -> Tensor:
        if F.traced(input):  # export / jit.trace / fx: standard operators (a Proxy has no shape to check)
            return F.mean_only_batch_norm(input, self.running_mean, self.bias,
                                          training=self.training or self.running_mean is None,
                                          momentum=self._momentum_for_step())
        if not isinstance(input, Tensor) or input.dim() < 2:
            check_dims(input, (2, 3, 4, 5), type(self).__name__)
        F.check_channels(input, self.num_features)
        momentum = self._momentum_for_step()
        return F.mean_only_batch_norm(
            input,
            self.running_mean,
            self.bias,
            training=self.training or self.running_mean is None,
            momentum=momentum,
            backend=self.backend,
        )
