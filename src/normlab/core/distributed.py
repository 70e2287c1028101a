r"""Exact cross-process batch-norm statistics over ``torch.distributed`` (any backend, any group).

Forward: every rank computes its local per-channel (count nᵢ, mean μᵢ, M2ᵢ = nᵢσᵢ²) with the fused
kernel (float64 statistics on the CPU), the ranks exchange them in ONE ``all_gather_single``
of a (2C + 1,) float64 vector, and every rank merges them with Chan et al.'s parallel formula
generalised to k parts:

.. math::

    N = \sum_i n_i, \qquad \mu = \frac{1}{N}\sum_i n_i \mu_i, \qquad
    M_2 = \sum_i M_{2,i} + \sum_i n_i (\mu_i - \mu)^2, \qquad \sigma^2 = M_2 / N.

This is not E[x²] − E[x]²: a channel with a large offset loses nothing, and a rank with nᵢ = 0
contributes exactly nothing (it still joins the collective). Every rank merges the same gathered
matrix in the same order, so the statistics (and running statistics) are bitwise identical on
every rank.

Backward: with x̂ = (x − μ)·rstd and the local sums s₁ = Σ g, s₂ = Σ g·x̂ (per channel, over the
local batch), ONE ``all_reduce`` of the (2C,) float64 vector (s₁, s₂) gives the global sums S₁,
S₂, and

.. math:: \frac{\partial L}{\partial x} = \gamma\,\mathrm{rstd}\,\Big(g - \frac{S_1}{N} - \hat x\,\frac{S_2}{N}\Big),
          \qquad \frac{\partial L}{\partial \gamma}\Big|_{\text{rank}} = s_2, \qquad
          \frac{\partial L}{\partial \beta}\Big|_{\text{rank}} = s_1.

The weight/bias gradients are each rank's local share (torch.nn.SyncBatchNorm's semantics: DDP's
gradient all-reduce sums them to the single-process gradient). The input gradient uses the fused
backward kernel (which returns the local dx and s₁, s₂ in one call) plus a per-channel affine
correction from the local to the global sums done by the fused eval kernel:
dx = dx_local + γ·rstd·((s₁/n − S₁/N) + x̂ (s₂/n − S₂/N)).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from normlab.core import ops

__all__ = ["comm_stats", "is_active", "merge_moments", "sync_batch_norm", "gather_moments"]

#: wall seconds and number of SyncBatchNorm collectives in this process (forward all-gathers and
#: backward all-reduces), for profiling; :func:`comm_stats` reads and optionally resets it
_COMM = {"seconds": 0.0, "calls": 0}


def comm_stats(reset: bool = False) -> dict:
    """{"seconds", "calls"} spent in SyncBatchNorm's collectives in this process so far."""
    out = dict(_COMM)
    if reset:
        _COMM.update(seconds=0.0, calls=0)
    return out


def _timed(fn, *args, **kw):
    t = time.perf_counter()
    fn(*args, **kw)
    _COMM["seconds"] += time.perf_counter() - t
    _COMM["calls"] += 1


def is_active(group=None) -> bool:
    """True when ``torch.distributed`` is initialised and ``group`` has more than one rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    size = dist.get_world_size(group)
    if size < 0:
        raise RuntimeError("process_group: this rank is not a member of the layer's process group")
    return size > 1


def _local_moments(x: Tensor, eps: float, backend: str):
    """(n, mean, M2) of the local batch: n a Python int, mean and M2 float64 (C,)."""
    c = x.shape[1]
    n = x.numel() // c if c else 0
    if n == 0:
        z = torch.zeros(c, dtype=torch.float64, device=x.device)
        return 0, z, z
    _, mean, var, _ = ops._batch_norm_impl(x, None, None, eps, False, backend)
    return n, mean.to(torch.float64), var.to(torch.float64) * n


def merge_moments(counts: Tensor, means: Tensor, m2s: Tensor):
    r"""Merge per-part (count (k,), mean (k, C), M2 (k, C)) into (N, mean (C,), biased var (C,)).

    Chan's parallel formula; parts with count 0 contribute nothing. With N = 0 the mean and
    variance are zeros (there is nothing to normalize).
    """
    total = counts.sum()
    n = float(total)
    if n == 0:
        return 0, torch.zeros_like(means[0]), torch.zeros_like(means[0])
    w = (counts / total).unsqueeze(1)
    mean = (w * means).sum(0)
    m2 = m2s.sum(0) + (counts.unsqueeze(1) * (means - mean) ** 2).sum(0)
    return int(round(n)), mean, m2 / n


def gather_moments(n: int, mean: Tensor, m2: Tensor, group=None):
    """All ranks' (count, mean, M2) by one all-gather, merged: (N, mean, var)."""
    c = mean.shape[0]
    size = dist.get_world_size(group)
    local = torch.cat([mean.new_tensor([float(n)]), mean, m2])
    out = local.new_empty(size * (2 * c + 1))
    _all_gather(out, local, group=group)
    parts = out.view(size, 2 * c + 1)
    return merge_moments(parts[:, 0], parts[:, 1:c + 1], parts[:, c + 1:])


def _all_gather(out: Tensor, local: Tensor, group=None) -> None:
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _timed(gather, out, local, group=group)


class _SyncBatchNorm(torch.autograd.Function):
    """y = BN(x) with statistics of the concatenated batch over ``group``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, backend, out):
        n, mean_l, m2_l = _local_moments(x, eps, backend)
        count, mean, var = gather_moments(n, mean_l, m2_l, group)
        if count == 1:
            raise ValueError(
                "input: SyncBatchNorm in training needs more than 1 value per channel over all ranks, got 1")
        rstd = torch.rsqrt(var + eps)
        if x.numel():
            y = ops._batch_norm_eval_impl(x, mean, var, weight, bias, eps, False, backend)
        else:
            y = ops._empty_out(x, True).zero_()
        ctx.save_for_backward(x, weight, mean, var, rstd)
        ctx.meta = (n, count, eps, group, backend, None if bias is None else bias.dtype)
        out.extend((count, mean, var))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, var, rstd = ctx.saved_tensors
        n, count, eps, group, backend, bias_dtype = ctx.meta
        c = x.shape[1]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # γ (ones without affine) so that the kernel's dx carries γ; dγ = Σg·x̂ and dβ = Σg do not depend on it
        w = torch.ones(c, dtype=x.dtype, device=x.device) if weight is None else weight.detach()
        if n:
            dx_l, s2, s1 = ops._batch_norm_backward_impl(dy, x, w, mean, rstd, eps, False, backend,
                                                         [need_x, True, True])
            s1, s2 = s1.to(torch.float64), s2.to(torch.float64)
        else:
            dx_l = None
            s1 = s2 = torch.zeros(c, dtype=torch.float64, device=x.device)
        local = torch.cat([s1, s2])
        total = local.clone()
        _timed(dist.all_reduce, total, group=group)  # the one collective of the backward
        S1, S2 = total[:c], total[c:]
        dx = dw = db = None
        if need_x:
            if n:
                g = rstd if weight is None else rstd * weight.detach().to(torch.float64)
                k1 = g * (s1 / n - S1 / count)
                k2 = g * (s2 / n - S2 / count)
                # x̂·k2 + k1 by the fused eval kernel (its rstd is rsqrt(var + eps) = rstd)
                corr = ops._batch_norm_eval_impl(x, mean, var, k2, k1, eps, False, backend)
                dx = dx_l.add_(corr)
            else:
                dx = ops._empty_out(x, True).zero_()
        if need_w and weight is not None:
            dw = s2.to(weight.dtype)
        if need_b and bias_dtype is not None:
            db = s1.to(bias_dtype)
        return dx, dw, db, None, None, None, None


def _sync_batch_norm(x: Tensor, weight, bias, eps: float, group=None, backend: str | None = None):
    r"""Training batch norm of ``x`` (N, C, \*) with the statistics of the batch concatenated over
    ``group``: returns (y, N, mean, biased var), the statistics float64 (C,) and identical on
    every rank. ``x`` may be empty (N = 0) on some ranks; every rank must call this."""
    out: list = []
    y = _SyncBatchNorm.apply(x, weight, bias, float(eps), group, backend or "", out)
    count, mean, var = out
    return y, count, mean, var


def __getattr__(name: str):
    # ``sync_batch_norm`` is ``_sync_batch_norm`` behind ``torch.compiler.disable`` (dynamo must not
    # trace the collectives), applied on first use: the decorator imports torch._dynamo, which
    # costs ~7 s of every ``import normlab`` on a 2-core machine, for a function only multi-process
    # training calls.
    if name == "sync_batch_norm":
        fn = globals()[name] = torch.compiler.disable(_sync_batch_norm)
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
