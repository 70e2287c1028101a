"""Batch normalization (Ioffe & Szegedy 2015) and mean-only batch normalization (Salimans & Kingma 2016)."""

from __future__ import annotations

from torch import Tensor, fx, nn

from normlab import functional as F
from normlab._checks import check_channels, check_dims
from normlab.core import masked
from normlab.nn._base import NormBase, RunningStats


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

    **Statistics mode** (``layer.stats_mode``, independent of train/eval; not in the state_dict):

    * ``None`` (default): torch's behaviour (batch statistics and running-average updates in
      training, running statistics in eval);
    * ``"batch"``: batch statistics in train *and* eval; running averages are updated only in
      training mode (an eval-mode forward mutates nothing);
    * ``"running"``: the running statistics even in training, never updated (BN is then a
      fixed per-channel affine map; γ and β still train);
    * ``"frozen"``: as ``"running"``, and setting it turns ``requires_grad`` off for γ and β
      (leaving ``"frozen"`` for another mode turns back on what it turned off). This is what
      :func:`normlab.freeze_batchnorm` sets.

    ``"running"`` and ``"frozen"`` need running statistics (``track_running_stats=True``).

    **Masks**: ``forward(input, mask=None)``; ``mask`` is a boolean tensor broadcastable to the
    input, True = valid position (e.g. (N, 1, L) for padded sequences). The statistics are
    count-weighted over the valid positions, n_c = Σ m, μ_c = Σ m·x / n_c,
    σ²_c = Σ m·(x − μ_c)² / n_c, and y = m·(γ (x − μ_c)/sqrt(σ²_c + ε) + β): zero at masked
    positions, so masked BN over padded sequences equals BN over the concatenation of the valid
    steps (running statistics included: ``running_var`` gets σ²_c · n_c/(n_c − 1), momentum or
    the cumulative average as without a mask; a channel with n_c = 0 keeps its running
    statistics, n_c = 1 its running variance), padding cannot change any output and its
    gradient is exactly zero. Eval: the running statistics, masked positions zeroed. See
    :func:`normlab.functional.batch_norm`.
    """

    _dims: tuple[int, ...] = ()
    _STATS_MODES = (None, "batch", "running", "frozen")
    #: class-level default, so layers pickled before stats_mode existed load with None
    _stats_mode: str | None = None

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
        check_channels(input, self.num_features)

    @property
    def stats_mode(self) -> str | None:
        """Which statistics normalize: None (train/eval decides), "batch", "running" or "frozen"."""
        return self._stats_mode

    @stats_mode.setter
    def stats_mode(self, mode: str | None) -> None:
        if mode not in self._STATS_MODES:
            raise ValueError(f"stats_mode: expected one of {list(self._STATS_MODES)}, got {mode!r}")
        if mode in ("running", "frozen") and (self.running_mean is None or self.running_var is None):
            raise ValueError(
                f"stats_mode: {mode!r} needs running statistics, and this {type(self).__name__} was "
                "built with track_running_stats=False"
            )
        previous = self._stats_mode
        if mode == "frozen" and previous != "frozen":
            params = [p for p in (self.weight, self.bias) if p is not None]
            self._unfrozen = [p for p in params if p.requires_grad]  # what "frozen" turned off
            for p in params:
                p.requires_grad_(False)
        elif previous == "frozen" and mode != "frozen":
            for p in self.__dict__.pop("_unfrozen", []):
                p.requires_grad_(True)
        self._stats_mode = mode

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = None if mask is None else masked.layer_mask(mask, self)
        mode = self._stats_mode
        traced = F.traced(input)
        if traced and mode is None and mask is None:
            return super().forward(input)  # torch's own layer: standard operators in the graph
        if not traced:
            self._check_input_dim(input)
        running_mean, running_var, batch_stats, momentum = self._statistics()
        return F.batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            batch_stats,
            momentum,
            self.eps,
            mask=mask,
            backend=self.backend,
        )

    def _statistics(self):
        """(running_mean, running_var, use batch statistics, momentum) of this step under
        ``stats_mode``; counts the batch when it is tracked (the one place this is decided)."""
        mode = self._stats_mode
        if mode is None:
            momentum = self._momentum_for_step()
            batch_stats = self.training or (self.running_mean is None and self.running_var is None)
            track = not self.training or self.track_running_stats
        elif mode == "batch":  # batch statistics; running averages only in training
            momentum = self._momentum_for_step()
            batch_stats, track = True, self.training and self.track_running_stats
        else:  # "running" / "frozen": fixed running statistics, nothing updated, nothing counted
            momentum = 0.0 if self.momentum is None else self.momentum
            batch_stats, track = False, True
        return (self.running_mean if track else None, self.running_var if track else None, batch_stats, momentum)


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
        check_channels(input, self.num_features)
        momentum = self._momentum_for_step()
        return F.mean_only_batch_norm(
            input,
            self.running_mean,
            self.bias,
            training=self.training or self.running_mean is None,
            momentum=momentum,
            backend=self.backend,
        )
