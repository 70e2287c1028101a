"""Kernel benchmark: every norm × a CNN and a transformer shape set, torch native vs normlab.

For each (norm, shape, layout) the same input is run through torch's native layer and through
the normlab layer under each backend (``reference``, ``cpu``; the full run adds ``cpu-nopool``,
the cpu backend with its output-buffer pool disabled, to show how much of the gain is
allocation). All of them and a preallocated copy (``torch.Tensor.copy_`` into a buffer of the
same size, the bandwidth yardstick) are timed in one process, interleaved: every repetition runs
each contender once, in alternating order (forward then forward+backward), and the medians are
reported.

On a CUDA device (``device="cuda"``, contenders torch native, torch.compile and the ``gpu``
backend) every timing is bracketed by CUDA events after a ``torch.cuda.synchronize()``, the
shapes are larger (:data:`CUDA_NORMS` only: the ops the Triton backend implements) and the copy is
a device-to-device ``copy_`` measured in the same run.

Minimum-traffic model (float32, n elements): forward moves 2·4·n bytes (read x, write y),
backward 3·4·n (read x and dy, write dx). Effective GB/s = model bytes / median time; "% copy"
divides it by the copy's 2·4·n / time measured on the same tensor in the same run.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = ["Case", "NORMS", "CUDA_NORMS", "cases", "run", "compile_times", "summarize", "render",
           "render_device", "save"]

LARGE_BYTES = 64 << 20  # "large" tensors: well beyond the last-level cache (32 MiB)

# norm -> (shape set, description)
NORMS: dict[str, tuple[str, str]] = {
    "bn": ("cnn", "BatchNorm2d, training"),
    "bn_eval": ("cnn", "BatchNorm2d, eval (running stats)"),
    "mobn": ("cnn", "mean-only BatchNorm, training"),
    "gn": ("cnn", "GroupNorm, 32 groups"),
    "in": ("cnn", "InstanceNorm2d (affine)"),
    "ln": ("transformer", "LayerNorm over the hidden dim"),
    "rms": ("transformer", "RMSNorm over the hidden dim"),
    # the methods beyond the classic five (issue 10): "torch" is the eager composition a user
    # would write (torch has no such layer), "torch-compile" that composition under torch.compile
    "brn": ("cnn", "BatchRenorm2d, training (r_max 3, d_max 5)"),
    "gbn": ("cnn", "GhostBatchNorm2d, virtual batch 8 (torch: BatchNorm2d per chunk)"),
    "frn": ("cnn", "FilterResponseNorm2d + TLU"),
    "evonorm-s0": ("cnn", "EvoNorm-S0, 32 groups"),
    "evonorm-b0": ("cnn", "EvoNorm-B0, training"),
    "ws": ("weights", "Weight Standardization of a conv weight (O, I, 3, 3)"),
    "dyt": ("transformer", "Dynamic Tanh  γ·tanh(αx) + β"),
    "derf": ("transformer", "Dynamic erf  γ·erf(αx + s) + β"),
    # the fused operators (issue 13 §1): "torch" is the eager two-op composition, "torch-compile"
    # that composition compiled; on the CPU backend these are composed, not fused (core/composed.py)
    "add_ln": ("transformer", "residual add + LayerNorm  (y of LN(x + r); r a fixed tensor)"),
    "add_rms": ("transformer", "residual add + RMSNorm  (y of RMS(x + r))"),
    "gn_silu": ("cnn", "GroupNorm (32 groups) + SiLU"),
    "bn_relu": ("cnn", "BatchNorm2d training + ReLU"),
}
# norms whose "torch" contender is a composition of torch ops: also timed under torch.compile
COMPOSED = ("brn", "gbn", "ws", "frn", "evonorm-s0", "evonorm-b0", "dyt", "derf", "add_ln", "add_rms", "gn_silu",
            "bn_relu")


@dataclass
class Case:
    norm: str
    shape: tuple[int, ...]
    layout: str  # "nchw" | "nhwc" | "rows" | "oihw" (a conv weight)
    # median seconds: times[contender]["fwd" | "fwdbwd"]; contender "copy" has "copy"
    times: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def label(self) -> str:
        if self.layout == "rows":
            return f"{self.shape[0]}x{self.shape[1]}"
        n, c, h, w = self.shape
        return f"{n}x{c}x{h}x{w} {self.layout}"


# the norms whose every op the gpu backend implements (the others run on the reference there)
CUDA_NORMS = ["bn", "bn_eval", "mobn", "gn", "in", "ln", "rms", "dyt", "derf", "frn"]


def cases(quick: bool, norms: list[str], device: str = "cpu", large: bool = False) -> list[Case]:
    """The shapes of a run; ``large`` (CPU): the smallest shape of each full set and layout that is
    at least :data:`LARGE_BYTES` in float32 (where the bandwidth targets apply; weights never are)."""
    if large and device == "cpu":
        full = cases(False, norms)
        out = []
        for kind in ("nchw", "nhwc", "rows"):
            for norm in norms:
                big = sorted({c.shape for c in full if c.norm == norm and c.layout == kind
                              and 4 * math.prod(c.shape) >= LARGE_BYTES}, key=math.prod)[:1]
                out += [Case(norm, sh, kind) for sh in big]
        return sorted(out, key=lambda c: (norms.index(c.norm), c.layout != "nchw", math.prod(c.shape)))
    if device == "cuda":  # sizes from L2-resident to far beyond it (50 MiB L2 on an H100)
        if quick:  # few shapes: every case compiles its own torch.compile graphs (~10 s)
            cnn = [(32, 64, 56, 56), (32, 256, 64, 64)]
            tr = [(8192, 1024), (16384, 4096)]
        else:
            cnn = [(n, c, hw, hw) for n in (32, 128) for c in (64, 256, 512) for hw in (16, 32, 64)]
            tr = [(r, h) for r in (4096, 16384) for h in (512, 1024, 2048, 4096, 8192, 16384)]
    elif quick:
        cnn = [(32, 64, 32, 32), (32, 256, 16, 16)]
        tr = [(4096, 1024), (1024, 4096)]
    else:
        cnn = [(32, c, hw, hw) for c in (64, 128, 256, 512) for hw in (8, 16, 32, 64)]
        tr = [(r, h) for r in (2048, 8192) for h in (256, 512, 1024, 2048, 4096, 8192)]
    weights = [(256, 256, 3, 3), (512, 512, 3, 3)] if quick else [(c, c, 3, 3) for c in (64, 128, 256, 512, 1024)]
    out = []
    for norm in norms:
        if NORMS[norm][0] == "weights":
            out += [Case(norm, s, "oihw") for s in weights]
        elif NORMS[norm][0] == "cnn":
            out += [Case(norm, s, lay) for s in cnn for lay in ("nchw", "nhwc")]
        else:
            out += [Case(norm, s, "rows") for s in tr]
    return out


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------


class _TorchMeanOnlyBN(nn.Module):
    """torch has no mean-only batch norm: the native composite x − mean + β."""

    def __init__(self, c: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return x - x.mean((0, 2, 3), keepdim=True) + self.bias.view(1, -1, 1, 1)


def _view(x):
    return (1, -1) + (1,) * (x.dim() - 2)


class _TorchBatchRenorm(nn.BatchNorm2d):
    """Batch Renormalization as a user writes it in torch ops (r, d detached, running update)."""

    def forward(self, x):
        dims = [0, 2, 3]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        std = torch.sqrt(var + self.eps)
        with torch.no_grad():
            rs = torch.sqrt(self.running_var + self.eps)
            r = (std / rs).clamp(1 / 3.0, 3.0)
            d = ((mean - self.running_mean) / rs).clamp(-5.0, 5.0)
            m = x.numel() // x.shape[1]
            self.running_mean.lerp_(mean, 0.1)
            self.running_var.lerp_(var * m / (m - 1), 0.1)
        xhat = (x - mean.view(_view(x))) / std.view(_view(x)) * r.view(_view(x)) + d.view(_view(x))
        return xhat * self.weight.view(_view(x)) + self.bias.view(_view(x))


class _TorchGhostBN(nn.BatchNorm2d):
    """Ghost BN the obvious way: torch's BatchNorm2d on each virtual batch, concatenated."""

    def forward(self, x):
        return torch.cat([super(_TorchGhostBN, self).forward(ch) for ch in x.split(8)])


class _TorchFRN(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.weight, self.bias, self.tau = (nn.Parameter(torch.full((c,), v)) for v in (1.0, 0.0, 0.0))

    def forward(self, x):
        nu2 = x.pow(2).mean((2, 3), keepdim=True)
        y = x * torch.rsqrt(nu2 + 1e-6) * self.weight.view(_view(x)) + self.bias.view(_view(x))
        return torch.maximum(y, self.tau.view(_view(x)))


class _TorchEvoS0(nn.Module):
    def __init__(self, c: int, groups: int = 32):
        super().__init__()
        self.groups = groups
        self.weight, self.bias, self.v = (nn.Parameter(torch.full((c,), v)) for v in (1.0, 0.0, 1.0))

    def forward(self, x):
        n, c, h, w = x.shape
        var = x.reshape(n, self.groups, -1).var(-1, unbiased=False, keepdim=True)
        std = torch.sqrt(var + 1e-5).expand(n, self.groups, c // self.groups * h * w).reshape(x.shape)
        y = x * torch.sigmoid(self.v.view(_view(x)) * x) / std
        return y * self.weight.view(_view(x)) + self.bias.view(_view(x))


class _TorchEvoB0(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.weight, self.bias, self.v = (nn.Parameter(torch.full((c,), v)) for v in (1.0, 0.0, 1.0))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        var_b = x.var([0, 2, 3], unbiased=False)
        with torch.no_grad():
            m = x.numel() // x.shape[1]
            self.running_var.lerp_(var_b * m / (m - 1), 0.1)
        left = torch.sqrt(var_b + 1e-5).view(_view(x))
        inst = torch.sqrt(x.var((2, 3), unbiased=False, keepdim=True) + 1e-5)
        y = x / torch.maximum(left, self.v.view(_view(x)) * x + inst)
        return y * self.weight.view(_view(x)) + self.bias.view(_view(x))


class _TorchPointwise(nn.Module):
    """``gamma * torch.tanh(alpha * x) + beta`` (or erf(alpha * x + shift)): what a user writes."""

    def __init__(self, c: int, erf: bool):
        super().__init__()
        self.erf = erf
        self.alpha = nn.Parameter(torch.full((1,), 0.5))
        self.shift = nn.Parameter(torch.zeros(1)) if erf else None
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        a = torch.erf(self.alpha * x + self.shift) if self.erf else torch.tanh(self.alpha * x)
        return self.weight * a + self.bias


class _TorchWS(nn.Module):
    """Weight Standardization as written in torch ops (timm's StdConv2d without the conv)."""

    def forward(self, w):
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) / torch.sqrt(var + 1e-5)


class _NormlabWS(nn.Module):
    def forward(self, w):
        from normlab.functional import weight_standardize

        return weight_standardize(w, 1e-5)


class _Residual:
    """A fixed residual tensor shaped like the input (made on first use; not a parameter, so both
    contenders time x + r and the norm, and the gradient to x only)."""

    r: torch.Tensor | None = None

    def residual(self, x):
        if self.r is None or self.r.shape != x.shape or self.r.stride() != x.stride():
            g = torch.Generator().manual_seed(1)
            self.r = torch.empty_like(x.detach()).copy_(torch.randn(x.shape, generator=g))
        return self.r


class _TorchAddLN(_Residual, nn.LayerNorm):
    def forward(self, x):
        return super().forward(x + self.residual(x))


class _TorchAddRMS(_Residual, nn.RMSNorm):
    def forward(self, x):
        return super().forward(x + self.residual(x))


class _NormlabAddNorm(_Residual, nn.Module):
    def __init__(self, c: int, rms: bool):
        super().__init__()
        import normlab.nn as L

        self.norm = L.AddRMSNorm(c, eps=1e-6) if rms else L.AddLayerNorm(c)
        self.weight, self.bias = self.norm.weight, self.norm.bias

    def forward(self, x):
        return self.norm(x, self.residual(x))[0]


class _TorchGNSiLU(nn.GroupNorm):
    def forward(self, x):
        return torch.nn.functional.silu(super().forward(x))


class _TorchBNReLU(nn.BatchNorm2d):
    def forward(self, x):
        return torch.relu(super().forward(x))


def _layer(norm: str, c: int, native: bool) -> nn.Module:
    if native:
        mk = {
            "bn": lambda: nn.BatchNorm2d(c),
            "bn_eval": lambda: nn.BatchNorm2d(c).eval(),
            "mobn": lambda: _TorchMeanOnlyBN(c),
            "gn": lambda: nn.GroupNorm(32, c),
            "in": lambda: nn.InstanceNorm2d(c, affine=True),
            "ln": lambda: nn.LayerNorm(c),
            "rms": lambda: nn.RMSNorm(c, eps=1e-6),
            "brn": lambda: _TorchBatchRenorm(c),
            "gbn": lambda: _TorchGhostBN(c),
            "ws": lambda: _TorchWS(),
            "frn": lambda: _TorchFRN(c),
            "evonorm-s0": lambda: _TorchEvoS0(c),
            "evonorm-b0": lambda: _TorchEvoB0(c),
            "dyt": lambda: _TorchPointwise(c, erf=False),
            "derf": lambda: _TorchPointwise(c, erf=True),
            "add_ln": lambda: _TorchAddLN(c),
            "add_rms": lambda: _TorchAddRMS(c, eps=1e-6),
            "gn_silu": lambda: _TorchGNSiLU(32, c),
            "bn_relu": lambda: _TorchBNReLU(c),
        }
    else:
        import normlab.nn as L

        mk = {
            "bn": lambda: L.BatchNorm2d(c),
            "bn_eval": lambda: L.BatchNorm2d(c).eval(),
            "mobn": lambda: L.MeanOnlyBatchNorm(c),
            "gn": lambda: L.GroupNorm(32, c),
            "in": lambda: L.InstanceNorm2d(c, affine=True),
            "ln": lambda: L.LayerNorm(c),
            "rms": lambda: L.RMSNorm(c, eps=1e-6),
            "brn": lambda: L.BatchRenorm2d(c),
            "gbn": lambda: L.GhostBatchNorm2d(c, virtual_batch_size=8),
            "ws": lambda: _NormlabWS(),
            "frn": lambda: L.FilterResponseNorm2d(c),
            "evonorm-s0": lambda: L.EvoNormS0(c),
            "evonorm-b0": lambda: L.EvoNormB0(c),
            "dyt": lambda: L.DynamicTanh(c),
            "derf": lambda: L.DynamicErf(c),
            "add_ln": lambda: _NormlabAddNorm(c, rms=False),
            "add_rms": lambda: _NormlabAddNorm(c, rms=True),
            "gn_silu": lambda: L.GroupNormSiLU(32, c),
            "bn_relu": lambda: L.BatchNormReLU2d(c),
        }
    m = mk[norm]()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(1.0 if p.dim() and p is getattr(m, "weight", None) else 0.0, 0.1)
    return m


def _contender(name: str, norm: str, c: int, x: torch.Tensor, dy: torch.Tensor):
    """(forward, forward+backward) closures of one contender."""
    from normlab.core import cpu as cpu_backend
    from normlab.core.dispatch import use_backend

    m = _layer(norm, c, native=name in ("torch", "torch-compile")).to(x.device)
    params = [p for p in m.parameters() if p.requires_grad]
    if name == "torch-compile":
        # one compiled graph per shape, static (every case is a new shape; dynamo's default of
        # 8 recompiles per code object would silently fall back to eager)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        m = torch.compile(m, dynamic=False)
    backend = {"torch": None, "torch-compile": None, "reference": "reference", "cpu": "cpu",
               "cpu-nopool": "cpu", "gpu": "gpu"}[name]
    pool_mb = 0 if name == "cpu-nopool" else None

    def call(fn):
        if backend is None:
            return fn()
        saved = cpu_backend._pool.max_bytes
        if pool_mb is not None:
            cpu_backend.set_buffer_pool(pool_mb)
        try:
            with use_backend(backend):
                return fn()
        finally:
            cpu_backend._pool.max_bytes = saved

    def fwd():
        return call(lambda: m(x))

    def fwdbwd():
        def f():
            y = m(x)
            return torch.autograd.grad(y, [x, *params], dy)

        return call(f)

    return fwd, fwdbwd


def _timeit(fn: Callable, device: str = "cpu") -> float:
    if device == "cuda":
        # CUDA events on the stream around the call; synchronized first so that nothing queued
        # earlier is counted, and after so that elapsed_time is defined
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        del out
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    del out
    return dt


def _make_input(case: Case, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(case.shape, generator=g) * 1.5 + 0.3).to(device)
    if case.layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def run_case(case: Case, contenders: list[str], reps: int, device: str = "cpu") -> Case:
    """Median forward and forward+backward times of every contender, interleaved."""
    x = _make_input(case, device)
    dy = torch.randn_like(x)  # same memory format as x (and as y)
    c = case.shape[1]
    fns = {name: _contender(name, case.norm, c, x, dy) for name in contenders}
    buf = torch.empty_like(x)
    src = x.detach()
    samples: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwdbwd": []} for n in contenders}
    samples["copy"] = {"copy": []}
    for name in contenders:  # warm-up: compile, pool, first-touch
        fns[name][1]()
        fns[name][0]()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for rep in range(reps):
            order = contenders if rep % 2 == 0 else contenders[::-1]
            samples["copy"]["copy"].append(_timeit(lambda: buf.copy_(src), device))
            for name in order:
                fwd, fwdbwd = fns[name]
                samples[name]["fwd"].append(_timeit(fwd, device))
                samples[name]["fwdbwd"].append(_timeit(fwdbwd, device))
    finally:
        if gc_was:
            gc.enable()
    case.times = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in samples.items()}
    del fns, x, dy, buf
    gc.collect()
    return case


# --------------------------------------------------------------------------------------------
# compile time
# --------------------------------------------------------------------------------------------

_COMPILE_SNIPPET = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from normlab.core import cpu, ops
t1 = time.perf_counter()
dtypes = [getattr(torch, d) for d in sys.argv[1].split(",")]
families = sys.argv[2]
if families == "all":
    cpu.warmup(dtypes)
else:  # layer norm only
    for dt in dtypes:
        x = torch.randn(8, 16, dtype=dt, requires_grad=True)
        y = ops.layer_norm(x, 1, None, None, 1e-5, backend="cpu")[0]
        torch.autograd.grad(y.sum(), x)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_calls_s": t2 - t1}))
"""


def compile_times(full: bool) -> dict:
    """First-call time in fresh processes: cold (empty numba cache) then cached (same cache).

    A temporary NUMBA_CACHE_DIR keeps the project's own cache untouched. ``full``: every kernel
    in float32 and float64; otherwise the layer-norm kernels in float32 only (quick mode).
    """
    import os

    what = ("float32,float64", "all") if full else ("float32", "ln")
    out = {"scope": "all kernels, float32+float64" if full else "layer-norm kernels, float32"}
    with tempfile.TemporaryDirectory(prefix="normlab-bench-cache-") as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=tmp)
        for label in ("cold", "cached"):
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", _COMPILE_SNIPPET, *what], env=env,
                                 capture_output=True, text=True, timeout=900)
            wall = time.perf_counter() - t
            if res.returncode != 0:
                out[label] = {"error": res.stderr.strip().splitlines()[-1:]}
                continue
            info = json.loads(res.stdout.strip().splitlines()[-1])
            info["process_wall_s"] = wall
            out[label] = info
    return out


# --------------------------------------------------------------------------------------------
# derived numbers
# --------------------------------------------------------------------------------------------


def metrics(case: Case, name: str) -> dict:
    """speed-ups over torch, effective GB/s and % of copy bandwidth of one contender."""
    n = case.numel
    t = case.times
    copy_gbs = 8 * n / t["copy"]["copy"] / 1e9
    m = {"copy_gbs": copy_gbs}
    for k, nbytes in (("fwd", 8 * n), ("fwdbwd", 20 * n)):
        m[f"{k}_ms"] = t[name][k] * 1e3
        m[f"{k}_speedup"] = t["torch"][k] / t[name][k]
        m[f"{k}_gbs"] = nbytes / t[name][k] / 1e9
        m[f"{k}_pct_copy"] = 100 * m[f"{k}_gbs"] / copy_gbs
    return m


def summarize(results: list[Case], name: str = "cpu") -> dict:
    """Per norm (and layout): median / min forward+backward speed-up, GB/s, % of copy."""
    out: dict[str, dict] = {}
    for norm in dict.fromkeys(c.norm for c in results):
        groups = {"all": [c for c in results if c.norm == norm and name in c.times]}
        for lay in ("nchw", "nhwc"):
            sel = [c for c in groups["all"] if c.layout == lay]
            if sel:
                groups[lay] = sel
        out[norm] = {}
        for g, sel in groups.items():
            if not sel:
                continue
            ms = [metrics(c, name) for c in sel]
            worst = min(range(len(sel)), key=lambda i: ms[i]["fwdbwd_speedup"])
            large = [m for c, m in zip(sel, ms) if 4 * c.numel >= LARGE_BYTES]
            out[norm][g] = {
                "shapes": len(sel),
                "median_fwdbwd_speedup": statistics.median(m["fwdbwd_speedup"] for m in ms),
                "median_fwd_speedup": statistics.median(m["fwd_speedup"] for m in ms),
                "min_fwdbwd_speedup": ms[worst]["fwdbwd_speedup"],
                "min_shape": sel[worst].label,
                "median_fwdbwd_gbs": statistics.median(m["fwdbwd_gbs"] for m in ms),
                "median_torch_fwdbwd_gbs": statistics.median(
                    m["fwdbwd_gbs"] / m["fwdbwd_speedup"] for m in ms),
                "large_shapes": len(large),
                "large_median_pct_copy": statistics.median(m["fwdbwd_pct_copy"] for m in large)
                if large else None,
                "large_min_pct_copy": min(m["fwdbwd_pct_copy"] for m in large) if large else None,
            }
    return out


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def composed_summary(results: list[Case]) -> dict:
    """Per composed norm: forward+backward speed-up of the cpu backend over the eager composition
    and over torch.compile of it (median, min over shapes), and the worst large-shape % of copy."""
    out = {}
    for norm in dict.fromkeys(c.norm for c in results):
        sel = [c for c in results if c.norm == norm and "torch-compile" in c.times and "cpu" in c.times
               and norm in COMPOSED]
        if not sel:
            continue
        xe = [c.times["torch"]["fwdbwd"] / c.times["cpu"]["fwdbwd"] for c in sel]
        xc = [c.times["torch-compile"]["fwdbwd"] / c.times["cpu"]["fwdbwd"] for c in sel]
        large = [metrics(c, "cpu")["fwdbwd_pct_copy"] for c in sel if 4 * c.numel >= LARGE_BYTES]
        out[norm] = {"shapes": len(sel), "median_x_eager": statistics.median(xe), "min_x_eager": min(xe),
                     "median_x_compile": statistics.median(xc), "min_x_compile": min(xc),
                     "large_min_pct_copy": min(large) if large else None}
    return out


def render(results: list[Case], contenders: list[str], compile_info: dict | None, console=None):
    """Rich tables: one row per case, then the per-norm summary."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    others = [n for n in contenders if n != "torch"]
    if results:
        _render_cases(results, contenders, others, console)
    if compile_info:
        _render_compile(compile_info, console)


def _render_cases(results, contenders, others, console):
    from rich.table import Table

    t = Table(title="normlab kernels vs torch native (float32, medians; speed-up = torch time / time)")
    t.add_column("norm")
    t.add_column("shape")
    t.add_column("torch f ms", justify="right")
    t.add_column("cpu f ms", justify="right")
    t.add_column("f ×", justify="right")
    t.add_column("torch f+b ms", justify="right")
    for n in others:
        t.add_column(f"{n} f+b ms", justify="right")
    for n in others:
        t.add_column(f"{n} f+b ×", justify="right")
    t.add_column("cpu f+b GB/s", justify="right")
    t.add_column("copy GB/s", justify="right")
    t.add_column("% copy", justify="right")
    for c in results:
        m = metrics(c, "cpu")
        sp = m["fwdbwd_speedup"]
        style = "red" if sp < 1.0 else ("green" if sp >= 1.5 else "yellow")
        row = [c.norm, c.label, f"{c.times['torch']['fwd'] * 1e3:.2f}", f"{m['fwd_ms']:.2f}",
               f"{m['fwd_speedup']:.2f}", f"{c.times['torch']['fwdbwd'] * 1e3:.2f}"]
        row += [f"{c.times[n]['fwdbwd'] * 1e3:.2f}" for n in others]
        row += [f"[{style}]{metrics(c, n)['fwdbwd_speedup']:.2f}[/]" if n == "cpu"
                else f"{metrics(c, n)['fwdbwd_speedup']:.2f}" for n in others]
        row += [f"{m['fwdbwd_gbs']:.1f}", f"{m['copy_gbs']:.1f}", f"{m['fwdbwd_pct_copy']:.0f}"]
        t.add_row(*row)
    console.print(t)
    s = Table(title="summary: cpu backend, forward+backward speed-up over torch native")
    for col in ("norm", "layout", "shapes", "median ×", "min ×", "min shape", "median fwd ×",
                "cpu GB/s", "torch GB/s", "large: % copy (median/min)"):
        s.add_column(col, justify="left" if col in ("norm", "layout", "min shape") else "right")
    for norm, groups in summarize(results).items():
        for g, d in groups.items():
            large = (f"{d['large_median_pct_copy']:.0f} / {d['large_min_pct_copy']:.0f}"
                     if d["large_shapes"] else "-")
            s.add_row(norm, g, str(d["shapes"]), f"{d['median_fwdbwd_speedup']:.2f}",
                      f"{d['min_fwdbwd_speedup']:.2f}", d["min_shape"],
                      f"{d['median_fwd_speedup']:.2f}", f"{d['median_fwdbwd_gbs']:.1f}",
                      f"{d['median_torch_fwdbwd_gbs']:.1f}", large)
    console.print(s)
    if "torch-compile" in contenders:
        v = Table(title="methods torch lacks: normlab cpu vs the eager composition and vs torch.compile of it "
                        "(forward+backward medians; targets ≥ 2× eager, ≥ 1× compile, large shapes ≥ 50% copy)")
        for col in ("norm", "shapes", "median × eager", "min × eager", "median × compile", "min × compile",
                    "large: min % copy"):
            v.add_column(col, justify="left" if col == "norm" else "right")
        for norm, d in composed_summary(results).items():
            v.add_row(norm, str(d["shapes"]), f"{d['median_x_eager']:.2f}", f"{d['min_x_eager']:.2f}",
                      f"{d['median_x_compile']:.2f}", f"{d['min_x_compile']:.2f}",
                      "-" if d["large_min_pct_copy"] is None else f"{d['large_min_pct_copy']:.0f}")
        console.print(v)
    if "cpu-nopool" in contenders:
        p = Table(title="cpu backend without its buffer pool (allocation via torch.empty)")
        for col in ("norm", "median f+b × (no pool)", "min ×", "median f+b × (pool)"):
            p.add_column(col, justify="right")
        with_pool = summarize(results, "cpu")
        for norm, groups in summarize(results, "cpu-nopool").items():
            d = groups["all"]
            p.add_row(norm, f"{d['median_fwdbwd_speedup']:.2f}", f"{d['min_fwdbwd_speedup']:.2f}",
                      f"{with_pool[norm]['all']['median_fwdbwd_speedup']:.2f}")
        console.print(p)


def _render_compile(compile_info, console):
    from rich.table import Table

    if compile_info:
        ct = Table(title=f"first-call time in a fresh process ({compile_info.get('scope', '')})")
        for col in ("cache", "import s", "first calls s", "process wall s"):
            ct.add_column(col, justify="right")
        for label in ("cold", "cached"):
            d = compile_info.get(label, {})
            if "error" in d:
                ct.add_row(label, "error", str(d["error"]), "")
            elif d:
                ct.add_row(label, f"{d['import_s']:.2f}", f"{d['first_calls_s']:.2f}",
                           f"{d['process_wall_s']:.2f}")
        console.print(ct)


def save(results: list[Case], contenders: list[str], compile_info: dict | None, out: Path,
         meta: dict) -> dict[str, Path]:
    """kernels.json (raw medians + derived numbers) and kernels.png (speed-up chart)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in results:
        d = asdict(c)
        d["label"] = c.label
        d["metrics"] = {n: metrics(c, n) for n in contenders if n != "torch"}
        rows.append(d)
    doc = {"meta": meta, "contenders": contenders, "cases": rows,
           "summary": {n: summarize(results, n) for n in contenders if n != "torch"},
           "composed": composed_summary(results),
           "compile": compile_info}
    jpath = out / "kernels.json"
    jpath.write_text(json.dumps(doc, indent=2))
    ppath = out / "kernels.png"
    _chart(results, contenders, ppath)
    return {"json": jpath, "png": ppath}


def _chart(results: list[Case], contenders: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = list(dict.fromkeys(c.norm for c in results))
    fig, axes = plt.subplots(len(norms), 2, figsize=(16, 2.6 * len(norms) + 1), squeeze=False)
    others = [n for n in contenders if n != "torch"]
    for row, norm in enumerate(norms):
        sel = [c for c in results if c.norm == norm]
        labels = [c.label for c in sel]
        ax = axes[row][0]
        width = 0.8 / max(1, len(others))
        for k, name in enumerate(others):
            vals = [metrics(c, name)["fwdbwd_speedup"] for c in sel]
            ax.bar([i + k * width for i in range(len(sel))], vals, width, label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.5, color="g", lw=0.8, ls="--")
        ax.set_ylabel(f"{norm}\nf+b speed-up")
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sel))])
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
        if row == 0:
            ax.legend(fontsize=7)
            ax.set_title("forward+backward speed-up over torch native (log scale)")
        ax2 = axes[row][1]
        sizes = [4 * c.numel / 2**20 for c in sel]
        for name in ["torch"] + others:
            gbs = [20 * c.numel / c.times[name]["fwdbwd"] / 1e9 for c in sel]
            ax2.scatter(sizes, gbs, s=12, label=name)
        ax2.scatter(sizes, [8 * c.numel / c.times["copy"]["copy"] / 1e9 for c in sel], s=12,
                    marker="x", color="k", label="copy_")
        ax2.set_xscale("log")
        ax2.set_xlabel("tensor MiB")
        ax2.set_ylabel("effective GB/s")
        if row == 0:
            ax2.legend(fontsize=7)
            ax2.set_title("effective bandwidth, f+b (model: 20·n bytes), copy: 8·n bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool, norms: list[str], contenders: list[str], reps: int, progress=None,
        device: str = "cpu", large: bool = False) -> list[Case]:
    results = []
    todo = cases(quick, norms, device, large)
    for i, case in enumerate(todo):
        if progress:
            progress(i, len(todo), case)
        results.append(run_case(case, contenders, reps, device))
    return results


def render_device(results: list[Case], contenders: list[str], console=None) -> None:
    """The CUDA run's table: per case and contender forward / forward+backward medians, GB/s by
    the minimum-traffic model, % of the copy measured in the same run, × torch native."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="CUDA: normlab gpu backend vs torch (float32, medians; GB/s by the minimum-traffic model, "
                    "% of a device-to-device copy in the same run)")
    for col in ("norm", "shape", "contender", "f ms", "f GB/s", "f % copy", "f ×torch", "f+b ms", "f+b GB/s",
                "f+b % copy", "f+b ×torch"):
        t.add_column(col, justify="left" if col in ("norm", "shape", "contender") else "right")
    for c in results:
        for name in contenders:
            if name not in c.times:
                continue
            m = metrics(c, name)
            t.add_row(c.norm, c.label, name, f"{m['fwd_ms']:.3f}", f"{m['fwd_gbs']:.0f}", f"{m['fwd_pct_copy']:.0f}",
                      f"{m['fwd_speedup']:.2f}", f"{m['fwdbwd_ms']:.3f}", f"{m['fwdbwd_gbs']:.0f}",
                      f"{m['fwdbwd_pct_copy']:.0f}", f"{m['fwdbwd_speedup']:.2f}")
    console.print(t)
