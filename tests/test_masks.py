"""Masked statistics (issue 10): ``mask=`` on BN, LN, RMS, GN, IN, LayerNorm2d.

Semantics under test (docstrings of normlab.functional and normlab.core.masked): statistics are
count-weighted over the valid (True) positions, the output at masked positions is zero, a set
with no valid position outputs zeros, BN's running_var takes the unbiased count n − 1.

The references are written here in float64 (loops over the valid values of each statistic, or
torch's own layers applied to the valid subset), never through normlab.
"""

import math

import pytest
import torch
from torch import nn

import normlab
import normlab.functional as F
from normlab.core import masked as core_masked

D = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


def _x(*shape, seed=0, dtype=D, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=D) * scale + offset).to(dtype)


def _rand_mask(*shape, seed=0, p=0.6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) < p


def _len_mask(lengths, length):
    """(N, L) boolean: True for the first lengths[i] steps of sample i."""
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


def _garbage_like(x, mask, seed=7, nonfinite=False):
    """x with every masked position replaced by huge random values (optionally also Inf/NaN)."""
    g = torch.Generator().manual_seed(seed)
    junk = (torch.randn(x.shape, generator=g, dtype=D) * 1e30).to(x.dtype)
    if nonfinite:
        flat = junk.view(-1)
        flat[0::3] = float("inf")
        flat[1::3] = float("nan")
    return torch.where(mask.expand(x.shape), x.detach(), junk)


# ------------------------------------------------------------------ float64 references (no normlab)


def _ref_rows(rows, mrows, eps, rms=False):
    """Normalize each row of ``rows`` (float64, (S, K)) over its valid entries ``mrows``; zero elsewhere.

    Returns (xhat (S, K), mean (S,), biased var (S,), n (S,))."""
    out = torch.zeros_like(rows, dtype=D)
    S = rows.shape[0]
    mean, var, n = torch.zeros(S, dtype=D), torch.zeros(S, dtype=D), torch.zeros(S, dtype=D)
    for s in range(S):
        v = rows[s][mrows[s]].to(D)
        n[s] = v.numel()
        if v.numel() == 0:
            continue
        if rms:
            ms = (v * v).mean()
            out[s, mrows[s]] = v / torch.sqrt(ms + eps)
            var[s] = ms
        else:
            mu = v.mean()
            s2 = ((v - mu) ** 2).mean()
            out[s, mrows[s]] = (v - mu) / torch.sqrt(s2 + eps)
            mean[s], var[s] = mu, s2
    return out, mean, var, n


def _ref(kind, x, mask, weight=None, bias=None, eps=1e-5, groups=None):
    """Float64 reference of the masked op ``kind`` on (x, mask): (y, mean, var, n) per statistic."""
    x = x.detach().to(D)
    m = mask.expand(x.shape)
    if kind in ("ln", "rms"):
        k = weight.dim() if weight is not None else 1
        rows, mrows = x.reshape(-1, math.prod(x.shape[x.dim() - k:])), m.reshape(-1, math.prod(x.shape[x.dim() - k:]))
        xh, mean, var, n = _ref_rows(rows, mrows, eps, rms=kind == "rms")
        y = xh.reshape(x.shape)
        aff_w, aff_b = weight, bias
        view = None
    elif kind == "ln2d":
        xt, mt = x.movedim(1, -1), m.movedim(1, -1)
        c = x.shape[1]
        xh, mean, var, n = _ref_rows(xt.reshape(-1, c), mt.reshape(-1, c), eps)
        y = xh.reshape(xt.shape).movedim(-1, 1)
        view = (1, -1) + (1,) * (x.dim() - 2)
    elif kind == "bn":
        c = x.shape[1]
        xt, mt = x.transpose(0, 1).reshape(c, -1), m.transpose(0, 1).reshape(c, -1)
        xh, mean, var, n = _ref_rows(xt, mt, eps)
        shape_t = (c, x.shape[0]) + tuple(x.shape[2:])
        y = xh.reshape(shape_t).transpose(0, 1)
        view = (1, -1) + (1,) * (x.dim() - 2)
    elif kind in ("gn", "in"):
        nb, c = x.shape[0], x.shape[1]
        g = c if kind == "in" else groups
        xh, mean, var, n = _ref_rows(x.reshape(nb * g, -1), m.reshape(nb * g, -1), eps)
        y = xh.reshape(x.shape)
        mean, var, n = mean.view(nb, g), var.view(nb, g), n.view(nb, g)
        view = (1, -1) + (1,) * (x.dim() - 2)
    else:  # pragma: no cover
        raise ValueError(kind)
    if kind not in ("ln", "rms"):
        aff_w = None if weight is None else weight.view(view)
        aff_b = None if bias is None else bias.view(view)
    if aff_w is not None:
        y = y * aff_w.detach().to(D)
    if aff_b is not None:
        y = y + aff_b.detach().to(D)
    return torch.where(m, y, 0.0), mean, var, n


# ------------------------------------------------------------------ the ops under test, uniformly

# name -> (kind, input shape, mask shape, params shape, call(x, mask, w, b))
OPS = {
    "batch_norm": ("bn", (4, 3, 6), (4, 1, 6), (3,),
                   lambda x, m, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5, mask=m)),
    "batch_norm_2d": ("bn", (3, 2, 4, 5), (3, 2, 4, 5), (2,),
                      lambda x, m, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5, mask=m)),
    "layer_norm": ("ln", (3, 4, 7), (3, 4, 7), (7,),
                   lambda x, m, w, b: F.layer_norm(x, (7,), w, b, 1e-5, mask=m)),
    "layer_norm_rows": ("ln", (3, 5, 6), (3, 5, 1), (6,),
                        lambda x, m, w, b: F.layer_norm(x, (6,), w, b, 1e-5, mask=m)),
    "rms_norm": ("rms", (3, 4, 7), (3, 4, 7), (7,),
                 lambda x, m, w, b: F.rms_norm(x, (7,), w, 1e-5, mask=m)),
    "group_norm": ("gn", (3, 4, 5, 3), (3, 1, 5, 3), (4,),
                   lambda x, m, w, b: F.group_norm(x, 2, w, b, 1e-5, mask=m)),
    "group_norm_full": ("gn", (2, 6, 7), (2, 6, 7), (6,),
                        lambda x, m, w, b: F.group_norm(x, 3, w, b, 1e-5, mask=m)),
    "instance_norm": ("in", (3, 2, 8), (3, 1, 8), (2,),
                      lambda x, m, w, b: F.instance_norm(x, None, None, w, b, True, 0.1, 1e-5, mask=m)),
    "layer_norm_2d": ("ln2d", (2, 5, 3, 4), (2, 5, 3, 4), (5,),
                      lambda x, m, w, b: F.layer_norm_2d(x, w, b, 1e-5, mask=m)),
}
GROUPS = {"group_norm": 2, "group_norm_full": 3}


def _case(name, seed=0, dtype=D):
    kind, xs, ms, ps, call = OPS[name]
    x = _x(*xs, seed=seed, dtype=dtype)
    mask = _rand_mask(*ms, seed=seed + 1)
    w = (1.0 + 0.5 * _x(*ps, seed=seed + 2)).to(dtype)
    b = None if kind == "rms" else _x(*ps, seed=seed + 3).to(dtype)
    return kind, x, mask, w, b, call


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", [D, torch.float32], ids=["f64", "f32"])
def test_random_mask_matches_float64_reference(name, dtype):
    kind, x, mask, w, b, call = _case(name, dtype=dtype)
    y = call(x, mask, w, b)
    yr, *_ = _ref(kind, x, mask, w, b, groups=GROUPS.get(name))
    assert y.dtype == dtype and y.shape == x.shape
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == D else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.to(D), yr, **tol)
    assert torch.all(y[~mask.expand(x.shape)] == 0)


# ------------------------------------------------------------------ equal to the op on the valid subset


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("dtype", [D, torch.float32], ids=["f64", "f32"])
def test_batchnorm_padded_sequences_equal_bn_of_concatenated_valid_steps(momentum, dtype):
    """(N, C, L) with per-sample lengths: y and the running stats equal BN over the valid steps."""
    torch.manual_seed(0)
    n, c, length = 4, 3, 9
    bn = normlab.BatchNorm1d(c, momentum=momentum, dtype=dtype)
    ref = nn.BatchNorm1d(c, momentum=momentum, dtype=D)  # torch's own, on the concatenation
    with torch.no_grad():
        for p in (bn.weight, bn.bias):
            p.copy_(torch.randn(c, dtype=dtype))
        ref.weight.copy_(bn.weight.to(D))
        ref.bias.copy_(bn.bias.to(D))
    for step, lengths in enumerate(([9, 4, 6, 2], [3, 9, 1, 5], [7, 7, 8, 2])):
        x = _x(n, c, length, seed=step, dtype=dtype, scale=2.0, offset=0.5)
        mask = _len_mask(lengths, length)[:, None, :]
        y = bn(_garbage_like(x, mask), mask)
        cat = torch.cat([x[i, :, :lengths[i]] for i in range(n)], dim=1).T.to(D)  # (Σ len, C)
        yr = ref(cat)
        yv = torch.cat([y[i, :, :lengths[i]] for i in range(n)], dim=1).T
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == D else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(yv.to(D), yr.detach(), **tol)
        assert torch.all(y[~mask.expand_as(y)] == 0)
        torch.testing.assert_close(bn.running_mean.to(D), ref.running_mean, **tol)
        torch.testing.assert_close(bn.running_var.to(D), ref.running_var, **tol)
    assert int(bn.num_batches_tracked) == 3
    # eval: the running statistics, masked positions zeroed
    bn.eval(), ref.eval()
    x = _x(n, c, length, seed=11, dtype=dtype)
    mask = _len_mask([2, 9, 5, 1], length)[:, None, :]
    y = bn(_garbage_like(x, mask), mask)
    ye = ref(x.to(D).transpose(1, 2).reshape(-1, c)).reshape(n, length, c).transpose(1, 2)
    torch.testing.assert_close(y.to(D), torch.where(mask, ye, 0.0).detach(), rtol=1e-5, atol=1e-5)


def test_batchnorm2d_padded_images_equal_bn_of_valid_pixels():
    n, c, h, w = 3, 2, 5, 6
    crops = [(5, 6), (2, 3), (4, 1)]
    x = _x(n, c, h, w, seed=3, scale=3.0, offset=-1.0)
    mask = torch.zeros(n, 1, h, w, dtype=torch.bool)
    for i, (hh, ww) in enumerate(crops):
        mask[i, :, :hh, :ww] = True
    bn = normlab.BatchNorm2d(c, dtype=D)
    ref = nn.BatchNorm1d(c, dtype=D)
    y = bn(x, mask)
    pix = torch.cat([x[i, :, :hh, :ww].reshape(c, -1) for i, (hh, ww) in enumerate(crops)], 1).T
    yr = ref(pix)
    yv = torch.cat([y[i, :, :hh, :ww].reshape(c, -1) for i, (hh, ww) in enumerate(crops)], 1).T
    torch.testing.assert_close(yv, yr.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_layer_and_rms_norm_padded_tokens_and_features(rms):
    b, t, d = 3, 6, 8
    x = _x(b, t, d, seed=4, scale=2.0, offset=1.0)
    w = 1.0 + 0.3 * _x(d, seed=5)
    bias = _x(d, seed=6)
    layer = normlab.RMSNorm(d, eps=1e-5, dtype=D) if rms else normlab.LayerNorm(d, dtype=D)
    torch_layer = nn.RMSNorm(d, eps=1e-5, dtype=D) if rms else nn.LayerNorm(d, dtype=D)
    with torch.no_grad():
        layer.weight.copy_(w), torch_layer.weight.copy_(w)
        if not rms:
            layer.bias.copy_(bias), torch_layer.bias.copy_(bias)
    # padded tokens: (B, T, 1) mask; valid rows are torch's LN/RMS of the row, padded rows are zero
    tok = _len_mask([6, 2, 4], t)[:, :, None]
    y = layer(_garbage_like(x, tok), tok)
    yr = torch_layer(x)
    torch.testing.assert_close(y[tok.expand_as(y)], yr[tok.expand_as(yr)].detach(), rtol=1e-12, atol=1e-12)
    assert torch.all(y[~tok.expand_as(y)] == 0)
    # padded features: row r normalized over its first len_r features, with γ[:len], β[:len]
    rows = x.reshape(-1, d)
    lens = [(3 * r) % d + 1 for r in range(rows.shape[0])]
    feat = _len_mask(lens, d)
    y = layer(_garbage_like(rows, feat), feat)
    for r, k in enumerate(lens):
        v = rows[r, :k]
        if rms:
            expect = v / torch.sqrt((v * v).mean() + 1e-5) * w[:k]
        else:
            expect = (v - v.mean()) / torch.sqrt(v.var(correction=0) + 1e-5) * w[:k] + bias[:k]
        torch.testing.assert_close(y[r, :k], expect, rtol=1e-12, atol=1e-12)
        assert torch.all(y[r, k:] == 0)


def test_group_norm_padded_spatial_equals_group_norm_of_the_crop():
    n, c, h, w, g = 3, 6, 5, 7, 3
    crops = [(5, 7), (3, 2), (1, 4)]
    x = _x(n, c, h, w, seed=8, scale=2.0, offset=3.0)
    mask = torch.zeros(n, 1, h, w, dtype=torch.bool)
    for i, (hh, ww) in enumerate(crops):
        mask[i, :, :hh, :ww] = True
    gn = normlab.GroupNorm(g, c, dtype=D)
    tgn = nn.GroupNorm(g, c, dtype=D)
    with torch.no_grad():
        gn.weight.copy_(1 + _x(c, seed=9)), gn.bias.copy_(_x(c, seed=10))
        tgn.load_state_dict(gn.state_dict())
    y = gn(_garbage_like(x, mask), mask)
    for i, (hh, ww) in enumerate(crops):
        torch.testing.assert_close(y[i:i + 1, :, :hh, :ww], tgn(x[i:i + 1, :, :hh, :ww]).detach(),
                                   rtol=1e-12, atol=1e-12)
    assert torch.all(y[~mask.expand_as(y)] == 0)


@pytest.mark.parametrize("dtype", [D, torch.float32], ids=["f64", "f32"])
def test_instance_norm_padded_sequences_and_running_stats(dtype):
    n, c, length = 4, 3, 10
    lengths = [10, 3, 6, 2]
    x = _x(n, c, length, seed=12, dtype=dtype, scale=2.0, offset=-2.0)
    mask = _len_mask(lengths, length)[:, None, :]
    inn = normlab.InstanceNorm1d(c, affine=True, track_running_stats=True, dtype=dtype)
    with torch.no_grad():
        inn.weight.copy_(1 + _x(c, seed=13).to(dtype)), inn.bias.copy_(_x(c, seed=14).to(dtype))
    y = inn(_garbage_like(x, mask), mask)
    tin = nn.InstanceNorm1d(c, affine=True, dtype=D)
    with torch.no_grad():
        tin.weight.copy_(inn.weight.to(D)), tin.bias.copy_(inn.bias.to(D))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == D else dict(rtol=1e-5, atol=1e-5)
    for i, k in enumerate(lengths):
        torch.testing.assert_close(y[i:i + 1, :, :k].to(D), tin(x[i:i + 1, :, :k].to(D)).detach(), **tol)
        assert torch.all(y[i, :, k:] == 0)
    # running stats: the batch average of each instance's mean and unbiased variance, momentum 0.1
    means = torch.stack([x[i, :, :k].to(D).mean(1) for i, k in enumerate(lengths)])
    uvars = torch.stack([x[i, :, :k].to(D).var(1, correction=1) for i, k in enumerate(lengths)])
    torch.testing.assert_close(inn.running_mean.to(D), 0.1 * means.mean(0), **tol)
    torch.testing.assert_close(inn.running_var.to(D), 0.9 + 0.1 * uvars.mean(0), **tol)
    # eval with running statistics: masked positions zeroed
    inn.eval()
    ye = inn(x, mask)
    rm, rv = inn.running_mean.to(D).view(1, -1, 1), inn.running_var.to(D).view(1, -1, 1)
    expect = (x.to(D) - rm) / torch.sqrt(rv + 1e-5) * inn.weight.to(D).view(1, -1, 1) + inn.bias.to(D).view(1, -1, 1)
    torch.testing.assert_close(ye.to(D), torch.where(mask, expect, 0.0).detach(), rtol=1e-5, atol=1e-5)


def test_instance_norm_unbatched_input_with_mask():
    c, h, w = 3, 4, 5
    x = _x(c, h, w, seed=15)
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    mask[:, :2, :3] = True
    y = normlab.InstanceNorm2d(c)(x, mask)
    assert y.shape == x.shape
    torch.testing.assert_close(y[:, :2, :3], nn.InstanceNorm2d(c)(x[:, :2, :3]), rtol=1e-12, atol=1e-12)
    assert torch.all(y[:, 2:] == 0) and torch.all(y[:, :, 3:] == 0)


def test_layer_norm_2d_padded_positions_and_channels():
    x = _x(2, 4, 3, 5, seed=16, scale=2.0)
    pos = _rand_mask(2, 1, 3, 5, seed=17)
    ln = normlab.LayerNorm2d(4, dtype=D)
    y = ln(_garbage_like(x, pos), pos)
    full = ln(x)  # whole positions masked: the valid ones keep the unmasked result
    torch.testing.assert_close(y, torch.where(pos, full, 0.0), rtol=1e-12, atol=1e-12)
    chans = torch.tensor([True, False, True, True]).view(1, 4, 1, 1)
    y = ln(x, chans)
    sub = x[:, [0, 2, 3]]
    expect = (sub - sub.mean(1, keepdim=True)) / torch.sqrt(sub.var(1, correction=0, keepdim=True) + 1e-6)
    torch.testing.assert_close(y[:, [0, 2, 3]], expect, rtol=1e-12, atol=1e-12)
    assert torch.all(y[:, 1] == 0)


# ------------------------------------------------------------------ padding cannot change anything


def _layers():
    """(layer factory, input shape, mask shape) for every masked layer, in training mode."""
    return {
        "BatchNorm1d": (lambda: normlab.BatchNorm1d(3), (4, 3, 7), (4, 1, 7)),
        "BatchNorm2d": (lambda: normlab.BatchNorm2d(3), (2, 3, 4, 4), (2, 1, 4, 4)),
        "BatchNorm3d": (lambda: normlab.BatchNorm3d(2), (2, 2, 3, 3, 2), (2, 2, 3, 3, 2)),
        "LayerNorm": (lambda: normlab.LayerNorm(6), (3, 5, 6), (3, 5, 6)),
        "RMSNorm": (lambda: normlab.RMSNorm(6), (3, 5, 6), (3, 5, 1)),
        "GroupNorm": (lambda: normlab.GroupNorm(2, 4), (2, 4, 5, 3), (2, 1, 5, 3)),
        "InstanceNorm1d": (lambda: normlab.InstanceNorm1d(3, affine=True, track_running_stats=True),
                           (3, 3, 8), (3, 1, 8)),
        "InstanceNorm2d": (lambda: normlab.InstanceNorm2d(3, affine=True), (2, 3, 4, 5), (2, 1, 4, 5)),
        "InstanceNorm3d": (lambda: normlab.InstanceNorm3d(2, affine=True), (2, 2, 3, 3, 3), (2, 2, 3, 3, 3)),
        "LayerNorm2d": (lambda: normlab.LayerNorm2d(4), (2, 4, 3, 3), (2, 4, 3, 3)),
    }


def _run(layer, x, mask, dy):
    x = x.detach().requires_grad_()
    y = layer(x, mask)
    y.backward(dy)
    grads = [p.grad.clone() for p in layer.parameters()]
    for p in layer.parameters():
        p.grad = None
    return y.detach(), x.grad, grads, [b.clone() for b in layer.buffers()]


@pytest.mark.parametrize("nonfinite", [False, True], ids=["huge", "inf-nan"])
@pytest.mark.parametrize("name", list(_layers()))
def test_padding_values_cannot_change_any_output(name, nonfinite):
    make, xs, ms = _layers()[name]
    x = _x(*xs, seed=20, dtype=torch.float32)
    mask = _rand_mask(*ms, seed=21)
    dy = _x(*xs, seed=22, dtype=torch.float32)
    torch.manual_seed(0)
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        b.load_state_dict(a.state_dict())
    ya, gxa, gpa, bufa = _run(a, x, mask, dy)
    yb, gxb, gpb, bufb = _run(b, _garbage_like(x, mask, nonfinite=nonfinite), mask, dy)
    valid = mask.expand(x.shape)
    assert torch.equal(ya, yb)
    assert torch.isfinite(yb).all()
    assert torch.equal(gxa[valid], gxb[valid])
    for ga, gb in zip(gpa, gpb):
        assert torch.equal(ga, gb)
    for ba, bb in zip(bufa, bufb):
        assert torch.equal(ba, bb)
    # eval too (running statistics where the layer has them), gradients included
    a.eval(), b.eval()
    ya, gxa, gpa, _ = _run(a, x, mask, dy)
    yb, gxb, gpb, _ = _run(b, _garbage_like(x, mask, nonfinite=nonfinite), mask, dy)
    assert torch.equal(ya, yb) and torch.equal(gxa[valid], gxb[valid])
    for ga, gb in zip(gpa, gpb):
        assert torch.equal(ga, gb)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(_layers()))
def test_gradients_at_masked_positions_are_exactly_zero(name, train):
    make, xs, ms = _layers()[name]
    layer = make().train(train)
    x = _x(*xs, seed=23, dtype=torch.float32).requires_grad_()
    mask = _rand_mask(*ms, seed=24)
    y = layer(x, mask)
    (y * _x(*xs, seed=25, dtype=torch.float32)).sum().backward()
    invalid = ~mask.expand(x.shape)
    assert invalid.any() and (~invalid).any()
    assert torch.all(x.grad[invalid] == 0)
    assert torch.all(x.grad[invalid].view(torch.int32) == 0)  # +0.0, not merely |g| tiny
    assert x.grad[~invalid].abs().sum() > 0


# ------------------------------------------------------------------ gradcheck / gradgradcheck


@pytest.mark.parametrize("name", list(OPS))
def test_gradcheck_and_gradgradcheck(name):
    kind, x, mask, w, b, call = _case(name, seed=30)
    # one statistic with no valid position at all: its outputs are 0 and so are its gradients
    if kind in ("ln", "rms"):
        mask = mask.expand(x.shape).clone()
        mask[0, 0] = False
    elif kind in ("gn", "in"):
        mask = mask.expand(x.shape).clone()
        mask[0] = False
    x = x.detach().requires_grad_()
    inputs = [x, w.detach().requires_grad_()] + ([] if b is None else [b.detach().requires_grad_()])

    def f(x_, w_, b_=None):
        return call(x_, mask, w_, b_)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_gradcheck_batch_norm_eval_and_instance_norm_eval():
    x = _x(3, 2, 5, seed=31).requires_grad_()
    mask = _rand_mask(3, 1, 5, seed=32)
    rm, rv = _x(2, seed=33), 1 + _x(2, seed=34).abs()
    w, b = (1 + _x(2, seed=35)).requires_grad_(), _x(2, seed=36).requires_grad_()
    for fn in (lambda x_, w_, b_: F.batch_norm(x_, rm, rv, w_, b_, False, 0.1, 1e-5, mask=mask),
               lambda x_, w_, b_: F.instance_norm(x_, rm, rv, w_, b_, False, 0.1, 1e-5, mask=mask)):
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


# ------------------------------------------------------------------ all-True mask = no mask


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(_layers()))
def test_all_true_mask_equals_no_mask(name, train):
    make, xs, ms = _layers()[name]
    torch.manual_seed(1)
    a = make()
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for buf_name, buf in a.named_buffers():
            if buf.is_floating_point():
                buf.add_(torch.rand_like(buf))
    b = make()
    b.load_state_dict(a.state_dict())
    a.train(train), b.train(train)
    x = _x(*xs, seed=40, dtype=torch.float32, scale=2.0, offset=0.5)
    dy = _x(*xs, seed=41, dtype=torch.float32)
    for mask in (torch.ones(ms, dtype=torch.bool), torch.tensor(True)):
        ya, gxa, gpa, bufa = _run(a, x, mask, dy)
        xb = x.detach().requires_grad_()
        yb = b(xb)
        yb.backward(dy)
        torch.testing.assert_close(ya, yb.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gxa, xb.grad, rtol=1e-4, atol=1e-5)
        for ga, p in zip(gpa, b.parameters()):
            torch.testing.assert_close(ga, p.grad, rtol=1e-4, atol=1e-5)
            p.grad = None
        for ba, bb in zip(bufa, b.buffers()):
            torch.testing.assert_close(ba, bb, rtol=1e-6, atol=1e-7)


def test_all_true_mask_bfloat16_layer_norm():
    x = _x(4, 16, seed=42, dtype=torch.bfloat16)
    ln = normlab.LayerNorm(16, dtype=torch.bfloat16)
    y = ln(x, torch.ones(4, 16, dtype=torch.bool))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), nn.functional.layer_norm(x.float(), (16,)), rtol=2**-7, atol=2**-7)


# ------------------------------------------------------------------ no valid position


def test_statistic_with_no_valid_position_gives_zeros_not_nan():
    x = _x(2, 3, 6, seed=50).float().requires_grad_()
    mask = torch.ones(2, 3, 6, dtype=torch.bool)
    mask[:, 1] = False  # BN channel 1: no valid value
    mask[1, 2, 1:] = False  # BN channel 2: values left; IN (1, 2): exactly one valid value
    bn = normlab.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -0.25, 2.0]))
        bn.running_var.copy_(torch.tensor([1.5, 3.0, 0.75]))
    before_mean, before_var = bn.running_mean.clone(), bn.running_var.clone()
    y = bn(x, mask)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.all(y[:, 1] == 0)
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[:, 1] == 0)
    assert torch.isfinite(bn.weight.grad).all() and bn.weight.grad[1] == 0 and bn.bias.grad[1] == 0
    # channel 1 keeps its running statistics exactly; the others move
    assert bn.running_mean[1] == before_mean[1] and bn.running_var[1] == before_var[1]
    assert bn.running_mean[0] != before_mean[0] and bn.running_var[2] != before_var[2]
    # one valid value in a channel: running mean updated, running var (n − 1 = 0) kept
    one = torch.zeros(2, 3, 6, dtype=torch.bool)
    one[0, :, 0] = True
    one[:, 0] = True
    bn2 = normlab.BatchNorm1d(3)
    bn2(x.detach(), one)
    torch.testing.assert_close(bn2.running_mean[1:], 0.1 * x.detach()[0, 1:, 0])
    assert torch.all(bn2.running_var[1:] == 1.0) and bn2.running_var[0] != 1.0
    # every op: an all-False mask outputs zeros with zero (finite) gradients
    for name in OPS:
        kind, xx, _, w, b, call = _case(name, seed=51)
        xx = xx.requires_grad_()
        none = torch.zeros(OPS[name][2], dtype=torch.bool)
        out = call(xx, none, w, b)
        out.sum().backward()
        assert torch.all(out == 0) and torch.all(xx.grad == 0), name


def test_zero_valid_with_eps_zero_stays_finite():
    """eps = 0 (allowed for LN/GN/RMS): a row with no valid value must still give zeros, and
    finite gradients (the 1/sqrt(σ² + ε) of an empty set would be 1/0)."""
    x = _x(3, 4, 6, seed=53).requires_grad_()
    w, b = (1 + _x(6, seed=54)).requires_grad_(), _x(6, seed=55).requires_grad_()
    mask = _rand_mask(3, 4, 1, seed=56, p=0.5)
    mask[0, 0] = False
    for out in (F.layer_norm(x, (6,), w, b, 0.0, mask=mask), F.rms_norm(x, (6,), w, 0.0, mask=mask),
                F.group_norm(x.transpose(1, 2), 2, w, b, 0.0, mask=mask.transpose(1, 2))):
        out.backward(torch.ones_like(out))
        assert torch.isfinite(out).all()
        for t in (x, w, b):
            if t.grad is not None:  # RMS has no bias
                assert torch.isfinite(t.grad).all()
                t.grad = None


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_large_offset_keeps_precision(rms):
    """An offset of 1e10 with a spread of 1 (float64): the statistics keep full precision (the
    rounding of the mean is corrected as in the reference backend)."""
    off = 0.0 if rms else 1e10
    small = _x(5, 7, seed=57)
    x = small + off
    mask = _rand_mask(5, 7, seed=58)
    mask[:, 0] = True
    mask[:, 1] = True
    y = (F.rms_norm(x, (7,), None, 1e-5, mask=mask) if rms else F.layer_norm(x, (7,), None, None, 1e-5, mask=mask))
    # exact reference: x − off is exact in float64 (Sterbenz), and LN is translation invariant
    yr, *_ = _ref("rms" if rms else "ln", x - off, mask)
    torch.testing.assert_close(y, yr, rtol=1e-9, atol=1e-9)


def test_instance_norm_running_stats_skip_instances_without_values():
    x = _x(3, 2, 5, seed=52)
    mask = torch.ones(3, 2, 5, dtype=torch.bool)
    mask[0, 0] = False  # instance (0, 0): nothing
    mask[1, 0, 1:] = False  # instance (1, 0): one value (mean yes, variance no)
    mask[:, 1] = False  # channel 1: no instance at all
    rm, rv = torch.zeros(2, dtype=D), torch.ones(2, dtype=D)
    F.instance_norm(x, rm, rv, None, None, True, 0.5, 1e-5, mask=mask)
    means = torch.stack([x[1, 0, :1].mean(), x[2, 0].mean()])
    torch.testing.assert_close(rm[0], 0.5 * means.mean())
    torch.testing.assert_close(rv[0], 0.5 + 0.5 * x[2, 0].var(correction=1))
    assert rm[1] == 0 and rv[1] == 1


# ------------------------------------------------------------------ transforms and tracing


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = normlab.BatchNorm1d(4)
        self.inn = normlab.InstanceNorm1d(4, affine=True)
        self.gn = normlab.GroupNorm(2, 4)
        self.ln = normlab.LayerNorm(4)
        self.rms = normlab.RMSNorm(4)

    def forward(self, x, mask):  # x (N, C, L), mask (N, 1, L)
        h = self.gn(self.inn(self.bn(x, mask), mask), mask)
        t = h.transpose(1, 2)  # (N, L, C): token rows
        tm = mask.transpose(1, 2)
        return self.rms(self.ln(t, tm), tm)


def _xm(seed):
    x = _x(3, 4, 7, seed=seed, dtype=torch.float32)
    return x, _len_mask([7, 3, 5], 7)[:, None, :]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_masked_layers(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m, ref = _Masked(), _Masked()
    ref.load_state_dict(m.state_dict())
    cm = torch.compile(m, fullgraph=True, backend=backend)
    x, mask = _xm(60)
    xc, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc, yr = cm(xc, mask), ref(xr, mask)
    torch.testing.assert_close(yc, yr, rtol=1e-5, atol=1e-5)
    yc.sum().backward(), yr.sum().backward()
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.bn.running_var, ref.bn.running_var)
    m.eval(), ref.eval()
    torch.testing.assert_close(cm(x, mask), ref(x, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_export_masked_layers(train):
    torch.manual_seed(0)
    m, ref = _Masked().train(train), _Masked().train(train)
    ref.load_state_dict(m.state_dict())
    x, mask = _xm(61)
    ep = torch.export.export(m, (x, mask))
    # another input and another mask through the same exported program
    x2 = _x(3, 4, 7, seed=62, dtype=torch.float32)
    mask2 = _len_mask([2, 7, 6], 7)[:, None, :]
    torch.testing.assert_close(ep.module()(x2, mask2), ref(x2, mask2), rtol=1e-5, atol=1e-5)


def test_vmap_masked_layer_norm():
    x = _x(5, 4, 6, seed=63)
    mask = _rand_mask(5, 4, 6, seed=64)
    w = 1 + _x(6, seed=65)
    out = torch.func.vmap(lambda xi, mi: F.layer_norm(xi, (6,), w, None, mask=mi))(x, mask)
    loop = torch.stack([F.layer_norm(x[i], (6,), w, None, mask=mask[i]) for i in range(5)])
    torch.testing.assert_close(out, loop, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(_layers()))
def test_fx_symbolic_trace_of_a_layer_traces_its_unmasked_forward(name):
    """fx binds the unused mask=None to a placeholder: the layer still traces as before masks."""
    make, xs, ms = _layers()[name]
    layer = make().eval()
    gm = torch.fx.symbolic_trace(layer)
    x = _x(*xs, seed=67, dtype=torch.float32)
    torch.testing.assert_close(gm(x), layer(x))


def test_fx_symbolic_trace_of_a_masked_call_is_refused_clearly():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = normlab.LayerNorm(4)

        def forward(self, x, mask):
            return self.ln(x, mask)

    with pytest.raises(TypeError, match=r"^mask: torch.fx.symbolic_trace cannot trace a masked"):
        torch.fx.symbolic_trace(Outer())


def test_no_mask_never_takes_the_masked_path(monkeypatch):
    """mask=None keeps the operators' path: the masked composite is not called at all."""

    def boom(*a, **k):
        raise AssertionError("masked composite called without a mask")

    for fn in ("normalize", "batch_norm", "batch_norm_eval", "group_norm", "layer_norm", "layer_norm_channels",
               "check_mask"):
        monkeypatch.setattr(core_masked, fn, boom)
    for name, (make, xs, _) in _layers().items():
        layer = make()
        x = _x(*xs, seed=66, dtype=torch.float32).requires_grad_()
        layer(x).sum().backward()
        layer.eval()
        layer(x)


# ------------------------------------------------------------------ errors


def _error_calls(mask):
    x3 = _x(2, 3, 4, dtype=torch.float32)
    return [
        lambda: F.batch_norm(x3, None, None, training=True, mask=mask),
        lambda: F.batch_norm(x3, torch.zeros(3), torch.ones(3), training=False, mask=mask),
        lambda: F.instance_norm(x3, mask=mask),
        lambda: F.group_norm(x3, 3, mask=mask),
        lambda: F.layer_norm(x3, (4,), mask=mask),
        lambda: F.rms_norm(x3, (4,), mask=mask),
        lambda: normlab.BatchNorm1d(3)(x3, mask),
        lambda: normlab.InstanceNorm1d(3)(x3, mask),
        lambda: normlab.GroupNorm(1, 3)(x3, mask),
        lambda: normlab.LayerNorm(4)(x3, mask),
        lambda: normlab.RMSNorm(4)(x3, mask),
        lambda: F.layer_norm_2d(x3, mask=mask),
        lambda: normlab.LayerNorm2d(3)(x3, mask),
    ]


@pytest.mark.parametrize("bad, exc, words", [
    (torch.ones(2, 3, 4), TypeError, "dtype torch.bool"),
    (torch.ones(2, 1, 4, dtype=torch.int64), TypeError, "dtype torch.bool"),
    (torch.ones(2, 3, 5, dtype=torch.bool), ValueError, "broadcastable"),
    (torch.ones(3, 1, 1, dtype=torch.bool), ValueError, "broadcastable"),
    (torch.ones(1, 2, 3, 4, dtype=torch.bool), ValueError, "broadcastable"),
    (torch.ones(2, 3, 4, dtype=torch.bool, device="meta"), ValueError, "device"),
    ([[True]], TypeError, "torch.Tensor"),
], ids=["float", "int", "shape", "shape2", "more-dims", "device", "list"])
def test_mask_errors_name_the_argument(bad, exc, words):
    for call in _error_calls(bad):
        with pytest.raises(exc) as info:
            call()
        msg = str(info.value)
        assert msg.startswith("mask: ") and words in msg and "\n" not in msg, msg
