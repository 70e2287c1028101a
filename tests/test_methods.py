"""Issue 10's methods: Batch Renorm, Ghost BN, WS, FRN+TLU, EvoNorm-S0/B0, DyT, Derf.

Each formula is re-derived here in float64 from its paper (not by calling normlab), then
gradcheck/gradgradcheck, train/eval semantics, the error catalog, lab/convert names, and one
torch.compile(fullgraph=True) and one torch.export test over all new layers.
"""

import math
import warnings

import pytest
import torch
from torch import nn

import normlab
import normlab.functional as F
import normlab.nn as nl
from normlab.lab.norms import get_norm
from normlab.nn.utils import is_weight_standardized, remove_weight_standardization, weight_standardization

D = torch.float64


def _x(*shape, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=D) * scale + offset)


def _params(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
    return module


# ------------------------------------------------------------------- independent references


def ref_bn(x, mean, var, w, b, eps):
    v = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.view(v)) / torch.sqrt(var.view(v) + eps) * w.view(v) + b.view(v)


def ref_brn(x, rm, rv, w, b, eps, r_max, d_max):
    red = [0] + list(range(2, x.dim()))
    mu = x.mean(red)
    sb = torch.sqrt(((x - mu.view((1, -1) + (1,) * (x.dim() - 2))) ** 2).mean(red) + eps)
    s = torch.sqrt(rv + eps)
    r = (sb / s).clamp(1 / r_max, r_max).detach()
    d = ((mu - rm) / s).clamp(-d_max, d_max).detach()
    v = (1, -1) + (1,) * (x.dim() - 2)
    xhat = (x - mu.view(v)) / sb.view(v)
    return w.view(v) * (xhat * r.view(v) + d.view(v)) + b.view(v)


def ref_gbn(x, g, w, b, eps):
    outs = []
    for chunk in x.split(g, 0):
        red = [0] + list(range(2, x.dim()))
        mu = chunk.mean(red)
        var = chunk.var(red, unbiased=False)
        outs.append(ref_bn(chunk, mu, var, w, b, eps))
    return torch.cat(outs)


def ref_frn(x, w, b, tau, eps):
    nu2 = (x * x).mean((2, 3), keepdim=True)
    y = w.view(1, -1, 1, 1) * x / torch.sqrt(nu2 + eps) + b.view(1, -1, 1, 1)
    return torch.max(y, tau.view(1, -1, 1, 1))


def ref_s0(x, groups, w, b, v, eps):
    n, c, h, wd = x.shape
    xg = x.reshape(n, groups, c // groups, h, wd)
    mu = xg.mean((2, 3, 4), keepdim=True)
    var = ((xg - mu) ** 2).mean((2, 3, 4), keepdim=True)
    std = torch.sqrt(var + eps).expand_as(xg).reshape(x.shape)
    cv = (1, -1, 1, 1)
    return x * torch.sigmoid(v.view(cv) * x) / std * w.view(cv) + b.view(cv)


def ref_b0(x, var_b, w, b, v, eps):
    cv = (1, -1, 1, 1)
    mu_i = x.mean((2, 3), keepdim=True)
    var_i = ((x - mu_i) ** 2).mean((2, 3), keepdim=True)
    den = torch.max(torch.sqrt(var_b.view(cv) + eps).expand_as(x), v.view(cv) * x + torch.sqrt(var_i + eps))
    return x / den * w.view(cv) + b.view(cv)


# ------------------------------------------------------------------------- Batch Renorm


def test_brn_formula_and_running_stats():
    x = _x(6, 3, 4, 5, offset=0.5)
    m = _params(nl.BatchRenorm2d(3, r_max=1.5, d_max=0.3).double())
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.1, -0.4, 0.9], dtype=D))
        m.running_var.copy_(torch.tensor([0.5, 2.0, 1.3], dtype=D))
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    want = ref_brn(x, rm, rv, m.weight, m.bias, m.eps, 1.5, 0.3)
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)
    red = (0, 2, 3)
    torch.testing.assert_close(m.running_mean, 0.9 * rm + 0.1 * x.mean(red))
    torch.testing.assert_close(m.running_var, 0.9 * rv + 0.1 * x.var(red, unbiased=True))
    assert int(m.num_batches_tracked) == 1


def test_brn_gradients_match_reference_with_clipping():
    x = _x(5, 3, 4, offset=1.0).requires_grad_()
    m = _params(nl.BatchRenorm1d(3, r_max=1.2, d_max=0.1).double())
    with torch.no_grad():
        m.running_var.fill_(3.0)  # r and d both clip
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    y = m(x)
    x2 = x.detach().clone().requires_grad_()
    w2, b2 = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
    y2 = ref_brn(x2, rm, rv, w2, b2, m.eps, 1.2, 0.1)
    dy = _x(*y.shape, seed=3)
    got = torch.autograd.grad(y, (x, m.weight, m.bias), dy)
    want = torch.autograd.grad(y2, (x2, w2, b2), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_brn_r1_d0_equals_batchnorm_and_eval_equals_bn_running():
    x = _x(8, 4, 3, 3).requires_grad_()
    bn = _params(nl.BatchNorm2d(4).double())
    brn = nl.BatchRenorm2d(4, r_max=1.0, d_max=0.0).double()
    brn.load_state_dict(bn.state_dict())
    y1, y2 = bn(x), brn(x)
    torch.testing.assert_close(y2, y1, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(y1.square().sum(), (x, bn.weight))
    g2 = torch.autograd.grad(y2.square().sum(), (x, brn.weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(brn.running_var, bn.running_var)
    brn3 = nl.BatchRenorm2d(4).double()
    brn3.load_state_dict(bn.state_dict())
    brn3.eval(), bn.eval()
    torch.testing.assert_close(brn3(x), ref_bn(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, 1e-5))


def test_brn_warmup_and_schedule():
    m = nl.BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup=10)
    r, d = m.limits(torch.tensor(0))
    assert float(r) == 1.0 and float(d) == 0.0
    r, d = m.limits(torch.tensor(5))
    assert math.isclose(float(r), 2.0) and math.isclose(float(d), 2.5)
    r, d = m.limits(torch.tensor(50))
    assert math.isclose(float(r), 3.0) and math.isclose(float(d), 5.0)
    ramp = nl.Ramp(1.0, 3.0, steps=4, delay=2)
    assert [float(ramp(torch.tensor(s))) for s in (0, 2, 4, 6, 9)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    s = nl.BatchRenorm1d(2, r_max=ramp, d_max=lambda step: 0.0 * step)
    s(torch.randn(4, 2))  # first step: r_max = 1, d_max = 0 -> batch norm
    assert int(s.num_batches_tracked) == 1
    x = _x(4, 2)
    bn = nl.BatchNorm1d(2).double()
    torch.testing.assert_close(nl.BatchRenorm1d(2, warmup=100).double()(x), bn(x), rtol=1e-12, atol=1e-12)


def test_brn_gradcheck():
    # r and d are stop-gradient, so finite differences agree with autograd only where both are
    # clipped (locally constant): running statistics far from the batch's.
    rm, rv = torch.tensor([5.0, -5.0], dtype=D), torch.tensor([20.0, 30.0], dtype=D)
    x, w, b = _x(4, 2, 3).requires_grad_(), _x(2, seed=2).requires_grad_(), _x(2, seed=3).requires_grad_()
    f = lambda x, w, b: F.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, 1.3, 0.2)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


# ------------------------------------------------------------------------- Ghost BN


def test_gbn_formula_running_stats_and_eval():
    x = _x(12, 3, 4, 2, offset=0.3)
    m = _params(nl.GhostBatchNorm2d(3, virtual_batch_size=4).double())
    torch.testing.assert_close(m(x), ref_gbn(x, 4, m.weight, m.bias, m.eps), rtol=1e-12, atol=1e-12)
    red = (0, 2, 3)
    means = torch.stack([c.mean(red) for c in x.split(4)]).mean(0)
    vars_ = torch.stack([c.var(red, unbiased=True) for c in x.split(4)]).mean(0)
    torch.testing.assert_close(m.running_mean, 0.1 * means)
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * vars_)
    m.eval()
    y_eval = m(x[:5])  # any eval batch size: running statistics
    torch.testing.assert_close(y_eval, ref_bn(x[:5], m.running_mean, m.running_var, m.weight, m.bias, m.eps))


def test_gbn_g_equals_n_is_batchnorm():
    x = _x(8, 3, 5).requires_grad_()
    bn, gbn = nl.BatchNorm1d(3).double(), nl.GhostBatchNorm1d(3, virtual_batch_size=8).double()
    y1, y2 = bn(x), gbn(x)
    torch.testing.assert_close(y2, y1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gbn.running_var, bn.running_var)
    torch.testing.assert_close(torch.autograd.grad(y2.pow(3).sum(), x)[0], torch.autograd.grad(y1.pow(3).sum(), x)[0])


def test_gbn_gradcheck():
    x, w, b = _x(6, 2, 3).requires_grad_(), _x(2, seed=2).requires_grad_(), _x(2, seed=3).requires_grad_()
    f = lambda x, w, b: F.ghost_batch_norm(x, 3, None, None, w, b, True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("shape,layout", [((8, 4, 5, 3), "contiguous"), ((8, 4, 5, 3), "channels_last"),
                                          ((8, 5), "contiguous"), ((8, 3, 7), "contiguous"), ((8, 4, 5, 3), "sliced")])
def test_gbn_cpu_kernels_match_the_float64_formula_in_every_layout(shape, layout):
    from normlab.core import dispatch
    x64 = _x(*shape, scale=2.0, offset=0.7)
    w64, b64 = _x(shape[1], seed=2), _x(shape[1], seed=3)
    x = x64.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # every other element of a wider buffer: neither layout, one copy
        big = torch.zeros(shape[:-1] + (2 * shape[-1],))
        big[..., ::2] = x
        x = big[..., ::2]
    assert torch.equal(x.double(), x64.float().double())
    assert dispatch.backend_module("ghost_batch_norm", x).__name__ == "normlab.core.cpu"
    x.requires_grad_()
    w, b = w64.float().requires_grad_(), b64.float().requires_grad_()
    y = F.ghost_batch_norm(x, 2, None, None, w, b, True)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    leaves = [t.clone().requires_grad_() for t in (x64, w64, b64)]
    ref = ref_gbn(*leaves[:1], 2, *leaves[1:], 1e-5)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    dy = _x(*shape, seed=5)
    got = torch.autograd.grad(y, (x, w, b), dy.float())
    want = torch.autograd.grad(ref, leaves, dy)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.double(), w_, rtol=1e-4, atol=1e-4)


def test_gbn_compiles_without_graph_breaks_and_exports_standard_ops():
    m = nl.GhostBatchNorm2d(4, virtual_batch_size=2)
    x = torch.randn(8, 4, 3, 3)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0
    y = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(y, nl.GhostBatchNorm2d(4, virtual_batch_size=2)(x), rtol=1e-5, atol=1e-5)
    ep = torch.export.export(nl.GhostBatchNorm2d(4, virtual_batch_size=2), (x,))
    assert not [n for n in ep.graph.nodes if "normlab" in str(n.target)]


# ------------------------------------------------------------------------- Weight Standardization


def test_ws_filters_zero_mean_unit_variance_and_formula():
    conv = nn.Conv2d(3, 5, 3).double()
    raw = conv.weight.detach().clone()
    weight_standardization(conv, eps=0.0)
    assert is_weight_standardized(conv)
    w = conv.weight.reshape(5, -1)
    torch.testing.assert_close(w.mean(1), torch.zeros(5, dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(w.var(1, unbiased=False), torch.ones(5, dtype=D))
    r = raw.reshape(5, -1)
    want = ((r - r.mean(1, keepdim=True)) / r.std(1, unbiased=False, keepdim=True)).view_as(raw)
    torch.testing.assert_close(conv.weight, want)
    x = _x(2, 3, 6, 6)
    std = nl.StdConv2d(3, 5, 3, eps=0.0).double()
    with torch.no_grad():
        std.weight.copy_(raw)
        std.bias.copy_(conv.bias)
    torch.testing.assert_close(std(x), conv(x))
    remove_weight_standardization(conv)
    assert not is_weight_standardized(conv) and torch.equal(conv.weight, raw)


def test_ws_gradcheck():
    w = _x(4, 2, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: F.weight_standardize(w, 1e-5), (w,))
    assert torch.autograd.gradgradcheck(lambda w: F.weight_standardize(w, 1e-5), (w,))


# ------------------------------------------------------------------------- FRN, EvoNorm


def test_frn_formula_and_tlu():
    x = _x(3, 4, 5, 5)
    m = _params(nl.FilterResponseNorm2d(4).double())
    with torch.no_grad():
        m.tau.copy_(torch.tensor([-10.0, 0.5, 1.0, 10.0], dtype=D))
    y = m(x)
    torch.testing.assert_close(y, ref_frn(x, m.weight, m.bias, m.tau, 1e-6))
    assert torch.equal(y[:, 3], torch.full_like(y[:, 3], 10.0))  # TLU threshold above every response
    assert (y >= m.tau.view(1, -1, 1, 1)).all()
    # ν² is the mean square, not a variance: a constant channel normalizes to ±1
    c = torch.full((1, 1, 3, 3), -2.0, dtype=D)
    torch.testing.assert_close(F.filter_response_norm(c, eps=0.0), -torch.ones_like(c))
    le = nl.FilterResponseNorm2d(4, learnable_eps=True).double()
    torch.testing.assert_close(le(x), ref_frn(x, le.weight, le.bias, le.tau, 1e-6 + 1e-4))
    le(x).sum().backward()
    assert le.learned_eps.grad is not None and le.learned_eps.grad.abs().item() > 0


def test_frn_gradcheck():
    x, w, b = _x(2, 3, 3, 2).requires_grad_(), _x(3, seed=2).requires_grad_(), _x(3, seed=3).requires_grad_()
    tau = torch.full((3,), -5.0, dtype=D, requires_grad=True)  # away from the max's kink
    e = torch.full((1,), 0.1, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b, t: F.filter_response_norm(x, w, b, t), (x, w, b, tau))
    assert torch.autograd.gradgradcheck(lambda x, w, b, t: F.filter_response_norm(x, w, b, t), (x, w, b, tau))
    assert torch.autograd.gradcheck(lambda x, e: F.filter_response_norm(x, learned_eps=e), (x, e))


def test_evonorm_s0_formula_and_batch_independence():
    x = _x(4, 6, 3, 3)
    m = _params(nl.EvoNormS0(6, groups=3).double())
    torch.testing.assert_close(m(x), ref_s0(x, 3, m.weight, m.bias, m.v, 1e-5))
    torch.testing.assert_close(m(x[:1]), m(x)[:1])


def test_evonorm_b0_formula_train_eval():
    x = _x(4, 3, 3, 3, offset=0.2)
    m = _params(nl.EvoNormB0(3).double())
    var_b = x.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(m(x), ref_b0(x, var_b, m.weight, m.bias, m.v, 1e-5))
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * x.var((0, 2, 3), unbiased=True))
    m.eval()
    torch.testing.assert_close(m(x), ref_b0(x, m.running_var, m.weight, m.bias, m.v, 1e-5))


def test_evonorm_gradcheck():
    x = _x(2, 4, 3, 2).requires_grad_()
    w, b, v = (_x(4, seed=s).requires_grad_() for s in (2, 3, 4))
    s0 = lambda x, w, b, v: F.evonorm_s0(x, 2, w, b, v)  # noqa: E731
    b0 = lambda x, w, b, v: F.evonorm_b0(x, None, w, b, v, True)  # noqa: E731
    for f in (s0, b0):
        assert torch.autograd.gradcheck(f, (x, w, b, v))
        assert torch.autograd.gradgradcheck(f, (x, w, b, v))


# ------------------------------------------------------------------------- DyT, Derf


def test_dyt_derf_formula_and_parameters():
    x = _x(2, 5, 7)
    m = nl.DynamicTanh(7).double()
    assert m.alpha.shape == (1,) and float(m.alpha.detach()) == 0.5 and isinstance(m.alpha, nn.Parameter)
    _params(m)
    torch.testing.assert_close(m(x), m.weight * torch.tanh(m.alpha * x) + m.bias)
    cf = _params(nl.DynamicTanh(5, alpha_init=0.8, channels_last=False).double())
    assert float(nl.DynamicTanh(5, alpha_init=0.8).alpha) == pytest.approx(0.8)
    torch.testing.assert_close(cf(x), cf.weight.view(1, 5, 1) * torch.tanh(cf.alpha * x) + cf.bias.view(1, 5, 1))
    e = _params(nl.DynamicErf(7).double())
    torch.testing.assert_close(e(x), e.weight * torch.erf(e.alpha * x + e.shift) + e.bias)
    assert float(nl.DynamicErf(7).shift) == 0.0


def test_dyt_derf_gradcheck():
    x, a, s = _x(3, 4).requires_grad_(), torch.tensor([0.7], dtype=D, requires_grad=True), \
        torch.tensor([0.2], dtype=D, requires_grad=True)
    w, b = _x(4, seed=2).requires_grad_(), _x(4, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(F.dynamic_tanh, (x, a, w, b))
    assert torch.autograd.gradgradcheck(F.dynamic_tanh, (x, a, w, b))
    assert torch.autograd.gradcheck(F.dynamic_erf, (x, a, s, w, b))
    assert torch.autograd.gradgradcheck(F.dynamic_erf, (x, a, s, w, b))


# ------------------------------------------------------------------------- error catalog


@pytest.mark.parametrize("make, pattern", [
    (lambda: nl.GhostBatchNorm2d(3, virtual_batch_size=4)(torch.randn(6, 3, 2, 2)),
     r"^virtual_batch_size: expected a divisor of the batch size 6, got 4"),
    (lambda: nl.GhostBatchNorm1d(3, virtual_batch_size=0), r"^virtual_batch_size: expected a positive int, got 0$"),
    (lambda: nl.BatchRenorm2d(3, r_max=0.5), r"^r_max: expected a number >= 1 or a callable schedule, got 0.5$"),
    (lambda: nl.BatchRenorm2d(3, d_max=-1.0), r"^d_max: expected a number >= 0"),
    (lambda: F.batch_renorm(torch.randn(4, 2), torch.zeros(2), torch.ones(2), training=True, r_max=0.9),
     r"^r_max: expected a number >= 1, got 0.9$"),
    (lambda: nl.BatchRenorm1d(3, track_running_stats=False), r"^track_running_stats: Batch Renormalization needs"),
    (lambda: nl.BatchRenorm1d(3, warmup=-1), r"^warmup: expected an int >= 0, got -1$"),
    (lambda: nl.EvoNormS0(6, groups=4), r"^groups: expected a positive divisor of num_features=6, got 4$"),
    (lambda: nl.FilterResponseNorm2d(3)(torch.randn(2, 3, 4)), r"^input: FilterResponseNorm2d expected 4-D input"),
    (lambda: nl.FilterResponseNorm2d(3)(torch.randn(2, 4, 2, 2)), r"^input: expected 3 channels"),
    (lambda: nl.DynamicTanh(4)(torch.randn(2, 5)), r"^normalized_shape: expected the input's trailing dims"),
    (lambda: nl.DynamicTanh((2, 2), channels_last=False), r"^normalized_shape: expected one int"),
    (lambda: F.dynamic_tanh(torch.randn(3), torch.ones(2)), r"^alpha: expected a scalar"),
    (lambda: nl.StdConv2d(2, 2, 1, eps=-1.0), r"^eps: expected a number >= 0, got -1.0$"),
    (lambda: weight_standardization(nn.ConvTranspose2d(2, 2, 1)), r"^module: expected a layer with output filters"),
    (lambda: F.weight_standardize(torch.randn(3)), r"^weight: expected at least 2-D input"),
])
def test_error_catalog(make, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        make()


# ------------------------------------------------------------------------- lab, convert, compile, export


def test_lab_names_and_convert():
    for name, cls in [("brn", nl.BatchRenorm2d), ("gbn:16", nl.GhostBatchNorm2d), ("ws+gn", nl.GroupNorm),
                      ("frn", nl.FilterResponseNorm2d), ("evonorm-s0", nl.EvoNormS0), ("evonorm-b0", nl.EvoNormB0),
                      ("dyt", nl.DynamicTanh), ("derf", nl.DynamicErf)]:
        assert type(get_norm(name).make(16, "conv2d")) is cls
    assert get_norm("gbn:16").make(8, "conv2d").virtual_batch_size == 16
    assert get_norm("ws+gn").weight_standardization
    from normlab.lab.models import build_model
    model = build_model("cnn", norm="ws+gn", input_shape=(3, 8, 8), num_classes=4)
    assert any(is_weight_standardized(m) for m in model.modules() if isinstance(m, nn.Conv2d))
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(4, 3, 6, 6)
    net(x)
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        brn = normlab.convert(net, "brn")
        out, rep = normlab.convert(net, "ws+gn", report=True)
    assert isinstance(brn[1], nl.BatchRenorm2d)
    torch.testing.assert_close(brn(x), net(x))  # running statistics carried: eval unchanged
    assert isinstance(out[1], nl.GroupNorm) and rep.standardized == ["0"]
    for method, cls in [("gbn:2", nl.GhostBatchNorm2d), ("frn", nl.FilterResponseNorm2d), ("evonorm-s0", nl.EvoNormS0),
                        ("evonorm-b0", nl.EvoNormB0), ("dyt", nl.DynamicTanh), ("derf", nl.DynamicErf)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert isinstance(normlab.convert(net, method)[1], cls)
    ln = normlab.convert(nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)), "dyt")
    assert isinstance(ln[1], nl.DynamicTanh) and ln[1].normalized_shape == (6,)


class _Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nl.StdConv2d(3, 8, 3, padding=1)
        self.brn = nl.BatchRenorm2d(8, r_max=nl.Ramp(1.0, 3.0, 10), warmup=0)
        self.gbn = nl.GhostBatchNorm2d(8, virtual_batch_size=2)
        self.frn = nl.FilterResponseNorm2d(8)
        self.s0 = nl.EvoNormS0(8, groups=4)
        self.b0 = nl.EvoNormB0(8)
        self.dyt = nl.DynamicTanh(8, channels_last=False)
        self.derf = nl.DynamicErf(6)

    def forward(self, x):
        return self.derf(self.dyt(self.b0(self.s0(self.frn(self.gbn(self.brn(self.conv(x))))))))


def test_compile_fullgraph_train_and_eval():
    torch.manual_seed(0)
    m = _Zoo()
    x = torch.randn(4, 3, 6, 6)
    ref = _Zoo()
    ref.load_state_dict(m.state_dict())
    cm = torch.compile(m, fullgraph=True, backend="eager")  # dynamo: no graph break anywhere
    y = cm(x)
    y.sum().backward()
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.brn.running_var, ref.brn.running_var)
    m.eval(), ref.eval()
    torch.testing.assert_close(cm(x), ref(x), rtol=1e-5, atol=1e-5)


def test_export_new_layers():
    torch.manual_seed(0)
    m = _Zoo().eval()
    x = torch.randn(4, 3, 6, 6)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x), rtol=1e-5, atol=1e-5)
    mt = _Zoo().train()
    ept = torch.export.export(mt, (x,))
    ref = _Zoo().train()
    ref.load_state_dict(mt.state_dict())
    torch.testing.assert_close(ept.module()(x), ref(x), rtol=1e-5, atol=1e-5)
