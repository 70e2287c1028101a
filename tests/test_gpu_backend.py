"""The Triton GPU backend (normlab.core.gpu) against the float64 reference, torch and dispatch.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set here before anything imports triton): the backend accepts CPU tensors only when asked for
by name, so every test forces it with ``normlab.use_backend("gpu")``. With a CUDA device the
same tests run the compiled kernels on CUDA tensors.

Checked: every op (batch norm training / mean-only / eval, group norm with G = 2, 1 and C
(instance norm), layer norm over 1 and 2 dims, RMS norm, channels-first layer norm) × dtype
(float32, bfloat16, float16) × layout (NCHW, channels_last, sliced → copied; rows), forward,
statistics and every gradient (dx, dγ, dβ, and partial masks) against the reference evaluated in
float64 on the same rounded inputs; running statistics through the nn layers against
torch.nn.BatchNorm2d; the numerics cases (offset 1e6, |x| ≈ 1e30, NaN/Inf); rows and channels
split across programs (and bitwise determinism); non-power-of-two sizes; DyT/Derf and filter
response norm + TLU (ties included); opcheck; dispatch (CUDA tensors go to "gpu", CPU tensors
never do unless forced; CPU use does not load the kernel modules); the CUDA benchmark's
error without a GPU and its tables/files from hand-made timings.
The default run takes a covering subset of op × dtype × layout; the full product is ``slow``.
"""

from __future__ import annotations

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (it reads this at @jit time)

import itertools  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import normlab  # noqa: E402
from conftest import TOL, assert_close  # noqa: E402
from normlab.core import dispatch, ops  # noqa: E402
from normlab.core import gpu  # noqa: E402
from normlab.core import reference as ref  # noqa: E402
from normlab.core.gpu import geometry, norms  # noqa: E402

# (RuntimeWarning: the interpreter's numpy reports the NaN/Inf the numerics tests feed it)
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.usefixtures("single_thread")]

EPS = 1e-5
SHAPE = (3, 6, 5, 3)  # (N, C, H, W): non-powers of two, C = 6 (G = 2 and 3 divide it)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# op -> (per-channel?, default layouts)
OPS = {
    "bn": True, "mobn": True, "bn_eval": True, "mobn_eval": True, "gn": True, "gn1": True, "in": True,
    "lnc": True, "ln": False, "ln2": False, "rms": False,
}


def _values(shape, dtype, seed=0, scale=1.5, offset=0.3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def _layout(v: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        x = v.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        big = torch.zeros(v.shape[:-1] + (2 * v.shape[-1] + 1,), dtype=v.dtype, device=v.device)
        big[..., 1::2] = v
        x = big[..., 1::2]
    else:
        x = v.contiguous()
    assert torch.equal(x, v)
    return x


def _params(op, x, seed=3):
    """(γ, β) in x's dtype, None where the op takes none."""
    g = torch.Generator().manual_seed(seed)
    if op in ("ln", "rms"):
        shape = x.shape[-1:]
    elif op == "ln2":
        shape = x.shape[-2:]
    else:
        shape = x.shape[1:2]
    w = (1 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=x.device, dtype=x.dtype)
    b = (0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=x.device, dtype=x.dtype)
    if op in ("mobn", "mobn_eval"):
        w = None
    if op == "rms":
        b = None
    return w, b


def _eval_stats(x):
    g = torch.Generator().manual_seed(7)
    c = x.shape[1]
    mean = torch.randn(c, generator=g, dtype=torch.float64)
    var = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return mean, var


def _call(op, x, w, b, backend, module=ops):
    """(y, statistics) of ``op`` through the normlab operators on ``backend``."""
    c = x.shape[1] if x.dim() > 1 else 1
    if op == "bn":
        y, m, v, _ = ops.batch_norm(x, w, b, EPS, backend=backend)
        return y, (m, v)
    if op == "mobn":
        y, m, _, _ = ops.batch_norm(x, w, b, EPS, True, backend=backend)
        return y, (m,)
    if op in ("bn_eval", "mobn_eval"):
        mean, var = (t.to(x.device, x.dtype if x.dtype != torch.float64 else torch.float64) for t in _eval_stats(x))
        center = op == "mobn_eval"
        return ops.batch_norm_eval(x, mean, None if center else var, w, b, EPS, center, backend=backend), ()
    if op in ("gn", "gn1", "in"):
        y, m, v, _ = ops.group_norm(x, {"gn": 2, "gn1": 1, "in": c}[op], w, b, EPS, backend=backend)
        return y, (m, v)
    if op == "lnc":
        y, m, v, _ = ops.layer_norm_channels(x, w, b, EPS, backend=backend)
        return y, (m, v)
    if op in ("ln", "ln2", "rms"):
        y, m, v, _ = ops.layer_norm(x, 2 if op == "ln2" else 1, w, b, EPS, op == "rms", backend=backend)
        return y, ((v,) if op == "rms" else (m, v))
    raise AssertionError(op)


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _run(op, x, w, b, backend, dtype=None):
    """y, statistics and the gradients (dx, dγ, dβ) of Σ y·dy, dy rounded to ``dtype`` (the
    tested dtype: the float64 oracle gets the same rounded values)."""
    if backend != "reference":  # the kernels: on the CUDA device when there is one
        x, w, b = (None if t is None else t.to(DEVICE) for t in (x, w, b))
    x, w, b = _leaf(x), _leaf(w), _leaf(b)
    y, stats = _call(op, x, w, b, backend)
    dy = _values(y.shape, torch.float64, seed=11, scale=1.0, offset=0.0).to(dtype or y.dtype)
    dy = dy.to(device=y.device, dtype=y.dtype)
    inputs = [t for t in (x, w, b) if t is not None]
    grads = iter(torch.autograd.grad(y, inputs, dy))
    grads = [next(grads).cpu() if t is not None else None for t in (x, w, b)]
    return y.cpu(), tuple(s.cpu() for s in stats), grads


def _compare(op, dtype, layout, shape=SHAPE):
    v = _values(shape, dtype)
    x = _layout(v.to(DEVICE), layout)
    w, b = (None if t is None else t.to(DEVICE) for t in _params(op, v))
    with normlab.use_backend("gpu"):
        assert dispatch.backend_module(_DISPATCH[op], x) is gpu
        y, stats, grads = _run(op, x, w, b, "")
    # the oracle: the reference in float64 on the same rounded values, on the CPU
    y64, stats64, grads64 = _run(op, v.double(), *(None if t is None else t.cpu().double() for t in (w, b)),
                                 "reference", dtype)
    assert y.dtype == dtype and y.shape == v.shape
    if OPS[op] and layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert_close(y.cpu(), y64, dtype, msg=f"{op} y")
    for s, s64 in zip(stats, stats64):
        assert s.dtype == ops.stat_dtype(x)
        # statistics are float32 in the kernels: float32 precision for every input dtype
        assert_close(s.cpu(), s64, torch.float32, msg=f"{op} stat")
    for name, g, g64 in zip(("dx", "dγ", "dβ"), grads, grads64):
        assert (g is None) == (g64 is None), name
        if g is not None:
            assert g.dtype == dtype
            assert_close(g.cpu(), g64, dtype, msg=f"{op} {name}")


_DISPATCH = {"bn": "batch_norm", "mobn": "batch_norm", "bn_eval": "batch_norm_eval", "mobn_eval": "batch_norm_eval",
             "gn": "group_norm", "gn1": "group_norm", "in": "group_norm", "lnc": "layer_norm_channels",
             "ln": "layer_norm", "ln2": "layer_norm", "rms": "layer_norm"}


def _layouts(op):
    return ["contiguous", "channels_last", "sliced"] if OPS[op] else ["contiguous", "channels_last", "sliced"]


def _matrix():
    """(op, dtype, layout): every op × dtype × layout (slow) and a covering default subset:
    float32 in every layout, each 16-bit dtype in one layout (alternating) per op."""
    full, default = [], []
    for i, op in enumerate(OPS):
        for dtype, layout in itertools.product(DTYPES, _layouts(op)):
            full.append((op, dtype, layout))
        default += [(op, torch.float32, "contiguous"), (op, torch.float32, "channels_last"),
                    (op, torch.bfloat16, ("contiguous", "channels_last")[i % 2]),
                    (op, torch.float16, ("channels_last", "contiguous")[i % 2])]
        if i % 3 == 0:
            default.append((op, torch.float32, "sliced"))
    slow = [c for c in full if c not in default]
    return [pytest.param(*c, id=f"{c[0]}-{str(c[1])[6:]}-{c[2]}") for c in default] + [
        pytest.param(*c, id=f"{c[0]}-{str(c[1])[6:]}-{c[2]}", marks=pytest.mark.slow) for c in slow]


@pytest.mark.parametrize("op,dtype,layout", _matrix())
def test_op_matches_reference(op, dtype, layout):
    _compare(op, dtype, layout)


@pytest.mark.parametrize("op,shape", [
    ("bn", (2, 3)),  # (N, C) batch norm
    ("bn", (2, 3, 7)),  # 1-d
    ("in", (2, 3, 2, 3, 2)),  # 3-d
    ("gn", (1, 4, 1, 1)),  # one position per channel
    ("ln", (7,)),  # a single row
    ("lnc", (2, 5, 3)),
])
def test_other_ranks(op, shape):
    _compare(op, torch.float32, "contiguous", shape)


def test_channels_last_3d():
    v = _values((2, 4, 3, 2, 3), torch.float32)
    x = v.contiguous(memory_format=torch.channels_last_3d)
    w, b = _params("gn", v)
    with normlab.use_backend("gpu"):
        y, (m, var), grads = _run("gn", x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), "")
    y64, (m64, var64), grads64 = _run("gn", v.double(), w.double(), b.double(), "reference")
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert_close(y.cpu(), y64, torch.float32)
    for g, g64 in zip(grads, grads64):
        assert_close(g.cpu(), g64, torch.float32)


# ------------------------------------------------------------------------ split reductions


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("op,shape,tile,layout", [
    ("ln", (2, 1500), 1024, "contiguous"),  # a row longer than one tile: split across programs
    pytest.param("rms", (2, 1000), 256, "contiguous", marks=_SLOW),
    ("bn", (5, 3, 5, 5), 64, "channels_last"),  # per-channel reduction over (n, position) in chunks
    pytest.param("bn", (9, 3, 7, 5), 64, "contiguous", marks=_SLOW),
    ("gn", (2, 6, 11, 3), 32, "contiguous"),
    pytest.param("gn", (2, 6, 11, 3), 32, "channels_last", marks=_SLOW),
    ("lnc", (3, 70, 2), 32, "contiguous"),
])
def test_split_across_programs(op, shape, tile, layout, monkeypatch):
    monkeypatch.setattr(geometry, "TILE", tile)
    monkeypatch.setattr(geometry, "TARGET_PROGRAMS", 12)
    monkeypatch.setattr(norms, "ROWS_MAX", 0)  # rows through the general split kernels too  # a few chunks: the interpreter runs programs one by one
    # the reduction really is split: more than one chunk per group
    n, c = shape[0], shape[1]
    s = 1 if len(shape) < 3 else shape[2] * (shape[3] if len(shape) > 3 else 1)
    cl = layout == "channels_last"
    geo = {"ln": lambda: geometry.rows(shape[0], shape[-1])[0], "rms": lambda: geometry.rows(shape[0], shape[-1])[0],
           "bn": lambda: geometry.batch_norm(n, c, s, cl)[0], "gn": lambda: geometry.group_norm(n, c, s, 2, cl)[0],
           "lnc": lambda: geometry.channels_first(n, c, s)[0]}[op]()
    assert geo.split(*geo.tile())[0] > 1
    _compare(op, torch.float32, layout, shape)


@pytest.mark.parametrize("op,case", [("ln", "offset"), ("rms", "huge"), pytest.param("rms", "offset", marks=_SLOW),
                                     pytest.param("ln", "huge", marks=_SLOW)])
def test_general_rows_path_numerics(op, case, monkeypatch):
    """Rows longer than ROWS_MAX take the split kernels: the numerics cases hold there too."""
    monkeypatch.setattr(norms, "ROWS_MAX", 0)
    monkeypatch.setattr(geometry, "TILE", 64)
    monkeypatch.setattr(geometry, "TARGET_PROGRAMS", 6)
    v = _values((3, 200), torch.float32, **({"scale": 0.1, "offset": 1e6} if case == "offset" else
                                            {"scale": 1e30, "offset": 0.0}))
    w, b = _params(op, v)
    assert geometry.rows(3, 200)[0].split(*geometry.rows(3, 200)[0].tile())[0] > 1
    with normlab.use_backend("gpu"):
        y, stats, grads = _run(op, v, w, b, "")
    y64, stats64, grads64 = _run(op, v.double(), *(None if t is None else t.double() for t in (w, b)), "reference")
    assert_close(y, y64, torch.float32, msg="y")
    for g, g64 in zip(grads, grads64):
        if g is not None:
            assert_close(g, g64, torch.float32, msg="grad")


def test_row_backward_walks_row_blocks(monkeypatch):
    """Fewer row programs than row blocks: each program accumulates dγ/dβ over several blocks."""
    monkeypatch.setattr(norms, "ROW_PROGRAMS", 2)
    monkeypatch.setattr(geometry, "TILE", 16)
    _compare("ln", torch.float32, "contiguous", (7, 3, 8))


def test_split_reductions_are_deterministic(monkeypatch):
    """Two-stage reductions without atomics: the same call twice gives the same bits."""
    monkeypatch.setattr(geometry, "TILE", 32)
    monkeypatch.setattr(geometry, "TARGET_PROGRAMS", 8)
    v = _values((3, 4, 4, 4), torch.float32)
    w, b = _params("gn", v)
    x = _layout(v, "channels_last")
    with normlab.use_backend("gpu"):
        first = _run("gn", x, w, b, "")
        second = _run("gn", x, w, b, "")
    for a, c in zip([first[0], *first[1], *first[2]], [second[0], *second[1], *second[2]]):
        assert torch.equal(a, c)


def test_geometry_tiles_follow_memory():
    """NHWC batch norm tiles are wide along the (contiguous) channels, NCHW ones along positions."""
    nhwc, _ = geometry.batch_norm(8, 64, 49, True)
    nchw, _ = geometry.batch_norm(8, 64, 49, False)
    assert nhwc.tile()[0] == 64 and nchw.tile()[1] >= 8 * 49
    assert nhwc.R2 == 1  # (n, position) merged into one coordinate: no // or % in the kernel
    rows, cols = geometry.rows(4096, 1024)
    assert rows.tile() == (4, 1024) and rows.split(*rows.tile()) == (1, 1024)
    assert cols.tile()[0] == 64


# ---------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
@pytest.mark.parametrize("family", ["batch_norm", "group_norm", "layer_norm", "layer_norm_channels"])
def test_backward_masks(family, mask):
    v = _values(SHAPE, torch.float32)
    w, b = _params("bn", v)
    if family == "layer_norm":
        w, b = _params("ln", v)
    extra = {"batch_norm": (), "group_norm": (3,), "layer_norm": (1,), "layer_norm_channels": ()}[family]
    ref_fwd = {"batch_norm": lambda: ref.batch_norm(v, w, b, EPS), "group_norm": lambda: ref.group_norm(v, 3, w, b, EPS),
               "layer_norm": lambda: ref.layer_norm(v, 1, w, b, EPS),
               "layer_norm_channels": lambda: ref.layer_norm_channels(v, w, b, EPS)}[family]
    _, mean, _, rstd = ref_fwd()
    lead = {"batch_norm": (6,), "group_norm": (3, 3), "layer_norm": SHAPE[:-1], "layer_norm_channels": (3, 5, 3)}[family]
    mean, rstd = mean.reshape(lead), rstd.reshape(lead)
    dy = _values(SHAPE, torch.float32, seed=5)
    args = {"batch_norm": (EPS,), "group_norm": (3, EPS), "layer_norm": (1, EPS), "layer_norm_channels": (EPS,)}[family]
    with normlab.use_backend("gpu"):
        dev = (t.to(DEVICE) for t in (dy, v, w, mean, rstd))
        got = getattr(gpu, f"{family}_backward")(*dev, *args, mask=mask)
    want = getattr(ref, f"{family}_backward")(dy.double(), v.double(), w.double(), mean.double(), rstd.double(),
                                              *args, mask=(True, True, True))
    for m, g, e in zip(mask, got, want):
        if m:
            assert_close(g.cpu().reshape(e.shape), e, torch.float32)
        else:
            assert g is None
    del extra


def test_weight_grad_only_through_autograd():
    """x does not require grad (a first layer): only dγ, dβ are computed and they are right."""
    v = _values(SHAPE, torch.float32)
    w, b = (_leaf(t.to(DEVICE)) for t in _params("gn", v))
    with normlab.use_backend("gpu"):
        y = ops.group_norm(v.to(DEVICE), 3, w, b, EPS)[0]
        dw, db = torch.autograd.grad(y, (w, b), torch.ones_like(y))
    w64, b64 = (_leaf(t.double()) for t in _params("gn", v))
    y64 = ref.group_norm(v.double(), 3, w64, b64, EPS)[0]
    for g, e in zip((dw, db), torch.autograd.grad(y64, (w64, b64), torch.ones_like(y64))):
        assert_close(g.cpu(), e, torch.float32)


# ------------------------------------------------------------------------- running stats


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batchnorm2d_layer_running_stats(layout):
    torch.manual_seed(0)
    ours = normlab.nn.BatchNorm2d(6, momentum=0.3)
    theirs = torch.nn.BatchNorm2d(6, momentum=0.3).double()
    with torch.no_grad():
        ours.weight.copy_(torch.linspace(0.5, 1.5, 6))
        ours.bias.copy_(torch.linspace(-1, 1, 6))
        theirs.weight.copy_(ours.weight)
        theirs.bias.copy_(ours.bias)
    ours.to(DEVICE)
    for step in range(2):
        v = _values(SHAPE, torch.float32, seed=step)
        x = _layout(v.to(DEVICE), layout)
        with normlab.use_backend("gpu"):
            y = ours(x)
        y64 = theirs(v.double())
        assert_close(y.cpu(), y64, torch.float32)
    assert_close(ours.running_mean.cpu(), theirs.running_mean, torch.float32)
    assert_close(ours.running_var.cpu(), theirs.running_var, torch.float32)
    assert int(ours.num_batches_tracked) == 2
    ours.eval()
    theirs.eval()
    v = _values(SHAPE, torch.float32, seed=9)
    with normlab.use_backend("gpu"):
        y = ours(_layout(v.to(DEVICE), layout))
    assert_close(y.cpu(), theirs(v.double()), torch.float32)


def test_eval_backward_fused():
    """Frozen batch norm (eval, x needs a gradient): the fused eval backward vs torch."""
    v = _values(SHAPE, torch.float32)
    ours = normlab.nn.BatchNorm2d(6).eval()
    theirs = torch.nn.BatchNorm2d(6).double().eval()
    mean, var = _eval_stats(v)
    for m in (ours, theirs):
        with torch.no_grad():
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.weight.copy_(torch.linspace(0.5, 1.5, 6))
    x = _leaf(v.to(DEVICE))
    ours.to(DEVICE)
    with normlab.use_backend("gpu"):
        (dx,) = torch.autograd.grad(ours(x), x, torch.ones_like(x))
    x64 = _leaf(v.double())
    (dx64,) = torch.autograd.grad(theirs(x64), x64, torch.ones_like(x64))
    assert_close(dx.cpu(), dx64, torch.float32)


# -------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("op", ["bn", "gn", "ln", "rms", "lnc"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_offset_1e6_keeps_float32_precision(op, layout):
    """x = 1e6 + 0.1·z in float32: the centred statistics keep float32 precision (a one-pass
    E[x²] − E[x]² would return variance 0 or garbage here)."""
    v = _values((4, 6, 8, 3), torch.float32, scale=0.1, offset=1e6)
    x = _layout(v, layout)
    w, b = _params(op, v)
    with normlab.use_backend("gpu"):
        y, stats, grads = _run(op, x, w, b, "")
    y64, stats64, grads64 = _run(op, v.double(), *(None if t is None else t.double() for t in (w, b)), "reference")
    assert_close(y, y64, torch.float32, msg="y")
    for s, s64 in zip(stats, stats64):
        assert_close(s, s64, torch.float32, msg="stat")
    for g, g64 in zip(grads, grads64):
        if g is not None:
            assert_close(g, g64, torch.float32, msg="grad")


@pytest.mark.parametrize("op", ["bn", "gn", "ln", "rms", "lnc"])
def test_huge_values_do_not_overflow(op):
    """|x| ≈ 1e30: the squares (1e60) would overflow float32; the scaled sums do not."""
    v = _values((3, 6, 4, 3), torch.float32, scale=1e30, offset=0.0)
    w, b = _params(op, v)
    with normlab.use_backend("gpu"):
        y, stats, grads = _run(op, v, w, b, "")
    y64, _, grads64 = _run(op, v.double(), *(None if t is None else t.double() for t in (w, b)), "reference")
    assert torch.isfinite(y).all()
    assert_close(y, y64, torch.float32, msg="y")
    for g, g64 in zip(grads, grads64):
        if g is not None:
            assert torch.isfinite(g).all()
            assert_close(g, g64, torch.float32, msg="grad")


@pytest.mark.parametrize("op", ["bn", "gn", "ln", "rms", "lnc"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_propagate_like_reference(op, bad):
    """A NaN or Inf poisons exactly its own statistic group, as in torch (via the reference)."""
    v = _values(SHAPE, torch.float32)
    v[1, 2, 3, 1] = bad
    w, b = _params(op, v)
    with normlab.use_backend("gpu"):
        y, stats = _call(op, *(None if t is None else t.to(DEVICE) for t in (v, w, b)), "")
        y, stats = y.cpu(), [t.cpu() for t in stats]
    with normlab.use_backend("reference"):
        y_ref, stats_ref = _call(op, v, w, b, "")
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)), "NaN pattern"
    assert torch.isnan(y).any() and not torch.isnan(y).all()
    torch.testing.assert_close(y, y_ref, rtol=TOL[torch.float32]["rtol"], atol=1e-5, equal_nan=True)
    for s, s_ref in zip(stats, stats_ref):
        assert torch.equal(torch.isnan(s), torch.isnan(s_ref))
        assert torch.equal(torch.isinf(s), torch.isinf(s_ref))


def test_torch_layer_norm_agrees_on_inf_row():
    x = _values((3, 8), torch.float32)
    x[1, 3] = float("inf")
    with normlab.use_backend("gpu"):
        y = ops.layer_norm(x.to(DEVICE), 1, None, None, EPS)[0].cpu()
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,)), equal_nan=True)


def test_constant_input_gives_beta():
    v = torch.full(SHAPE, 3.25)
    w, b = _params("bn", v)
    with normlab.use_backend("gpu"):
        y, stats, grads = _run("bn", v, w, b, "")
    assert_close(y, b.view(1, -1, 1, 1).expand_as(v).double(), torch.float32)
    assert all(torch.isfinite(g).all() for g in grads)


# -------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("name,args", [
    ("layer_norm", lambda x, w, b: (x, w[:3], b[:3], 1, EPS, False, "gpu")),
    ("group_norm", lambda x, w, b: (x, w, b, 3, EPS, "gpu")),
    ("batch_norm", lambda x, w, b: (x, w, b, EPS, False, "gpu")),
    ("dynamic_erf", lambda x, w, b: (x, _leaf(torch.tensor([0.6], device=x.device)),
                                     _leaf(torch.tensor([0.1], device=x.device)), w, b, False, "gpu")),
])
def test_opcheck(name, args):
    x = _values(SHAPE, torch.float32).to(DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = (_leaf(t) for t in _params("bn", x))
    torch.library.opcheck(getattr(torch.ops.normlab, name).default, args(x, w, b),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ------------------------------------------------------------------------------- dispatch


def _fake_cuda(shape=(4, 8), dtype=torch.float32):
    """A stand-in for a CUDA tensor (none can be made here): what supports() looks at."""
    x = mock.MagicMock(spec=torch.Tensor)
    x.is_cuda = True
    x.device = torch.device("cuda", 0) if torch.cuda.is_available() else mock.Mock(type="cuda")
    x.dtype, x.layout = dtype, torch.strided
    x.numel.return_value = 32
    x.dim.return_value = len(shape)
    x.is_conj.return_value = x.is_neg.return_value = False
    return x


def test_registry_puts_gpu_first():
    assert dispatch._REGISTRY["gpu"] == ("normlab.core.gpu", -10)
    order = dispatch._order()
    assert order.index("gpu") < order.index("cpu") < order.index("reference")


@pytest.mark.parametrize("op", list(gpu.OPS))
def test_cuda_tensors_dispatch_to_gpu(op):
    assert dispatch.backend_module(op, _fake_cuda()) is gpu
    assert not gpu.supports(op, _fake_cuda(dtype=torch.float64))  # float64 goes to the reference
    assert not gpu.supports("evo_norm", _fake_cuda())  # not an op of the backend


def test_cpu_tensors_never_go_to_gpu_unless_forced():
    x = torch.randn(4, 8)
    if torch.cuda.is_available():
        pytest.skip("interpreter-only rule")
    assert not gpu.supports("layer_norm", x)
    assert dispatch.backend_module("layer_norm", x) is not gpu
    with normlab.use_backend("gpu"):
        assert gpu.supports("layer_norm", x)
        assert dispatch.backend_module("layer_norm", x) is gpu
        # what the kernels do not take falls back to the reference, as for every forced backend
        assert dispatch.backend_module("layer_norm", x.double()) is ref
        assert dispatch.backend_module("layer_norm", x.to(torch.int32)) is ref
    assert dispatch.backend_module("layer_norm", x, "gpu") is gpu  # a layer's backend="gpu"


def test_without_interpreter_cpu_tensors_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 8)
    assert not gpu.wait_ready("layer_norm", x)
    assert dispatch.backend_module("layer_norm", x, "gpu") is ref


def test_missing_triton_makes_backend_unavailable(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    monkeypatch.delitem(sys.modules, "normlab.core.gpu")
    monkeypatch.setitem(dispatch._loaded, "gpu", None)
    dispatch._loaded.pop("gpu")
    try:
        assert dispatch._load("gpu") is None
        assert "gpu" not in dispatch.available_backends()
    finally:
        dispatch._loaded.pop("gpu", None)
        sys.modules["normlab.core.gpu"] = gpu


@pytest.mark.slow  # a fresh interpreter importing torch: ~30 s on a loaded 2-core machine
def test_cpu_use_does_not_load_the_kernels():
    """Importing normlab and running it on CPU tensors never imports the kernel modules (triton
    itself may already be loaded: torch._dynamo imports it when it is installed)."""
    code = ("import sys, torch, normlab\n"
            "from normlab.core import dispatch\n"
            "x = torch.randn(4, 6, 3, 3, dtype=torch.bfloat16)\n"  # bf16: passes _takes, not the CPU kernels
            "y = normlab.nn.LayerNorm(3).to(torch.bfloat16)(x)\n"
            "assert dispatch._loaded['gpu'] is not None and 'gpu' in dispatch.available_backends()\n"
            "print(sorted(m for m in sys.modules if m.startswith('normlab.core.gpu')))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['normlab.core.gpu']"


# ------------------------------------------------------------------------------- point-wise


def _pw_run(erf, x, a, s, w, b, channels_last, backend, dtype):
    x, a, s, w, b = (_leaf(t) for t in (x, a, s, w, b))
    if erf:
        y = ops.dynamic_erf(x, a, s, w, b, channels_last, backend=backend)
    else:
        y = ops.dynamic_tanh(x, a, w, b, channels_last, backend=backend)
    dy = _values(y.shape, torch.float64, seed=11, scale=1.0, offset=0.0).to(dtype).to(device=y.device, dtype=y.dtype)
    inputs = [t for t in (x, a, s if erf else None, w, b) if t is not None]
    return y.cpu(), [g.cpu() for g in torch.autograd.grad(y, inputs, dy)]


@pytest.mark.parametrize("erf", [False, True], ids=["dyt", "derf"])
@pytest.mark.parametrize("channels_last,layout,dtype,affine", [
    (True, "contiguous", torch.float32, True),
    (True, "channels_last", torch.bfloat16, True),  # copied to contiguous rows
    (False, "contiguous", torch.float32, True),
    (False, "channels_last", torch.float32, True),  # per-channel parameters on NHWC memory
    (False, "contiguous", torch.float16, True),
    (True, "contiguous", torch.float32, False),
])
def test_pointwise_matches_reference(erf, channels_last, layout, dtype, affine):
    v = _values(SHAPE, dtype, scale=2.0)
    x = _layout(v, layout)
    shape = SHAPE[-1:] if channels_last else SHAPE[1:2]
    g = torch.Generator().manual_seed(4)
    w = (1 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype) if affine else None
    b = (0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype) if affine else None
    a = torch.tensor([0.7], dtype=dtype)
    sh = torch.tensor([0.2], dtype=dtype)
    dev = [None if t is None else t.to(DEVICE) for t in (x, a, sh, w, b)]
    with normlab.use_backend("gpu"):
        assert dispatch.backend_module("dynamic_erf" if erf else "dynamic_tanh", dev[0]) is gpu
        y, grads = _pw_run(erf, *dev, channels_last, "", dtype)
    y64, grads64 = _pw_run(erf, *(None if t is None else t.double() for t in (v, a, sh, w, b)), channels_last,
                           "reference", dtype)
    assert y.dtype == dtype
    assert_close(y, y64, dtype, msg="y")
    assert len(grads) == len(grads64)
    for i, (gr, g64) in enumerate(zip(grads, grads64)):
        # dx in x's dtype; dα, ds, dγ, dβ are sums rounded once to the parameter's dtype
        assert_close(gr, g64, dtype, msg=f"grad {i}")


@pytest.mark.parametrize("layout,dtype,params,split", [
    ("contiguous", torch.float32, "all", True),
    ("channels_last", torch.float32, "all", False),
    ("contiguous", torch.bfloat16, "all", False),
    ("channels_last", torch.float16, "no-tau", False),
    ("contiguous", torch.float32, "none", False),
])
def test_filter_response_norm_matches_reference(layout, dtype, params, split, monkeypatch):
    if split:  # positions split into chunks too
        monkeypatch.setattr(geometry, "TILE", 32)
        monkeypatch.setattr(geometry, "TARGET_PROGRAMS", 24)
    v = _values(SHAPE, dtype)
    x = _layout(v, layout)
    g = torch.Generator().manual_seed(5)
    c = SHAPE[1]
    w = (1 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)).to(dtype)
    b = (0.5 * torch.randn(c, generator=g, dtype=torch.float64)).to(dtype)
    tau = (0.3 * torch.randn(c, generator=g, dtype=torch.float64)).to(dtype)
    if params != "all":
        tau = None
    if params == "none":
        w = b = None

    def run(x, w, b, tau, backend):
        x, w, b, tau = (_leaf(t) for t in (x, w, b, tau))
        y, rstd = ops.filter_response_norm(x, w, b, tau, EPS, backend=backend)
        dy = _values(y.shape, torch.float64, seed=11, scale=1.0, offset=0.0).to(dtype)
        dy = dy.to(device=y.device, dtype=y.dtype)
        inputs = [t for t in (x, w, b, tau) if t is not None]
        return y.cpu(), rstd.cpu(), [gr.cpu() for gr in torch.autograd.grad(y, inputs, dy)]

    with normlab.use_backend("gpu"):
        dev = [None if t is None else t.to(DEVICE) for t in (x, w, b, tau)]
        assert dispatch.backend_module("filter_response_norm", dev[0]) is gpu
        y, rstd, grads = run(*dev, "")
    y64, rstd64, grads64 = run(*(None if t is None else t.double() for t in (v, w, b, tau)), "reference")
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, y64, dtype, msg="y")
    assert_close(rstd, rstd64, torch.float32, msg="rstd")
    for i, (gr, g64) in enumerate(zip(grads, grads64)):
        assert_close(gr, g64, dtype, msg=f"grad {i}")


def test_filter_response_norm_tlu_ties_split_the_gradient():
    """z == τ exactly (x = 0, β = τ = 0): half of dy to z, half to τ, as torch.maximum."""
    v = _values((2, 3, 4, 4), torch.float32)
    v[:, :, ::2, 1] = 0.0
    w, b, tau = torch.ones(3), torch.zeros(3), torch.zeros(3)

    def run(x, w, b, tau, backend):
        x, w, b, tau = (_leaf(t) for t in (x, w, b, tau))
        y = ops.filter_response_norm(x, w, b, tau, EPS, backend=backend)[0]
        return [gr.cpu() for gr in torch.autograd.grad(y, (x, w, b, tau), torch.ones_like(y))]

    with normlab.use_backend("gpu"):
        grads = run(*(t.to(DEVICE) for t in (v, w, b, tau)), "")
    for gr, g64 in zip(grads, run(v.double(), w.double(), b.double(), tau.double(), "reference")):
        assert_close(gr, g64, torch.float32)


def test_tanh_is_accurate_near_zero_and_saturates():
    x = torch.tensor([0.0, 1e-7, -3e-4, 0.1249, 0.1251, -0.5, 3.0, 9.0, 40.0, -float("inf"), float("inf"),
                      float("nan")], dtype=torch.float32)
    with normlab.use_backend("gpu"):
        y = ops.dynamic_tanh(x.to(DEVICE), torch.ones(1, device=DEVICE), None, None).cpu()
    # the bound pointwise._tanh documents: 1e-6 relative (measured: ≤ 5.7e-7 over [−10, 10])
    torch.testing.assert_close(y, torch.tanh(x.double()).float(), rtol=1e-6, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------ benchmark


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_kernels_device_cuda_fails_clearly_without_gpu():
    from typer.testing import CliRunner

    from normlab.bench import app

    result = CliRunner().invoke(app, ["kernels", "--device", "cuda"])
    assert result.exit_code == 2, result.output
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "--device cuda: no CUDA device" in out and "Traceback" not in out
    bad = CliRunner().invoke(app, ["kernels", "--device", "tpu"])
    assert bad.exit_code == 2 and "--device: expected 'cpu' or 'cuda', got 'tpu'" in bad.output + bad.stderr


def test_bench_cuda_cases_cover_the_gpu_norms():
    from normlab.bench import kernels as K

    quick = K.cases(True, K.CUDA_NORMS, "cuda")
    assert {c.norm for c in quick} == set(K.CUDA_NORMS)
    assert {c.layout for c in quick if c.norm == "gn"} == {"nchw", "nhwc"}
    assert max(4 * c.numel for c in quick) >= K.LARGE_BYTES  # shapes beyond the GPU's L2 cache


def test_bench_cuda_tables_and_files_from_timings(tmp_path):
    """The CUDA run's rendering and saving, fed hand-made timings (no GPU here): GB/s by the
    minimum-traffic model and % of the copy come out as the formulas say."""
    from rich.console import Console

    from normlab.bench import kernels as K

    contenders = ["torch", "torch-compile", "gpu"]
    results = []
    for case in K.cases(True, ["ln", "gn"], "cuda")[:3]:
        n = case.numel
        copy = 8 * n / 3.0e12  # a 3 TB/s copy
        case.times = {"copy": {"copy": copy}, "torch": {"fwd": 2 * copy, "fwdbwd": 6 * copy},
                      "torch-compile": {"fwd": 1.5 * copy, "fwdbwd": 5 * copy},
                      "gpu": {"fwd": 1.25 * copy, "fwdbwd": 4 * copy}}
        results.append(case)
    m = K.metrics(results[0], "gpu")
    assert m["fwd_pct_copy"] == pytest.approx(80.0) and m["fwd_speedup"] == pytest.approx(1.6)
    assert m["fwdbwd_gbs"] == pytest.approx(20 * results[0].numel / (4 * 8 * results[0].numel / 3.0e12) / 1e9)
    console = Console(record=True, width=250)
    K.render_device(results, contenders, console)
    text = console.export_text()
    assert "gpu" in text and "80" in text
    paths = K.save(results, contenders, None, tmp_path, {"device": "fake"})
    assert paths["json"].exists() and paths["png"].exists()
