"""Hypothesis property tests over shapes, axes, scales and offsets (float64).

* normalized output has mean 0 and variance var/(var+eps) (-> 1) over the reduced axes;
* GroupNorm(G=1) == LayerNorm over (C, *spatial); GroupNorm(G=C) == InstanceNorm;
* every op matches an independent float64 numpy reference on random shapes;
* invariances: LN to per-sample shift/scale, RMS to per-sample scale,
  IN to per-(sample, channel) shift/scale, GN to per-(sample, group) shift/scale,
  BN to per-channel shift/scale, mean-only BN to per-channel shift.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import normlab.functional as NF
from conftest import BACKENDS, backend_ctx

pytestmark = pytest.mark.usefixtures("single_thread", "deterministic_seed")

D = torch.float64
# NORMLAB_PROP_EXAMPLES raises the example count for a soak run; the suite default stays modest.
PROP = settings(max_examples=int(os.environ.get("NORMLAB_PROP_EXAMPLES", "25")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture], print_blob=True)

METHODS = ["batch", "layer", "instance", "group", "rms", "mean_only"]


# ----------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------
@st.composite
def nchw(draw, min_spatial=0, max_spatial=3):
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 6))
    k = draw(st.integers(min_spatial, max_spatial))
    spatial = tuple(draw(st.integers(1, 5)) for _ in range(k))
    return (n, c) + spatial


@st.composite
def problem(draw, method):
    """(method, shape, extra, data) for a non-degenerate normalization problem."""
    if method == "instance":
        shape = draw(nchw(min_spatial=1))
    else:
        shape = draw(nchw())
    extra = {}
    if method == "group":
        c = shape[1]
        divisors = [g for g in range(1, c + 1) if c % g == 0]
        extra["groups"] = draw(st.sampled_from(divisors))
    if method in ("layer", "rms"):
        extra["k"] = draw(st.integers(1, len(shape)))  # normalize over the last k dims
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.05, 50.0))
    offset = draw(st.floats(-100.0, 100.0))
    g = np.random.default_rng(seed)
    x = offset + scale * g.standard_normal(shape)
    # reduced extent must hold >= 2 elements for a non-trivial variance
    dims = reduce_dims(method, len(shape), extra)
    size = int(np.prod([shape[d] for d in dims])) * (shape[1] // extra["groups"] if method == "group" else 1)
    if method != "mean_only":
        assume(size >= 2)
    return shape, extra, x, g


def reduce_dims(method, nd, extra):
    if method in ("batch", "mean_only"):
        return tuple(d for d in range(nd) if d != 1)
    if method in ("layer", "rms"):
        return tuple(range(nd - extra["k"], nd))
    if method == "instance":
        return tuple(range(2, nd))
    if method == "group":
        return tuple(range(2, nd))  # plus the channels of the group, handled by reshaping
    raise ValueError(method)


# ----------------------------------------------------------------------------
# numpy float64 references
# ----------------------------------------------------------------------------
def np_norm(x, axes, eps, center=True, scale=True):
    mu = x.mean(axis=axes, keepdims=True) if center else 0.0
    d = x - mu
    if not scale:
        return d
    var = (d * d).mean(axis=axes, keepdims=True)
    return d / np.sqrt(var + eps)


def np_reference(method, x, extra, w, b, eps):
    nd = x.ndim
    cview = (1, -1) + (1,) * (nd - 2)
    if method == "batch":
        y = np_norm(x, tuple(d for d in range(nd) if d != 1), eps)
        return y * w.reshape(cview) + b.reshape(cview)
    if method == "mean_only":
        y = np_norm(x, tuple(d for d in range(nd) if d != 1), eps, scale=False)
        return y + b.reshape(cview)
    if method == "instance":
        y = np_norm(x, tuple(range(2, nd)), eps)
        return y * w.reshape(cview) + b.reshape(cview)
    if method == "group":
        n, c = x.shape[:2]
        G = extra["groups"]
        xg = x.reshape(n, G, -1)
        y = np_norm(xg, (2,), eps).reshape(x.shape)
        return y * w.reshape(cview) + b.reshape(cview)
    if method == "layer":
        axes = tuple(range(nd - extra["k"], nd))
        return np_norm(x, axes, eps) * w + b
    if method == "rms":
        axes = tuple(range(nd - extra["k"], nd))
        ms = (x * x).mean(axis=axes, keepdims=True)
        return x / np.sqrt(ms + eps) * w
    raise ValueError(method)


def param_shapes(method, shape, extra):
    if method in ("layer", "rms"):
        return shape[len(shape) - extra["k"]:]
    return (shape[1],)


def run(method, x, extra, w=None, b=None, eps=1e-5):
    """normlab functional form of ``method`` (training-mode statistics)."""
    xt = torch.as_tensor(x, dtype=D)
    wt = None if w is None else torch.as_tensor(w, dtype=D)
    bt = None if b is None else torch.as_tensor(b, dtype=D)
    if method == "batch":
        return NF.batch_norm(xt, None, None, wt, bt, training=True, eps=eps)
    if method == "mean_only":
        rm = torch.zeros(xt.shape[1], dtype=D)
        return NF.mean_only_batch_norm(xt, rm, bt, training=True)
    if method == "instance":
        return NF.instance_norm(xt, None, None, wt, bt, use_input_stats=True, eps=eps)
    if method == "group":
        return NF.group_norm(xt, extra["groups"], wt, bt, eps=eps)
    if method == "layer":
        return NF.layer_norm(xt, tuple(xt.shape[xt.dim() - extra["k"]:]), wt, bt, eps=eps)
    if method == "rms":
        return NF.rms_norm(xt, tuple(xt.shape[xt.dim() - extra["k"]:]), wt, eps=eps)
    raise ValueError(method)


def group_view(method, a, extra):
    """(outer, reduced) 2-D view: one row per set of statistics."""
    nd = a.ndim
    if method in ("batch", "mean_only"):
        return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)
    if method == "instance":
        return a.reshape(a.shape[0] * a.shape[1], -1)
    if method == "group":
        return a.reshape(a.shape[0] * extra["groups"], -1)
    if method in ("layer", "rms"):
        k = extra["k"]
        return a.reshape(int(np.prod(a.shape[: nd - k], dtype=np.int64)), -1)
    raise ValueError(method)


# ----------------------------------------------------------------------------
# properties
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("method", ["batch", "layer", "instance", "group", "rms"])
@PROP
@given(data=st.data(), eps=st.sampled_from([1e-8, 1e-5, 1e-3]))
def test_normalized_moments(backend_name, method, data, eps):
    shape, extra, x, _ = data.draw(problem(method))
    with backend_ctx(backend_name):
        y = run(method, x, extra, eps=eps).numpy()
    xr, yr = group_view(method, x, extra), group_view(method, y, extra)
    if method == "rms":
        ms = (xr * xr).mean(1)
        np.testing.assert_allclose((yr * yr).mean(1), ms / (ms + eps), rtol=1e-9, atol=1e-12)
        return
    var = xr.var(1)
    np.testing.assert_allclose(yr.mean(1), 0.0, atol=1e-9)
    np.testing.assert_allclose(yr.var(1), var / (var + eps), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend_name", BACKENDS)
@PROP
@given(data=st.data())
def test_mean_only_moments(backend_name, data):
    shape, extra, x, g = data.draw(problem("mean_only"))
    b = g.standard_normal(shape[1])
    with backend_ctx(backend_name):
        y = run("mean_only", x, extra, b=b).numpy()
    yr, xr = group_view("mean_only", y, extra), group_view("mean_only", x, extra)
    np.testing.assert_allclose(yr.mean(1), b, atol=1e-9 * (1 + np.abs(x).max()))
    # output - input is constant per channel
    d = yr - xr
    np.testing.assert_allclose(d, np.broadcast_to(d[:, :1], d.shape), atol=1e-9 * (1 + np.abs(x).max()))


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@PROP
@given(data=st.data(), affine=st.booleans(), eps=st.sampled_from([1e-5, 1e-2, 0.7]))
def test_matches_numpy_float64_reference(backend_name, method, data, affine, eps):
    shape, extra, x, g = data.draw(problem(method))
    ps = param_shapes(method, shape, extra)
    w = 1 + 0.5 * g.standard_normal(ps) if affine else np.ones(ps)
    b = g.standard_normal(ps) if affine else np.zeros(ps)
    with backend_ctx(backend_name):
        if affine:
            y = run(method, x, extra, w, None if method == "rms" else b, eps=eps)
        else:
            y = run(method, x, extra, eps=eps)
    ref = np_reference(method, x, extra, w, b, eps)
    scale = 1 + np.abs(ref).max()
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-9, atol=1e-9 * scale)
    assert y.dtype == D and tuple(y.shape) == shape


@pytest.mark.parametrize("backend_name", BACKENDS)
@PROP
@given(shape=nchw(), seed=st.integers(0, 2**31 - 1), affine=st.booleans())
def test_group_norm_one_group_is_layer_norm(backend_name, shape, seed, affine):
    g = np.random.default_rng(seed)
    x = torch.as_tensor(g.standard_normal(shape) * 3 + 1)
    c = shape[1]
    w = torch.as_tensor(1 + 0.5 * g.standard_normal(c)) if affine else None
    b = torch.as_tensor(g.standard_normal(c)) if affine else None
    rest = shape[1:]
    with backend_ctx(backend_name):
        y_gn = NF.group_norm(x, 1, w, b, eps=1e-5)
        if affine:  # per-channel gamma/beta broadcast over the (C, *spatial) normalized shape
            view = (c,) + (1,) * (len(shape) - 2)
            wl = w.view(view).expand(rest).contiguous()
            bl = b.view(view).expand(rest).contiguous()
        else:
            wl = bl = None
        y_ln = NF.layer_norm(x, rest, wl, bl, eps=1e-5)
    torch.testing.assert_close(y_gn, y_ln, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend_name", BACKENDS)
@PROP
@given(shape=nchw(min_spatial=1), seed=st.integers(0, 2**31 - 1), affine=st.booleans())
def test_group_norm_c_groups_is_instance_norm(backend_name, shape, seed, affine):
    assume(int(np.prod(shape[2:])) >= 2)  # instance norm rejects 1 spatial value in training (as torch)
    g = np.random.default_rng(seed)
    x = torch.as_tensor(g.standard_normal(shape) * 2 - 3)
    c = shape[1]
    w = torch.as_tensor(1 + 0.5 * g.standard_normal(c)) if affine else None
    b = torch.as_tensor(g.standard_normal(c)) if affine else None
    with backend_ctx(backend_name):
        y_gn = NF.group_norm(x, c, w, b, eps=1e-5)
        y_in = NF.instance_norm(x, None, None, w, b, use_input_stats=True, eps=1e-5)
    torch.testing.assert_close(y_gn, y_in, rtol=1e-10, atol=1e-10)


def _stat_groups_shape(method, shape, extra):
    """Shape of a per-statistics-group factor broadcastable against the input."""
    nd = len(shape)
    if method in ("batch", "mean_only"):
        return (1, shape[1]) + (1,) * (nd - 2)
    if method == "instance":
        return shape[:2] + (1,) * (nd - 2)
    if method in ("layer", "rms"):
        return shape[: nd - extra["k"]] + (1,) * extra["k"]
    raise ValueError(method)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@PROP
@given(data=st.data())
def test_invariance_to_shift_and_scale_per_statistics_group(backend_name, method, data):
    """y(a*x + c) == sign(a) * y(x) for a, c constant over each set of reduced elements
    (scale only for RMS, shift only for mean-only BN)."""
    shape, extra, x, g = data.draw(problem(method))
    if method == "group":
        n, c, G = shape[0], shape[1], extra["groups"]
        gs = (n, G, 1)
        a = g.uniform(0.2, 5.0, gs) * g.choice([-1.0, 1.0], gs)
        sh = g.uniform(-50, 50, gs)
        x2 = (x.reshape(n, G, -1) * a + sh).reshape(shape)
        sign = np.repeat(np.sign(a).reshape(n, G), c // G, axis=1).reshape((n, c) + (1,) * (len(shape) - 2))
    else:
        gs = _stat_groups_shape(method, shape, extra)
        a = g.uniform(0.2, 5.0, gs) * g.choice([-1.0, 1.0], gs)
        sh = g.uniform(-50, 50, gs)
        if method == "rms":
            sh = 0.0
        if method == "mean_only":
            a = np.ones(gs)
        x2 = a * x + sh
        sign = np.sign(a)
    # eps must be negligible against every group's variance (before and after the
    # transformation) for the invariance to be exact up to rounding
    eps = 1e-30
    xr = group_view(method, x, extra)
    spread = (xr * xr).mean(1) if method == "rms" else xr.var(1)
    assume(method == "mean_only" or spread.min() > 1e-12)
    with backend_ctx(backend_name):
        y1 = run(method, x, extra, eps=eps).numpy()
        y2 = run(method, x2, extra, eps=eps).numpy()
    tol = 1e-7 if method != "mean_only" else 1e-9 * (1 + np.abs(x2).max())
    np.testing.assert_allclose(y2, sign * y1, atol=tol, rtol=1e-7)


@pytest.mark.parametrize("backend_name", BACKENDS)
@PROP
@given(shape=nchw(), seed=st.integers(0, 2**31 - 1))
def test_layer_norm_is_batch_norm_of_the_transpose(backend_name, shape, seed):
    """LN over the last dim of (R, F) equals training BN of the (F, R) transpose, transposed."""
    g = np.random.default_rng(seed)
    r = int(np.prod(shape[:-1]))
    f = max(shape[-1], 2)
    x = torch.as_tensor(g.standard_normal((r, f)) * 2 + 5)
    with backend_ctx(backend_name):
        y_ln = NF.layer_norm(x, (x.shape[-1],), eps=1e-5)
        y_bn = NF.batch_norm(x.t(), None, None, training=True, eps=1e-5).t()
    torch.testing.assert_close(y_ln, y_bn, rtol=1e-10, atol=1e-10)
