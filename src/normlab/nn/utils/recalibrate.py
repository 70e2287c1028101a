r"""``normlab.recalibrate_batchnorm``: recompute BatchNorm's population statistics from data.

After SWA weight averaging, pruning, quantization or any edit of the weights, the running
statistics no longer describe the activations (pytorch#49082, #52055).
:func:`recalibrate_batchnorm` runs the data through the model once, without gradients, and sets
every BatchNorm's statistics from it.

``exact=True`` (default): the statistics of *all* values each BN layer saw, pooled over the
batches (float64 sums, Chan's parallel update), i.e. the population mean and the unbiased
population variance

.. math:: \mu_c = \frac{1}{n}\sum x, \qquad \sigma^2_c = \frac{1}{n-1}\sum (x - \mu_c)^2

— independent of how the data was batched. ``exact=False``: torch's cumulative average
(``momentum=None``: the plain mean of the per-batch means and of the per-batch unbiased
variances), which is what ``torch.optim.swa_utils.update_bn`` computes. The two agree for the
mean when batches have equal sizes; the variances differ by the spread of the batch means
(the per-batch variances miss it), unless the loader has one batch.

During the pass BatchNorm layers are in train mode (each batch is normalized with its own
statistics, as in training and as ``update_bn`` does) and every other module is in eval mode
(dropout off: the statistics are those of the activations the eval-mode model sees); afterwards
momentum, every module's train/eval mode and normlab's ``stats_mode`` are restored (also when the
forward raises, which restores the old statistics too). ``num_batches_tracked`` becomes the
number of batches seen. Works on torch's and normlab's BatchNorm layers (and MeanOnlyBatchNorm);
layers without running statistics are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from normlab._checks import check_positive_int
from normlab.nn.batchnorm import _BatchNorm
from normlab.nn.utils.layer_types import is_batch_norm

__all__ = ["recalibrate_batchnorm"]


def _default_forward(model: nn.Module, batch):
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


class _Pooled:
    """Running float64 count, mean and M2 of one BN layer's input, per channel (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = None
        self.m2 = None

    def __call__(self, module: nn.Module, args) -> None:
        x = args[0].detach()
        if x.numel() == 0:
            return
        c = x.shape[1]
        x = x.to(torch.float64).transpose(0, 1).reshape(c, -1)
        nb = x.shape[1]
        mb = x.mean(dim=1)
        m2b = ((x - mb[:, None]) ** 2).sum(dim=1)
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n


def recalibrate_batchnorm(
    model: nn.Module,
    loader: Iterable,
    forward_fn: Callable[[nn.Module, object], object] | None = None,
    *,
    num_batches: int | None = None,
    exact: bool = True,
) -> nn.Module:
    """Recompute the running statistics of every BatchNorm in ``model`` from ``loader``.

    Args:
        model: the model (modified in place: only BN running statistics change).
        loader: an iterable of batches (a DataLoader, a list of tensors, ...).
        forward_fn: ``forward_fn(model, batch)`` runs one batch; default ``model(batch[0])`` for a
            tuple/list batch (``(inputs, targets)``), ``model(batch)`` otherwise. Use it for
            keyword inputs, dicts, or to move the batch to the model's device.
        num_batches: use at most this many batches (default: the whole loader).
        exact: pooled population statistics (default) or torch's cumulative average of the
            per-batch statistics (``momentum=None``, as ``swa_utils.update_bn``); see the module
            docstring.

    Returns:
        ``model``.

    Example::

        >>> import torch, normlab
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        >>> data = [torch.randn(16, 4) for _ in range(3)]
        >>> _ = normlab.recalibrate_batchnorm(net, data)
        >>> int(net[1].num_batches_tracked)
        3
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    check_positive_int(num_batches, "num_batches", allow_none=True)
    forward_fn = forward_fn or _default_forward
    bns = [
        m for m in model.modules()
        if is_batch_norm(m) and getattr(m, "running_mean", None) is not None
    ]
    if not bns:
        return model
    modes = {m: m.training for m in model.modules()}
    saved = {m: (m.momentum, getattr(m, "_stats_mode", None),
                 {k: v.clone() for k, v in m._buffers.items() if v is not None}) for m in bns}
    pooled = {m: _Pooled() for m in bns}
    handles = [m.register_forward_pre_hook(pooled[m]) for m in bns] if exact else []
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            if isinstance(m, _BatchNorm):
                m._stats_mode = None  # plain train-mode BN for the pass (requires_grad untouched)
            m.train()
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if num_batches is not None and i >= num_batches:
                    break
                forward_fn(model, batch)
        if exact:
            for m, acc in pooled.items():
                if acc.n == 0:
                    continue
                m.running_mean.copy_(acc.mean.to(m.running_mean))
                if m.running_var is not None:
                    var = acc.m2 / (acc.n - 1) if acc.n > 1 else torch.zeros_like(acc.m2)
                    m.running_var.copy_(var.to(m.running_var))
    except BaseException:
        for m, (_, _, bufs) in saved.items():
            for k, v in bufs.items():
                m._buffers[k].copy_(v)
        raise
    finally:
        for h in handles:
            h.remove()
        for m, (momentum, stats_mode, _) in saved.items():
            m.momentum = momentum
            if isinstance(m, _BatchNorm):
                m._stats_mode = stats_mode
        for m, t in modes.items():
            m.training = t
    return model
