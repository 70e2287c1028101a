"""CPU backend: fused numba kernels for every normlab op (see docs/CONTRACTS.md).

Ops: ``batch_norm`` (training; also mean-only), ``batch_norm_eval``, ``group_norm`` (InstanceNorm
is G = C), ``layer_norm`` (also RMSNorm), ``layer_norm_channels`` (channels-first layer norm).
Each has a fused forward kernel and a fused backward kernel that returns dx, dγ and dβ together.

Support (``supports(op, x)``): strided CPU tensors of dtype float32 or float64 with at least one
element (and at least 2 dims for batch/group norm). float16 / bfloat16, other devices and empty
tensors are not supported: dispatch then falls back to the reference backend.

Memory layouts
    * contiguous (NCHW, NCL, NCDHW, (N, C), any trailing shape for layer norm): native;
    * channels-last (``channels_last`` / ``channels_last_3d``, or any tensor whose
      ``x.movedim(1, -1)`` is contiguous): native for batch and group norm, the kernels run
      along the contiguous channel axis; y and dx keep x's strides;
    * anything else (sliced, permuted views): ONE ``.contiguous()`` copy of x, then the
      contiguous path; layer norm on a non-contiguous input also copies (and converts y back
      to channels_last when x was channels_last). An upstream gradient whose layout differs
      from x's is copied once into x's layout.

Package layout
    * one module per memory-layout family, each holding its forward and backward kernels and
      its plan type (which launches them):
      ``rows`` (``RowsPlan``): layer norm, RMS norm, group/instance norm on contiguous input;
      ``planes`` (``PlanesPlan``): batch norm on contiguous input (per-channel planes);
      ``channels_last`` (``ChannelsLastPlan``): batch norm and group/instance norm on
      channels-last input, and batch norm of an (N, C) matrix;
      ``cols`` (``ColsPlan``): channels-first layer norm (statistics over C) on NCHW input
      (on channels-last input it is a row layer norm);
    * ``shared``: the numerics the families share (block sums with the float64 fallback, the
      mean split, the backward formula, the per-thread partial reduction), written once;
    * ``jit``: compile flags, the on-disk cache and its location, the decorators;
    * ``plan``: the marshalling every plan shares; ``params``: γ/β views, dγ/dβ buffers;
      ``pool``: the output-buffer pool; ``threads``: thread counts and kernel launches;
    * this module: the backend interface (``supports``, the ops, ``warmup``) and the choice of
      family. A plan is cached per (op, shape, strides, options), so a call does little Python
      work. Each kernel compiles once per dtype (float32, float64).

Statistics are accumulated in float64 (block sums in the input dtype, see ``shared``), are exact
for a 1e6 offset, a constant input (y = β, finite gradients) and |x| ≈ 1e30 in float32; NaN/Inf
propagate (no fast-math flags that assume finite values). The statistics returned (and saved
for the backward) are float64. float64 inputs whose squares overflow float64 (|x| ≳ 1e154) are
detected after the forward and recomputed by the reference backend.

Autograd
    None here: the functions below are the CPU kernels of the ``normlab::`` operators, and
    ``core/ops.py`` registers one autograd formula per operator for every backend.

Threads (``threads``)
    Every call sets numba's thread count to ``torch.get_num_threads()`` (capped at
    ``numba.config.NUMBA_NUM_THREADS``), so ``torch.set_num_threads`` controls both; inputs of
    fewer than ``PARALLEL_MIN_NUMEL`` elements run on one thread.

Output buffers (``pool``)
    Outputs (y, dx) of at least ``POOL_MIN_BYTES`` come from a free-list of numpy blocks that
    a block rejoins only when the last tensor referencing it is freed, which avoids the page
    faults of a fresh multi-MiB allocation. Pool size: ``NORMLAB_CPU_POOL_MB`` (default 2048;
    0 disables), or :func:`set_buffer_pool`. Pool-backed tensors are ordinary tensors except
    that their storage cannot grow (``resize_`` to a larger size raises).

Compilation: kernels compile on first use per dtype (a few seconds each) and are cached on
disk; see ``jit`` for the cache location when the package is read-only, and :func:`supports`
for ``NORMLAB_CPU_COMPILE``.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import torch
from torch import Tensor

from normlab.core import reference
from normlab.core.cpu import threads  # noqa: F401 - cpu.threads.PARALLEL_MIN_NUMEL is the setting
from normlab.core.cpu.channels_last import ChannelsLastPlan
from normlab.core.cpu.cols import ColsPlan
from normlab.core.cpu.jit import CACHE, CACHE_DIR
from normlab.core.cpu.params import NP_DTYPE, f64
from normlab.core.cpu.plan import Plan, cached, is_channels_last
from normlab.core.cpu.planes import GhostPlanesPlan, PlanesPlan
from normlab.core.cpu.pool import (POOL_MIN_BYTES, buffer_pool_stats, clear_buffer_pool,
                                   set_buffer_pool)
from normlab.core.cpu.pool import pool as _pool  # noqa: F401 - cpu._pool: the pool's cap, stats
from normlab.core.cpu.rows import RowsPlan
from normlab.core.cpu.pointwise import (POINTWISE_OPS, dynamic_erf, dynamic_erf_backward, dynamic_tanh,
                                        dynamic_tanh_backward, filter_response_norm,
                                        filter_response_norm_backward)
from normlab.core.cpu.pointwise import warmup as _warmup_pointwise
from normlab.core.cpu.evonorm import (EVONORM_OPS, evonorm_b0, evonorm_b0_backward, evonorm_s0,
                                      evonorm_s0_backward)
from normlab.core.cpu.evonorm import warmup as _warmup_evonorm
from normlab.core.cpu.running import takes as running_takes
from normlab.core.cpu.running import update_bn_running, update_running
from normlab.core.cpu.running import warmup as _warmup_running
from normlab.core.cpu.threads import PARALLEL_MIN_NUMEL, start_pool

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_eval_backward",
    "group_norm",
    "group_norm_backward",
    "ghost_batch_norm",
    "ghost_batch_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "layer_norm_channels",
    "layer_norm_channels_backward",
    "dynamic_tanh",
    "dynamic_tanh_backward",
    "dynamic_erf",
    "dynamic_erf_backward",
    "filter_response_norm",
    "filter_response_norm_backward",
    "evonorm_s0",
    "evonorm_s0_backward",
    "evonorm_b0",
    "evonorm_b0_backward",
    "supports",
    "wait_ready",
    "running_takes",
    "update_running",
    "update_bn_running",
    "lane",
    "lane_forward",
    "lane_backward",
    "set_buffer_pool",
    "clear_buffer_pool",
    "buffer_pool_stats",
    "warmup",
    "CACHE",
    "CACHE_DIR",
    "COMPILE_MODE",
    "OPS",
    "PARALLEL_MIN_NUMEL",
    "POOL_MIN_BYTES",
]

OPS = ("batch_norm", "batch_norm_eval", "group_norm", "ghost_batch_norm", "layer_norm", "layer_norm_channels", *POINTWISE_OPS,
       *EVONORM_OPS)


def _takes(op: str, x: Tensor) -> bool:
    """float32/float64 strided CPU tensors with elements; (N, C, ...) except for layer norm."""
    if op not in OPS or not isinstance(x, Tensor):
        return False
    if x.device.type != "cpu" or x.layout != torch.strided or x.dtype not in NP_DTYPE:
        return False
    if x.numel() == 0 or x.is_conj() or x.is_neg():
        return False
    if op == "evonorm_b0":
        return x.dim() >= 3
    return x.dim() >= 1 if op in ("layer_norm", *POINTWISE_OPS) else x.dim() >= 2


def supports(op: str, x: Tensor) -> bool:
    """The kernels take ``x`` and can run now (see :func:`wait_ready`).

    Kernels compile on first use (a few seconds each, once per dtype; later processes load them
    from the disk cache in milliseconds; ``warmup()`` or ``make`` prebuilds the cache). With
    ``NORMLAB_CPU_COMPILE=background`` the first call for a dtype instead starts compiling every
    kernel of that dtype in a background thread and returns False until they are ready, so the
    caller falls back to the reference backend rather than wait: an interactive first step costs
    what the reference costs. That mode trades bitwise reproducibility (which steps ran on which
    backend depends on timing) for latency, so it is opt-in.
    """
    return _takes(op, x) and (COMPILE_MODE != "background" or _ready(x.dtype, wait=False))


def wait_ready(op: str, x: Tensor) -> bool:
    """Like :func:`supports`, but waits for the kernels (the backend was asked for by name)."""
    return _takes(op, x) and (COMPILE_MODE != "background" or _ready(x.dtype, wait=True))


# --------------------------------------------------------------------------------------------
# compilation
# --------------------------------------------------------------------------------------------

COMPILE_MODE = os.environ.get("NORMLAB_CPU_COMPILE", "lazy")  # "lazy" | "background"
_compiled: dict[torch.dtype, threading.Event] = {}
_compile_lock = threading.Lock()


def _ready(dtype: torch.dtype, wait: bool) -> bool:
    """Background mode: are dtype's kernels compiled (starting their compilation if not)?"""
    event = _compiled.get(dtype)
    if event is None:
        with _compile_lock:
            event = _compiled.get(dtype)
            if event is None:
                event = _compiled[dtype] = threading.Event()
                start_pool()  # in the caller's thread: the pool keeps torch's thread count
                threading.Thread(target=_warm, args=(dtype, event), daemon=True,
                                 name=f"normlab-compile-{dtype}").start()
    if wait:
        event.wait()
    return event.is_set()


def _warm(dtype: torch.dtype, event: threading.Event) -> None:
    try:
        warmup((dtype,))
    finally:
        event.set()


# --------------------------------------------------------------------------------------------
# plans and ops: a plan per (op, shape, strides, dtype, options), built once and cached. No
# autograd here: these are the CPU kernels of the ``normlab::`` operators (core/ops.py registers
# autograd once for every backend).
# --------------------------------------------------------------------------------------------


def _overflowed(mean: np.ndarray, var: np.ndarray) -> bool:
    """Σd² overflowed float64: var is +inf, or inf − inf = NaN while the mean is finite.

    (A NaN input makes the mean NaN too; that is propagated, not recomputed.)
    """
    return bool(np.isposinf(var).any() or (np.isnan(var) & np.isfinite(mean)).any())


def _nc_layout(x: Tensor) -> tuple[bool, bool]:
    """(channels_last, needs a .contiguous() copy) for an (N, C, *) input."""
    if x.is_contiguous():
        return False, False
    if is_channels_last(x):
        return True, False
    return False, True


def _bn_plan(x: Tensor, eps: float, train: bool, center: bool) -> Plan:
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    cl, copy = _nc_layout(x)
    common = dict(eps=eps, train=train, center=center, pcount=c, stat_shape=(c,), copy=copy)
    if cl:
        return ChannelsLastPlan((n * s, c), n=1, groups=c, channels_last=True, **common)
    if s == 1:  # (N, C) rows: the channels-last kernel on the same memory
        return ChannelsLastPlan((n, c), n=1, groups=c, **common)
    return PlanesPlan((n * c, s), n=n, **common)


def _gbn_plan(x: Tensor, g: int, eps: float) -> Plan:
    n, c = x.shape[0], x.shape[1]
    k, s = n // g, x.numel() // (n * c)
    cl, copy = _nc_layout(x)
    common = dict(eps=eps, pcount=c, stat_shape=(k, c), copy=copy)
    # channels innermost: a virtual batch is a block of g·S rows, which the channels-last kernels
    # treat as one of k "samples" with per-channel groups (one launch); contiguous: one planes
    # launch per virtual batch's slab
    if cl:
        return ChannelsLastPlan((n * s, c), n=k, groups=c, channels_last=True, **common)
    if s == 1:
        return ChannelsLastPlan((n, c), n=k, groups=c, **common)
    return GhostPlanesPlan((n * c, s), n=g, k=k, **common)


def _gn_plan(x: Tensor, g: int, eps: float) -> Plan:
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    cl, copy = _nc_layout(x)
    common = dict(eps=eps, pcount=c, stat_shape=(n, g), copy=copy)
    if cl:
        return ChannelsLastPlan((n * s, c), n=n, groups=g, channels_last=True, **common)
    return RowsPlan((n * g, (c // g) * s), groups=g, seg=s, **common)


def _ln_plan(x: Tensor, k: int, eps: float, rms: bool) -> Plan:
    lead = tuple(x.shape[: x.dim() - k])
    cols = math.prod(x.shape[x.dim() - k:])
    return RowsPlan((x.numel() // cols, cols), eps=eps, rms=rms, pcount=cols, stat_shape=lead,
                    copy=not x.is_contiguous())


def _bn_key(x, eps, center, train) -> Plan:
    return cached(("bn", train, x.shape, x.stride(), eps, center), lambda: _bn_plan(x, eps, train, center))


def _gn_key(x, g, eps) -> Plan:
    return cached(("gn", x.shape, x.stride(), g, eps), lambda: _gn_plan(x, g, eps))


def _gbn_key(x, g, eps) -> Plan:
    return cached(("gbn", x.shape, x.stride(), g, eps), lambda: _gbn_plan(x, g, eps))


def _ln_key(x, k, eps, rms) -> Plan:
    return cached(("ln", x.shape, x.stride(), k, eps, rms), lambda: _ln_plan(x, k, eps, rms))


# float64 means of x over each statistic group, the slow, obvious way (see _inf_means)
def _channel_means(x: Tensor) -> np.ndarray:
    return x.detach().double().transpose(0, 1).reshape(x.shape[1], -1).mean(1).numpy()


def _sample_means(groups: int):
    return lambda x: x.detach().double().reshape(x.shape[0], groups, -1).mean(-1).numpy()


def _virtual_means(g: int):
    return lambda x: x.detach().double().reshape(x.shape[0] // g, g, x.shape[1], -1).mean((1, 3)).numpy()


def _row_means(cols: int):
    return lambda x: x.detach().double().reshape(-1, cols).mean(-1).numpy()


def _inf_means(mean: np.ndarray, exact) -> None:
    """Where a group holds ±Inf the kernels' shifted sums give NaN (Inf − Inf); torch's mean is
    +Inf or −Inf there (NaN only if both signs or a NaN occur). Rare: recompute those groups."""
    bad = np.isnan(mean)
    if bad.any():
        mean[bad] = exact().reshape(mean.shape)[bad]


def _forward(plan: Plan, x: Tensor, weight, bias, group_means):
    """(y, mean, var, rstd) with float64 statistics shaped ``plan.stat_shape``, or None when the
    float64 sums of squares overflowed (|x| ≳ 1e154) and the caller must use the reference.
    ``group_means(x)``: the exact means, for the rare groups holding ±Inf."""
    if plan.copy:
        x = x.contiguous()
    y, mean, var, rstd = plan.forward(x, weight, bias)
    if x.dtype == torch.float64 and _overflowed(mean, var):
        return None
    if plan.has_mean:
        _inf_means(mean, lambda: group_means(x))
    shape = plan.stat_shape
    return (y, torch.from_numpy(mean.reshape(shape)), torch.from_numpy(var.reshape(shape)),
            torch.from_numpy(rstd.reshape(shape)))


def _backward(plan: Plan, dy, x, weight, mean, rstd, mask):
    if plan.copy:
        x = x.contiguous()
    if rstd is None or rstd.numel() == 0:  # mean-only batch norm: rstd = 1
        rstd = torch.ones_like(mean, dtype=torch.float64)
    # dβ comes back flat in x's dtype; the operator reshapes and casts it to β's dtype.
    dx, dw, db = plan.backward(x, dy, weight, ((plan.pcount,), x.dtype), f64(mean), f64(rstd),
                               mask[1] and weight is not None, mask[2])
    return (dx if mask[0] else None), dw, db


# The eager fast lane (``core/ops.py``'s ``call``): a float32 call whose plan needs no copy runs
# its plan directly, without the operator's generic marshalling (dispatch, layout and dtype checks
# of every output, statistics converted back and forth). Same kernels, same results; float64
# keeps the operator path for its overflow check (float32 squares cannot overflow float64 sums).


def lane(name: str, args: tuple):
    """(plan, exact group means) for forward op ``name`` on ``args`` (the operator's arguments),
    or None where the lane does not apply."""
    x = args[0]
    if (x.dtype is not torch.float32 or x.device.type != "cpu" or x.layout is not torch.strided
            or not x.numel() or x.is_conj() or x.is_neg()):
        return None
    if COMPILE_MODE == "background" and not _ready(x.dtype, wait=False):
        return None
    if name == "layer_norm":
        plan = _ln_key(x, args[3], args[4], args[5])
        means = _row_means(plan.pcount)
    elif x.dim() < 2:
        return None
    elif name == "batch_norm":
        plan, means = _bn_key(x, args[3], args[4], True), _channel_means
    elif name == "group_norm":
        plan, means = _gn_key(x, args[3], args[4]), _sample_means(args[3])
    else:
        return None
    return None if plan.copy else (plan, means)


def lane_forward(lane, x: Tensor, weight, bias):
    """(y, mean, var, rstd) as the operator returns them, and the (mean, rstd) arrays the
    backward takes; statistics the op does not have (RMS mean, mean-only var/rstd) are empty."""
    plan, means = lane
    y, mean, var, rstd = plan.forward(x, weight, bias)
    shape = plan.stat_shape
    if plan.has_mean:
        _inf_means(mean, lambda: means(x))
        mean_t = torch.from_numpy(mean.reshape(shape))
    else:
        mean, mean_t = np.zeros_like(rstd), _empty64()
    if getattr(plan, "center", False):
        return (y, mean_t, _empty64(), _empty64()), (mean, rstd)
    return (y, mean_t, torch.from_numpy(var.reshape(shape)), torch.from_numpy(rstd.reshape(shape))), (mean, rstd)


def lane_backward(lane, saved, dy, x, weight, need, bias_meta):
    """(dx, dγ, dβ) of a lane forward (``saved``: its (mean, rstd) arrays); dγ/dβ None unless
    needed, shaped and typed like the parameters (``bias_meta``: β's (shape, dtype))."""
    mean, rstd = saved
    dx, dw, db = lane[0].backward(x, dy, weight, bias_meta, mean, rstd, need[1] and weight is not None,
                                  need[2] and bias_meta is not None)
    return (dx if need[0] else None), dw, db


def _empty64() -> Tensor:
    return torch.empty(0, dtype=torch.float64)


def batch_norm(x: Tensor, weight, bias, eps: float, *, center_only: bool = False):
    """Training batch norm: (y, mean, biased var, rstd), float64 statistics of shape (C,)."""
    out = _forward(_bn_key(x, eps, center_only, True), x, weight, bias, _channel_means)
    return out if out is not None else reference.batch_norm(x, weight, bias, eps, center_only=center_only)


def batch_norm_backward(dy, x, weight, mean, rstd, eps: float, *, center_only: bool = False,
                        mask=(True, True, True)):
    """(dx, dγ, dβ) of training batch norm (None where not in ``mask``)."""
    return _backward(_bn_key(x, eps, center_only, True), dy, x, weight, mean, rstd, mask)


def ghost_batch_norm(x: Tensor, virtual_batch_size: int, weight, bias, eps: float):
    """Ghost batch norm: (y, mean, biased var, rstd), float64 statistics (N / g, C)."""
    g = virtual_batch_size
    out = _forward(_gbn_key(x, g, eps), x, weight, bias, _virtual_means(g))
    return out if out is not None else reference.ghost_batch_norm(x, g, weight, bias, eps)


def ghost_batch_norm_backward(dy, x, weight, mean, rstd, virtual_batch_size: int, eps: float, *,
                              mask=(True, True, True)):
    """(dx, dγ, dβ) of ghost batch norm (None where not in ``mask``)."""
    return _backward(_gbn_key(x, virtual_batch_size, eps), dy, x, weight, mean, rstd, mask)


def batch_norm_eval(x: Tensor, mean: Tensor, var, weight, bias, eps: float, *, center_only: bool = False):
    """Batch norm with given statistics (running stats): y."""
    plan = _bn_key(x, eps, center_only, False)
    return plan.forward(x.contiguous() if plan.copy else x, weight, bias, mean, var)[0]


def batch_norm_eval_backward(dy, x, mean, var, weight, eps: float, *, center_only: bool = False,
                             mask=(True, True, True)):
    """(dx, dγ, dβ) of batch norm with given statistics: dx = γ·rstd·dy, dγ = Σ dy·x̂, dβ = Σ dy."""
    plan = _bn_key(x, eps, center_only, False)
    if plan.copy:
        x = x.contiguous()
    mean64 = f64(mean)
    rstd = np.ones_like(mean64) if center_only else 1.0 / np.sqrt(f64(var) + eps)
    dx, dw, db = plan.backward(x, dy, weight, ((plan.pcount,), x.dtype), mean64, rstd,
                               mask[1] and weight is not None, mask[2])
    return (dx if mask[0] else None), dw, db


def group_norm(x: Tensor, num_groups: int, weight, bias, eps: float):
    """Group norm (instance norm: num_groups = C): (y, mean, var, rstd), float64 stats (N, G)."""
    out = _forward(_gn_key(x, num_groups, eps), x, weight, bias, _sample_means(num_groups))
    return out if out is not None else reference.group_norm(x, num_groups, weight, bias, eps)


def group_norm_backward(dy, x, weight, mean, rstd, num_groups: int, eps: float, *, mask=(True, True, True)):
    return _backward(_gn_key(x, num_groups, eps), dy, x, weight, mean, rstd, mask)


def layer_norm(x: Tensor, normalized_ndim: int, weight, bias, eps: float, *, rms: bool = False):
    """Layer norm over the trailing ``normalized_ndim`` dims: (y, mean, var, rstd); rms: mean None."""
    plan = _ln_key(x, normalized_ndim, eps, rms)
    out = _forward(plan, x, weight, bias, _row_means(plan.pcount))
    if out is None:
        return reference.layer_norm(x, normalized_ndim, weight, bias, eps, rms=rms)
    y, mean, var, rstd = out
    return y, (None if rms else mean), var, rstd


def layer_norm_backward(dy, x, weight, mean, rstd, normalized_ndim: int, eps: float, *, rms: bool = False,
                        mask=(True, True, True)):
    if mean is None:
        mean = torch.zeros_like(rstd)
    return _backward(_ln_key(x, normalized_ndim, eps, rms), dy, x, weight, mean, rstd, mask)


def _as_base(v: Tensor) -> Tensor:
    """A base tensor (not a view) over v's memory: what an operator may return."""
    return torch.empty(0, dtype=v.dtype).set_(v.untyped_storage(), v.storage_offset(), v.size(), v.stride())


def _rows_layout(x: Tensor) -> bool:
    """Channels-first layer norm on memory where C is innermost is a plain row layer norm."""
    return x.dim() == 2 or is_channels_last(x)


def _cols_key(x: Tensor, eps: float) -> ColsPlan:
    return cached(("lnc", x.shape, eps), lambda: ColsPlan(x.shape[0], x.shape[1], math.prod(x.shape[2:]), eps))


def layer_norm_channels(x: Tensor, weight, bias, eps: float):
    """Layer norm over C of (N, C, *): (y, mean, var, rstd), float64 statistics (N, *S)."""
    if _rows_layout(x):
        y, mean, var, rstd = layer_norm(x.movedim(1, -1), 1, weight, bias, eps)
        return _as_base(y.movedim(-1, 1)), mean, var, rstd
    x = x.contiguous()
    y, *stats = _cols_key(x, eps).forward(x, weight, bias)
    _inf_means(stats[0], lambda: x.double().mean(1).numpy())
    lead = (x.shape[0],) + tuple(x.shape[2:])
    return (y, *(torch.from_numpy(a).view(lead) for a in stats))


def layer_norm_channels_backward(dy, x, weight, mean, rstd, eps: float, *, mask=(True, True, True)):
    """(dx, dγ, dβ) of channels-first layer norm (None where not in ``mask``)."""
    if _rows_layout(x):
        dx, dw, db = layer_norm_backward(dy.movedim(1, -1), x.movedim(1, -1), weight, mean, rstd, 1, eps,
                                         mask=mask)
        return (None if dx is None else _as_base(dx.movedim(-1, 1))), dw, db
    x = x.contiguous()
    dx, dw, db = _cols_key(x, eps).backward(x, dy.to(x.dtype).contiguous(), weight, mean, rstd)
    return (dx if mask[0] else None), dw, db


WARMUP_FAMILIES = ("nhwc", "nchw", "rows", "pointwise", "dyt")


def _warmup_tasks(dtypes) -> dict:
    """Closures compiling (or loading) every kernel for ``dtypes``, one per group of kernel families:
    batch/group statistics over channels-last and over contiguous input, rows (layer norm), and the
    point-wise family (DyT, Derf, FRN, EvoNorm), and DyT/Derf alone (what the demo's transformer
    calls)."""
    def stats(dt, layout):
        x = torch.randn(2, 4, 3, 3, dtype=dt).contiguous(memory_format=layout)
        w = torch.ones(4, dtype=dt)
        for fwd, bwd, args in ((batch_norm, batch_norm_backward, ()), (group_norm, group_norm_backward, (2,))):
            y, mean, _, rstd = fwd(x, *args, w, w, 1e-5)
            bwd(y, x, w, mean, rstd, *args, 1e-5)
        batch_norm_eval(x, w, w, w, w, 1e-5)
        _warmup_running(dt)

    def rows(dt):
        x, w = torch.randn(2, 4, 3, 3, dtype=dt), torch.ones(4, dtype=dt)
        y, mean, _, rstd = layer_norm(x, 2, None, None, 1e-5)
        layer_norm_backward(y, x, None, mean, rstd, 2, 1e-5)
        y, mean, _, rstd = layer_norm_channels(x, w, w, 1e-5)
        layer_norm_channels_backward(y, x, w, mean, rstd, 1e-5)

    return dict(zip(WARMUP_FAMILIES, (
        lambda: [stats(dt, torch.channels_last) for dt in dtypes],
        lambda: [stats(dt, torch.contiguous_format) for dt in dtypes],
        lambda: [rows(dt) for dt in dtypes],
        lambda: [(_warmup_pointwise(dt), _warmup_evonorm(dt)) for dt in dtypes],
        lambda: [_warmup_pointwise(dt, frn=False) for dt in dtypes])))


def warmup(dtypes=(torch.float32, torch.float64), *, families=WARMUP_FAMILIES, part: int = 0,
           parts: int = 1) -> None:
    """Compile (or load from the disk cache) every kernel for ``dtypes`` now (of ``families``, some
    of :data:`WARMUP_FAMILIES`: e.g. the demo prebuilds only what its studies call).

    ``part``/``parts`` split the work between processes (``python -m normlab.core.cpu`` runs the
    parts side by side: numba compiles on one thread, so two cores halve a cold prebuild).
    """
    bad = [f for f in families if f not in WARMUP_FAMILIES]
    if bad:
        raise ValueError(f"families: expected some of {list(WARMUP_FAMILIES)}, got {bad[0]!r}")
    tasks = _warmup_tasks(dtypes)
    if "pointwise" in families:  # it includes dyt: don't compile those twice, in two processes
        families = [f for f in families if f != "dyt"]
    for name in _partition(families, parts)[part]:
        tasks[name]()


#: Cold compile seconds of each family (float32, measured on 2 cores under load 8.7): what
#: :func:`_partition` balances.
_COMPILE_COST = {"nhwc": 78, "nchw": 61, "rows": 30, "pointwise": 70, "dyt": 21}


def _partition(families, parts: int) -> list[list[str]]:
    """``families`` split into ``parts`` lists of about equal compile time: longest first, each
    to the least loaded part (the demo's nhwc | nchw + rows: 78 s | 91 s, where every other
    family in turn gave nhwc + rows | nchw: 108 s | 61 s)."""
    out: list[list[str]] = [[] for _ in range(parts)]
    load = [0] * parts
    for name in sorted(dict.fromkeys(families), key=lambda f: -_COMPILE_COST[f]):
        i = load.index(min(load))
        out[i].append(name)
        load[i] += _COMPILE_COST[name]
    return out
