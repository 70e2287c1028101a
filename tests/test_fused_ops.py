"""The fused operators (issue 13 §1): residual-add + LayerNorm/RMSNorm, GroupNorm + SiLU, BatchNorm + ReLU.

Every value is compared with torch's own composition evaluated in float64 on the same (already
rounded) inputs — ``F.layer_norm(x + r)``, ``F.silu(F.group_norm(x))``, ``F.relu(F.batch_norm(x))``
— never with normlab's outputs. For add + norm, s = x + r is rounded to the input dtype (as torch's
``x + r``) before it is normalized, so the float64 reference normalizes that rounded s.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normlab.functional as F
import normlab.nn as nl
from conftest import assert_close

N = torch.ops.normlab
EPS = 1e-5
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("single_thread")]


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        big = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x


def _rand(shape, seed, dtype, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def _leaves(*ts):
    return [None if t is None else t.detach().requires_grad_() for t in ts]


def _grads(outs, leaves, gouts):
    pairs = [(o, g) for o, g in zip(outs, gouts) if g is not None]
    wrt = [t for t in leaves if t is not None]
    return list(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))


# ------------------------------------------------------------------- add + layer norm / RMS norm

ADD_CASES = [  # (shape, normalized ndim, layout)
    ((6, 5, 32), 1, "contiguous"),
    ((3, 4, 5, 6), 2, "contiguous"),
    ((2, 3, 4, 8), 1, "channels_last"),
    ((6, 16), 1, "sliced"),
]


def _add_norm(rms, x, r, k, w, b, **kw):
    shape = tuple(x.shape[x.dim() - k:])
    if rms:
        return F.add_rms_norm(x, r, shape, w, EPS, **kw)
    return F.add_layer_norm(x, r, shape, w, b, EPS, **kw)


def _add_norm_torch(rms, x, r, k, w, b, dtype):
    """torch's composition: s rounded to the input dtype, then normalized in float64."""
    s = (x.detach().to(dtype) + r.detach().to(dtype)).double().requires_grad_()
    shape = tuple(x.shape[x.dim() - k:])
    y = TF.rms_norm(s, shape, w, EPS) if rms else TF.layer_norm(s, shape, w, b, EPS)
    return y, s


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", ADD_CASES, ids=lambda c: f"{len(c[0])}d-k{c[1]}-{c[2]}")
@pytest.mark.parametrize("backend", [None, "reference"])
def test_add_norm_vs_torch(rms, dtype, case, backend):
    shape, k, layout = case
    pshape = shape[len(shape) - k:]
    x = _layout(_rand(shape, 0, dtype, 1.5, 0.3), layout)
    r = _layout(_rand(shape, 1, dtype), layout)
    w = _rand(pshape, 2, dtype, 0.3, 1.0)
    b = None if rms else _rand(pshape, 3, dtype, 0.2)
    dy, ds = _rand(shape, 4, dtype), _rand(shape, 5, dtype)
    lx, lr, lw, lb = _leaves(x, r, w, b)
    y, s = _add_norm(rms, lx, lr, k, lw, lb, backend=backend)
    got = _grads([y, s], [lx, lr, lw, lb], [dy, ds])
    w64, b64 = _leaves(w.double(), None if b is None else b.double())
    ey, es = _add_norm_torch(rms, x, r, k, w64, b64, dtype)
    want = _grads([ey, es], [es, w64, b64], [dy.double(), ds.double()])
    assert y.dtype == dtype and s.dtype == dtype and y.shape == x.shape
    assert torch.equal(s, x + r), "s is x + residual in the input dtype"
    assert_close(y, ey, dtype, msg="y")
    assert_close(got[0], want[0], dtype, msg="dx")
    assert_close(got[1], want[0], dtype, msg="dresidual")
    for name, gi, wi in zip(["dweight", "dbias"], got[2:], want[1:]):
        assert gi.dtype == dtype and gi.shape == wi.shape
        assert_close(gi, wi, dtype, msg=name)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last) and s.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("used", ["y", "s"])
def test_add_norm_one_output_used(used):
    """Only y (ds = 0) or only s (dy = 0: x and r get ds, γ and β nothing) feeds the loss."""
    x, r = _rand((4, 8), 0, torch.float64), _rand((4, 8), 1, torch.float64)
    w, b = _rand((8,), 2, torch.float64, 0.3, 1.0), _rand((8,), 3, torch.float64)
    lx, lr, lw, lb = _leaves(x, r, w, b)
    y, s = F.add_layer_norm(lx, lr, 8, lw, lb)
    out = y if used == "y" else s
    g = torch.autograd.grad((out * _rand((4, 8), 4, torch.float64)).sum(), [lx, lr, lw, lb], allow_unused=True)
    ex, ew, eb = _leaves((x + r), w, b)
    ey = TF.layer_norm(ex, (8,), ew, eb, EPS)
    eout = ey if used == "y" else ex
    e = torch.autograd.grad((eout * _rand((4, 8), 4, torch.float64)).sum(), [ex, ew, eb], allow_unused=True)
    assert_close(g[0], e[0])
    assert_close(g[1], e[0])
    for gi, ei in zip(g[2:], e[1:]):
        assert (gi is None or not gi.any()) if ei is None else torch.allclose(gi, ei)


def test_add_norm_gradcheck_gradgradcheck():
    x, r = _rand((3, 6), 0, torch.float64), _rand((3, 6), 1, torch.float64)
    w, b = _rand((6,), 2, torch.float64, 0.3, 1.0), _rand((6,), 3, torch.float64)
    args = _leaves(x, r, w, b)
    fn = lambda *a: F.add_layer_norm(a[0], a[1], 6, a[2], a[3])  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    fr = lambda *a: F.add_rms_norm(a[0], a[1], 6, a[2], 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fr, args[:3])
    assert torch.autograd.gradgradcheck(fr, args[:3])


def test_add_norm_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"residual: expected the input's shape \(4, 8\), got \(4, 7\)"):
        F.add_layer_norm(x, torch.randn(4, 7), 8)
    with pytest.raises(ValueError, match="residual: expected the input's dtype"):
        F.add_rms_norm(x, torch.randn(4, 8, dtype=torch.float64), 8)
    with pytest.raises(TypeError, match="residual: expected a torch.Tensor"):
        F.add_layer_norm(x, 1.0, 8)


# ------------------------------------------------------------------------- group norm + SiLU

GN_CASES = [((4, 6, 5, 3), "contiguous"), ((4, 6, 5, 3), "channels_last"), ((4, 6, 5, 3), "sliced"), ((3, 4, 7), "contiguous")]


def _gn_silu_torch(x, w, b):
    return TF.silu(TF.group_norm(x, 2, w, b, EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: f"{len(c[0])}d-{c[1]}")
@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_silu_vs_torch(dtype, case, backend, affine):
    shape, layout = case
    c = shape[1]
    x = _layout(_rand(shape, 0, dtype, 1.5, 0.3), layout)
    w = _rand((c,), 1, dtype, 0.5, 1.0) if affine else None
    b = _rand((c,), 2, dtype, 0.5) if affine else None
    dy = _rand(shape, 3, dtype)
    leaves = _leaves(x, w, b)
    y = F.group_norm_silu(leaves[0], 2, leaves[1], leaves[2], EPS, backend=backend)
    got = _grads([y], leaves, [dy])
    ref = _leaves(*(None if t is None else t.double() for t in (x, w, b)))
    ey = _gn_silu_torch(*ref)
    want = _grads([ey], ref, [dy.double()])
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ey, dtype, msg="y")
    for name, gi, wi in zip(["dx", "dweight", "dbias"], got, want):
        assert gi.dtype == dtype and gi.shape == wi.shape, name
        assert_close(gi, wi, dtype, msg=name)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------- batch norm + ReLU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: f"{len(c[0])}d-{c[1]}")
@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_relu_vs_torch(dtype, case, backend, training):
    shape, layout = case
    c = shape[1]
    x = _layout(_rand(shape, 0, dtype, 1.5, 0.3), layout)
    w, b = _rand((c,), 1, dtype, 0.5, 1.0), _rand((c,), 2, dtype, 0.5)
    rm, rv = _rand((c,), 3, dtype, 0.3), _rand((c,), 4, dtype).abs().add(0.5).to(dtype)
    dy = _rand(shape, 5, dtype)
    lx, lw, lb = _leaves(x, w, b)
    rm1, rv1 = rm.clone(), rv.clone()
    y = F.batch_norm_relu(lx, rm1, rv1, lw, lb, training, 0.1, EPS, backend=backend)
    got = _grads([y], [lx, lw, lb], [dy])
    ref = _leaves(x.double(), w.double(), b.double())
    rm2, rv2 = rm.double(), rv.double()
    ey = TF.relu(TF.batch_norm(ref[0], rm2, rv2, ref[1], ref[2], training, 0.1, EPS))
    want = _grads([ey], ref, [dy.double()])
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ey, dtype, msg="y")
    for name, gi, wi in zip(["dx", "dweight", "dbias"], got, want):
        assert gi.dtype == dtype and gi.shape == wi.shape, name
        assert_close(gi, wi, dtype, msg=name)
    assert_close(rm1, rm2, dtype, msg="running_mean")
    assert_close(rv1, rv2, dtype, msg="running_var")
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_gradcheck_gradgradcheck_gn_silu_bn_relu():
    x = _rand((3, 4, 2, 3), 0, torch.float64, 1.0, 0.2)
    w, b = _rand((4,), 1, torch.float64, 0.3, 1.0), _rand((4,), 2, torch.float64, 0.3)
    args = _leaves(x, w, b)
    for fn in (lambda x_, w_, b_: F.group_norm_silu(x_, 2, w_, b_),
               lambda x_, w_, b_: F.batch_norm_relu(x_, None, None, w_, b_, True)):
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)
    rm, rv = _leaves(_rand((4,), 3, torch.float64), _rand((4,), 4, torch.float64).abs() + 0.5)
    fe = lambda x_, m_, v_, w_, b_: F.batch_norm_relu(x_, m_, v_, w_, b_, False)  # noqa: E731
    assert torch.autograd.gradcheck(fe, (args[0], rm, rv, args[1], args[2]))
    assert torch.autograd.gradgradcheck(fe, (args[0], rm, rv, args[1], args[2]))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_relu_module_running_stats_vs_torch(momentum):
    """BatchNormReLU2d's running statistics follow torch's BatchNorm2d exactly (momentum, the
    cumulative average of momentum=None, num_batches_tracked), and eval uses them."""
    torch.manual_seed(0)
    ours, theirs = nl.BatchNormReLU2d(4, momentum=momentum), nn.BatchNorm2d(4, momentum=momentum)
    plain = nl.BatchNorm2d(4, momentum=momentum)  # and bit for bit as normlab's own BatchNorm2d
    with torch.no_grad():
        ours.weight.normal_(1, 0.2), ours.bias.normal_(0, 0.2)
    theirs.load_state_dict(ours.state_dict())
    plain.load_state_dict(ours.state_dict())
    for step in range(4):
        x = torch.randn(5, 4, 3, 3) * (1 + step) + step
        assert_close(ours(x), torch.relu(theirs(x)).detach().double())
        plain(x)
    for name in ("running_mean", "running_var"):
        assert_close(getattr(ours, name), getattr(theirs, name).double(), msg=name)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 4
    ours.eval(), theirs.eval()
    x = torch.randn(2, 4, 3, 3)
    assert_close(ours(x), torch.relu(theirs(x)).detach().double())
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ours, name), getattr(plain, name)), name


def test_empty_batch():
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    w, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    for y in (F.group_norm_silu(x, 2, w, b), F.batch_norm_relu(x, None, None, w, b, True)):
        assert y.shape == x.shape
        gx, gw, gb = torch.autograd.grad(y.sum(), [x, w, b])
        assert gx.shape == x.shape and not gw.any() and not gb.any()
    e, r = torch.randn(0, 8, requires_grad=True), torch.randn(0, 8, requires_grad=True)
    y, s = F.add_layer_norm(e, r, 8)
    assert y.shape == s.shape == (0, 8)
    m = nl.BatchNormReLU2d(4)
    before = m.running_mean.clone()
    assert m(x.detach()).shape == x.shape and torch.equal(m.running_mean, before)


# ------------------------------------------------------------------------------------ opcheck


def _opcheck_rows():
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    return [(f32, "contiguous", True, ""), (f64, "channels_last", True, "reference"), (bf16, "sliced", False, ""),
            (f32, "channels_last", False, ""), (f32, "sliced", True, "reference")]


@pytest.mark.parametrize("row", _opcheck_rows(), ids=lambda r: "-".join(map(str, r)).replace("torch.", ""))
def test_opcheck(row):
    dtype, layout, affine, backend = row
    shape = (4, 6, 5, 3)
    x = _layout(_rand(shape, 0, dtype, 1.5, 0.3), layout)
    r = _layout(_rand(shape, 1, dtype), layout)
    w = _rand((6,), 2, dtype, 0.5, 1.0) if affine else None
    b = _rand((6,), 3, dtype, 0.5) if affine else None
    wl = _rand((3,), 2, dtype, 0.5, 1.0) if affine else None
    bl = _rand((3,), 3, dtype, 0.5) if affine else None
    dy, ds = _rand(shape, 4, dtype), _rand(shape, 5, dtype)
    mask = [True, affine, affine]
    req = lambda *a: tuple(t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in a)  # noqa: E731
    for rms in (False, True):
        args = (x, r, wl, None if rms else bl, 1, EPS, rms, backend)
        torch.library.opcheck(N.add_layer_norm, req(*args))
        y, s, mean, var, rstd = N.add_layer_norm(*args)
        m = [True, affine, affine and not rms]
        for d in (ds, None):
            torch.library.opcheck(N.add_layer_norm_backward, (dy, d, s, wl, mean, rstd, 1, EPS, rms, backend, m))
    args = (x, w, b, 2, EPS, backend)
    torch.library.opcheck(N.group_norm_silu, req(*args))
    _, mean, _, rstd = N.group_norm_silu(*args)
    torch.library.opcheck(N.group_norm_silu_backward, (dy, x, w, b, mean, rstd, 2, EPS, backend, mask))
    args = (x, w, b, EPS, backend)
    torch.library.opcheck(N.batch_norm_relu, req(*args))
    y, mean, _, rstd = N.batch_norm_relu(*args)
    torch.library.opcheck(N.batch_norm_relu_backward, (dy, y, x, w, mean, rstd, EPS, backend, mask))
    rm, rv = _rand((6,), 6, dtype), _rand((6,), 7, dtype).abs().add(0.5).to(dtype)
    torch.library.opcheck(N.batch_norm_relu_eval, req(x, rm, rv, w, b, EPS, backend))


def test_opcheck_empty():
    x = torch.randn(0, 6, 5, 3)
    torch.library.opcheck(N.add_layer_norm, (x, x.clone(), torch.ones(3), torch.zeros(3), 1, EPS, False, ""))
    torch.library.opcheck(N.group_norm_silu, (x, torch.ones(6), torch.zeros(6), 3, EPS, ""))
    torch.library.opcheck(N.batch_norm_relu, (x, torch.ones(6), torch.zeros(6), EPS, ""))


# --------------------------------------------------------------------- torch.compile and export


class _Block(nn.Module):
    """Uses all three: x → BN+ReLU → GN+SiLU → (tokens) add+LN with a residual, add+RMS."""

    def __init__(self):
        super().__init__()
        self.bn = nl.BatchNormReLU2d(4)
        self.gn = nl.GroupNormSiLU(2, 4)
        self.ln = nl.AddLayerNorm(4)
        self.rms = nl.AddRMSNorm(4, eps=1e-6)
        with torch.no_grad():
            for m in (self.bn, self.gn, self.ln, self.rms):
                m.weight.normal_(1, 0.2)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0, 0.2)

    def forward(self, x):
        h = self.gn(self.bn(x))
        t = h.flatten(2).transpose(1, 2)  # (N, HW, C)
        y, s = self.ln(t, t * 0.5)
        y2, s2 = self.rms(y, s)
        return y2 + s2


def test_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = _Block()
    x = torch.randn(3, 4, 3, 3, requires_grad=True)
    eager = m(x)
    (gx,) = torch.autograd.grad(eager.sum(), [x])
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = cm(x)
    (gc,) = torch.autograd.grad(y.sum(), [x])
    assert_close(y, eager.detach().double())
    assert_close(gc, gx.double())


def test_export_is_standard_ops():
    torch.manual_seed(0)
    m = _Block().eval()
    x = torch.randn(2, 4, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("normlab" in t for t in targets), targets
    assert_close(ep.module()(x), m(x).detach().double())


@pytest.mark.parametrize("norm", ["add_ln", "add_rms", "gn_silu", "bn_relu"])
def test_bench_compositions_compute_the_same_method(norm):
    """The eager torch composition the kernel bench times is the fused normlab layer's method."""
    from normlab.bench import kernels as K

    shape = {"cnn": (8, 64, 4, 4), "transformer": (8, 64)}[K.NORMS[norm][0]]
    torch.manual_seed(0)
    native, ours = K._layer(norm, shape[1], native=True), K._layer(norm, shape[1], native=False)
    ours.load_state_dict(native.state_dict(), strict=False)
    if norm.startswith("add"):
        ours.norm.load_state_dict(native.state_dict())
    x = (torch.randn(shape) * 1.5 + 0.3).requires_grad_()
    yn, yo = native(x), ours(x)
    dy = torch.randn_like(yn)
    (gn,) = torch.autograd.grad(yn, [x], dy)
    (go,) = torch.autograd.grad(yo, [x], dy)
    assert_close(yo, yn.detach().double(), rtol=1e-4, atol=1e-4)
    assert_close(go, gn.double(), rtol=1e-4, atol=1e-4)


def test_bench_rows_smoke():
    from normlab.bench import kernels as K

    cases = [K.run_case(K.Case("add_ln", (64, 128), "rows"), ["torch", "torch-compile", "cpu"], reps=1),
             K.run_case(K.Case("bn_relu", (4, 32, 4, 4), "nhwc"), ["torch", "torch-compile", "cpu"], reps=1)]
    summary = K.composed_summary(cases)
    assert set(summary) == {"add_ln", "bn_relu"} and summary["add_ln"]["median_x_compile"] > 0


def test_functorch_vmap_and_grad():
    """Under functorch transforms the operators run their reference composite."""
    x, r = _rand((3, 4, 8), 0, torch.float64), _rand((3, 4, 8), 1, torch.float64)
    y, s = torch.vmap(lambda a, b: F.add_layer_norm(a, b, 8))(x, r)
    assert_close(y, TF.layer_norm(x + r, (8,)))
    assert_close(s, x + r)
    z = _rand((2, 4, 3), 2, torch.float64)
    g = torch.func.grad(lambda a: F.group_norm_silu(a, 2).sum())(z)
    (e,) = torch.autograd.grad(_gn_silu_torch(z.requires_grad_(), None, None).sum(), [z])
    assert_close(g, e)
    g = torch.func.grad(lambda a: F.batch_norm_relu(a, None, None, training=True).sum())(z.detach())
    (e,) = torch.autograd.grad(TF.relu(TF.batch_norm(z, None, None, training=True)).sum(), [z])
    assert_close(g, e)


def test_gpu_backend_has_a_kernel_for_every_fused_op():
    """On CUDA tensors the fused operators reach core/gpu/fused.py's Triton kernels, not the composition."""
    pytest.importorskip("triton")
    from normlab.core import composed, gpu

    for op in ("add_layer_norm", "add_layer_norm_backward", "group_norm_silu", "group_norm_silu_backward",
               "batch_norm_relu", "batch_norm_relu_backward", "batch_norm_relu_eval"):
        assert composed.resolve(gpu, op) is getattr(gpu, op)
