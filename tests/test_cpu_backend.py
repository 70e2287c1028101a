"""The fused numba CPU backend (normlab.core.cpu) against the reference backend and torch.

Correctness only (never speed). Every op is checked on a case matrix: shapes with odd sizes,
N = 1, size-1 spatial dims, 2-D / 3-D / 4-D / 5-D; contiguous, channels_last and sliced views;
float32 and float64; forward, statistics, and the gradients w.r.t. x, γ and β. float32 results
are compared with the reference evaluated in float64 on the same (float32) values, so the
tolerance measures the kernel's own error. Then the numerics cases of the issue (offset 1e6,
constant input, |x| ≈ 1e30, NaN), double backward (gradgradcheck), thread count, dispatch
fallbacks, the output-buffer pool and the numba cache location.
"""

from __future__ import annotations

import gc
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as TF

numba = pytest.importorskip("numba")

from normlab.core import cpu, dispatch, ops  # noqa: E402
from normlab.core import reference as ref  # noqa: E402


class Via:
    """A backend reached through the ``normlab::`` operators (which register its autograd), with
    the statistics a method does not have as None."""

    def __init__(self, name):
        self.name = name

    @staticmethod
    def _opt(t):
        return None if t.numel() == 0 and t.dim() == 1 else t

    def batch_norm(self, x, w, b, eps, center_only=False):
        y, m, v, _ = ops.batch_norm(x, w, b, eps, center_only, backend=self.name)
        return y, m, self._opt(v)

    def batch_norm_eval(self, x, mean, var, w, b, eps, center_only=False):
        return ops.batch_norm_eval(x, mean, var, w, b, eps, center_only, backend=self.name)

    def group_norm(self, x, g, w, b, eps):
        return ops.group_norm(x, g, w, b, eps, backend=self.name)[:3]

    def layer_norm(self, x, k, w, b, eps, rms=False):
        y, m, v, _ = ops.layer_norm(x, k, w, b, eps, rms, backend=self.name)
        return y, (None if rms else m), v


CPU, REF = Via("cpu"), Via("reference")

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def close(actual, expected, tol, what=""):
    """|a − e| <= tol·|e| + tol·max(1, max|e|) elementwise (NaN == NaN)."""
    assert actual is not None and expected is not None, what
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: {tuple(a.shape)} != {tuple(e.shape)}"
    fin = e[torch.isfinite(e)]
    scale = max(1.0, float(fin.abs().max())) if fin.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale, equal_nan=True, msg=lambda m: f"{what}\n{m}")


# --------------------------------------------------------------------------------------------
# op configurations: name -> (cpu call, reference call, parameter shape)
# --------------------------------------------------------------------------------------------


def _stats(x):
    c = x.shape[1]
    g = torch.Generator().manual_seed(7)
    mean = torch.randn(c, generator=g, dtype=torch.float64).to(x.dtype)
    var = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(x.dtype)
    return mean, var


def _run(backend, op, x, w, b):
    """Call ``op`` on ``backend``; returns (y, stats tuple)."""
    c = x.shape[1] if x.dim() > 1 else None
    if op == "bn":
        y, m, v = backend.batch_norm(x, w, b, 1e-5)
        return y, (m, v)
    if op == "mobn":
        y, m, v = backend.batch_norm(x, None, b, 0.0, center_only=True)
        assert v is None
        return y, (m,)
    if op == "bn_eval":
        mean, var = _stats(x)
        return backend.batch_norm_eval(x, mean, var, w, b, 1e-5), ()
    if op == "mobn_eval":
        mean, _ = _stats(x)
        return backend.batch_norm_eval(x, mean, None, None, b, 0.0, center_only=True), ()
    if op in ("gn", "gn1", "in"):
        y, m, v = backend.group_norm(x, {"gn": 2, "gn1": 1, "in": c}[op], w, b, 1e-5)
        return y, (m, v)
    if op == "ln":
        y, m, v = backend.layer_norm(x, 1, w, b, 1e-5)
        return y, (m, v)
    if op == "ln2":
        y, m, v = backend.layer_norm(x, 2, w, b, 1e-5)
        return y, (m, v)
    if op == "rms":
        y, m, v = backend.layer_norm(x, 1, w, None, 1e-6, rms=True)
        assert m is None
        return y, (v,)
    raise AssertionError(op)


def _params(op, x, dtype, affine=True):
    """(weight, bias) leaves for ``op`` on ``x``; None where the op takes none."""
    g = torch.Generator().manual_seed(3)
    if op in ("ln", "rms"):
        shape = x.shape[-1:]
    elif op == "ln2":
        shape = x.shape[-2:]
    else:
        shape = (x.shape[1],)
    w = (1 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    if not affine:
        return None, None
    if op in ("mobn", "mobn_eval"):
        return None, b
    if op == "rms":
        return w, None
    return w, b


def _layout(x, layout):
    if layout == "channels_last":
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[x.dim()]
        return x.contiguous(memory_format=fmt)
    if layout == "sliced":
        big = torch.zeros(x.shape[:-1] + (2 * x.shape[-1] + 1,), dtype=x.dtype)
        big[..., 1::2] = x
        return big[..., 1::2]
    return x.contiguous()


def _input(shape, dtype, layout, seed=0, scale=1.5, offset=0.3):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    return _layout(x, layout).requires_grad_()


def _compare(op, x, affine=True, tol=None):
    """cpu(x) vs reference(x in float64): y, statistics, dx, dγ, dβ."""
    dtype = x.dtype
    tol = tol or TOL[dtype]
    w, b = _params(op, x, dtype, affine)
    y, stats = _run(CPU, op, x, w, b)
    xr = x.detach().double().requires_grad_()
    wr = None if w is None else w.detach().double().requires_grad_()
    br = None if b is None else b.detach().double().requires_grad_()
    yr, stats_r = _run(REF, op, xr, wr, br)
    assert y.dtype == dtype and y.shape == x.shape
    close(y, yr, tol, f"{op} y")
    for s, sr in zip(stats, stats_r):
        assert s.dtype == ops.stat_dtype(x), f"{op}: stat dtype {s.dtype}"
        close(s, sr, tol, f"{op} stat")
    g = torch.Generator().manual_seed(11)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    leaves = [t for t in (x, w, b) if t is not None]
    leaves_r = [t for t in (xr, wr, br) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy.to(dtype))
    grads_r = torch.autograd.grad(yr, leaves_r, dy)
    for name, gc_, gr in zip(("dx", "dw", "db"), grads, grads_r):
        assert gc_.dtype == dtype
        close(gc_, gr, tol, f"{op} {name}")
    return y, grads


OPS_NC = ["bn", "mobn", "bn_eval", "mobn_eval", "gn", "gn1", "in", "ln", "ln2", "rms"]
SHAPES = [
    (4, 6, 5, 3),  # 4-D, odd spatial
    (1, 6, 7, 9),  # N = 1
    (3, 6, 1, 1),  # size-1 spatial
    (3, 10, 7),  # 3-D
    (2, 4, 3, 2, 5),  # 5-D
    (5, 6),  # 2-D
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", OPS_NC)
def test_matches_reference_contiguous(op, shape, dtype):
    if op == "ln2" and len(shape) < 3:
        pytest.skip("ln2 needs 2 normalized dims and a batch dim")
    if op == "bn" and math.prod(shape) // shape[1] == 1:
        pytest.skip("one value per channel")
    _compare(op, _input(shape, dtype, "contiguous"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (1, 6, 7, 9), (2, 4, 3, 2, 5), (3, 8, 1, 2)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", OPS_NC)
def test_matches_reference_channels_last(op, shape, dtype):
    x = _input(shape, dtype, "channels_last")
    y, grads = _compare(op, x)
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if not x.is_contiguous() and op not in ("ln", "ln2", "rms"):
        # batch/group norm run natively on channels-last memory: y and dx keep the layout
        assert y.is_contiguous(memory_format=fmt)
        assert grads[0].is_contiguous(memory_format=fmt)
    assert y.is_contiguous(memory_format=fmt) or y.is_contiguous()


@pytest.mark.parametrize("op", OPS_NC)
def test_matches_reference_sliced_view(op):
    _compare(op, _input((3, 6, 5, 4), torch.float32, "sliced"))


@pytest.mark.parametrize("op", ["gn", "bn", "ln"])
def test_no_affine(op):
    _compare(op, _input((4, 6, 5, 3), torch.float64, "contiguous"), affine=False)
    _compare(op, _input((4, 6, 5, 3), torch.float32, "channels_last"), affine=False)


def test_parameter_dtype_differs_from_input():
    """float32 input with float64 γ/β: computed in float32, gradients returned in float64."""
    x = _input((4, 6, 5, 3), torch.float32, "contiguous")
    w = torch.linspace(0.5, 1.5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.linspace(-1, 1, 6, dtype=torch.float64, requires_grad=True)
    y = CPU.group_norm(x, 3, w, b, 1e-5)[0]
    assert y.dtype == torch.float32
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    assert gw.dtype == torch.float64 and gb.dtype == torch.float64
    ref_y = REF.group_norm(x.detach().double(), 3, w.detach(), b.detach(), 1e-5)[0]
    close(y, ref_y, 1e-5)
    close(gb, torch.full((6,), 60.0, dtype=torch.float64), 1e-6)


def test_channels_last_3d_input_transposed():
    """(N, L, C) memory seen as (N, C, L) runs natively (channels innermost)."""
    base = _input((3, 9, 8), torch.float32, "contiguous").detach()
    x = base.transpose(1, 2).requires_grad_()  # (3, 8, 9), channels innermost
    for op in ("bn", "gn", "in", "bn_eval"):
        y, grads = _compare(op, x)
        assert y.stride() == x.stride()


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", OPS_NC)
def test_multithreaded_paths(op, layout, monkeypatch):
    """Small inputs normally run on one thread; force the threaded paths (thread chunks of
    rows/channels, per-thread dγ/dβ partials, and the channels-last row-chunk merge for odd N
    and for batch norm) on small odd shapes."""
    monkeypatch.setattr(cpu.threads, "PARALLEL_MIN_NUMEL", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for shape in [(3, 6, 5, 4), (4, 6, 3, 5), (1, 6, 7, 3)]:
            _compare(op, _input(shape, torch.float32, layout))
            _compare(op, _input(shape, torch.float64, layout))
    finally:
        torch.set_num_threads(before)


def test_larger_shapes_multiple_blocks():
    """Rows longer than a kernel block, many rows, odd sizes: exercises the blocking paths."""
    for op, shape in [("ln", (37, 1500)), ("rms", (33, 1029)), ("gn", (3, 8, 33, 31)),
                      ("bn", (5, 3, 41, 43)), ("in", (2, 6, 40, 30))]:
        _compare(op, _input(shape, torch.float32, "contiguous"))
        if len(shape) == 4:
            _compare(op, _input(shape, torch.float32, "channels_last"))


# --------------------------------------------------------------------------------------------
# torch native
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_torch_native(layout):
    x = _input((4, 8, 6, 5), torch.float64, layout)
    xd = x.detach()
    w = torch.linspace(0.5, 1.5, 8, dtype=torch.float64)
    b = torch.linspace(-1, 1, 8, dtype=torch.float64)
    close(CPU.batch_norm(xd, w, b, 1e-5)[0], TF.batch_norm(xd, None, None, w, b, True, 0.0, 1e-5), 1e-10)
    mean, var = _stats(xd)
    close(CPU.batch_norm_eval(xd, mean, var, w, b, 1e-5), TF.batch_norm(xd, mean, var, w, b, False, 0.0, 1e-5), 1e-10)
    close(CPU.group_norm(xd, 4, w, b, 1e-5)[0], TF.group_norm(xd, 4, w, b, 1e-5), 1e-10)
    close(CPU.group_norm(xd, 8, w, b, 1e-5)[0], TF.instance_norm(xd, weight=w, bias=b, eps=1e-5), 1e-10)
    lw = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    close(CPU.layer_norm(xd, 1, lw, None, 1e-5)[0], TF.layer_norm(xd, (5,), lw, None, 1e-5), 1e-10)
    close(CPU.layer_norm(xd, 1, lw, None, 1e-6, rms=True)[0], TF.rms_norm(xd, (5,), lw, 1e-6), 1e-10)


# --------------------------------------------------------------------------------------------
# numerics of the issue
# --------------------------------------------------------------------------------------------

NUM_OPS = ["bn", "gn", "in", "ln", "rms", "mobn"]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", NUM_OPS)
def test_offset_1e6_std_0p1_float32(op, layout):
    """float32 x = 1e6 + 0.1·z: as accurate as the float64 reference on the same values."""
    x = _input((4, 8, 6, 5), torch.float32, layout, seed=1, scale=0.1, offset=1e6)
    _compare(op, x)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", NUM_OPS)
def test_constant_input(op, layout):
    x = _layout(torch.full((3, 8, 5, 4), 2.75), layout).requires_grad_()
    w, b = _params(op, x, torch.float32)
    y, _ = _run(CPU, op, x, w, b)
    if op != "rms":  # rms of a constant is not zero: no special value
        expected = (b if b is not None else torch.zeros(())).detach()
        shape = (1, -1, 1, 1) if op in ("bn", "gn", "in", "mobn") else (-1,)
        assert torch.equal(y.detach(), expected.view(shape).expand_as(y)), "constant input: y must be β"
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], torch.randn_like(y))
    assert all(torch.isfinite(g).all() for g in grads)
    _compare(op, x)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", NUM_OPS)
def test_huge_values_float32(op, layout):
    """|x| ≈ 1e30 in float32: x² overflows float32, the kernels must not."""
    x = _input((3, 8, 5, 4), torch.float32, layout, seed=2, scale=1e30, offset=0.0)
    w, b = _params(op, x, torch.float32)
    y, _ = _run(CPU, op, x, w, b)
    assert torch.isfinite(y).all()
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], torch.randn_like(y))
    assert all(torch.isfinite(g).all() for g in grads)
    if op != "mobn":  # mean-only: y ~ 1e30 itself; compared below through the reference
        _compare(op, x)


@pytest.mark.parametrize("op", ["bn", "gn", "ln", "rms"])
def test_huge_values_float64_fall_back_to_reference(op):
    """float64 squares overflowing float64 (|x| ≈ 1e200): recomputed by the reference."""
    x = _input((3, 8, 5, 4), torch.float64, "contiguous", seed=2, scale=1e200, offset=0.0)
    w, b = _params(op, x, torch.float64)
    y, _ = _run(CPU, op, x, w, b)
    yr, _ = _run(REF, op, x.detach(), None if w is None else w.detach(), None if b is None else b.detach())
    assert torch.isfinite(y).all()
    close(y, yr, 1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", ["bn", "gn", "in", "ln", "rms", "bn_eval"])
def test_nan_propagates(op, layout):
    x = _input((3, 8, 5, 4), torch.float32, layout).detach()
    x[1, 2, 3, 1] = float("nan")
    x = _layout(x, layout).requires_grad_()
    w, b = _params(op, x, torch.float32)
    y, _ = _run(CPU, op, x, w, b)
    xr = x.detach().double()
    yr, _ = _run(REF, op, xr, None if w is None else w.detach().double(),
                 None if b is None else b.detach().double())
    assert torch.isnan(y).any()
    assert torch.equal(torch.isnan(y), torch.isnan(yr)), "NaN pattern differs from the reference"
    grads = torch.autograd.grad(y, [t for t in (x, w) if t is not None], torch.ones_like(y))
    assert any(torch.isnan(g).any() for g in grads)  # eval: dx = a·dy has none, dγ has


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


def _gradcheck_fn(op, layout):
    def f(x, w, b):
        return _run(CPU, op, _layout(x, layout), w, b)[0]

    return f


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", ["bn", "mobn", "bn_eval", "gn", "in", "ln", "rms"])
def test_gradcheck(op, layout):
    x = _input((2, 4, 3, 2), torch.float64, "contiguous")
    w, b = _params(op, x, torch.float64)
    assert torch.autograd.gradcheck(_gradcheck_fn(op, layout), (x, w, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("op,layout", [("bn", "channels_last"), ("bn_eval", "contiguous"),
                                       ("gn", "contiguous"), ("in", "channels_last"),
                                       ("ln", "contiguous"), ("rms", "contiguous"),
                                       ("mobn", "contiguous")])
def test_gradgradcheck(op, layout):
    """Double backward (create_graph=True) goes through the reference backend's graph."""
    x = _input((2, 4, 2, 2), torch.float64, "contiguous")
    w, b = _params(op, x, torch.float64)
    assert torch.autograd.gradgradcheck(_gradcheck_fn(op, layout), (x, w, b), eps=1e-6, atol=1e-5)


def test_double_backward_matches_reference():
    """create_graph=True: the gradient graph is the reference backend's (same values)."""
    x = _input((3, 6, 4, 4), torch.float64, "channels_last")
    w, b = _params("gn", x, torch.float64)
    outs = []
    for backend in (CPU, REF):
        y = _run(backend, "gn", x, w, b)[0]
        dx, dw = torch.autograd.grad((y ** 2).sum(), (x, w), create_graph=True)
        outs.append(torch.autograd.grad((dx ** 2).sum() + dw.sum(), (x, w, b), allow_unused=True))
    for a, e in zip(*outs):
        if e is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            close(a, e, 1e-10)


def test_only_weight_requires_grad_and_no_grad_mode():
    x = _input((4, 6, 3, 3), torch.float32, "contiguous").detach()
    w, b = _params("bn", x, torch.float32)
    y = CPU.batch_norm(x, w, None, 1e-5)[0]
    (dw,) = torch.autograd.grad(y.sum() + (y ** 2).sum(), (w,))
    assert torch.isfinite(dw).all()
    with torch.no_grad():
        y2 = CPU.batch_norm(x, w, b, 1e-5)[0]
    assert y2.grad_fn is None


def test_output_is_not_a_view_inplace_ok():
    """y may be modified in place (ReLU(inplace=True)) without breaking autograd."""
    for layout in ("contiguous", "channels_last"):
        x = _input((8, 64, 32, 32), torch.float32, layout)  # 2 MiB: pool-backed output
        w, b = _params("bn", x, torch.float32)
        y = CPU.batch_norm(x, w, b, 1e-5)[0]
        assert y._base is None
        z = torch.relu_(y)
        dx, = torch.autograd.grad(z.sum(), x)
        assert torch.isfinite(dx).all()


def test_upstream_gradient_in_other_layouts():
    """dy contiguous for a channels_last x, and an expanded (stride-0) dy."""
    x = _input((3, 6, 5, 4), torch.float64, "channels_last")
    w, b = _params("gn", x, torch.float64)
    y = CPU.group_norm(x, 3, w, b, 1e-5)[0]
    yr = REF.group_norm(x, 3, w, b, 1e-5)[0]
    for dy in (torch.randn(y.shape, dtype=torch.float64), torch.ones(()).double().expand(y.shape)):
        g = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
        gr = torch.autograd.grad(yr, (x, w, b), dy, retain_graph=True)
        for a, e in zip(g, gr):
            close(a, e, 1e-10)


# --------------------------------------------------------------------------------------------
# threads, dispatch, pool, cache
# --------------------------------------------------------------------------------------------


def test_thread_count_follows_torch():
    before = torch.get_num_threads()
    x = _input((16, 32, 16, 8), torch.float64, "contiguous")  # above PARALLEL_MIN_NUMEL
    assert x.numel() >= cpu.PARALLEL_MIN_NUMEL
    results = []
    try:
        for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            torch.set_num_threads(n)
            outs = []
            for op in ("bn", "gn", "ln"):
                w, b = _params(op, x, torch.float64)
                y = _run(CPU, op, x, w, b)[0]
                outs += [y, *torch.autograd.grad(y, (x, w, b), torch.ones_like(y))]
            assert numba.get_num_threads() == n
            results.append(outs)
    finally:
        torch.set_num_threads(before)
    for a, e in zip(results[0], results[-1]):
        close(a, e, 1e-12)


def test_supports_and_dispatch_fallback():
    x = torch.randn(4, 6, 3, 3)
    for op in cpu.OPS:
        assert cpu.supports(op, x)
        assert cpu.supports(op, x.double())
        assert not cpu.supports(op, x.half())
        assert not cpu.supports(op, x.bfloat16())
        assert not cpu.supports(op, torch.empty(0, 6, 3, 3))
        assert not cpu.supports(op, x.to("meta"))
    assert not cpu.supports("batch_norm", torch.randn(5))
    assert cpu.supports("layer_norm", torch.randn(5))
    assert dispatch.resolve("group_norm", x) is cpu.group_norm
    assert dispatch.resolve("group_norm", x.bfloat16()) is ref.group_norm
    with dispatch.use_backend("cpu"):
        assert dispatch.resolve("layer_norm", x.half()) is ref.layer_norm  # documented fallback
    y = dispatch.resolve("group_norm", x.bfloat16())(x.bfloat16(), 2, None, None, 1e-5)[0]
    assert y.dtype == torch.bfloat16


def test_buffer_pool_reuses_only_dead_buffers():
    x = torch.randn(16, 64, 32, 32)  # 4 MiB outputs
    y1 = CPU.batch_norm(x, None, None, 1e-5)[0]
    keep = y1[:, :3]  # a view keeps y1's storage alive
    p1 = y1.data_ptr()
    del y1
    gc.collect()
    y2 = CPU.batch_norm(x, None, None, 1e-5)[0]
    assert y2.data_ptr() != p1, "a buffer still referenced by a view was reused"
    expected = keep.clone()
    y2.add_(1.0)
    assert torch.equal(keep, expected)
    p2 = y2.data_ptr()
    del y2
    y3 = CPU.batch_norm(x, None, None, 1e-5)[0]
    assert y3.data_ptr() == p2, "a dead buffer should be reused"
    saved = cpu._pool.max_bytes
    try:
        cpu.set_buffer_pool(0)
        y4 = CPU.batch_norm(x, None, None, 1e-5)[0]
        close(y4, y3, 0.0)
    finally:
        cpu._pool.max_bytes = saved


def test_cache_dir_fallback_when_package_is_read_only(tmp_path, monkeypatch):
    from normlab.core.cpu import jit as common

    here = os.path.join(os.path.dirname(common.__file__), "__pycache__")
    fallback = tmp_path / "fallback"
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setenv("NORMLAB_NUMBA_CACHE_DIR", str(fallback))
    real = common._writable
    monkeypatch.setattr(common, "_writable", lambda p: False if p == here else real(p))
    assert common._choose_cache_dir() == (True, str(fallback))
    # nothing writable at all: caching is switched off instead of failing
    monkeypatch.setattr(common, "_writable", lambda p: False)
    assert common._choose_cache_dir() == (False, None)
    # the override routes a kernel's cache files there and restores numba's setting
    monkeypatch.setattr(common, "CACHE_DIR", str(fallback))
    monkeypatch.setattr(common, "CACHE", True)

    def twice(a):
        return a * 2.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "parallel=True without parallel loops"
        f = common.kernel(twice)
    assert numba.config.CACHE_DIR == ""
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert f(np.ones(3))[0] == 2.0
    assert any(p.suffix == ".nbi" for p in fallback.rglob("*")), "no cache index written"


def test_bench_kernels_smoke(tmp_path):
    """The benchmark machinery (normlab bench kernels) on two tiny cases: runs, saves JSON/PNG."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("rich")
    from normlab.bench import kernels as K

    cases = [K.run_case(K.Case("gn", (2, 32, 4, 4), "nhwc"), ["torch", "cpu"], reps=1),
             K.run_case(K.Case("ln", (8, 64), "rows"), ["torch", "cpu"], reps=1)]
    summary = K.summarize(cases)
    assert set(summary) == {"gn", "ln"} and summary["gn"]["all"]["median_fwdbwd_speedup"] > 0
    paths = K.save(cases, ["torch", "cpu"], None, tmp_path, {"test": True})
    assert paths["json"].stat().st_size > 0 and paths["png"].stat().st_size > 0


def test_bench_large_cases_are_the_smallest_shape_above_the_bandwidth_threshold():
    from normlab.bench import kernels as K

    got = K.cases(False, ["bn", "ln", "ws"], large=True)
    full = K.cases(False, ["bn", "ln", "ws"])
    assert {c.layout for c in got} == {"nchw", "nhwc", "rows"}  # the weights (WS) are never large
    for c in got:
        assert 4 * math.prod(c.shape) >= K.LARGE_BYTES
        smaller = [f for f in full if f.norm == c.norm and f.layout == c.layout
                   and K.LARGE_BYTES <= 4 * math.prod(f.shape) < 4 * math.prod(c.shape)]
        assert not smaller, c
    assert sum(c.norm == "bn" for c in got) == 2 and sum(c.norm == "ln" for c in got) == 1


def test_first_kernel_call_keeps_torch_thread_count():
    # Starting numba's OpenMP pool used to reset torch.get_num_threads() process-wide (a sweep
    # worker set to 1 thread ran on every core afterwards); needs a fresh process to observe.
    import subprocess
    import sys

    code = (
        "import torch, normlab\n"
        "torch.set_num_threads(1)\n"
        "x = torch.randn(64, 8, 32, 32, requires_grad=True)\n"
        "normlab.BatchNorm2d(8)(x).sum().backward()\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1"


def test_warmup_families_and_parts():
    tasks = cpu._warmup_tasks((torch.float32,))
    assert tuple(tasks) == cpu.WARMUP_FAMILIES
    cpu.warmup((torch.float32,), families=("nchw", "rows"), part=1, parts=2)  # loads from the disk cache
    # longest compile first, each to the least loaded part; every family exactly once
    assert cpu._partition(["nhwc", "nchw", "rows"], 2) == [["nhwc"], ["nchw", "rows"]]
    for parts in (1, 2, 3):
        split = cpu._partition(list(cpu.WARMUP_FAMILIES), parts)
        assert len(split) == parts and sorted(sum(split, [])) == sorted(cpu.WARMUP_FAMILIES)
    with pytest.raises(ValueError, match=r"^families: expected some of .*, got 'nhcw'$"):
        cpu.warmup((torch.float32,), families=("nhcw",))


def test_prebuild_command_rejects_unknown_dtype():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "normlab.core.cpu", "float16"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "dtype: expected some of ['float32', 'float64'], got 'float16'"
    r = subprocess.run([sys.executable, "-m", "normlab.core.cpu", "float32", "--families", "rows,cols"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "--families: expected some of ['nhwc', 'nchw', 'rows', 'pointwise', 'dyt'], got 'cols'"
