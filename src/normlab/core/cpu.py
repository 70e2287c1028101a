"""CPU backend: fused numba kernels for every normlab op (see docs/CONTRACTS.md).

Ops: ``batch_norm`` (training; also mean-only), ``batch_norm_eval``, ``group_norm`` (InstanceNorm
is G = C), ``layer_norm`` (also RMSNorm). Each is one ``torch.autograd.Function`` with a fused
forward kernel and a fused backward kernel that returns dx, dγ and dβ together.

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

Kernel families (passes over memory: see each module)
    * ``cpu_kernels_rows``: layer norm, RMS norm, group/instance norm on contiguous input;
    * ``cpu_kernels_batch``: batch norm on contiguous input (per-channel planes);
    * ``cpu_kernels_cl``: batch norm and group/instance norm on channels-last input;
    * ``cpu_kernels_cols``: channels-first layer norm (statistics over C) on NCHW input
      (on channels-last input it is a row layer norm).
    Each family is one forward and one backward kernel (float32 and float64 each compile
    once); the choice of family, the physical 2-D shape the kernel sees and the flags are a
    ``_Plan`` cached per (op, shape, strides, options), so a call does little Python work.

Statistics are accumulated in float64 (block sums in the input dtype, see the kernel modules),
are exact for a 1e6 offset, a constant input (y = β, finite gradients) and |x| ≈ 1e30 in float32;
NaN/Inf propagate (no fast-math flags that assume finite values). The statistics returned (and
saved for the backward) are float64. float64 inputs whose squares overflow float64
(|x| ≳ 1e154) are detected after the forward and recomputed by the reference backend.

Autograd
    None here: the functions below are the CPU kernels of the ``normlab::`` operators, and
    ``core/ops.py`` registers one autograd formula per operator for every backend.

Threads
    Every call sets numba's thread count to ``torch.get_num_threads()`` (capped at
    ``numba.config.NUMBA_NUM_THREADS``), so ``torch.set_num_threads`` controls both; inputs of
    fewer than ``PARALLEL_MIN_NUMEL`` elements run on one thread (waking the pool would cost
    more than it saves).

Output buffers
    Outputs (y, dx) of at least ``POOL_MIN_BYTES`` come from a small free-list of numpy
    blocks (numpy advises transparent huge pages for large arrays) wrapped with
    ``torch.from_numpy``: a
    block returns to the pool only when the last tensor/view/saved-variable referencing it is
    freed (a weak reference to the array that the tensor's storage owns), so reuse can
    never alias live data. This avoids the page faults of a fresh multi-MiB allocation (the
    glibc allocator behind ``torch.empty`` returns large blocks to the OS on free, and faulting
    them back in costs as much as the normalization itself). Pool size: ``NORMLAB_CPU_POOL_MB``
    (default 2048; 0 disables), or :func:`set_buffer_pool`. Pool-backed tensors are ordinary
    tensors except that their storage cannot grow (``resize_`` to a larger size raises).
    Smaller outputs, dγ/dβ and the statistics use ``torch.empty``.

Compilation: kernels compile on first use per dtype (a few seconds each) and are cached on
disk; see ``cpu_kernels_common`` for the cache location when the package is read-only.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from dataclasses import dataclass

import numba
import numpy as np
import torch
from torch import Tensor

from normlab.core import reference
from normlab.core.cpu_kernels_batch import planes_bwd, planes_fwd
from normlab.core.cpu_kernels_cl import cl_bwd, cl_fwd
from normlab.core.cpu_kernels_cols import POS_BLOCK, cols_bwd, cols_fwd
from normlab.core.cpu_kernels_common import CACHE, CACHE_DIR
from normlab.core.cpu_kernels_rows import rows_bwd, rows_fwd

__all__ = [
    "batch_norm",
    "batch_norm_eval",
    "group_norm",
    "layer_norm",
    "layer_norm_channels",
    "supports",
    "set_buffer_pool",
    "clear_buffer_pool",
    "buffer_pool_stats",
    "warmup",
    "CACHE",
    "CACHE_DIR",
]

OPS = ("batch_norm", "batch_norm_eval", "group_norm", "layer_norm", "layer_norm_channels")
_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def _takes(op: str, x: Tensor) -> bool:
    """float32/float64 strided CPU tensors with elements; (N, C, ...) except for layer norm."""
    if op not in OPS or not isinstance(x, Tensor):
        return False
    if x.device.type != "cpu" or x.layout != torch.strided or x.dtype not in _NP_DTYPE:
        return False
    if x.numel() == 0 or x.is_conj() or x.is_neg():
        return False
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
                _start_pool()  # in the caller's thread: the pool keeps torch's thread count
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
# threads
# --------------------------------------------------------------------------------------------


# Below this many elements a call runs on one thread: waking the worker threads costs more
# than it saves (tens of µs on an idle machine, milliseconds on an oversubscribed one).
PARALLEL_MIN_NUMEL = 1 << 15


_pool_started = False


def _start_pool() -> None:
    """Start numba's thread pool once, keeping torch's thread count.

    Launching numba's OpenMP layer resets the process-wide OpenMP thread count, which silently
    changed ``torch.get_num_threads()`` (e.g. from a sweep worker's 1 back to the core count).
    """
    global _pool_started
    torch_threads = torch.get_num_threads()
    numba.get_num_threads()  # launches the pool
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    _pool_started = True


# numba's workqueue threading layer aborts the process when two Python threads launch parallel
# kernels at once (omp and tbb are thread-safe); kernels launched under that layer take a lock.
_launch_lock = threading.RLock()


_serialize: bool | None = None


def _launch(kernel, *args) -> None:
    global _serialize
    if _serialize is None:
        _start_pool()
        _serialize = numba.threading_layer() == "workqueue"
    if _serialize:
        with _launch_lock:
            kernel(*args)
    else:
        kernel(*args)


_numba_threads = threading.local()  # numba's thread count is per calling thread: remember it


def _threads(numel: int) -> int:
    """numba's thread count := torch's (capped by numba's pool), 1 for small problems."""
    if not _pool_started:
        _start_pool()
    n = 1 if numel < PARALLEL_MIN_NUMEL else max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if getattr(_numba_threads, "n", None) != n:
        numba.set_num_threads(n)
        _numba_threads.n = n
    return n


# --------------------------------------------------------------------------------------------
# output buffers
# --------------------------------------------------------------------------------------------

POOL_MIN_BYTES = 1 << 20


class _BufferPool:
    """Free-list of page-backed numpy blocks keyed by exact byte size (see module docstring)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._free: dict[int, list[np.ndarray]] = {}
        self._free_bytes = 0
        self._live: dict = {}  # id(weakref to a handed-out array) -> (weakref, block)
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0

    def empty(self, shape: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A tensor of ``shape``/``strides`` (elements; dense) that is not a view."""
        npd = _NP_DTYPE[dtype]
        itemsize = 4 if npd is np.float32 else 8
        nbytes = math.prod(shape) * itemsize
        if self.max_bytes <= 0 or nbytes < POOL_MIN_BYTES:
            return torch.empty_strided(shape, strides, dtype=dtype)
        block = None
        with self._lock:
            blocks = self._free.get(nbytes)
            if blocks:
                block = blocks.pop()
                self._free_bytes -= nbytes
                self.hits += 1
            else:
                self.misses += 1
        if block is None:
            block = np.empty(nbytes, np.uint8)
        arr = np.ndarray(shape, npd, buffer=block, strides=tuple(st * itemsize for st in strides))
        # The tensor's storage owns `arr`: when the storage dies (last tensor, view or saved
        # variable gone) `arr` dies, the weak reference fires, and only then the block goes
        # back to the free list.
        ref = weakref.ref(arr, self._release)
        self._live[id(ref)] = (ref, block)  # keeps the weak reference (and its callback) alive
        return torch.from_numpy(arr)

    def _release(self, ref) -> None:
        entry = self._live.pop(id(ref), None)
        if entry is None:
            return
        block = entry[1]
        nbytes = block.nbytes
        with self._lock:
            if self._free_bytes + nbytes > self.max_bytes:
                return  # over budget: let the block be freed
            self._free.setdefault(nbytes, []).append(block)
            self._free_bytes += nbytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._free_bytes = 0


_pool = _BufferPool(int(float(os.environ.get("NORMLAB_CPU_POOL_MB", "2048")) * (1 << 20)))


def set_buffer_pool(max_mb: float) -> None:
    """Cap the cached free output buffers at ``max_mb`` MiB (0 disables the pool)."""
    _pool.max_bytes = int(max_mb * (1 << 20))
    if _pool.max_bytes <= 0:
        _pool.clear()


def clear_buffer_pool() -> None:
    """Drop every cached free buffer (live outputs are unaffected)."""
    _pool.clear()


def buffer_pool_stats() -> dict:
    """hits / misses / bytes currently cached / cap."""
    return {"hits": _pool.hits, "misses": _pool.misses, "free_bytes": _pool._free_bytes,
            "max_bytes": _pool.max_bytes}


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------

_CONSTS: dict[tuple[int, np.dtype, float], np.ndarray] = {}


def _const(n: int, npd, value: float) -> np.ndarray:
    key = (n, np.dtype(npd), value)
    a = _CONSTS.get(key)
    if a is None:
        a = np.full(n, value, npd)  # kernels never write parameters
        if len(_CONSTS) > 256:
            _CONSTS.clear()
        _CONSTS[key] = a
    return a


# Numpy views of parameters, keyed by the Parameter object: a view shares the parameter's memory,
# so in-place updates (optimizer steps) show through; a new storage (``p.data = ...``) changes the
# data pointer and refreshes the entry; a dead parameter's entry goes with it. Making the view
# costs a few µs per call (detach + numpy), as much as a small kernel.
_PARAM_VIEWS: dict[int, tuple] = {}


def _param(t: Tensor | None, n: int, dtype: torch.dtype, default: float) -> np.ndarray:
    """γ or β as a flat numpy array in x's dtype (constant ones/zeros when None)."""
    if t is None:
        return _const(n, _NP_DTYPE[dtype], default)
    cacheable = isinstance(t, torch.nn.Parameter) and t.dtype == dtype
    if cacheable:
        entry = _PARAM_VIEWS.get(id(t))
        if entry is not None and entry[0]() is t and entry[1] == t.data_ptr():
            return entry[2]
    a = t.detach()
    if a.dtype != dtype:
        a = a.to(dtype)
    if not a.is_contiguous():
        a = a.contiguous()
        cacheable = False
    arr = a.numpy().reshape(-1)
    if cacheable:
        if len(_PARAM_VIEWS) > 4096:
            _PARAM_VIEWS.clear()
        key = id(t)
        _PARAM_VIEWS[key] = (weakref.ref(t, lambda _, k=key: _PARAM_VIEWS.pop(k, None)), t.data_ptr(), arr)
    return arr


def _grad_buffer(shape, dtype: torch.dtype, need: bool, n: int, x_dtype: torch.dtype):
    """Output array the backward kernel writes dγ (or dβ) into, and the tensor it backs.

    The kernels accumulate in float64 and store the total once, straight into the
    parameter's tensor when its dtype is x's (one compiled signature per x dtype); otherwise
    into a throwaway array in x's dtype (converted afterwards when needed).
    """
    if need and dtype == x_dtype:
        a = np.empty(n, _NP_DTYPE[x_dtype])
        return a, torch.from_numpy(a.reshape(shape))
    return np.empty(n, _NP_DTYPE[x_dtype]), None


def _overflowed(mean: np.ndarray, var: np.ndarray) -> bool:
    """Σd² overflowed float64: var is +inf, or inf − inf = NaN while the mean is finite.

    (A NaN input makes the mean NaN too; that is propagated, not recomputed.)
    """
    return bool(np.isposinf(var).any() or (np.isnan(var) & np.isfinite(mean)).any())


def _f64(t: Tensor) -> np.ndarray:
    """A statistic as a flat float64 numpy array (no copy for the float64 ones the ops return)."""
    if t.dtype == torch.float64 and not t.requires_grad and t.is_contiguous():
        return t.numpy().reshape(-1)
    return t.detach().to(torch.float64).contiguous().reshape(-1).numpy()


def _stat(a: np.ndarray, shape, dtype: torch.dtype) -> Tensor:
    """A returned statistic: a copy in x's dtype (never the saved float64 array itself)."""
    with np.errstate(over="ignore"):  # a float64 variance of 1e60 is inf in float32, as in torch
        return torch.from_numpy(a.astype(_NP_DTYPE[dtype]).reshape(shape))


# --------------------------------------------------------------------------------------------
# layouts and kernel plans
# --------------------------------------------------------------------------------------------


def _view(a: np.ndarray, shape) -> np.ndarray:
    """Reshape without copying (raises instead of silently copying an output buffer)."""
    v = a.view()
    v.shape = shape
    return v


def _channels_last(x: Tensor) -> bool:
    """(N, C, *S) stored with channels innermost (and not plainly contiguous)."""
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _row_chunks(n: int, rows: int, nt: int) -> int:
    """Row chunks per sample (channels-last kernels): 1 (whole samples, one parallel region)
    when the n samples already split well over nt threads, else enough chunks to balance."""
    if nt <= 1 or n % nt == 0 or n >= 4 * nt:
        return 1
    return max(1, min(rows, nt // math.gcd(n, nt)))


@dataclass
class _Plan:
    """How one op call maps onto a kernel. ``phys`` is x's memory as a C-contiguous shape."""

    family: str  # "rows" | "planes" | "cl"
    op: str  # "batch_norm" | "batch_norm_eval" | "group_norm" | "layer_norm"
    phys: tuple[int, ...]
    eps: float
    groups: int = 1  # rows: groups of the per-channel affine; cl: statistic groups per sample
    seg: int = 0  # rows: 0 = per-column affine (layer norm), else elements per channel
    rms: bool = False
    train: bool = True
    center: bool = False
    channels_last: bool = False  # y/dx are channels-last views of the physical buffer
    pcount: int = 1  # number of affine parameters (γ/β length)
    stat_shape: tuple[int, ...] = ()
    ref_arg: int = 0  # num_groups (group norm) / normalized_ndim (layer norm) for the reference
    copy: bool = False  # x is neither contiguous nor channels-last: one .contiguous() copy

    # ---- memory ----------------------------------------------------------------------------
    def to_phys(self, t: Tensor) -> np.ndarray:
        """x-shaped tensor -> its C-contiguous physical array, 2-D (no copy when laid out as x)."""
        if t.requires_grad:
            t = t.detach()
        if self.channels_last:
            t = t.movedim(1, -1)
        if not t.is_contiguous():
            t = t.contiguous()
        return t.numpy().reshape(self.phys2)

    @property
    def phys2(self) -> tuple[int, int]:
        """The 2-D array the kernels take: rows (R, L), planes (N·C, S), cl (N·S, C)."""
        if self.family == "rows":
            return self.phys
        return (self.phys[0] * self.phys[1], self.phys[2])

    def out(self, like: Tensor) -> tuple[np.ndarray, Tensor]:
        """(physical numpy array, tensor shaped and laid out like ``like``) sharing memory.

        The tensor is a base tensor, never a view: a custom Function must not return a view
        (in-place ops on it, e.g. ReLU(inplace=True), would be rejected by autograd). Small
        outputs are numpy allocations handed to torch (cheaper than torch.empty_strided plus
        .numpy()); large ones come from the buffer pool.
        """
        shape = tuple(like.shape)
        npd = _NP_DTYPE[like.dtype]
        if self.channels_last:
            phys_nd = (shape[0],) + shape[2:] + (shape[1],)
            if like.numel() * like.element_size() < POOL_MIN_BYTES or _pool.max_bytes <= 0:
                buf = np.empty(phys_nd, npd)
                perm = (0, len(shape) - 1) + tuple(range(1, len(shape) - 1))
                return buf.reshape(self.phys2), torch.from_numpy(buf.transpose(perm))
            st = [1] * len(phys_nd)
            for i in range(len(phys_nd) - 2, -1, -1):
                st[i] = st[i + 1] * phys_nd[i + 1]
            strides = (st[0], 1) + tuple(st[1:-1])
            t = _pool.empty(shape, strides, like.dtype)
            return _view(t.movedim(1, -1).numpy(), self.phys2), t
        if like.numel() * like.element_size() < POOL_MIN_BYTES or _pool.max_bytes <= 0:
            buf = np.empty(shape, npd)
            return buf.reshape(self.phys2), torch.from_numpy(buf)
        st = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            st[i] = st[i + 1] * shape[i + 1]
        t = _pool.empty(shape, tuple(st), like.dtype)
        return _view(t.numpy(), self.phys2), t

    # ---- kernels ---------------------------------------------------------------------------
    def forward(self, x: Tensor, weight, bias, mean_in=None, var_in=None):
        """y, mean64, var64, rstd64 (numpy float64 statistics of shape stat_shape)."""
        nt = _threads(x.numel())
        xa = self.to_phys(x)
        ya, y = self.out(x)
        w = _param(weight, self.pcount, x.dtype, 1.0)
        b = _param(bias, self.pcount, x.dtype, 0.0)
        nstat = math.prod(self.stat_shape)
        if self.train:
            mean, var = np.empty(nstat), np.empty(nstat)
        else:
            mean = _f64(mean_in)
            var = np.zeros(nstat) if var_in is None else _f64(var_in)
        rstd = np.empty(nstat)
        if self.family == "rows":
            _launch(rows_fwd, xa, w, b, self.seg, self.groups, self.rms, self.eps, min(nt, xa.shape[0]),
                     ya, mean, var, rstd)
        elif self.family == "planes":
            n, c, _ = self.phys
            _launch(planes_fwd, xa, n, w, b, self.eps, self.train, self.center, min(nt, c), ya, mean,
                       var, rstd)
        else:
            n, s, _ = self.phys
            g = self.groups
            _launch(cl_fwd, xa, n, w, b, g, self.train, self.center, self.eps, _row_chunks(n, s, nt), ya,
                   mean.reshape(n, g), var.reshape(n, g), rstd.reshape(n, g))
        return y, mean, var, rstd

    def backward(self, x: Tensor, dy: Tensor, weight, bias_meta, mean: np.ndarray,
                 rstd: np.ndarray, need_w: bool, need_b: bool):
        """dx, dγ, dβ as tensors (dγ/dβ None when not needed)."""
        nt = _threads(x.numel())
        xa = self.to_phys(x)
        dya = self.to_phys(dy if dy.dtype == x.dtype else dy.to(x.dtype))
        dxa, dx = self.out(x)
        w = _param(weight, self.pcount, x.dtype, 1.0)
        dw, gw = _grad_buffer(None if weight is None else weight.shape,
                              None if weight is None else weight.dtype, need_w, self.pcount, x.dtype)
        db, gb = _grad_buffer(*(bias_meta or (None, None)), need_b, self.pcount, x.dtype)
        if self.family == "rows":
            _launch(rows_bwd, xa, dya, w, self.seg, self.groups, self.rms, mean, rstd,
                     min(nt, xa.shape[0]), dxa, dw, db)
        elif self.family == "planes":
            n, c, _ = self.phys
            _launch(planes_bwd, xa, dya, n, w, mean, rstd, self.train, self.center, min(nt, c), dxa,
                       dw, db)
        else:
            n, s, _ = self.phys
            g = self.groups
            _launch(cl_bwd, xa, dya, n, w, g, self.train, self.center, _row_chunks(n, s, nt),
                   mean.reshape(n, g), rstd.reshape(n, g), dxa, dw, db)
        if need_w and gw is None:  # a parameter dtype the kernels do not write
            gw = torch.from_numpy(dw).reshape(weight.shape).to(weight.dtype)
        if need_b and gb is None:
            gb = torch.from_numpy(db).reshape(bias_meta[0]).to(bias_meta[1])
        return dx, gw, gb



# --------------------------------------------------------------------------------------------
# ops: a plan per (op, shape, strides, dtype, options), built once and cached. No autograd here:
# these are the CPU kernels of the ``normlab::`` operators (core/ops.py registers autograd once
# for every backend).
# --------------------------------------------------------------------------------------------

_PLANS: dict[tuple, _Plan] = {}


def _cached(key: tuple, build) -> _Plan:
    plan = _PLANS.get(key)
    if plan is None:
        plan = build()
        if len(_PLANS) >= 1024:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _nc_layout(x: Tensor) -> tuple[bool, bool]:
    """(channels_last, needs a .contiguous() copy) for an (N, C, *) input."""
    if x.is_contiguous():
        return False, False
    if _channels_last(x):
        return True, False
    return False, True


def _bn_plan(x: Tensor, op: str, eps: float, train: bool, center: bool) -> _Plan:
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    cl, copy = _nc_layout(x)
    common = dict(op=op, eps=eps, train=train, center=center, pcount=c, stat_shape=(c,), copy=copy)
    if cl:
        return _Plan("cl", phys=(1, n * s, c), groups=c, channels_last=True, **common)
    if s == 1:  # (N, C) rows: the channels-last kernel on the same memory
        return _Plan("cl", phys=(1, n, c), groups=c, **common)
    return _Plan("planes", phys=(n, c, s), **common)


def _gn_plan(x: Tensor, g: int, eps: float) -> _Plan:
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    cl, copy = _nc_layout(x)
    common = dict(op="group_norm", eps=eps, pcount=c, stat_shape=(n, g), ref_arg=g, copy=copy)
    if cl:
        return _Plan("cl", phys=(n, s, c), groups=g, channels_last=True, **common)
    return _Plan("rows", phys=(n * g, (c // g) * s), groups=g, seg=s, **common)


def _ln_plan(x: Tensor, k: int, eps: float, rms: bool) -> _Plan:
    lead = tuple(x.shape[: x.dim() - k])
    cols = math.prod(x.shape[x.dim() - k:])
    return _Plan("rows", op="layer_norm", phys=(x.numel() // cols, cols), eps=eps, rms=rms,
                 pcount=cols, stat_shape=lead, ref_arg=k, copy=not x.is_contiguous())


def _bn_key(x, eps, center, train):
    return _cached(("bn", train, x.shape, x.stride(), eps, center),
                   lambda: _bn_plan(x, "batch_norm" if train else "batch_norm_eval", eps, train, center))


def _gn_key(x, g, eps):
    return _cached(("gn", x.shape, x.stride(), g, eps), lambda: _gn_plan(x, g, eps))


def _ln_key(x, k, eps, rms):
    return _cached(("ln", x.shape, x.stride(), k, eps, rms), lambda: _ln_plan(x, k, eps, rms))


def _forward(plan: _Plan, x: Tensor, weight, bias, mean_in=None, var_in=None):
    """(y, mean, var, rstd) with float64 statistics shaped ``plan.stat_shape``, or None when the
    float64 sums of squares overflowed (|x| ≳ 1e154) and the caller must use the reference."""
    if plan.copy:
        x = x.contiguous()
    y, mean, var, rstd = plan.forward(x, weight, bias, mean_in, var_in)
    if plan.train and x.dtype == torch.float64 and _overflowed(mean, var):
        return None
    if plan.train and not plan.rms:
        _inf_means(mean, lambda: _group_means(plan, x))
    shape = plan.stat_shape
    return (y, torch.from_numpy(mean.reshape(shape)), torch.from_numpy(var.reshape(shape)),
            torch.from_numpy(rstd.reshape(shape)))


def _inf_means(mean: np.ndarray, exact) -> None:
    """Where a group holds ±Inf the kernels' shifted sums give NaN (Inf − Inf); torch's mean is
    +Inf or −Inf there (NaN only if both signs or a NaN occur). Rare: recompute those groups."""
    bad = np.isnan(mean)
    if bad.any():
        mean[bad] = exact().reshape(mean.shape)[bad]


def _group_means(plan: _Plan, x: Tensor) -> np.ndarray:
    """float64 means of x over each statistic group of ``plan`` (the slow, obvious way)."""
    xd = x.detach().double()
    if plan.op == "batch_norm":
        return xd.transpose(0, 1).reshape(x.shape[1], -1).mean(1).numpy()
    if plan.op == "group_norm":
        return xd.reshape(x.shape[0], plan.groups, -1).mean(-1).numpy()
    return xd.reshape(-1, plan.pcount).mean(-1).numpy()


def _backward(plan: _Plan, dy, x, weight, mean, rstd, mask):
    if plan.copy:
        x = x.contiguous()
    if rstd is None or rstd.numel() == 0:  # mean-only batch norm: rstd = 1
        rstd = torch.ones_like(mean, dtype=torch.float64)
    # dβ comes back flat in x's dtype; the operator reshapes and casts it to β's dtype.
    dx, dw, db = plan.backward(x, dy, weight, ((plan.pcount,), x.dtype), _f64(mean), _f64(rstd),
                               mask[1] and weight is not None, mask[2])
    return (dx if mask[0] else None), dw, db


def batch_norm(x: Tensor, weight, bias, eps: float, *, center_only: bool = False):
    """Training batch norm: (y, mean, biased var, rstd), float64 statistics of shape (C,)."""
    out = _forward(_bn_key(x, eps, center_only, True), x, weight, bias)
    return out if out is not None else reference.batch_norm(x, weight, bias, eps, center_only=center_only)


def batch_norm_backward(dy, x, weight, mean, rstd, eps: float, *, center_only: bool = False,
                        mask=(True, True, True)):
    """(dx, dγ, dβ) of training batch norm (None where not in ``mask``)."""
    return _backward(_bn_key(x, eps, center_only, True), dy, x, weight, mean, rstd, mask)


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
    mean64 = _f64(mean)
    rstd = np.ones_like(mean64) if center_only else 1.0 / np.sqrt(_f64(var) + eps)
    dx, dw, db = plan.backward(x, dy, weight, ((plan.pcount,), x.dtype), mean64, rstd,
                               mask[1] and weight is not None, mask[2])
    return (dx if mask[0] else None), dw, db


def group_norm(x: Tensor, num_groups: int, weight, bias, eps: float):
    """Group norm (instance norm: num_groups = C): (y, mean, var, rstd), float64 stats (N, G)."""
    out = _forward(_gn_key(x, num_groups, eps), x, weight, bias)
    return out if out is not None else reference.group_norm(x, num_groups, weight, bias, eps)


def group_norm_backward(dy, x, weight, mean, rstd, num_groups: int, eps: float, *, mask=(True, True, True)):
    return _backward(_gn_key(x, num_groups, eps), dy, x, weight, mean, rstd, mask)


def layer_norm(x: Tensor, normalized_ndim: int, weight, bias, eps: float, *, rms: bool = False):
    """Layer norm over the trailing ``normalized_ndim`` dims: (y, mean, var, rstd); rms: mean None."""
    out = _forward(_ln_key(x, normalized_ndim, eps, rms), x, weight, bias)
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
    return x.dim() == 2 or _channels_last(x)


def layer_norm_channels(x: Tensor, weight, bias, eps: float):
    """Layer norm over C of (N, C, *): (y, mean, var, rstd), float64 statistics (N, *S)."""
    if _rows_layout(x):
        y, mean, var, rstd = layer_norm(x.movedim(1, -1), 1, weight, bias, eps)
        return _as_base(y.movedim(-1, 1)), mean, var, rstd
    x = x.contiguous()
    n, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    xa = x.numpy().reshape(n, c, s)
    y = _pool.empty(tuple(x.shape), x.stride(), x.dtype)
    stats = [np.empty((n, s)) for _ in range(3)]
    units = n * -(-s // POS_BLOCK)
    _launch(cols_fwd, xa, _param(weight, c, x.dtype, 1.0), _param(bias, c, x.dtype, 0.0), eps,
             min(_threads(x.numel()), units), y.numpy().reshape(n, c, s), *stats)
    _inf_means(stats[0], lambda: x.double().mean(1).numpy())
    lead = (n,) + tuple(x.shape[2:])
    return (y, *(torch.from_numpy(a).view(lead) for a in stats))


def layer_norm_channels_backward(dy, x, weight, mean, rstd, eps: float, *, mask=(True, True, True)):
    """(dx, dγ, dβ) of channels-first layer norm (None where not in ``mask``)."""
    if _rows_layout(x):
        dx, dw, db = layer_norm_backward(dy.movedim(1, -1), x.movedim(1, -1), weight, mean, rstd, 1, eps,
                                         mask=mask)
        return (None if dx is None else _as_base(dx.movedim(-1, 1))), dw, db
    x = x.contiguous()
    dy = dy.to(x.dtype).contiguous()
    n, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    dx = _pool.empty(tuple(x.shape), x.stride(), x.dtype)
    dw, db = np.empty(c, _NP_DTYPE[x.dtype]), np.empty(c, _NP_DTYPE[x.dtype])
    units = n * -(-s // POS_BLOCK)
    _launch(cols_bwd, x.numpy().reshape(n, c, s), dy.numpy().reshape(n, c, s), _param(weight, c, x.dtype, 1.0),
             _f64(mean).reshape(n, s), _f64(rstd).reshape(n, s), min(_threads(x.numel()), units),
             dx.numpy().reshape(n, c, s), dw, db)
    return (dx if mask[0] else None), torch.from_numpy(dw), torch.from_numpy(db)


def warmup(dtypes=(torch.float32, torch.float64)) -> None:
    """Compile (or load from the disk cache) every kernel for ``dtypes`` now."""
    for dt in dtypes:
        x = torch.randn(2, 4, 3, 3, dtype=dt)
        w = torch.ones(4, dtype=dt)
        for xi in (x, x.contiguous(memory_format=torch.channels_last)):
            for fwd, bwd, args in ((batch_norm, batch_norm_backward, ()), (group_norm, group_norm_backward, (2,))):
                y, mean, _, rstd = fwd(xi, *args, w, w, 1e-5)
                bwd(y, xi, w, mean, rstd, *args, 1e-5)
            batch_norm_eval(xi, w, w, w, w, 1e-5)
        y, mean, _, rstd = layer_norm(x, 2, None, None, 1e-5)
        layer_norm_backward(y, x, None, mean, rstd, 2, 1e-5)
        y, mean, _, rstd = layer_norm_channels(x, w, w, 1e-5)
        layer_norm_channels_backward(y, x, w, mean, rstd, 1e-5)
        _warmup_pointwise(dt)


# --------------------------------------------------------------------------------------------
# point-wise ops: Dynamic Tanh, Dynamic erf (kernels in cpu_kernels_pointwise)
# --------------------------------------------------------------------------------------------

from normlab.core.cpu_kernels_pointwise import pw_bwd, pw_fwd  # noqa: E402

POINTWISE_OPS = ("dynamic_tanh", "dynamic_erf")
OPS = OPS + POINTWISE_OPS
__all__ += ["dynamic_tanh", "dynamic_tanh_backward", "dynamic_erf", "dynamic_erf_backward"]


def _pw_prepare(x: Tensor, weight, bias, channels_last: bool):
    """(x in a layout the kernel takes, its (R, F, S) physical shape, F).

    Channels-last layers: x contiguous, F = the parameters' size (x's last dim without them).
    Channels-first: contiguous (N, C, S) planes, or rows of C on channels-last memory. Anything
    else is copied once to contiguous.
    """
    x = x.detach()
    if channels_last:
        p = weight if weight is not None else bias
        f = p.numel() if p is not None else (x.shape[-1] if x.dim() else 1)
        if not x.is_contiguous():
            x = x.contiguous()
        return x, (x.numel() // max(f, 1), f, 1), f
    c = x.shape[1]
    if _channels_last(x):
        return x, (x.numel() // c, c, 1), c
    if not x.is_contiguous():
        x = x.contiguous()
    return x, (x.shape[0], c, x.numel() // max(x.shape[0] * c, 1)), c


def _pw_phys(t: Tensor, shape) -> tuple[np.ndarray, np.ndarray]:
    """t's memory (contiguous, or channels-last with C innermost) as the kernel's (R, F, S) and
    (R, F·S) arrays."""
    if not t.is_contiguous():
        t = t.movedim(1, -1)
    a = t.numpy()
    return a.reshape(shape), a.reshape(shape[0], shape[1] * shape[2])


def _pw_scalar(t: Tensor | None, dtype: torch.dtype):
    return _NP_DTYPE[dtype](0.0 if t is None else float(t.detach().reshape(())))


def _pw_chunks(x: Tensor, shape) -> int:
    units = shape[0] if shape[2] == 1 else shape[0] * shape[1]
    return max(1, min(_threads(x.numel()), units))


def _pw_forward(x: Tensor, alpha: Tensor, shift, weight, bias, channels_last: bool) -> Tensor:
    x, shape, f = _pw_prepare(x, weight, bias, channels_last)
    y = _pool.empty(tuple(x.shape), x.stride(), x.dtype)
    _launch(pw_fwd, *_pw_phys(x, shape), _pw_scalar(alpha, x.dtype), _pw_scalar(shift, x.dtype),
            _param(weight, f, x.dtype, 1.0), _param(bias, f, x.dtype, 0.0), shift is not None,
            _pw_chunks(x, shape), *_pw_phys(y, shape))
    return y


def _pw_backward(dy, x, alpha, shift, weight, bias, channels_last: bool, mask):
    """(dx, dα, ds, dγ, dβ): dx in x's dtype and layout, the rest float64 (flat for γ/β)."""
    x, shape, f = _pw_prepare(x, weight, bias, channels_last)
    dy = dy.detach()
    if dy.dtype != x.dtype or dy.stride() != x.stride():
        dy = torch.empty_strided(tuple(x.shape), x.stride(), dtype=x.dtype).copy_(dy)
    dx = _pool.empty(tuple(x.shape), x.stride(), x.dtype)
    nchunks = _pw_chunks(x, shape)
    pa, ps = np.empty(nchunks), np.empty(nchunks)
    pw, pb = np.zeros((nchunks, f)), np.zeros((nchunks, f))
    _launch(pw_bwd, *_pw_phys(x, shape), *_pw_phys(dy, shape), _pw_scalar(alpha, x.dtype),
            _pw_scalar(shift, x.dtype), _param(weight, f, x.dtype, 1.0), shift is not None, nchunks, *_pw_phys(dx, shape), pa, ps, pw, pb)
    out = [dx if mask[0] else None, torch.tensor(pa.sum()), torch.tensor(ps.sum()),
           torch.from_numpy(pw.sum(0)), torch.from_numpy(pb.sum(0))]
    return tuple(o if m else None for o, m in zip(out, mask))


def dynamic_tanh(x: Tensor, alpha: Tensor, weight, bias, *, channels_last: bool = True) -> Tensor:
    """y = γ·tanh(α·x) + β in one pass (layout: as :func:`_pw_prepare`)."""
    return _pw_forward(x, alpha, None, weight, bias, channels_last)


def dynamic_tanh_backward(dy, x, alpha, weight, bias, *, channels_last: bool = True, mask=(True,) * 4):
    """(dx, dα, dγ, dβ) in one pass; dα, dγ, dβ float64 (flat), None where not in ``mask``."""
    dx, da, _, dw, db = _pw_backward(dy, x, alpha, None, weight, bias, channels_last,
                                     (mask[0], mask[1], False, mask[2], mask[3]))
    return dx, da, dw, db


def dynamic_erf(x: Tensor, alpha: Tensor, shift: Tensor, weight, bias, *, channels_last: bool = True) -> Tensor:
    """y = γ·erf(α·x + s) + β in one pass."""
    return _pw_forward(x, alpha, shift, weight, bias, channels_last)


def dynamic_erf_backward(dy, x, alpha, shift, weight, bias, *, channels_last: bool = True, mask=(True,) * 5):
    """(dx, dα, ds, dγ, dβ) in one pass; all but dx float64."""
    return _pw_backward(dy, x, alpha, shift, weight, bias, channels_last, tuple(mask))


def _warmup_pointwise(dt: torch.dtype) -> None:
    x = torch.randn(2, 4, 3, 3, dtype=dt)
    a, w = torch.full((1,), 0.5, dtype=dt), torch.ones(4, dtype=dt)
    for xi, cl, p in ((x, False, w), (x.contiguous(memory_format=torch.channels_last), False, w),
                      (x, True, torch.ones(3, dtype=dt))):
        dynamic_tanh_backward(dynamic_tanh(xi, a, p, p, channels_last=cl), xi, a, p, p, channels_last=cl)
        dynamic_erf_backward(dynamic_erf(xi, a, a, p, p, channels_last=cl), xi, a, a, p, p, channels_last=cl)
    for xi in (x, x.contiguous(memory_format=torch.channels_last)):
        y, rstd = filter_response_norm(xi, w, w, w, 1e-6)
        filter_response_norm_backward(y, xi, w, w, w, rstd, 1e-6)


# --------------------------------------------------------------------------------------------
# Filter Response Norm + TLU (kernels in cpu_kernels_pointwise)
# --------------------------------------------------------------------------------------------

from normlab.core.cpu_kernels_pointwise import frn_bwd, frn_bwd_cl, frn_fwd, frn_fwd_cl  # noqa: E402

OPS = OPS + ("filter_response_norm",)
__all__ += ["filter_response_norm", "filter_response_norm_backward"]


def _frn_layout(x: Tensor) -> tuple[Tensor, bool, tuple[int, int, int]]:
    """(x, channels-last?, kernel shape): contiguous (N·C, S, 1) planes or channels-last
    (N, S, C) rows; any other strides are copied once to contiguous."""
    x = x.detach()
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    if _channels_last(x):
        return x, True, (n, s, c)
    if not x.is_contiguous():
        x = x.contiguous()
    return x, False, (n * c, s, 1)


def _frn_arr(t: Tensor, cl: bool, shape) -> np.ndarray:
    a = t.movedim(1, -1).numpy() if cl else t.numpy()
    return a.reshape(shape) if cl else a.reshape(shape[:2])


def filter_response_norm(x: Tensor, weight, bias, tau, eps: float):
    """(y, rstd): y = max(γ·x·rstd + β, τ), rstd = 1/sqrt(mean_HW(x²) + ε) float64 of shape (N, C);
    y in x's layout (contiguous or channels-last). ``tau=None``: no threshold."""
    x, cl, shape = _frn_layout(x)
    n, c = x.shape[0], x.shape[1]
    y = _pool.empty(tuple(x.shape), x.stride(), x.dtype)
    rstd = np.empty((n, c))
    units = n if cl else n * c
    _launch(frn_fwd_cl if cl else frn_fwd, _frn_arr(x, cl, shape), _param(weight, c, x.dtype, 1.0),
            _param(bias, c, x.dtype, 0.0), _param(tau, c, x.dtype, -math.inf), float(eps),
            max(1, min(_threads(x.numel()), units)), _frn_arr(y, cl, shape), rstd if cl else rstd.reshape(-1))
    return y, torch.from_numpy(rstd)


def filter_response_norm_backward(dy, x, weight, bias, tau, rstd, eps: float, *, mask=(True,) * 4):
    """(dx, dγ, dβ, dτ): dx in x's layout and dtype, the rest float64 (C,)."""
    x, cl, shape = _frn_layout(x)
    n, c = x.shape[0], x.shape[1]
    dy = dy.detach()
    if dy.dtype != x.dtype or dy.stride() != x.stride():
        dy = torch.empty_strided(tuple(x.shape), x.stride(), dtype=x.dtype).copy_(dy)
    dx = _pool.empty(tuple(x.shape), x.stride(), x.dtype)
    nchunks = max(1, min(_threads(x.numel()), n if cl else n * c))
    pw, pb, pt = (np.zeros((nchunks, c)) for _ in range(3))
    r = _f64(rstd)
    _launch(frn_bwd_cl if cl else frn_bwd, _frn_arr(x, cl, shape), _frn_arr(dy, cl, shape),
            _param(weight, c, x.dtype, 1.0), _param(bias, c, x.dtype, 0.0), _param(tau, c, x.dtype, -math.inf),
            r.reshape(n, c) if cl else r, nchunks, _frn_arr(dx, cl, shape), pw, pb, pt)
    out = (dx, torch.from_numpy(pw.sum(0)), torch.from_numpy(pb.sum(0)), torch.from_numpy(pt.sum(0)))
    return tuple(o if m else None for o, m in zip(out, mask))
