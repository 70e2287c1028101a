"""Every normlab module against its torch.nn twin.

Outputs, every gradient (input, weight, bias), running statistics, state_dict
interchange and memory formats; float32 / float64 compared dtype-for-dtype,
bfloat16 compared against the torch twin evaluated in float32 on the same
(bf16-rounded) inputs, parameters and grad_output.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import normlab
import normlab.functional as NF
import normlab.nn as nlnn
from conftest import (
    assert_close,
    copy_state_,
    make_input,
    memory_format_for,
    randn,
    randomize_module_,
    ref_dtype,
    twin_input,
)

pytestmark = pytest.mark.usefixtures("single_thread", "deterministic_seed")

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16

TWINNED = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "GroupNorm", "RMSNorm",
]

# (id, class name, ctor kwargs, input shape, allowed modes)
BOTH = ("train", "eval")
CASES = [
    # ---- BatchNorm1d
    ("bn1d-NC", "BatchNorm1d", dict(num_features=7), (13, 7), BOTH),
    ("bn1d-NC-small", "BatchNorm1d", dict(num_features=3), (2, 3), BOTH),
    ("bn1d-NC-batch1", "BatchNorm1d", dict(num_features=7), (1, 7), ("eval",)),
    ("bn1d-NCL", "BatchNorm1d", dict(num_features=7), (5, 7, 13), BOTH),
    ("bn1d-NCL-batch1", "BatchNorm1d", dict(num_features=3), (1, 3, 7), BOTH),
    ("bn1d-NCL-L1", "BatchNorm1d", dict(num_features=3), (7, 3, 1), BOTH),
    ("bn1d-noaffine", "BatchNorm1d", dict(num_features=7, affine=False), (5, 7, 3), BOTH),
    ("bn1d-notrack", "BatchNorm1d", dict(num_features=7, track_running_stats=False), (5, 7, 3), BOTH),
    ("bn1d-momNone", "BatchNorm1d", dict(num_features=3, momentum=None), (4, 3, 5), BOTH),
    ("bn1d-eps", "BatchNorm1d", dict(num_features=3, eps=0.3), (4, 3, 5), BOTH),
    # ---- BatchNorm2d
    ("bn2d", "BatchNorm2d", dict(num_features=13), (4, 13, 7, 9), BOTH),
    ("bn2d-batch1", "BatchNorm2d", dict(num_features=3), (1, 3, 5, 7), BOTH),
    ("bn2d-1x1", "BatchNorm2d", dict(num_features=5), (3, 5, 1, 1), BOTH),
    ("bn2d-1x7", "BatchNorm2d", dict(num_features=3), (2, 3, 1, 7), BOTH),
    ("bn2d-noaffine-notrack", "BatchNorm2d",
     dict(num_features=3, affine=False, track_running_stats=False), (3, 3, 5, 2), BOTH),
    # ---- BatchNorm3d
    ("bn3d", "BatchNorm3d", dict(num_features=3), (2, 3, 5, 7, 3), BOTH),
    ("bn3d-batch1", "BatchNorm3d", dict(num_features=4), (1, 4, 3, 1, 5), BOTH),
    ("bn3d-111", "BatchNorm3d", dict(num_features=2), (3, 2, 1, 1, 1), BOTH),
    # ---- InstanceNorm
    ("in1d", "InstanceNorm1d", dict(num_features=5), (3, 5, 7), BOTH),
    ("in1d-batch1", "InstanceNorm1d", dict(num_features=3), (1, 3, 13), BOTH),
    ("in1d-affine", "InstanceNorm1d", dict(num_features=5, affine=True), (3, 5, 7), BOTH),
    ("in1d-track", "InstanceNorm1d", dict(num_features=5, track_running_stats=True), (3, 5, 7), BOTH),
    ("in1d-unbatched", "InstanceNorm1d", dict(num_features=3, affine=True), (3, 7), BOTH),
    ("in2d", "InstanceNorm2d", dict(num_features=5, affine=True), (3, 5, 7, 9), BOTH),
    ("in2d-affine-track", "InstanceNorm2d",
     dict(num_features=3, affine=True, track_running_stats=True), (2, 3, 5, 3), BOTH),
    ("in2d-1xW", "InstanceNorm2d", dict(num_features=2, affine=True), (1, 2, 1, 13), BOTH),
    ("in3d", "InstanceNorm3d", dict(num_features=3, affine=True), (2, 3, 3, 1, 5), BOTH),
    # ---- LayerNorm
    ("ln-last", "LayerNorm", dict(normalized_shape=13), (5, 13), BOTH),
    ("ln-2dims", "LayerNorm", dict(normalized_shape=(7, 13)), (4, 3, 7, 13), BOTH),
    ("ln-all", "LayerNorm", dict(normalized_shape=(2, 3, 5)), (2, 3, 5), BOTH),
    ("ln-batch1", "LayerNorm", dict(normalized_shape=[7]), (1, 7), BOTH),
    ("ln-size1", "LayerNorm", dict(normalized_shape=(1,)), (3, 1), BOTH),
    ("ln-noaffine", "LayerNorm", dict(normalized_shape=7, elementwise_affine=False), (3, 7), BOTH),
    ("ln-nobias", "LayerNorm", dict(normalized_shape=7, bias=False), (3, 5, 7), BOTH),
    ("ln-eps", "LayerNorm", dict(normalized_shape=3, eps=0.5), (4, 3), BOTH),
    # ---- GroupNorm
    ("gn", "GroupNorm", dict(num_groups=3, num_channels=9), (3, 9, 7, 5), BOTH),
    ("gn-NC", "GroupNorm", dict(num_groups=2, num_channels=6), (2, 6), BOTH),
    ("gn-G=C", "GroupNorm", dict(num_groups=4, num_channels=4), (1, 4, 3), BOTH),
    ("gn-G=1", "GroupNorm", dict(num_groups=1, num_channels=6), (2, 6, 3, 1, 2), BOTH),
    ("gn-1x1", "GroupNorm", dict(num_groups=3, num_channels=6), (2, 6, 1, 1), BOTH),
    ("gn-odd", "GroupNorm", dict(num_groups=13, num_channels=13), (1, 13, 3), BOTH),
    ("gn-noaffine", "GroupNorm", dict(num_groups=2, num_channels=4, affine=False), (3, 4, 5), BOTH),
    # ---- RMSNorm
    ("rms", "RMSNorm", dict(normalized_shape=13), (4, 7, 13), BOTH),
    ("rms-2dims", "RMSNorm", dict(normalized_shape=(5, 7)), (3, 5, 7), BOTH),
    ("rms-eps", "RMSNorm", dict(normalized_shape=13, eps=1e-5), (3, 13), BOTH),
    ("rms-noaffine", "RMSNorm", dict(normalized_shape=7, elementwise_affine=False), (3, 7), BOTH),
    ("rms-size1", "RMSNorm", dict(normalized_shape=1), (2, 1), BOTH),
    ("rms-1d", "RMSNorm", dict(normalized_shape=7), (7,), BOTH),
]

CASE_PARAMS = [
    pytest.param(c, mode, id=f"{c[0]}-{mode}") for c in CASES for mode in c[4]
]


def build_pair(cls_name, kwargs, dtype, seed=1):
    """normlab module in ``dtype`` and its torch twin in ref_dtype(dtype), same state."""
    nl = getattr(nlnn, cls_name)(**kwargs).to(dtype)
    tkw = dict(kwargs)
    if cls_name == "RMSNorm" and tkw.get("eps") is None:
        # torch resolves eps=None from the *compute* dtype (float32 for 16-bit inputs,
        # measured: bf16 rows near 0.01 match eps=finfo(float32).eps to 6e-3 and
        # eps=finfo(bfloat16).eps only to 2.9); the twin runs in ref_dtype(dtype).
        tkw["eps"] = torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).eps
    tm = getattr(torch.nn, cls_name)(**tkw).to(ref_dtype(dtype))
    randomize_module_(nl, seed, nbt=3)
    copy_state_(tm, nl)
    return nl, tm


def set_mode(mode, *mods):
    for m in mods:
        m.train(mode == "train")


def check_pair(nl, tm, x, dtype, ctx=""):
    """forward + backward both modules and compare output, all grads and buffers."""
    xt = twin_input(x)
    y = nl(x)
    yt = tm(xt)
    assert isinstance(y, torch.Tensor)
    assert y.dtype == x.dtype, f"{ctx}: output dtype {y.dtype} != input dtype {x.dtype}"
    assert y.shape == x.shape
    assert_close(y, yt, dtype, msg=f"{ctx}: output")
    gout = randn(y.shape, seed=99).to(dtype)
    y.backward(gout)
    yt.backward(gout.to(yt.dtype))
    assert_close(x.grad, xt.grad, dtype, msg=f"{ctx}: grad input")
    tparams = dict(tm.named_parameters())
    nparams = dict(nl.named_parameters())
    assert set(nparams) == set(tparams), f"{ctx}: parameters {sorted(nparams)} != {sorted(tparams)}"
    for name, p in nparams.items():
        assert p.grad is not None, f"{ctx}: no grad for {name}"
        assert p.grad.dtype == p.dtype
        assert_close(p.grad, tparams[name].grad, dtype, msg=f"{ctx}: grad {name}")
    tbufs = {k: v for k, v in tm.named_buffers()}
    nbufs = {k: v for k, v in nl.named_buffers()}
    assert set(nbufs) == set(tbufs), f"{ctx}: buffers {sorted(nbufs)} != {sorted(tbufs)}"
    for name, b in nbufs.items():
        if b.dtype.is_floating_point:
            assert b.dtype == dtype, f"{ctx}: buffer {name} dtype {b.dtype}"
            assert_close(b, tbufs[name], dtype, msg=f"{ctx}: buffer {name}")
        else:
            assert torch.equal(b, tbufs[name]), f"{ctx}: buffer {name}: {b} != {tbufs[name]}"
    return y


# ----------------------------------------------------------------------------
# public surface
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", TWINNED + ["MeanOnlyBatchNorm"])
def test_reexported_at_top_level(name):
    assert getattr(normlab, name) is getattr(nlnn, name)


@pytest.mark.parametrize("name", TWINNED)
def test_constructor_signature_matches_torch(name):
    def positional(cls):
        sig = inspect.signature(cls.__init__)
        return [
            (p.name, p.default)
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
        ]

    assert positional(getattr(nlnn, name)) == positional(getattr(torch.nn, name))


@pytest.mark.parametrize("name", TWINNED)
def test_is_module_and_dtype_device_kwargs(name):
    first = {"GroupNorm": (2, 4), "LayerNorm": (4,), "RMSNorm": (4,)}.get(name, (4,))
    kw = {"InstanceNorm1d": dict(affine=True), "InstanceNorm2d": dict(affine=True),
          "InstanceNorm3d": dict(affine=True)}.get(name, {})
    m = getattr(nlnn, name)(*first, dtype=torch.float64, device="cpu", **kw)
    assert isinstance(m, torch.nn.Module)
    for p in m.parameters():
        assert p.dtype == torch.float64
    t = getattr(torch.nn, name)(*first, **kw)
    assert [k for k, _ in m.named_parameters()] == [k for k, _ in t.named_parameters()]
    assert list(m.state_dict().keys()) == list(t.state_dict().keys())
    for k, v in t.state_dict().items():
        assert m.state_dict()[k].shape == v.shape, k
        if k != "num_batches_tracked":
            torch.testing.assert_close(m.state_dict()[k].float(), v.float())  # same init
    for attr in ("eps", "momentum", "affine", "track_running_stats", "num_features",
                 "num_groups", "num_channels", "normalized_shape", "elementwise_affine"):
        if hasattr(t, attr):
            assert getattr(m, attr) == getattr(t, attr), attr


# ----------------------------------------------------------------------------
# modules, contiguous inputs, three dtypes
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("case,mode", CASE_PARAMS)
def test_module_matches_torch(backend, case, mode, dtype):
    cid, cls_name, kwargs, shape, _ = case
    nl, tm = build_pair(cls_name, kwargs, dtype)
    set_mode(mode, nl, tm)
    x = make_input(shape, dtype, "contiguous", seed=7)
    check_pair(nl, tm, x, dtype, ctx=f"{cid}/{mode}/{dtype}")


# ----------------------------------------------------------------------------
# memory layouts
# ----------------------------------------------------------------------------
LAYOUT_CASES = [c for c in CASES if len(c[3]) >= 3 and c[0] in {
    "bn1d-NCL", "bn2d", "bn2d-1x7", "bn3d", "bn3d-batch1", "in1d-affine", "in2d",
    "in2d-affine-track", "in3d", "ln-2dims", "ln-nobias", "gn", "gn-G=1", "gn-1x1",
    "rms", "rms-2dims",
}]
LAYOUT_PARAMS = []
for _c in LAYOUT_CASES:
    for _layout in ["channels_last", "reversed", "swap01", "sliced"]:
        if _layout == "channels_last" and len(_c[3]) not in (4, 5):
            continue
        for _mode in _c[4]:
            LAYOUT_PARAMS.append(pytest.param(_c, _layout, _mode, id=f"{_c[0]}-{_layout}-{_mode}"))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("case,layout,mode", LAYOUT_PARAMS)
def test_layouts_match_torch(backend, case, layout, mode, dtype):
    cid, cls_name, kwargs, shape, _ = case
    nl, tm = build_pair(cls_name, kwargs, dtype)
    set_mode(mode, nl, tm)
    x = make_input(shape, dtype, layout, seed=11)
    before = x.detach().clone()
    y = check_pair(nl, tm, x, dtype, ctx=f"{cid}/{layout}/{mode}")
    assert torch.equal(x.detach(), before), "input was modified in place"
    if layout == "channels_last" and not cls_name.startswith(("LayerNorm", "RMSNorm")):
        fmt = memory_format_for(len(shape))
        assert y.is_contiguous(memory_format=fmt), f"{cid}: channels_last in -> {y.stride()} out"


@pytest.mark.parametrize("ndim", [4, 5])
def test_mean_only_channels_last_out(backend, ndim):
    shape = (2, 3, 4, 5) if ndim == 4 else (2, 3, 2, 3, 4)
    m = nlnn.MeanOnlyBatchNorm(3)
    x = make_input(shape, F32, "channels_last", seed=3)
    y = m(x)
    assert y.is_contiguous(memory_format=memory_format_for(ndim))
    ref = x.detach() - x.detach().mean(dim=[d for d in range(ndim) if d != 1], keepdim=True)
    ref = ref + m.bias.detach().view(1, -1, *([1] * (ndim - 2)))
    assert_close(y, ref, F32)


# ----------------------------------------------------------------------------
# running statistics
# ----------------------------------------------------------------------------
STAT_MODULES = [
    ("BatchNorm1d", dict(), (6, 4)),
    ("BatchNorm1d", dict(), (5, 4, 3)),
    ("BatchNorm2d", dict(), (3, 4, 5, 2)),
    ("BatchNorm3d", dict(), (2, 4, 3, 1, 3)),
    ("BatchNorm2d", dict(affine=False), (2, 4, 3, 3)),
    ("InstanceNorm1d", dict(track_running_stats=True), (3, 4, 5)),
    ("InstanceNorm2d", dict(track_running_stats=True, affine=True), (2, 4, 3, 5)),
    ("InstanceNorm3d", dict(track_running_stats=True), (2, 4, 2, 1, 3)),
]


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0, 0.37])
@pytest.mark.parametrize("cls_name,extra,shape", STAT_MODULES,
                         ids=[f"{c}-{'-'.join(e) or 'default'}-{len(s)}d" for c, e, s in STAT_MODULES])
def test_running_stats_after_several_steps(backend, cls_name, extra, shape, momentum, dtype):
    kwargs = dict(num_features=shape[1], momentum=momentum, **extra)
    nl = getattr(nlnn, cls_name)(**kwargs).to(dtype)
    tm = getattr(torch.nn, cls_name)(**kwargs).to(ref_dtype(dtype))
    randomize_module_(nl, seed=5)
    copy_state_(tm, nl)
    nl.train(); tm.train()
    for step in range(4):
        x = make_input(shape, dtype, seed=100 + step, scale=1.0 + step, offset=0.5 * step)
        if step == 2:  # an eval step in between must not touch the statistics
            nl.eval(); tm.eval()
        y, yt = nl(x), tm(twin_input(x))
        nl.train(); tm.train()
        assert_close(y, yt, dtype, msg=f"output step {step}")
        assert_close(nl.running_mean, tm.running_mean, dtype, msg=f"running_mean step {step}")
        assert_close(nl.running_var, tm.running_var, dtype, msg=f"running_var step {step}")
        assert nl.num_batches_tracked.dtype == torch.long
        assert int(nl.num_batches_tracked) == int(tm.num_batches_tracked), f"step {step}"
    nl.eval(); tm.eval()
    x = make_input(shape, dtype, seed=200, scale=3.0, offset=-1.0)
    assert_close(nl(x), tm(twin_input(x)), dtype, msg="eval after training")


@pytest.mark.parametrize("cls_name,shape", [("BatchNorm1d", (5, 3)), ("BatchNorm2d", (2, 3, 4, 4)),
                                            ("InstanceNorm1d", (2, 3, 5))])
def test_no_running_stats_when_not_tracked(backend, cls_name, shape):
    nl = getattr(nlnn, cls_name)(3, track_running_stats=False).double()
    tm = getattr(torch.nn, cls_name)(3, track_running_stats=False).double()
    assert nl.running_mean is None and nl.running_var is None
    assert getattr(nl, "num_batches_tracked", None) is None
    assert list(nl.state_dict()) == list(tm.state_dict())
    nl.eval(); tm.eval()  # batch statistics are used in eval, too
    x = make_input(shape, F64, seed=3, scale=2.0, offset=1.0)
    assert_close(nl(x), tm(twin_input(x)), F64)


# ----------------------------------------------------------------------------
# state_dict interchange
# ----------------------------------------------------------------------------
SD_CASES = [
    ("BatchNorm1d", dict(num_features=5), (4, 5, 3)),
    ("BatchNorm2d", dict(num_features=3, momentum=None), (2, 3, 4, 3)),
    ("BatchNorm3d", dict(num_features=3, affine=False), (2, 3, 2, 2, 3)),
    ("BatchNorm2d", dict(num_features=3, track_running_stats=False), (2, 3, 4, 3)),
    ("InstanceNorm2d", dict(num_features=3, affine=True, track_running_stats=True), (2, 3, 4, 3)),
    ("InstanceNorm1d", dict(num_features=3, affine=True), (2, 3, 5)),
    ("InstanceNorm3d", dict(num_features=3), (2, 3, 2, 2, 3)),
    ("LayerNorm", dict(normalized_shape=(3, 4)), (2, 3, 4)),
    ("LayerNorm", dict(normalized_shape=4, bias=False), (3, 4)),
    ("LayerNorm", dict(normalized_shape=4, elementwise_affine=False), (3, 4)),
    ("GroupNorm", dict(num_groups=2, num_channels=6), (2, 6, 5)),
    ("RMSNorm", dict(normalized_shape=(3, 4)), (2, 3, 4)),
]


@pytest.mark.parametrize("direction", ["torch_to_normlab", "normlab_to_torch"])
@pytest.mark.parametrize("cls_name,kwargs,shape", SD_CASES,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(SD_CASES)])
def test_state_dict_interchange(backend, cls_name, kwargs, shape, direction):
    nl = getattr(nlnn, cls_name)(**kwargs).double()
    tm = getattr(torch.nn, cls_name)(**kwargs).double()
    src, dst = (tm, nl) if direction == "torch_to_normlab" else (nl, tm)
    randomize_module_(src, seed=9, nbt=5)
    result = dst.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    sd_src, sd_dst = src.state_dict(), dst.state_dict()
    assert list(sd_src) == list(sd_dst)
    for k in sd_src:
        assert sd_src[k].dtype == sd_dst[k].dtype, k
        assert torch.equal(sd_src[k], sd_dst[k]), k
    for mode in ("train", "eval", "train"):
        set_mode(mode, nl, tm)
        x = make_input(shape, F64, seed=17, scale=2.0, offset=0.3)
        assert_close(nl(x), tm(twin_input(x)), F64, msg=mode)
        for k, v in tm.state_dict().items():
            assert_close(nl.state_dict()[k], v, F64, msg=f"{mode}: {k}")


def test_mean_only_state_dict_roundtrip(backend):
    a = nlnn.MeanOnlyBatchNorm(4)
    names = [n for n, _ in a.named_parameters()]
    assert names == ["bias"], f"MeanOnlyBatchNorm(affine=True) has bias only, got {names}"
    assert "running_mean" in a.state_dict()
    randomize_module_(a, seed=2)
    b = nlnn.MeanOnlyBatchNorm(4)
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval(); b.eval()
    x = make_input((3, 4, 5), F32, seed=1)
    assert torch.equal(a(x), b(x))
    assert [n for n, _ in nlnn.MeanOnlyBatchNorm(4, affine=False).named_parameters()] == []


# ----------------------------------------------------------------------------
# functional forms vs torch.nn.functional
# ----------------------------------------------------------------------------
def _params(c, dtype, seed=0, affine=True):
    if not affine:
        return None, None
    w = (1 + 0.5 * randn((c,), seed)).to(dtype).requires_grad_()
    b = randn((c,), seed + 1).to(dtype).requires_grad_()
    return w, b


def _grads(*ts):
    return [t.grad for t in ts if t is not None]


def _run_both(fn_nl, fn_t, x, extra_leaves, dtype):
    """Evaluate fn(x, *leaves) for both; compare output and all grads."""
    xt = twin_input(x)
    leaves_t = [None if t is None else t.detach().to(ref_dtype(dtype)).requires_grad_() for t in extra_leaves]
    y = fn_nl(x, *extra_leaves)
    yt = fn_t(xt, *leaves_t)
    assert y.dtype == x.dtype
    assert_close(y, yt, dtype, msg="output")
    g = randn(y.shape, seed=5).to(dtype)
    y.backward(g)
    yt.backward(g.to(yt.dtype))
    assert_close(x.grad, xt.grad, dtype, msg="grad input")
    for a, b in zip(extra_leaves, leaves_t):
        if a is not None:
            assert_close(a.grad, b.grad, dtype, msg="grad param")


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training,stats", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 7), (2, 3, 3, 5)], ids=str)
def test_functional_batch_norm(backend, shape, training, stats, affine, dtype):
    c = shape[1]
    rm = (0.3 * randn((c,), 1)).to(dtype) if stats else None
    rv = (0.5 + randn((c,), 2).abs()).to(dtype) if stats else None
    rmt = None if rm is None else rm.clone().to(ref_dtype(dtype))
    rvt = None if rv is None else rv.clone().to(ref_dtype(dtype))
    w, b = _params(c, dtype, affine=affine)
    x = make_input(shape, dtype, seed=4)
    _run_both(
        lambda x, w, b: NF.batch_norm(x, rm, rv, w, b, training=training, momentum=0.2, eps=1e-3),
        lambda x, w, b: torch.nn.functional.batch_norm(x, rmt, rvt, w, b, training=training, momentum=0.2, eps=1e-3),
        x, [w, b], dtype)
    if stats:
        assert_close(rm, rmt, dtype, msg="running_mean")
        assert_close(rv, rvt, dtype, msg="running_var")


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("mode", ["input_stats", "input_stats+running", "running"])
@pytest.mark.parametrize("shape", [(3, 4, 7), (2, 3, 5, 3), (2, 2, 3, 1, 2)], ids=str)
def test_functional_instance_norm(backend, shape, mode, affine, dtype):
    c = shape[1]
    stats = mode != "input_stats"
    rm = (0.3 * randn((c,), 1)).to(dtype) if stats else None
    rv = (0.5 + randn((c,), 2).abs()).to(dtype) if stats else None
    rmt = None if rm is None else rm.clone().to(ref_dtype(dtype))
    rvt = None if rv is None else rv.clone().to(ref_dtype(dtype))
    use_input_stats = mode != "running"
    w, b = _params(c, dtype, affine=affine)
    x = make_input(shape, dtype, seed=4)
    _run_both(
        lambda x, w, b: NF.instance_norm(x, rm, rv, w, b, use_input_stats=use_input_stats, momentum=0.3, eps=1e-4),
        lambda x, w, b: torch.nn.functional.instance_norm(x, rmt, rvt, w, b, use_input_stats=use_input_stats,
                                                          momentum=0.3, eps=1e-4),
        x, [w, b], dtype)
    if stats:
        assert_close(rm, rmt, dtype, msg="running_mean")
        assert_close(rv, rvt, dtype, msg="running_var")


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("shape,nshape", [((5, 7), (7,)), ((2, 3, 4, 5), (4, 5)), ((3, 1), (1,)), ((2, 3, 5), (2, 3, 5))],
                         ids=str)
def test_functional_layer_norm(backend, shape, nshape, affine, dtype):
    w = None if affine == "none" else (1 + 0.5 * randn(nshape, 1)).to(dtype).requires_grad_()
    b = None if affine != "both" else randn(nshape, 2).to(dtype).requires_grad_()
    x = make_input(shape, dtype, seed=4)
    _run_both(lambda x, w, b: NF.layer_norm(x, nshape, w, b, eps=1e-4),
              lambda x, w, b: torch.nn.functional.layer_norm(x, nshape, w, b, eps=1e-4), x, [w, b], dtype)


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,groups", [((3, 6, 5), 3), ((2, 6), 2), ((2, 4, 3, 3), 1), ((1, 5, 2, 3), 5),
                                          ((2, 4, 1, 3, 2), 2)], ids=str)
def test_functional_group_norm(backend, shape, groups, affine, dtype):
    w, b = _params(shape[1], dtype, affine=affine)
    x = make_input(shape, dtype, seed=4)
    _run_both(lambda x, w, b: NF.group_norm(x, groups, w, b, eps=1e-4),
              lambda x, w, b: torch.nn.functional.group_norm(x, groups, w, b, eps=1e-4), x, [w, b], dtype)


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,nshape", [((5, 7), (7,)), ((2, 3, 4, 5), (4, 5)), ((3, 1), (1,))], ids=str)
def test_functional_rms_norm(backend, shape, nshape, affine, eps, dtype):
    w = (1 + 0.5 * randn(nshape, 1)).to(dtype).requires_grad_() if affine else None
    # eps=None: torch takes the machine epsilon of the compute dtype (float32 for 16-bit inputs)
    teps = torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).eps if eps is None else eps
    x = make_input(shape, dtype, seed=4)
    _run_both(lambda x, w: NF.rms_norm(x, nshape, w, eps=eps),
              lambda x, w: torch.nn.functional.rms_norm(x, nshape, w, eps=teps), x, [w], dtype)


# ----------------------------------------------------------------------------
# MeanOnlyBatchNorm vs a hand float64 reference
# ----------------------------------------------------------------------------
def _mean_only_ref(x, bias, running_mean, training, momentum):
    """float64: returns y, new running_mean."""
    x = x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    view = [1, -1] + [1] * (x.dim() - 2)
    if training or running_mean is None:
        mu = x.mean(dim=dims)
    else:
        mu = running_mean.double()
    y = x - mu.view(view)
    if bias is not None:
        y = y + bias.double().view(view)
    new_rm = running_mean
    if training and running_mean is not None:
        new_rm = (1 - momentum) * running_mean.double() + momentum * mu
    return y, new_rm


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 3), (3, 4, 2, 5), (1, 4, 7), (2, 4, 1, 3, 2)], ids=str)
def test_mean_only_batch_norm_vs_hand_reference(backend, shape, momentum, affine, dtype):
    c = shape[1]
    m = nlnn.MeanOnlyBatchNorm(c, momentum=momentum, affine=affine).to(dtype)
    randomize_module_(m, seed=3)
    rm = m.running_mean.detach().double().clone()
    bias = m.bias if affine else None
    if not affine:
        assert getattr(m, "bias", None) is None
    m.train()
    for step in range(3):
        x = make_input(shape, dtype, seed=30 + step, scale=2.0, offset=step - 1.0)
        y = m(x)
        ref, rm = _mean_only_ref(x.detach(), None if bias is None else bias.detach(), rm, True, momentum)
        assert y.dtype == dtype
        assert_close(y, ref, dtype, msg=f"train output step {step}")
        assert_close(m.running_mean, rm, dtype, msg=f"running_mean step {step}")
    # gradients (training): dL/dx = g - mean_c(g), dL/dbias = sum_c(g)
    g = randn(shape, seed=8).to(dtype)
    if bias is not None:
        bias.grad = None
    y.backward(g)
    dims = [d for d in range(len(shape)) if d != 1]
    gd = g.double()
    assert_close(x.grad, gd - gd.mean(dim=dims, keepdim=True), dtype, msg="grad input (train)")
    if bias is not None:
        assert_close(bias.grad, gd.sum(dim=dims), dtype, msg="grad bias (train)")
    # eval: running mean, gradient passes straight through
    m.eval()
    x = make_input(shape, dtype, seed=40, scale=3.0)
    y = m(x)
    ref, _ = _mean_only_ref(x.detach(), None if bias is None else bias.detach(), rm, False, momentum)
    assert_close(y, ref, dtype, msg="eval output")
    y.backward(g)
    assert_close(x.grad, gd, dtype, msg="grad input (eval)")
    assert_close(m.running_mean, rm, dtype, msg="eval must not update running_mean")


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5)], ids=str)
def test_mean_only_without_running_stats_uses_batch_mean_in_eval(backend, shape):
    m = nlnn.MeanOnlyBatchNorm(4, track_running_stats=False).double()
    randomize_module_(m, seed=1)
    m.eval()
    x = make_input(shape, F64, seed=2, offset=3.0)
    ref, _ = _mean_only_ref(x.detach(), m.bias.detach(), None, True, 0.1)
    assert_close(m(x), ref, F64)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5), (2, 4, 3, 3)], ids=str)
def test_functional_mean_only_batch_norm(backend, shape, training, dtype):
    c = shape[1]
    rm = (0.3 * randn((c,), 1)).to(dtype)
    rm0 = rm.clone()
    bias = randn((c,), 2).to(dtype).requires_grad_()
    x = make_input(shape, dtype, seed=5, offset=1.5)
    y = NF.mean_only_batch_norm(x, rm, bias, training=training, momentum=0.25)
    ref, new_rm = _mean_only_ref(x.detach(), bias.detach(), rm0, training, 0.25)
    assert_close(y, ref, dtype)
    assert_close(rm, new_rm, dtype, msg="running_mean")
    g = randn(shape, seed=6).to(dtype)
    y.backward(g)
    dims = [d for d in range(len(shape)) if d != 1]
    gd = g.double()
    exp = gd - gd.mean(dim=dims, keepdim=True) if training else gd
    assert_close(x.grad, exp, dtype, msg="grad input")
    assert_close(bias.grad, gd.sum(dim=dims), dtype, msg="grad bias")


# ----------------------------------------------------------------------------
# large inputs with 2 intra-op threads: multi-threaded kernel paths, pooled output buffers
# ----------------------------------------------------------------------------
LARGE_CASES = [
    ("bn1d-large", "BatchNorm1d", dict(num_features=9), (4096, 9), "contiguous"),
    ("bn2d-large", "BatchNorm2d", dict(num_features=16), (8, 16, 24, 24), "contiguous"),
    ("bn2d-large-cl", "BatchNorm2d", dict(num_features=16), (16, 16, 32, 36), "channels_last"),
    ("bn3d-large-cl", "BatchNorm3d", dict(num_features=8), (2, 8, 8, 16, 17), "channels_last"),
    ("gn-large", "GroupNorm", dict(num_groups=8, num_channels=32), (4, 32, 16, 17), "contiguous"),
    ("gn-large-cl", "GroupNorm", dict(num_groups=8, num_channels=32), (4, 32, 16, 17), "channels_last"),
    ("in2d-large", "InstanceNorm2d", dict(num_features=8, affine=True), (4, 8, 33, 32), "contiguous"),
    ("ln-large", "LayerNorm", dict(normalized_shape=1100), (256, 1100), "contiguous"),
    ("ln-large-sliced", "LayerNorm", dict(normalized_shape=513), (64, 513), "sliced"),
    ("rms-large", "RMSNorm", dict(normalized_shape=1024), (64, 1024), "contiguous"),
]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", LARGE_CASES, ids=[c[0] for c in LARGE_CASES])
def test_large_inputs_two_threads(backend, two_threads, case, mode):
    cid, cls_name, kwargs, shape, layout = case
    nl, tm = build_pair(cls_name, kwargs, F32)
    set_mode(mode, nl, tm)
    x = make_input(shape, F32, layout, seed=21, scale=2.0, offset=0.5)
    y = check_pair(nl, tm, x, F32, ctx=f"{cid}/{mode}")
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=memory_format_for(len(shape)))
    # outputs and gradients stay valid while later calls run (no aliasing of reused buffers)
    y_keep, gx_keep = y.detach().clone(), x.grad.clone()
    for seed in (22, 23):
        x2 = make_input(shape, F32, layout, seed=seed)
        nl(x2).sum().backward()
    assert torch.equal(y.detach(), y_keep), "an earlier output changed after later calls"
    assert torch.equal(x.grad, gx_keep), "an earlier gradient changed after later calls"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_mean_only_large_two_threads(backend, two_threads, layout):
    m = nlnn.MeanOnlyBatchNorm(16).double()
    randomize_module_(m, seed=4)
    x = make_input((8, 16, 24, 24), F64, layout, seed=5, offset=2.0)
    y = m(x)
    ref, _ = _mean_only_ref(x.detach(), m.bias.detach(), torch.zeros(16, dtype=F64), True, 1.0)
    assert_close(y, ref, F64)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
