"""DyT and Derf through their ``normlab::`` operators and the fused CPU kernels (issue 10 §1).

Every value is compared with the papers' formulas written here in float64 (forward and the
hand-derived gradients), never with normlab's own outputs:

    DyT:  y = γ·tanh(αx) + β           dx = α·g,  g = dy·γ·(1 − tanh²(αx))
    Derf: y = γ·erf(αx + s) + β        dx = α·g,  g = dy·γ·2/√π·exp(−(αx + s)²)
    dα = Σ g·x,  ds = Σ g,  dγ = Σ dy·f(u),  dβ = Σ dy  (γ, β sums over all but their own dims)
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import normlab.functional as F
import normlab.nn as nl
from conftest import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

KINDS = ["tanh", "erf"]


def _formula(kind, x, a, s, w, b, dy, channels_last):
    """(y, dx, dα, ds, dγ, dβ) in float64 from the formulas above."""
    x, dy, a, s = x.double(), dy.double(), float(a), float(s)
    shape = (1, -1) + (1,) * (x.dim() - 2) if not channels_last else w.shape
    wv, bv = w.double().reshape(shape), b.double().reshape(shape)
    u = a * x + (s if kind == "erf" else 0.0)
    f = torch.tanh(u) if kind == "tanh" else torch.erf(u)
    fp = 1 - f * f if kind == "tanh" else 2 / math.sqrt(math.pi) * torch.exp(-u * u)
    g = dy * wv * fp
    red = list(range(x.dim() - w.dim())) if channels_last else [0] + list(range(2, x.dim()))
    return (wv * f + bv, a * g, (g * x).sum(), g.sum(), (dy * f).sum(red), dy.sum(red))


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # non-contiguous: every other element of a wider tensor
        big = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x


CASES = [  # (shape, channels_last, normalized dims, memory layout)
    ((6, 5, 32), True, 1, "contiguous"),
    ((3, 4, 5, 7), True, 2, "contiguous"),
    ((6, 5, 32), True, 1, "sliced"),
    ((4, 6, 5, 3), False, 1, "contiguous"),
    ((4, 6, 5, 3), False, 1, "channels_last"),
    ((4, 6, 5, 3), False, 1, "sliced"),
    ((8, 6), False, 1, "contiguous"),
]


def _inputs(shape, channels_last, k, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    pshape = shape[len(shape) - k:] if channels_last else (shape[1],)
    x = _layout((torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype), layout)
    w = (1 + 0.3 * torch.randn(pshape, generator=g, dtype=torch.float64)).to(dtype)
    b = (0.2 * torch.randn(pshape, generator=g, dtype=torch.float64)).to(dtype)
    a = torch.tensor([0.7], dtype=dtype)
    s = torch.tensor([0.25], dtype=dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, a, s, w, b, dy


def _call(kind, x, a, s, w, b, channels_last, **kw):
    if kind == "tanh":
        return F.dynamic_tanh(x, a, w, b, channels_last=channels_last, **kw)
    return F.dynamic_erf(x, a, s, w, b, channels_last=channels_last, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0])}d-cl{int(c[1])}-k{c[2]}-{c[3]}")
@pytest.mark.parametrize("backend", [None, "reference"])
def test_forward_backward_vs_formula(kind, dtype, case, backend):
    shape, cl, k, layout = case
    x, a, s, w, b, dy = _inputs(shape, cl, k, dtype, layout)
    leaves = [t.requires_grad_() for t in (x, a, s, w, b)]
    y = _call(kind, x, a, s, w, b, cl, backend=backend)
    grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    want = _formula(kind, x.detach(), a, s, w.detach(), b.detach(), dy, cl)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, want[0], dtype, msg="y")
    names = ["dx", "dalpha", "dshift", "dweight", "dbias"]
    for i, (name, got) in enumerate(zip(names, grads)):
        if kind == "tanh" and name == "dshift":
            assert got is None
            continue
        ref = want[1 + i]
        assert got.dtype == dtype and got.shape == leaves[i].shape, name
        assert_close(got.reshape(ref.shape), ref, dtype, msg=name)
    if not cl and layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cl", [True, False])
def test_gradcheck_gradgradcheck(kind, cl):
    shape = (3, 4, 5) if cl else (3, 4, 2, 3)
    x, a, s, w, b, _ = _inputs(shape, cl, 1, torch.float64, "contiguous")
    args = [t.requires_grad_() for t in (x, a, s, w, b)]
    fn = lambda x_, a_, s_, w_, b_: _call(kind, x_, a_, s_, w_, b_, cl)  # noqa: E731
    if kind == "tanh":
        args.pop(2)
        fn = lambda x_, a_, w_, b_: F.dynamic_tanh(x_, a_, w_, b_, channels_last=cl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_partial_grads_and_no_affine():
    """Only some inputs need gradients; γ/β absent: the formulas with γ = 1, β = 0."""
    x, a, s, w, b, dy = _inputs((5, 16), True, 1, torch.float64, "contiguous")
    a.requires_grad_()
    y = F.dynamic_erf(x, a, s, None, None)
    (da,) = torch.autograd.grad(y, [a], dy)
    want = _formula("erf", x, a.detach(), s, torch.ones(16, dtype=x.dtype), torch.zeros(16, dtype=x.dtype), dy, True)
    assert_close(y, want[0])
    assert_close(da.reshape(()), want[2])
    x.requires_grad_()
    (dx,) = torch.autograd.grad(F.dynamic_tanh(x, 0.7, w, None), [x], dy)
    assert_close(dx, _formula("tanh", x.detach(), 0.7, 0, w, torch.zeros_like(w), dy, True)[1])


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch(kind):
    x, a, s, w, b, _ = _inputs((0, 6, 4), False, 1, torch.float32, "contiguous")
    leaves = [t.requires_grad_() for t in (x, a, w, b)]
    y = _call(kind, x, a, s, w, b, False)
    assert y.shape == (0, 6, 4)
    grads = torch.autograd.grad(y.sum(), leaves)
    assert grads[0].shape == x.shape
    for g, t in zip(grads[1:], leaves[1:]):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_inf_propagate_like_torch(kind, dtype):
    x, a, s, w, b, dy = _inputs((4, 32), True, 1, dtype, "contiguous")
    x[1, 3], x[2, 5], x[3, 7] = float("nan"), float("inf"), -float("inf")
    leaves = [t.requires_grad_() for t in (x, a, s, w, b)]
    y = _call(kind, x, a, s, w, b, True)
    if kind == "tanh":
        ref = w * torch.tanh(a * x) + b
    else:
        ref = w * torch.erf(a * x + s) + b
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert_close(y, ref.detach().double(), dtype)
    got = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    want = torch.autograd.grad(ref, leaves, dy, allow_unused=True)
    for gi, wi in zip(got, want):
        if wi is None:
            assert gi is None or not gi.any()
            continue
        assert torch.equal(torch.isnan(gi), torch.isnan(wi)), (gi, wi)


def test_layers_use_the_operator():
    """The DynamicTanh layer (paper's init α = 0.5, γ = 1, β = 0) through the operator's autograd."""
    m = nl.DynamicTanh(32)
    x = torch.randn(4, 32, requires_grad=True)
    m(x).sum().backward()
    want = _formula("tanh", x.detach(), 0.5, 0, torch.ones(32), torch.zeros(32), torch.ones(4, 32), True)
    assert_close(x.grad, want[1])
    assert_close(m.alpha.grad.reshape(()), want[2])


@pytest.mark.parametrize("cls", [nl.DynamicTanh, nl.DynamicErf])
def test_compile_fullgraph(cls):
    torch._dynamo.reset()
    m = cls(16)
    with torch.no_grad():
        m.weight.normal_(1, 0.2)
        m.bias.normal_(0, 0.2)
    x = torch.randn(8, 16, requires_grad=True)
    eager = m(x)
    (gx,) = torch.autograd.grad(eager.sum(), [x])
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = cm(x)
    (gc,) = torch.autograd.grad(y.sum(), [x])
    assert_close(y, eager.detach().double())
    assert_close(gc, gx.double())


@pytest.mark.parametrize("cls", [nl.DynamicTanh, nl.DynamicErf])
def test_export_is_standard_ops(cls):
    m = cls(16).eval()
    x = torch.randn(4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("normlab" in t for t in targets), targets
    assert_close(ep.module()(x), m(x).detach().double())


@pytest.mark.parametrize("norm", ["brn", "gbn", "ws", "frn", "evonorm-s0", "evonorm-b0", "dyt", "derf"])
def test_bench_compositions_compute_the_same_method(norm):
    """The eager torch composition the kernel bench times against is the normlab method itself
    (same parameters, same output and input gradient), so the speed-ups compare like with like."""
    from normlab.bench import kernels as K

    shape = {"cnn": (16, 64, 4, 4), "transformer": (8, 64), "weights": (32, 16, 3, 3)}[K.NORMS[norm][0]]
    torch.manual_seed(0)
    native, ours = K._layer(norm, shape[1], native=True), K._layer(norm, shape[1], native=False)
    ours.load_state_dict(native.state_dict(), strict=False)
    x = (torch.randn(shape) * 1.5 + 0.3).requires_grad_()
    yn, yo = native(x), ours(x)
    dy = torch.randn_like(yn)
    (gn,) = torch.autograd.grad(yn, [x], dy)
    (go,) = torch.autograd.grad(yo, [x], dy)
    assert_close(yo, yn.detach().double(), rtol=1e-4, atol=1e-4)
    assert_close(go, gn.double(), rtol=1e-4, atol=1e-4)


def test_bench_rows_smoke():
    from normlab.bench import kernels as K

    cases = [K.run_case(K.Case("dyt", (64, 256), "rows"), ["torch", "torch-compile", "cpu"], reps=1),
             K.run_case(K.Case("frn", (4, 32, 4, 4), "nchw"), ["torch", "torch-compile", "cpu"], reps=1)]
    summary = K.composed_summary(cases)
    assert set(summary) == {"dyt", "frn"} and summary["dyt"]["median_x_compile"] > 0


# ---- Filter Response Norm + TLU through normlab::filter_response_norm (fused on the CPU)


def _frn_formula(x, w, b, tau, eps):
    """Singh & Krishnan 2020 in float64: z = max(γ·x/sqrt(mean_HW(x²) + ε) + β, τ)."""
    v = (1, -1, 1, 1)
    nu2 = (x * x).mean((2, 3), keepdim=True)
    return torch.maximum(x / torch.sqrt(nu2 + eps) * w.view(v) + b.view(v), tau.view(v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_frn_vs_formula(dtype, layout, backend):
    g = torch.Generator().manual_seed(3)
    x = _layout((torch.randn(4, 6, 5, 7, generator=g, dtype=torch.float64) * 2 + 0.3).to(dtype), layout)
    w, b, tau = ((1 + 0.3 * torch.randn(6, generator=g, dtype=torch.float64)).to(dtype),
                 (0.2 * torch.randn(6, generator=g, dtype=torch.float64)).to(dtype),
                 (-0.3 + 0.2 * torch.randn(6, generator=g, dtype=torch.float64)).to(dtype))
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    leaves = [t.detach().requires_grad_() for t in (x, w, b, tau)]
    y = F.filter_response_norm(*leaves, eps=1e-6, backend=backend)
    got = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = _frn_formula(*ref_leaves, 1e-6)
    want = torch.autograd.grad(ref, ref_leaves, dy.double())
    assert y.dtype == dtype
    assert_close(y, ref.detach(), dtype, msg="y")
    for name, gi, wi in zip(["dx", "dweight", "dbias", "dtau"], got, want):
        assert gi.dtype == dtype and gi.shape == wi.shape, name
        assert_close(gi, wi, dtype, msg=name)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_frn_gradcheck_gradgradcheck_and_no_tlu():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64).requires_grad_()
    w, b, tau = (torch.randn(3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    fn = lambda *a: F.filter_response_norm(*a, eps=1e-6)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, tau))
    assert torch.autograd.gradgradcheck(fn, (x, w, b, tau))
    y = F.filter_response_norm(x, w, b, None, eps=1e-6)
    ref = _frn_formula(x.detach(), w.detach(), b.detach(), torch.full((3,), -math.inf, dtype=x.dtype), 1e-6)
    assert_close(y, ref)


def test_frn_nan_and_empty():
    x = torch.randn(2, 4, 3, 3)
    x[0, 1, 1, 1] = float("nan")
    w, b, tau = torch.ones(4), torch.zeros(4), torch.full((4,), -0.5)
    y = F.filter_response_norm(x, w, b, tau)
    assert torch.isnan(y[0, 1]).all() and not torch.isnan(y[1]).any() and not torch.isnan(y[0, 0]).any()
    e = torch.randn(0, 4, 3, 3, requires_grad=True)
    ye = F.filter_response_norm(e, w, b, tau)
    assert ye.shape == e.shape
    (ge,) = torch.autograd.grad(ye.sum(), [e])
    assert ge.shape == e.shape
