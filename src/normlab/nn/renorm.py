r"""Batch Renormalization (Ioffe 2017): batch norm with r/d corrections toward the running statistics.

.. math::

    r = \operatorname{clip}_{[1/r_{max},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big),\quad
    d = \operatorname{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big),\quad
    y = \gamma\Big(\frac{x - \mu_B}{\sigma_B}\, r + d\Big) + \beta

(σ_B = sqrt(σ²_B + ε), σ = sqrt(running_var + ε); r, d stop-gradient). It fixes batch norm at
small and non-i.i.d. minibatches: the output in training no longer depends on the batch's own
statistics more than the clip allows, so training and inference agree.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from normlab import functional as F
from normlab._checks import check_int, check_limit
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "Ramp"]

Limit = float | Callable[[Tensor], "float | Tensor"]


class Ramp:
    """A warm-up schedule: ``start`` for ``delay`` steps, then linearly to ``end`` over ``steps`` steps.

    ``Ramp(start, end, steps, delay)(step)`` = start + (end − start) · clamp((step − delay) / steps, 0, 1).
    ``step`` may be an int or a 0-d tensor (the layer passes ``num_batches_tracked``, a tensor, so
    the schedule traces under torch.compile without a graph break). The paper's ImageNet schedule
    is ``r_max=Ramp(1, 3, 35_000, delay=5_000)``, ``d_max=Ramp(0, 5, 20_000, delay=5_000)``.
    """

    def __init__(self, start: float, end: float, steps: int, delay: int = 0) -> None:
        for v, name in ((start, "start"), (end, "end")):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
        check_int(steps, "steps", low=1)
        check_int(delay, "delay", low=0)
        self.start, self.end, self.steps, self.delay = float(start), float(end), steps, delay

    def __call__(self, step):
        if isinstance(step, Tensor):
            frac = ((step.to(torch.float64) - self.delay) / self.steps).clamp(0.0, 1.0)
        else:
            frac = min(max((step - self.delay) / self.steps, 0.0), 1.0)
        return self.start + (self.end - self.start) * frac

    def __repr__(self) -> str:
        return f"Ramp({self.start:g}, {self.end:g}, steps={self.steps}, delay={self.delay})"


class _BatchRenorm(_BatchNorm):
    r"""Batch Renormalization over (N, C, \*) (Ioffe 2017).

    .. math::

        r = \operatorname{clip}_{[1/r_{max},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big),\quad
        d = \operatorname{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big),\quad
        y = \gamma\Big(\frac{x - \mu_B}{\sigma_B}\, r + d\Big) + \beta

    σ_B = sqrt(σ²_B + ε) from the batch, μ = ``running_mean``, σ = sqrt(``running_var`` + ε)
    before this batch's update; r and d are constants for the gradient. Training: the formula,
    then the running statistics are updated as batch norm's. Eval: batch norm with the running
    statistics (so a trained layer folds like a BatchNorm). r_max = 1, d_max = 0 is batch norm.

    Arguments are torch.nn.BatchNorm's (``track_running_stats`` must be True: r and d need the
    running statistics) plus, keyword-only:

    * ``r_max`` (≥ 1, default 3) and ``d_max`` (≥ 0, default 5): numbers, or callables of the step
      (``num_batches_tracked`` as a 0-d tensor, before the step is counted) returning a number or
      a 0-d tensor, e.g. :class:`Ramp`. Use tensor ops in a callable to stay graph-break free.
    * ``warmup`` (int ≥ 0, default 0): with number limits, ramp them linearly from (1, 0) — batch
      norm — to (r_max, d_max) over the first ``warmup`` training steps.

    It is a subclass of normlab's (and torch's) BatchNorm{1,2,3}d, so BN tools (fold, freeze,
    recalibrate) apply. ``stats_mode`` accepts None, ``"running"`` and ``"frozen"``.
    """

    _STATS_MODES = (None, "running", "frozen")

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
        r_max: Limit = 3.0,
        d_max: Limit = 5.0,
        warmup: int = 0,
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        if track_running_stats is not True:
            raise ValueError(
                f"track_running_stats: Batch Renormalization needs running statistics (r and d are computed "
                f"from them), expected True, got {track_running_stats!r}"
            )
        check_limit(r_max, "r_max", 1.0, schedule=True)
        check_limit(d_max, "d_max", 0.0, schedule=True)
        check_int(warmup, "warmup", low=0)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, backend=backend)
        self.r_max, self.d_max, self.warmup = r_max, d_max, warmup

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, warmup={self.warmup}"

    def limits(self, step: Tensor | int | None = None):
        """(r_max, d_max) at ``step`` (default: the current ``num_batches_tracked``)."""
        step = self.num_batches_tracked if step is None else step
        r_max = self.r_max(step) if callable(self.r_max) else self.r_max
        d_max = self.d_max(step) if callable(self.d_max) else self.d_max
        if self.warmup and not callable(self.r_max):
            frac = Ramp(0.0, 1.0, self.warmup)(step)
            r_max = 1.0 + (r_max - 1.0) * frac
        if self.warmup and not callable(self.d_max):
            d_max = d_max * Ramp(0.0, 1.0, self.warmup)(step)
        return r_max, d_max

    def forward(self, input: Tensor) -> Tensor:
        if not F.traced(input):
            self._check_input_dim(input)
        renorm = self.training and self._stats_mode is None
        if not renorm:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False,
                                0.1, self.eps, backend=self.backend)
        r_max, d_max = self.limits()
        momentum = self._momentum_for_step()
        return F.batch_renorm(input, self.running_mean, self.running_var, self.weight, self.bias, True,
                              momentum, self.eps, r_max, d_max, backend=self.backend)


class BatchRenorm1d(_BatchRenorm, BatchNorm1d):
    """Batch Renormalization of (N, C) or (N, C, L) input. See :class:`_BatchRenorm`."""

    _dims = (2, 3)


class BatchRenorm2d(_BatchRenorm, BatchNorm2d):
    """Batch Renormalization of (N, C, H, W) input. See :class:`_BatchRenorm`."""

    _dims = (4,)


class BatchRenorm3d(_BatchRenorm, BatchNorm3d):
    """Batch Renormalization of (N, C, D, H, W) input. See :class:`_BatchRenorm`."""

    _dims = (5,)
