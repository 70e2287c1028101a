r"""Synchronized batch normalization across processes (data-parallel training), CPU and GPU.

:class:`SyncBatchNorm` is a :class:`torch.nn.SyncBatchNorm` (same constructor, state_dict, and
isinstance-based tools), computed by normlab: exact statistics of the batch concatenated over the
process group, for uneven and empty ranks, on any ``torch.distributed`` backend (gloo on CPU is
tested; nccl on GPU uses the same collectives). See :mod:`normlab.core.distributed` for the merge
formula and the backward.

Only BatchNorm needs this: GroupNorm, LayerNorm, InstanceNorm and RMSNorm compute their
statistics per sample, so they are identical with and without data parallelism and need no sync.
Mean-only batch norm (:class:`normlab.MeanOnlyBatchNorm`) *is* a batch statistic; its sync
variant is not implemented yet (it would need only the mean part of the same merge).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from normlab import functional as F
from normlab._checks import check_channels, check_dims, check_input
from normlab.core import distributed as D
from normlab.nn._base import RunningStats

__all__ = ["DistributedDataParallel", "SyncBatchNorm", "SyncBatchNormAct2d", "convert_sync_batchnorm", "revert_sync_batchnorm"]


class SyncBatchNorm(RunningStats, nn.SyncBatchNorm):
    r"""Batch normalization with statistics synchronised over ``process_group``.

    .. math:: y = \gamma_c \frac{x - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}} + \beta_c

    with μ_c, σ²_c (biased) over the N·∏spatial values of channel c of the batch **concatenated
    over every rank of the group** (each rank may hold a different N, including 0). Semantics:

    * training: outputs and input gradients equal single-process BatchNorm's on the concatenated
      batch; ``weight.grad``/``bias.grad`` are this rank's share (they sum over ranks to the
      single-process gradient, which is what DDP's gradient all-reduce does); one collective in
      the forward (an all-gather of (count, mean, M2) per channel, float64) and one in the
      backward (an all-reduce of Σg and Σg·x̂ per channel);
    * running statistics: updated with the global mean and the unbiased variance σ²·N/(N − 1)
      from the global count N, identical on every rank; ``momentum=None`` is the cumulative
      average, as in BatchNorm;
    * eval: running statistics, no communication; eval without running statistics
      (``track_running_stats=False``) uses synchronised batch statistics;
    * an empty local batch gives an empty output of shape (0, C, ...) and, in the backward, zero
      weight/bias gradients on that rank, but the rank still joins both collectives (every rank
      of the group must call forward and backward the same number of times);
    * ``torch.distributed`` not initialised, or a group of one rank: plain BatchNorm, no
      communication (so the same model runs in a single process);
    * channels_last in, channels_last out; float32/float64 use the fused CPU kernels for the
      local statistics and the normalize pass, other dtypes/devices the reference backend.

    Not supported: double backward (gradients of gradients); inside torch.compile the layer is
    a graph break (collectives run eagerly). Under torch.export / jit.trace it emits torch's
    local batch norm: export single-process models after :func:`revert_sync_batchnorm`.
    Extras (keyword-only): ``backend`` forces a normlab backend for the local kernels.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        self._validate(num_features, eps, momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
                         bias=bias)
        self.backend = backend

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor) or input.dim() < 2:
            check_dims(input, (2, 3, 4, 5), type(self).__name__)
        check_input(input, min_dim=2)
        check_channels(input, self.num_features)

    def forward(self, input: Tensor) -> Tensor:
        traced = F.traced(input)
        if not traced:
            self._check_input_dim(input)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = self.training and self.track_running_stats
        if traced or not batch_stats or not D.is_active(self.process_group):
            # eval with running statistics, or a single process: BatchNorm, no communication
            momentum = self._momentum_for_step() if not traced else (self.momentum or 0.0)
            use_running = not self.training or self.track_running_stats
            if traced:
                return TF.batch_norm(input, self.running_mean if use_running else None,
                                     self.running_var if use_running else None, self.weight, self.bias,
                                     batch_stats, momentum, self.eps)
            return F.batch_norm(input, self.running_mean if use_running else None,
                                self.running_var if use_running else None, self.weight, self.bias,
                                batch_stats, momentum, self.eps, backend=self.backend)
        if self.eps == 0:
            raise ValueError("eps: expected a number > 0 for batch statistics, got 0")
        y, count, mean, var = D.sync_batch_norm(input, self.weight, self.bias, self.eps, self.process_group,
                                                self.backend)
        momentum = self._momentum_for_step()  # counts the batch (as BatchNorm does, even when empty)
        if track and count > 0:
            with torch.no_grad():
                self.running_mean.mul_(1.0 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                unbiased = var * (count / (count - 1))
                self.running_var.mul_(1.0 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        return y


class SyncBatchNormAct2d(SyncBatchNorm):
    """:class:`SyncBatchNorm` followed by ``drop`` and ``act`` (``act(drop(bn(x)))``): what
    :func:`convert_sync_batchnorm` makes of :class:`normlab.nn.utils.BatchNormAct2d` (timm's
    layout), keeping the very ``drop``/``act`` modules and their state_dict keys."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 act: nn.Module | None = None, drop: nn.Module | None = None, bias: bool = True,
                 backend: str | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
                         bias=bias, backend=backend)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


class DistributedDataParallel(nn.parallel.DistributedDataParallel):
    """``torch.nn.parallel.DistributedDataParallel`` that accepts normlab's SyncBatchNorm on CPU.

    torch's DDP refuses every ``torch.nn.SyncBatchNorm`` instance in a CPU module ("SyncBatchNorm
    layers only work with GPU modules"), because torch's own implementation is CUDA-only; normlab's
    subclass works on any device and backend, so this subclass lifts the check for normlab's layers
    only (torch's own SyncBatchNorm on CPU is still refused). Otherwise identical to DDP.
    """

    def _passing_sync_batchnorm_handle(self, module):
        if self.device_type == "cpu":
            for layer in module.modules():
                if isinstance(layer, nn.SyncBatchNorm) and not isinstance(layer, SyncBatchNorm):
                    self._log_and_throw(ValueError, "SyncBatchNorm layers only work with GPU modules "
                                        "(torch's; use normlab.convert_sync_batchnorm for CPU)")
            return
        super()._passing_sync_batchnorm_handle(module)


# ------------------------------------------------------------------------------- conversion


def _plain_bn_classes():
    import normlab.nn.batchnorm as nb

    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nb.BatchNorm1d, nb.BatchNorm2d, nb.BatchNorm3d)


def _normlab_twin(cls: type) -> type:
    """normlab.BatchNorm1d/2d/3d for a (torch or normlab) BatchNorm class."""
    import normlab.nn.batchnorm as nb

    for base, twin in ((nn.BatchNorm1d, nb.BatchNorm1d), (nn.BatchNorm3d, nb.BatchNorm3d),
                       (nn.BatchNorm2d, nb.BatchNorm2d)):
        if issubclass(cls, base):
            return twin
    return nb.BatchNorm2d


def _own_forward(cls: type) -> bool:
    """Does ``cls`` (a BatchNorm subclass) define a forward of its own?"""
    import normlab.nn.batchnorm as nb

    known = {c.forward for c in _plain_bn_classes()} | {nb._BatchNorm.forward, nn.modules.batchnorm._BatchNorm.forward}
    return cls.forward not in known


def _bn_ctor(m: nn.Module) -> dict:
    return dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats, bias=getattr(m, "bias", None) is not None or m.weight is None)


def _move(new: nn.Module, old: nn.Module, children: dict | None = None) -> nn.Module:
    from normlab.nn.utils.convert import _adopt

    new = _adopt(new, old, children=children)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    if getattr(old, "backend", None):
        new.backend = old.backend
    return new


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (torch's or normlab's) in ``module`` by :class:`SyncBatchNorm`.

    The very parameter and buffer tensors move over (no copy: optimizer state stays valid), with
    the train/eval mode, hooks, ``qconfig`` and normlab's ``backend``; :class:`BatchNormAct2d`
    (timm's BatchNorm+drop+act layout) becomes :class:`SyncBatchNormAct2d` with the same
    ``drop``/``act`` modules. Returns ``module`` (or the new layer when ``module`` is itself one).
    Each new layer remembers its class so :func:`revert_sync_batchnorm` restores the dimension
    check. ``torch.nn.SyncBatchNorm`` layers get normlab's implementation (their process group
    is kept unless ``process_group`` is given).

    Compared with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, which builds a plain
    SyncBatchNorm for *any* ``_BatchNorm`` subclass: that silently drops a subclass's own
    ``forward`` (e.g. timm's BatchNormAct2d keeps its ``act`` child but never calls it,
    pytorch#187298), its hooks and extra attributes, and the 1d/2d/3d input check. Here a
    subclass that defines its own forward (other than BatchNormAct2d) is left as it is, with a
    warning, rather than converted into something that computes differently.
    """
    import normlab.nn.batchnorm as nb
    from normlab.nn.utils.norm_act import BatchNormAct2d

    def convert(m: nn.Module, path: str) -> nn.Module:
        new = None
        if isinstance(m, nn.SyncBatchNorm):
            if type(m) is nn.SyncBatchNorm:
                group = process_group if process_group is not None else m.process_group
                new = _move(SyncBatchNorm(**_bn_ctor(m), process_group=group, device="meta"), m)
                new._revert_to = getattr(m, "_revert_to", None)
            elif process_group is not None and isinstance(m, SyncBatchNorm):
                m.process_group = process_group
        elif isinstance(m, BatchNormAct2d) and type(m).forward is BatchNormAct2d.forward:
            new = SyncBatchNormAct2d(**_bn_ctor(m), process_group=process_group, device="meta")
            new = _move(new, m, children=dict(m.named_children()))
            new._revert_to = type(m)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nb._BatchNorm)) and not isinstance(m, nn.SyncBatchNorm):
            if _own_forward(type(m)):
                warnings.warn(
                    f"convert_sync_batchnorm: left {path or '<model>'} ({type(m).__qualname__}) unsynchronised: "
                    "it defines its own forward, which a SyncBatchNorm would silently drop", stacklevel=3)
            elif getattr(m, "stats_mode", None) is not None:
                warnings.warn(f"convert_sync_batchnorm: left {path or '<model>'} unsynchronised: stats_mode="
                              f"{m.stats_mode!r} is not supported by SyncBatchNorm", stacklevel=3)
            else:
                new = _move(SyncBatchNorm(**_bn_ctor(m), process_group=process_group, device="meta"), m)
                new._revert_to = _normlab_twin(type(m))
        out = m if new is None else new
        for name, child in list(out.named_children()):
            out._modules[name] = convert(child, f"{path}.{name}" if path else name)
        return out

    return convert(module, "")


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every SyncBatchNorm (normlab's or torch's) by a single-process normlab BatchNorm.

    The inverse of :func:`convert_sync_batchnorm` for single-process evaluation or export: the
    same tensors move back, and each layer becomes the normlab class it came from (BatchNorm1d,
    2d, 3d, or BatchNormAct2d). A SyncBatchNorm built directly (not by
    :func:`convert_sync_batchnorm`) has no recorded input rank and becomes
    :class:`normlab.BatchNorm2d` (whose input check wants 4-D input). Returns ``module`` (or the
    new layer when ``module`` is itself a SyncBatchNorm).
    """
    import normlab.nn.batchnorm as nb
    from normlab.nn.utils.norm_act import BatchNormAct2d

    def revert(m: nn.Module) -> nn.Module:
        new = None
        if isinstance(m, nn.SyncBatchNorm):
            cls = getattr(m, "_revert_to", None) or nb.BatchNorm2d
            new = _move(cls(**_bn_ctor(m), device="meta"), m, children=dict(m.named_children()) or None)
        out = m if new is None else new
        for name, child in list(out.named_children()):
            out._modules[name] = revert(child)
        return out

    return revert(module)
