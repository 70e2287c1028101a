"""Running-statistic updates on the CPU: one serial kernel call instead of four tensor ops.

``running ← (1 − momentum)·running + momentum·(scale·batch)`` in place. As tensor ops
(``mul_``, a cast, ``add_``, the unbias product) a BatchNorm step paid ~60 µs of dispatch here for
two (C,) vectors — more than normalizing a small activation. The roundings are the tensor ops':
scale·batch in batch's precision (float64 statistics), cast to running's dtype, then the two
in-place steps in running's dtype (no FMA: ``jit`` never enables ``contract``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from normlab.core.cpu.jit import helper
from normlab.core.cpu.params import NP_DTYPE, held_view

__all__ = ["takes", "update_bn_running", "update_running", "warmup"]


@helper
def _ema(running, batch, momentum, scale):
    T = running.dtype.type
    keep = T(1.0 - momentum)
    m = T(momentum)
    for i in range(running.shape[0]):
        running[i] = running[i] * keep + m * T(batch[i] * scale)


@helper
def _ema2(running_mean, running_var, mean, var, momentum, unbias):
    T = running_mean.dtype.type
    keep = T(1.0 - momentum)
    m = T(momentum)
    for i in range(running_mean.shape[0]):
        running_mean[i] = running_mean[i] * keep + m * T(mean[i])
        running_var[i] = running_var[i] * keep + m * T(var[i] * unbias)


def takes(running: Tensor, batch: Tensor) -> bool:
    """Plain contiguous float32/float64 CPU tensors of the same size (running outside autograd)."""
    return (type(running) is Tensor and type(batch) is Tensor and running.device.type == "cpu"
            and batch.device.type == "cpu" and running.dtype in NP_DTYPE and batch.dtype in NP_DTYPE
            and not running.requires_grad and running.is_contiguous() and batch.is_contiguous()
            and running.numel() == batch.numel())


def update_running(running: Tensor, batch: Tensor, momentum: float, scale: float = 1.0) -> None:
    """running ← (1 − momentum)·running + momentum·scale·batch, in place (see :func:`takes`); the
    version counter is bumped as an in-place tensor op would, so autograd still sees the write."""
    _ema(held_view(running), batch.detach().numpy().reshape(-1), float(momentum), float(scale))
    torch.autograd.graph.increment_version(running)


def update_bn_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float,
                      unbias: float) -> None:
    """Both batch-norm updates in one call: :func:`update_running` of ``running_mean`` with ``mean``
    and of ``running_var`` with ``var``·``unbias`` (the tensors as :func:`takes` requires, and
    both running tensors of one dtype)."""
    _ema2(held_view(running_mean), held_view(running_var), mean.detach().numpy().reshape(-1),
          var.detach().numpy().reshape(-1), float(momentum), float(unbias))
    torch.autograd.graph.increment_version(running_mean)
    torch.autograd.graph.increment_version(running_var)


def warmup(dt: torch.dtype) -> None:
    """Compile (or load) the updates for running statistics of dtype ``dt`` (float64 batch)."""
    r, b = np.zeros(1, NP_DTYPE[dt]), np.zeros(1)
    _ema(r, b, 0.1, 1.0)
    _ema2(r, r.copy(), b, b, 0.1, 1.0)
