"""Numerical robustness against float64 references computed on the *same* inputs.

* large offsets (1e4, 1e5, 1e6) with std 0.1 in float32: the bar is far above
  what E[x^2] - E[x]^2 (NaN here) or rounding the mean to float32 before
  subtracting (1e-2 .. 0.6 output error; torch's own kernels are in that range)
  give.  An implementation that keeps the centring exact (shifted / compensated
  two-pass, or higher-precision centring) reaches ~1e-6; we require 1e-4.
* constant inputs (variance 0): output == beta, finite gradients;
* |x| ~ 1e30 in float32 (x^2 overflows): finite, correct outputs and gradients;
* a 4e7-element reduction (slow): mean/var/output accurate;
* NaN / Inf propagate to exactly the rows/channels that contain them;
* float16 / bfloat16 inputs accumulate in float32.
"""
from __future__ import annotations

import pytest
import torch

import normlab.functional as NF
from conftest import assert_close, randn

pytestmark = pytest.mark.usefixtures("single_thread", "deterministic_seed")

F32, F64 = torch.float32, torch.float64

# method -> (shape used by most tests, extra)
METHODS = {
    "batch_norm": dict(shape=(256, 4)),
    "batch_norm_3d": dict(shape=(16, 3, 32)),
    "layer_norm": dict(shape=(8, 512), k=1),
    "layer_norm_2dims": dict(shape=(4, 16, 32), k=2),
    "group_norm": dict(shape=(4, 8, 64), groups=2),
    "instance_norm": dict(shape=(4, 3, 256)),
    "rms_norm": dict(shape=(8, 512), k=1),
    "mean_only": dict(shape=(256, 4)),
}
CENTERED = [m for m in METHODS if m != "rms_norm"]
HAS_WEIGHT = {m: m != "mean_only" for m in METHODS}
HAS_BIAS = {m: m != "rms_norm" for m in METHODS}


def param_shape(method, shape):
    cfg = METHODS[method]
    if "k" in cfg:
        return tuple(shape[len(shape) - cfg["k"]:])
    return (shape[1],)


def nl_apply(method, x, w=None, b=None, eps=1e-5):
    """normlab functional form, training-mode statistics."""
    cfg = METHODS[method]
    if method.startswith("batch_norm"):
        return NF.batch_norm(x, None, None, w, b, training=True, eps=eps)
    if method.startswith("layer_norm"):
        return NF.layer_norm(x, tuple(x.shape[x.dim() - cfg["k"]:]), w, b, eps=eps)
    if method == "group_norm":
        return NF.group_norm(x, cfg["groups"], w, b, eps=eps)
    if method == "instance_norm":
        return NF.instance_norm(x, None, None, w, b, use_input_stats=True, eps=eps)
    if method == "rms_norm":
        return NF.rms_norm(x, tuple(x.shape[x.dim() - cfg["k"]:]), w, eps=eps)
    if method == "mean_only":
        return NF.mean_only_batch_norm(x, torch.zeros(x.shape[1], dtype=x.dtype), b, training=True)
    raise ValueError(method)


def _cview(t, nd):
    return t.view((1, -1) + (1,) * (nd - 2))


def ref_apply(method, x, w=None, b=None, eps=1e-5):
    """Independent float64 two-pass reference (differentiable)."""
    cfg = METHODS[method]
    x = x.to(F64)
    w = None if w is None else w.to(F64)
    b = None if b is None else b.to(F64)
    nd = x.dim()

    def norm(t, dims):
        m = t.mean(dims, keepdim=True)
        d = t - m
        v = (d * d).mean(dims, keepdim=True)
        return d / torch.sqrt(v + eps)

    if method.startswith("batch_norm") or method == "instance_norm":
        dims = [d for d in range(nd) if d != 1] if method.startswith("batch_norm") else list(range(2, nd))
        y = norm(x, dims)
        if w is not None:
            y = y * _cview(w, nd)
        if b is not None:
            y = y + _cview(b, nd)
        return y
    if method.startswith("layer_norm"):
        y = norm(x, list(range(nd - cfg["k"], nd)))
        return y * (1 if w is None else w) + (0 if b is None else b)
    if method == "group_norm":
        n, c = x.shape[:2]
        y = norm(x.reshape(n, cfg["groups"], -1), [2]).reshape(x.shape)
        if w is not None:
            y = y * _cview(w, nd)
        if b is not None:
            y = y + _cview(b, nd)
        return y
    if method == "rms_norm":
        dims = list(range(nd - cfg["k"], nd))
        y = x / torch.sqrt((x * x).mean(dims, keepdim=True) + eps)
        return y if w is None else y * w
    if method == "mean_only":
        dims = [d for d in range(nd) if d != 1]
        y = x - x.mean(dims, keepdim=True)
        return y if b is None else y + _cview(b, nd)
    raise ValueError(method)


def make_params(method, shape, dtype, seed=0, spread=0.1):
    ps = param_shape(method, shape)
    w = (1 + spread * randn(ps, seed)).to(dtype).requires_grad_() if HAS_WEIGHT[method] else None
    b = (spread * randn(ps, seed + 1)).to(dtype).requires_grad_() if HAS_BIAS[method] else None
    return w, b


def _to64(t):
    return None if t is None else t.detach().to(F64)


def forward_backward(fn, x, w, b, g):
    """y, dx, dw, db of fn(x, w, b) for a fresh copy of the leaves."""
    x = x.detach().clone().requires_grad_()
    w = None if w is None else w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = fn(x, w, b)
    y.backward(g.to(y.dtype))
    return y.detach(), x.grad, None if w is None else w.grad, None if b is None else b.grad


# ----------------------------------------------------------------------------
# large offsets
# ----------------------------------------------------------------------------
OFFSET_ATOL = 1e-4  # relative to a unit-variance output (x std 0.1 => 1e-5 absolute for mean-only)


@pytest.mark.parametrize("offset", [1e4, 1e5, 1e6], ids=lambda o: f"{o:.0e}")
@pytest.mark.parametrize("method", list(METHODS))
def test_large_offset_small_spread_float32(backend, method, offset):
    shape = METHODS[method]["shape"]
    x = (offset + 0.1 * randn(shape, seed=1)).to(F32)  # float32 inputs ...
    w, b = make_params(method, shape, F32, seed=2)
    g = randn(shape, seed=3)
    y, dx, dw, db = forward_backward(lambda x, w, b: nl_apply(method, x, w, b), x, w, b, g)
    # ... and the float64 reference on exactly those inputs upcast
    yr, dxr, dwr, dbr = forward_backward(lambda x, w, b: ref_apply(method, x, w, b), x.to(F64), _to64(w), _to64(b), g)
    assert y.dtype == F32 and torch.isfinite(y).all()
    out_scale = 0.1 if method == "mean_only" else 1.0
    err = float((y.double() - yr).abs().max())
    assert err <= OFFSET_ATOL * out_scale, f"{method} @ {offset:.0e}: max output error {err:.3e}"
    gerr = float((dx.double() - dxr).abs().max()) / float(dxr.abs().max())
    assert gerr <= OFFSET_ATOL, f"{method} @ {offset:.0e}: input-grad error {gerr:.3e} (relative to max)"
    if dw is not None:
        assert_close(dw, dwr, F32, scale=float(dwr.abs().max()), atol=OFFSET_ATOL, rtol=0, msg="grad weight")
    if db is not None:
        assert_close(db, dbr, F32, msg="grad bias")


@pytest.mark.parametrize("offset", [1e4, 1e5, 1e6], ids=lambda o: f"{o:.0e}")
def test_large_offset_bar_rejects_naive_formulas(offset):
    """Self-check: the bar above is out of reach for E[x^2]-E[x]^2 and for
    float32-rounded mean subtraction, i.e. it really tests the centring."""
    x = (offset + 0.1 * randn((8, 512), seed=1)).to(F32)
    ref = ref_apply("layer_norm", x)
    m = x.mean(-1, keepdim=True)
    naive_var = (x * x).mean(-1, keepdim=True) - m * m
    naive = (x - m) / torch.sqrt(naive_var + 1e-5)
    naive_err = (naive.double() - ref).abs().nan_to_num(float("inf")).max()
    assert naive_err > 100 * OFFSET_ATOL
    two_pass = (x - m) * torch.rsqrt(((x - m) ** 2).mean(-1, keepdim=True) + 1e-5)
    assert (two_pass.double() - ref).abs().max() > 10 * OFFSET_ATOL


# ----------------------------------------------------------------------------
# constant inputs (variance 0)
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("value", [0.0, 3.0, -2.5, 0.1])
@pytest.mark.parametrize("method", list(METHODS))
def test_constant_input(backend, method, value, dtype):
    shape = METHODS[method]["shape"]
    shape = (min(shape[0], 6),) + tuple(shape[1:-1]) + (min(shape[-1], 24),)
    x = torch.full(shape, value, dtype=dtype)
    w, b = make_params(method, shape, dtype, seed=4, spread=0.5)
    g = randn(shape, seed=5)
    y, dx, dw, db = forward_backward(lambda x, w, b: nl_apply(method, x, w, b), x, w, b, g)
    yr, dxr, dwr, dbr = forward_backward(lambda x, w, b: ref_apply(method, x, w, b), x.to(F64), _to64(w), _to64(b), g)
    assert torch.isfinite(y).all(), "constant input gave a non-finite output"
    for name, t in (("input", dx), ("weight", dw), ("bias", db)):
        assert t is None or torch.isfinite(t).all(), f"non-finite grad {name}"
    if method != "rms_norm":
        nd = len(shape)
        beta = b.detach()
        expect = beta.expand(shape) if "k" in METHODS[method] else _cview(beta, nd).expand(shape)
        assert_close(y, expect, dtype, msg="output must equal beta")
    assert_close(y, yr, dtype, msg="output")
    assert_close(dx, dxr, dtype, msg="grad input")
    if dw is not None:
        assert_close(dw, dwr, dtype, msg="grad weight")
    if db is not None:
        assert_close(db, dbr, dtype, msg="grad bias")


# ----------------------------------------------------------------------------
# huge magnitudes: x^2 overflows float32
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_huge_values_float32(backend, method):
    shape = METHODS[method]["shape"]
    shape = (min(shape[0], 8),) + tuple(shape[1:-1]) + (min(shape[-1], 32),)
    x = (1e30 * randn(shape, seed=6)).to(F32)
    assert torch.isinf(x.double().pow(2).float()).any()  # naive squares overflow
    w, b = make_params(method, shape, F32, seed=7)
    g = randn(shape, seed=8)
    y, dx, dw, db = forward_backward(lambda x, w, b: nl_apply(method, x, w, b), x, w, b, g)
    yr, dxr, dwr, dbr = forward_backward(lambda x, w, b: ref_apply(method, x, w, b), x.to(F64), _to64(w), _to64(b), g)
    assert torch.isfinite(y).all(), "non-finite output for |x| ~ 1e30"
    for name, t in (("input", dx), ("weight", dw), ("bias", db)):
        assert t is None or torch.isfinite(t).all(), f"non-finite grad {name} for |x| ~ 1e30"
    assert_close(y, yr, F32, msg="output")
    # input gradients are ~1e-30: judge them relative to their own size
    assert_close(dx, dxr, F32, scale=float(dxr.abs().max()), msg="grad input")
    if dw is not None:
        assert_close(dw, dwr, F32, msg="grad weight")
    if db is not None:
        assert_close(db, dbr, F32, msg="grad bias")


# ----------------------------------------------------------------------------
# a 4e7-element reduction
# ----------------------------------------------------------------------------
BIG = 40_000_000


@pytest.fixture(scope="module")
def big_input():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(BIG, generator=g, dtype=F32)
    x += 10.0  # sequential float32 summation of this would stall far from 4e8
    var, mean = torch.var_mean(x.to(F64), unbiased=False)
    yield x, float(mean), float(var)


def _check_output_chunked(y, x, mean, var, eps, atol):
    y, x = y.reshape(-1), x.reshape(-1)
    rstd = 1.0 / (var + eps) ** 0.5
    worst = 0.0
    for i in range(0, BIG, 5_000_000):
        r = (x[i:i + 5_000_000].to(F64) - mean) * rstd
        worst = max(worst, float((y[i:i + 5_000_000].to(F64) - r).abs().max()))
    assert worst <= atol, f"max output error {worst:.3e}"


@pytest.mark.slow
def test_40M_element_reduction_batch_norm(backend, big_input):
    x, mean, var = big_input
    rm, rv = torch.zeros(1), torch.ones(1)
    with torch.no_grad():
        y = NF.batch_norm(x.view(40, 1, BIG // 40), rm, rv, training=True, momentum=1.0, eps=1e-5)
    assert abs(float(rm) - mean) <= 1e-6 * abs(mean), f"mean {float(rm)!r} vs {mean!r}"
    unbiased = var * BIG / (BIG - 1)
    assert abs(float(rv) - unbiased) <= 1e-5 * unbiased, f"var {float(rv)!r} vs {unbiased!r}"
    _check_output_chunked(y, x, mean, var, 1e-5, 5e-5)


@pytest.mark.slow
def test_40M_element_reduction_layer_norm(backend, big_input):
    x, mean, var = big_input
    with torch.no_grad():
        y = NF.layer_norm(x.view(1, BIG), (BIG,), eps=1e-5)
    _check_output_chunked(y, x, mean, var, 1e-5, 5e-5)


# ----------------------------------------------------------------------------
# NaN / Inf propagation
# ----------------------------------------------------------------------------
NAN_SHAPE = (4, 6, 5)
BAD = (1, 2, 3)
# case -> (callable(x, w, b), param shape, affected region, what an Inf does to the region)
# "nan": NaN over the whole region (centred methods: x - mean with mean = Inf);
# "nonfinite": every element non-finite (mean-only: x - Inf = -Inf);
# "element": only the Inf element is non-finite (RMS: x / Inf = 0; eval mode: elementwise)
_rm = 0.3 * randn((6,), 1).to(F32)
_rv = (0.5 + randn((6,), 2).abs()).to(F32)
NAN_CASES = {
    "batch_norm_train": (lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True), (6,),
                         (slice(None), 2, slice(None)), "nan"),
    "batch_norm_eval": (lambda x, w, b: NF.batch_norm(x, _rm, _rv, w, b, training=False), (6,), BAD, "element"),
    "layer_norm_last": (lambda x, w, b: NF.layer_norm(x, (5,), w, b), (5,), (1, 2, slice(None)), "nan"),
    "layer_norm_2dims": (lambda x, w, b: NF.layer_norm(x, (6, 5), w, b), (6, 5), (1, slice(None), slice(None)),
                         "nan"),
    "group_norm": (lambda x, w, b: NF.group_norm(x, 3, w, b), (6,), (1, slice(2, 4), slice(None)), "nan"),
    "instance_norm": (lambda x, w, b: NF.instance_norm(x, None, None, w, b, use_input_stats=True), (6,),
                      (1, 2, slice(None)), "nan"),
    "rms_norm": (lambda x, w, b: NF.rms_norm(x, (5,), w, eps=1e-5), (5,), (1, 2, slice(None)), "element"),
    "mean_only_train": (lambda x, w, b: NF.mean_only_batch_norm(x, torch.zeros(6), b, training=True), (6,),
                        (slice(None), 2, slice(None)), "nonfinite"),
    "mean_only_eval": (lambda x, w, b: NF.mean_only_batch_norm(x, _rm.clone(), b, training=False), (6,), BAD,
                       "element"),
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nan_inf_propagate(backend, case, bad):
    fn, ps, region, inf_effect = NAN_CASES[case]
    clean = randn(NAN_SHAPE, seed=9).to(F32)
    x = clean.clone()
    x[BAD] = bad
    x.requires_grad_()
    w = (1 + 0.3 * randn(ps, 1)).to(F32).requires_grad_()
    b = (0.3 * randn(ps, 2)).to(F32).requires_grad_()
    y = fn(x, w, b)
    affected = torch.zeros(NAN_SHAPE, dtype=torch.bool)
    affected[region] = True
    # the bad element itself never comes out finite
    assert not torch.isfinite(y[BAD]), f"{case}: {bad} input produced finite output {y[BAD]}"
    if bad != bad:  # NaN: the whole set of elements sharing the statistics is NaN
        assert torch.isnan(y[affected]).all(), f"{case}: NaN did not propagate to its whole group"
    elif inf_effect == "nan":
        assert torch.isnan(y[affected]).all(), f"{case}: Inf did not give NaN over its whole group"
    elif inf_effect == "nonfinite":
        assert not torch.isfinite(y[affected]).any(), f"{case}: Inf did not propagate to its whole group"
    # everything else is finite and unaffected
    ref = fn(clean.clone(), w.detach(), b.detach())
    assert torch.isfinite(y[~affected]).all(), f"{case}: non-finite output outside the affected group"
    assert_close(y[~affected], ref[~affected], F32, msg=f"{case}: unaffected outputs changed")
    # backward does not crash; input gradients outside the group stay finite
    y.backward(randn(NAN_SHAPE, seed=10).to(F32))
    assert torch.isfinite(x.grad[~affected]).all(), f"{case}: non-finite input grad outside the affected group"


# ----------------------------------------------------------------------------
# 16-bit inputs accumulate in float32
# ----------------------------------------------------------------------------
HALF_SHAPES = {
    "batch_norm": (4096, 3),
    "batch_norm_3d": (8, 3, 512),
    "layer_norm": (4, 8192),
    "layer_norm_2dims": (2, 64, 128),
    "group_norm": (2, 4, 4096),
    "instance_norm": (2, 3, 4096),
    "rms_norm": (4, 8192),
    "mean_only": (4096, 3),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", list(HALF_SHAPES))
def test_half_precision_accumulates_in_float32(backend, method, dtype):
    shape = HALF_SHAPES[method]
    x = (3.0 + randn(shape, seed=11)).to(dtype)  # offset: sums in 16 bits are far off
    g = randn(shape, seed=12).to(dtype)
    y, dx, _, _ = forward_backward(lambda x, w, b: nl_apply(method, x, eps=1e-5), x, None, None, g)
    yr, dxr, _, _ = forward_backward(lambda x, w, b: ref_apply(method, x, eps=1e-5), x.to(F64), None, None,
                                     g.to(F64))
    assert y.dtype == dtype and dx.dtype == dtype
    # a result computed in float32 and rounded once: within TOL[dtype]
    assert_close(y, yr, dtype, msg="output")
    assert_close(dx, dxr, dtype, msg="grad input")

