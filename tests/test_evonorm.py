"""EvoNorm-S0 through ``normlab::evonorm_s0`` and its fused CPU kernels (issue 10 §1, §3).

Every value is compared with the paper's formula (Liu, Brock, Simonyan & Le 2020) written here
in float64, gradients by autograd of that formula, never with normlab's own outputs:

    y = γ_c · x·σ(v_c·x) / sqrt(s²_ng + ε) + β_c,   s²_ng the biased variance over the C/G
    channels of group g of sample n and every position (v = None: no gate, y = γ·x/s + β).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import normlab.functional as F
import normlab.nn as nl
from conftest import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _s0_formula(x, groups, w, b, v, eps):
    """The paper's EvoNorm-S0 in float64 (x any (N, C, *) shape)."""
    n, c = x.shape[0], x.shape[1]
    xg = x.reshape(n, groups, -1)
    var = ((xg - xg.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True)
    std = torch.sqrt(var + eps).expand_as(xg).reshape(x.shape)
    cv = (1, -1) + (1,) * (x.dim() - 2)
    num = x if v is None else x * torch.sigmoid(v.view(cv) * x)
    return num / std * w.view(cv) + b.view(cv)


def _layout(x, layout):
    if layout == "channels_last":
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "sliced":
        big = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x


def _inputs(shape, dtype, layout, seed=0, offset=0.3):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = _layout((torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + offset).to(dtype), layout)
    w = (1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64)).to(dtype)
    b = (0.2 * torch.randn(c, generator=g, dtype=torch.float64)).to(dtype)
    v = (1 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, v, dy


def _check(shape, groups, dtype, layout, gate, backend):
    x, w, b, v, dy = _inputs(shape, dtype, layout)
    leaves = [t.detach().requires_grad_() for t in (x, w, b, v)]
    if not gate:
        leaves[3] = None
    y = F.evonorm_s0(leaves[0], groups, leaves[1], leaves[2], leaves[3], 1e-5, backend=backend)
    wrt = [t for t in leaves if t is not None]
    got = torch.autograd.grad(y, wrt, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in wrt]
    ref = _s0_formula(ref_leaves[0], groups, ref_leaves[1], ref_leaves[2], ref_leaves[3] if gate else None, 1e-5)
    want = torch.autograd.grad(ref, ref_leaves, dy.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref.detach(), dtype, msg="y")
    for name, gi, wi in zip(["dx", "dweight", "dbias", "dv"], got, want):
        assert gi.dtype == dtype and gi.shape == wi.shape, name
        assert_close(gi, wi, dtype, msg=name)
    if layout == "channels_last" and x.dim() >= 3:
        assert y.is_contiguous(memory_format=torch.channels_last) if x.dim() == 4 else y.movedim(1, -1).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_s0_vs_formula(dtype, layout, gate, backend):
    _check((4, 6, 5, 7), 3, dtype, layout, gate, backend)


@pytest.mark.parametrize("shape,groups", [((3, 8), 4), ((2, 6, 9), 2), ((2, 4, 3, 2, 3), 4), ((1, 5, 4, 4), 1),
                                          ((2, 64, 33, 33), 32)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_s0_shapes(shape, groups, layout):
    """2-D (no positions), 3-D, 5-D input, one group, one channel per group; a large plane
    (more than one shifted-sum block, several threads)."""
    _check(shape, groups, torch.float32, layout, True, None)


def test_s0_gradcheck_gradgradcheck():
    x, w, b, v, _ = _inputs((2, 4, 3, 2), torch.float64, "contiguous")
    args = tuple(t.requires_grad_() for t in (x, w, b, v))
    for layout in ("contiguous", "channels_last"):
        xs = _layout(args[0].detach(), layout).requires_grad_()
        fn = lambda x_, w_, b_, v_: F.evonorm_s0(x_, 2, w_, b_, v_, 1e-5)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (xs, *args[1:]))
        assert torch.autograd.gradgradcheck(fn, (xs, *args[1:]))
    no_gate = lambda x_, w_, b_: F.evonorm_s0(x_, 4, w_, b_, None, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(no_gate, args[:3])


def test_s0_numerics_offset_nan_overflow_empty():
    # a large offset with a small spread keeps float32 precision (shifted statistics)
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64) * 0.1 + 1e4).float().double()
    w, b = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    ref = _s0_formula(base, 2, w, b, None, 1e-5)
    for layout in ("contiguous", "channels_last"):
        y = F.evonorm_s0(_layout(base.float(), layout), 2, w.float(), b.float(), None, 1e-5)
        assert_close(y, ref, torch.float32, msg=layout)
    # NaN propagates to its group only
    x = torch.randn(2, 4, 3, 3)
    x[0, 1, 1, 1] = float("nan")
    for layout in ("contiguous", "channels_last"):
        y = F.evonorm_s0(_layout(x, layout), 2, torch.ones(4), torch.zeros(4), torch.ones(4))
        assert torch.isnan(y[0, :2]).all() and not torch.isnan(y[0, 2:]).any() and not torch.isnan(y[1]).any()
    # float64 squares overflowing: the reference's rescaled moments (finite, as the formula)
    big = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=g) * 1e160
    y = F.evonorm_s0(big, 2, None, None, None, 1e-5)
    assert torch.isfinite(y).all()
    assert_close(y, _s0_formula(big / 1e160, 2, w, b, None, 0.0))
    # empty batch
    e = torch.randn(0, 4, 3, 3, requires_grad=True)
    ye = F.evonorm_s0(e, 2, torch.ones(4), torch.zeros(4), torch.ones(4))
    (ge,) = torch.autograd.grad(ye.sum(), [e])
    assert ye.shape == e.shape and ge.shape == e.shape


def test_s0_layer_batch_independent_and_partial_grads():
    m = nl.EvoNormS0(8, groups=4)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(1.0, 0.2)
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    y = m(x)
    assert_close(m(x[:1]), y[:1].detach().double())
    m.v.requires_grad_(False)
    y = m(x)
    gx, gw = torch.autograd.grad(y.sum(), [x, m.weight])
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, m.weight)]
    ref = _s0_formula(ref_leaves[0], 4, ref_leaves[1], m.bias.detach().double(), m.v.detach().double(), 1e-5)
    want = torch.autograd.grad(ref.sum(), ref_leaves)
    assert_close(gx, want[0]) and assert_close(gw, want[1])


def test_s0_compile_fullgraph_and_export():
    torch._dynamo.reset()
    m = nl.EvoNormS0(16, groups=4)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(1.0, 0.2)
    x = torch.randn(4, 16, 5, 5, requires_grad=True)
    eager = m(x)
    (gx,) = torch.autograd.grad(eager.sum(), [x])
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = cm(x)
    (gc,) = torch.autograd.grad(y.sum(), [x])
    assert_close(y, eager.detach().double())
    assert_close(gc, gx.double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(m.eval(), (x.detach(),))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("normlab" in t for t in targets), targets
    assert_close(ep.module()(x.detach()), eager.detach().double())


# ---- EvoNorm-B0 through normlab::evonorm_b0


def _b0_formula(x, var_b, w, b, v, eps):
    """The paper's EvoNorm-B0 in float64: y = γ·x / max(sqrt(s²_b + ε), v·x + sqrt(s²_i + ε)) + β;
    ``var_b=None``: the biased batch variance of x per channel (differentiable)."""
    cv = (1, -1) + (1,) * (x.dim() - 2)
    sp = tuple(range(2, x.dim()))
    if var_b is None:
        red = (0,) + sp
        var_b = ((x - x.mean(red, keepdim=True)) ** 2).mean(red)
    var_i = ((x - x.mean(sp, keepdim=True)) ** 2).mean(sp, keepdim=True)
    right = torch.sqrt(var_i + eps) if v is None else v.view(cv) * x + torch.sqrt(var_i + eps)
    den = torch.maximum(torch.sqrt(var_b.view(cv) + eps).expand_as(x), right)
    return x / den * w.view(cv) + b.view(cv)


def _check_b0(shape, dtype, layout, gate, training, backend, seed=0):
    x, w, b, v, dy = _inputs(shape, dtype, layout, seed=seed)
    c = shape[1]
    run = (0.5 + torch.rand(c, generator=torch.Generator().manual_seed(seed + 9), dtype=torch.float64)).to(dtype)
    run0 = run.clone()
    leaves = [t.detach().requires_grad_() for t in (x, w, b, v)]
    if not gate:
        leaves[3] = None
    y = F.evonorm_b0(leaves[0], run, leaves[1], leaves[2], leaves[3], training, 0.1, 1e-5, backend=backend)
    wrt = [t for t in leaves if t is not None]
    got = torch.autograd.grad(y, wrt, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in wrt]
    ref = _b0_formula(ref_leaves[0], None if training else run0.double(), ref_leaves[1], ref_leaves[2],
                      ref_leaves[3] if gate else None, 1e-5)
    want = torch.autograd.grad(ref, ref_leaves, dy.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref.detach(), dtype, msg="y")
    for name, gi, wi in zip(["dx", "dweight", "dbias", "dv"], got, want):
        assert gi.dtype == dtype and gi.shape == wi.shape, name
        assert_close(gi, wi, dtype, msg=name)
    xd = x.double()
    if training:  # the running variance: unbiased batch variance, momentum 0.1
        red = (0,) + tuple(range(2, x.dim()))
        assert_close(run, 0.9 * run0.double() + 0.1 * xd.var(red, unbiased=True), dtype, msg="running_var")
    else:
        assert torch.equal(run, run0)
    if layout == "channels_last":
        assert y.movedim(1, -1).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_b0_vs_formula(dtype, layout, training, backend):
    _check_b0((4, 6, 5, 7), dtype, layout, True, training, backend)


@pytest.mark.parametrize("shape", [(3, 4, 7), (2, 3, 3, 2, 3), (2, 64, 33, 33)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("gate", [True, False])
def test_b0_shapes_and_no_gate(shape, layout, gate):
    _check_b0(shape, torch.float32, layout, gate, True, None, seed=2)


def test_b0_gradcheck_gradgradcheck_and_ties():
    x, w, b, v, _ = _inputs((3, 4, 3, 2), torch.float64, "contiguous")
    args = tuple(t.requires_grad_() for t in (x, w, b, v))
    for layout in ("contiguous", "channels_last"):
        xs = _layout(args[0].detach(), layout).requires_grad_()
        train = lambda x_, w_, b_, v_: F.evonorm_b0(x_, None, w_, b_, v_, True)  # noqa: E731
        run = torch.rand(4, dtype=torch.float64) + 0.5
        evl = lambda x_, w_, b_, v_: F.evonorm_b0(x_, run, w_, b_, v_, False)  # noqa: E731
        for f in (train, evl):
            assert torch.autograd.gradcheck(f, (xs, *args[1:]))
            assert torch.autograd.gradgradcheck(f, (xs, *args[1:]))
    # v = 0 and a constant-variance batch: σ_b = σ_i on every element, a tie everywhere; the
    # gradient splits as torch.maximum's (half to each argument)
    xt = torch.tensor([-1.0, 1.0, -1.0, 1.0] * 2, dtype=torch.float64).reshape(2, 1, 2, 2).requires_grad_()
    z = torch.zeros(1, dtype=torch.float64)
    dyt = torch.arange(8.0, dtype=torch.float64).view(2, 1, 2, 2) / 8
    for layout in ("contiguous", "channels_last"):
        xs = _layout(xt.detach(), layout).requires_grad_()
        (g,) = torch.autograd.grad(F.evonorm_b0(xs, None, None, None, z, True), [xs], dyt)
        xr = xt.detach().requires_grad_()
        ref = _b0_formula(xr, None, torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), z, 1e-5)
        (gr,) = torch.autograd.grad(ref, [xr], dyt)
        assert_close(g, gr, msg=layout)


def test_b0_nan_and_empty():
    x = torch.randn(2, 4, 3, 3)
    x[0, 1, 1, 1] = float("nan")
    for layout in ("contiguous", "channels_last"):
        run = torch.ones(4)
        y = F.evonorm_b0(_layout(x, layout), run, torch.ones(4), torch.zeros(4), torch.ones(4), False)
        assert torch.isnan(y[0, 1]).all() and not torch.isnan(y[:, [0, 2, 3]]).any() and not torch.isnan(y[1]).any()
        yt = F.evonorm_b0(_layout(x, layout), None, torch.ones(4), torch.zeros(4), torch.ones(4), True)
        assert torch.isnan(yt[:, 1]).all() and not torch.isnan(yt[:, [0, 2, 3]]).any()
    e = torch.randn(0, 4, 3, 3, requires_grad=True)
    run = torch.ones(4)
    ye = F.evonorm_b0(e, run, torch.ones(4), torch.zeros(4), torch.ones(4), False)
    (ge,) = torch.autograd.grad(ye.sum(), [e])
    assert ye.shape == e.shape and ge.shape == e.shape
