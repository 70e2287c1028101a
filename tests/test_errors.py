"""Bad inputs raise ValueError / TypeError whose message names the argument and
both the expected and the received value -- module and functional forms.

Each check builds a regex that requires *all* of: the argument name, the
received value and (a rendering of) the expected value.  Where an error can be
raised by the constructor or by the first forward call, both are inside the
``pytest.raises`` block.
"""
from __future__ import annotations

import pytest
import torch

import normlab.functional as NF
import normlab.nn as nlnn
from conftest import bad_value_regex as ALL
from conftest import num

pytestmark = pytest.mark.usefixtures("single_thread", "deterministic_seed")

F32 = torch.float32


def x_(*shape, dtype=F32):
    return torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)


def shape_re(*dims):
    """'3, 4' as printed in a tuple / list / torch.Size (or '3 x 4')."""
    return r"\D?\s*".join(str(d) for d in dims) if len(dims) > 1 else num(dims[0])


def dims_re(n):
    """'4D', '4-D', '4 dims', 'ndim=4', ..."""
    return f"(?<![\\d.]){n}(?!\\d)"


POSITIVE = r"(>\s*0|positive|greater than 0|at least 1|>=\s*1)"
UNIT_INTERVAL = (r"(\[\s*0(\.0*)?\s*,\s*1(\.0*)?\s*\]|between 0(\.0*)? and 1|0(\.0*)?\s*<=?\s*momentum\s*<=?\s*1"
                 r"|0(\.0*)?\s*<=?\s*\S+\s*<=?\s*1)")


def raises(exc, *patterns):
    return pytest.raises(exc, match=ALL(*patterns))


def call_module(factory, x, train=True):
    m = factory()
    m.train(train)
    return m(x)


# ----------------------------------------------------------------------------
# wrong number of dims
# ----------------------------------------------------------------------------
WRONG_DIMS = [
    # id, factory, input shape, expected-dims patterns, received dims
    ("BatchNorm1d-1d", lambda: nlnn.BatchNorm1d(3), (3,), [dims_re(2), dims_re(3)], 1),
    ("BatchNorm1d-4d", lambda: nlnn.BatchNorm1d(3), (2, 3, 4, 4), [dims_re(2), dims_re(3)], 4),
    ("BatchNorm2d-3d", lambda: nlnn.BatchNorm2d(3), (2, 3, 4), [dims_re(4)], 3),
    ("BatchNorm2d-5d", lambda: nlnn.BatchNorm2d(3), (2, 3, 4, 4, 4), [dims_re(4)], 5),
    ("BatchNorm3d-4d", lambda: nlnn.BatchNorm3d(3), (2, 3, 4, 4), [dims_re(5)], 4),
    ("InstanceNorm1d-4d", lambda: nlnn.InstanceNorm1d(3), (2, 3, 4, 4), [dims_re(3)], 4),
    ("InstanceNorm2d-2d", lambda: nlnn.InstanceNorm2d(3), (3, 4), [dims_re(4)], 2),
    ("InstanceNorm3d-3d", lambda: nlnn.InstanceNorm3d(3), (3, 4, 4), [dims_re(5)], 3),
    ("GroupNorm-1d", lambda: nlnn.GroupNorm(1, 3), (3,), [dims_re(2)], 1),
    ("MeanOnlyBatchNorm-1d", lambda: nlnn.MeanOnlyBatchNorm(3), (3,), [dims_re(2)], 1),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cid,factory,shape,expected,got", WRONG_DIMS, ids=[c[0] for c in WRONG_DIMS])
def test_module_wrong_number_of_dims(backend, cid, factory, shape, expected, got, train):
    with raises(ValueError, "input", *expected, dims_re(got)):
        call_module(factory, x_(*shape), train)


FUNCTIONAL_WRONG_DIMS = [
    ("batch_norm-1d", lambda x: NF.batch_norm(x, None, None, training=True), (3,), dims_re(2), 1),
    ("batch_norm-eval-1d", lambda x: NF.batch_norm(x, torch.zeros(3), torch.ones(3)), (3,), dims_re(2), 1),
    ("instance_norm-1d", lambda x: NF.instance_norm(x), (3,), f"({dims_re(2)}|{dims_re(3)})", 1),
    ("group_norm-1d", lambda x: NF.group_norm(x, 1), (3,), dims_re(2), 1),
    ("mean_only-1d", lambda x: NF.mean_only_batch_norm(x, torch.zeros(3), training=True), (3,), dims_re(2), 1),
]


@pytest.mark.parametrize("cid,fn,shape,expected,got", FUNCTIONAL_WRONG_DIMS,
                         ids=[c[0] for c in FUNCTIONAL_WRONG_DIMS])
def test_functional_wrong_number_of_dims(backend, cid, fn, shape, expected, got):
    with raises(ValueError, "input", expected, dims_re(got)):
        fn(x_(*shape))


# ----------------------------------------------------------------------------
# channel count != num_features
# ----------------------------------------------------------------------------
CHANNELS = [
    ("BatchNorm1d", lambda: nlnn.BatchNorm1d(5), (4, 3)),
    ("BatchNorm1d-3d", lambda: nlnn.BatchNorm1d(5), (4, 3, 2)),
    ("BatchNorm2d", lambda: nlnn.BatchNorm2d(5), (2, 3, 4, 4)),
    ("BatchNorm3d", lambda: nlnn.BatchNorm3d(5), (2, 3, 2, 2, 2)),
    ("BatchNorm2d-noaffine", lambda: nlnn.BatchNorm2d(5, affine=False), (2, 3, 4, 4)),
    ("BatchNorm2d-notrack", lambda: nlnn.BatchNorm2d(5, track_running_stats=False), (2, 3, 4, 4)),
    ("InstanceNorm1d-affine", lambda: nlnn.InstanceNorm1d(5, affine=True), (2, 3, 4)),
    ("InstanceNorm2d-track", lambda: nlnn.InstanceNorm2d(5, track_running_stats=True), (2, 3, 4, 4)),
    ("MeanOnlyBatchNorm", lambda: nlnn.MeanOnlyBatchNorm(5), (4, 3)),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cid,factory,shape", CHANNELS, ids=[c[0] for c in CHANNELS])
def test_module_channel_mismatch(backend, cid, factory, shape, train):
    with raises(ValueError, "(num_features|channel)", num(5), num(3)):
        call_module(factory, x_(*shape), train)


def test_group_norm_channel_mismatch(backend):
    with raises(ValueError, "(num_channels|channel)", num(6), num(4)):
        nlnn.GroupNorm(2, 6)(x_(2, 4, 3))


FUNCTIONAL_CHANNELS = [
    ("batch_norm-running_mean", "running_mean",
     lambda: NF.batch_norm(x_(2, 3, 4), torch.zeros(5), torch.ones(5), training=False)),
    ("batch_norm-running_mean-train", "running_mean",
     lambda: NF.batch_norm(x_(2, 3, 4), torch.zeros(5), torch.ones(5), training=True)),
    ("batch_norm-running_var", "running_var",
     lambda: NF.batch_norm(x_(2, 3, 4), torch.zeros(3), torch.ones(5), training=False)),
    ("batch_norm-weight", "weight",
     lambda: NF.batch_norm(x_(2, 3, 4), None, None, torch.ones(5), torch.zeros(3), training=True)),
    ("batch_norm-bias", "bias",
     lambda: NF.batch_norm(x_(2, 3, 4), None, None, torch.ones(3), torch.zeros(5), training=True)),
    ("instance_norm-weight", "weight", lambda: NF.instance_norm(x_(2, 3, 4), weight=torch.ones(5))),
    ("instance_norm-running_mean", "running_mean",
     lambda: NF.instance_norm(x_(2, 3, 4), torch.zeros(5), torch.ones(5), use_input_stats=False)),
    ("group_norm-weight", "weight", lambda: NF.group_norm(x_(2, 3, 4), 3, torch.ones(5), torch.zeros(3))),
    ("group_norm-bias", "bias", lambda: NF.group_norm(x_(2, 3, 4), 3, torch.ones(3), torch.zeros(5))),
    ("mean_only-running_mean", "running_mean",
     lambda: NF.mean_only_batch_norm(x_(4, 3), torch.zeros(5), training=True)),
    ("mean_only-bias", "bias",
     lambda: NF.mean_only_batch_norm(x_(4, 3), torch.zeros(3), torch.zeros(5), training=True)),
]


@pytest.mark.parametrize("cid,argname,call", FUNCTIONAL_CHANNELS, ids=[c[0] for c in FUNCTIONAL_CHANNELS])
def test_functional_channel_mismatch(backend, cid, argname, call):
    with raises(ValueError, argname, num(5), num(3)):
        call()


# ----------------------------------------------------------------------------
# num_groups must divide num_channels
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("groups,channels", [(4, 6), (5, 3), (7, 13)])
def test_group_norm_groups_must_divide_channels_module(backend, groups, channels):
    with raises(ValueError, "num_groups", "num_channels", num(groups), num(channels)):
        nlnn.GroupNorm(groups, channels)(x_(2, channels, 3))


@pytest.mark.parametrize("groups,channels", [(4, 6), (5, 3), (7, 13)])
def test_group_norm_groups_must_divide_channels_functional(backend, groups, channels):
    with raises(ValueError, "num_groups", num(groups), num(channels)):
        NF.group_norm(x_(2, channels, 3), groups)


# ----------------------------------------------------------------------------
# normalized_shape vs trailing dims
# ----------------------------------------------------------------------------
NSHAPE = [
    # normalized_shape, input shape, pattern for expected, pattern for received
    ((5,), (2, 3, 4), shape_re(5), num(4)),
    ((3, 4), (2, 4, 4), shape_re(3, 4), shape_re(4, 4)),
    ((3, 4), (4,), shape_re(3, 4), num(4)),
    ((2, 3, 4), (5, 3, 4), shape_re(2, 3, 4), shape_re(5, 3, 4)),
]


@pytest.mark.parametrize("cls", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("nshape,shape,exp,got", NSHAPE, ids=[f"{n}-vs-{s}" for n, s, _, _ in NSHAPE])
def test_normalized_shape_mismatch_module(backend, cls, nshape, shape, exp, got):
    with raises(ValueError, "normalized_shape", exp, got):
        getattr(nlnn, cls)(nshape)(x_(*shape))


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("nshape,shape,exp,got", NSHAPE, ids=[f"{n}-vs-{s}" for n, s, _, _ in NSHAPE])
def test_normalized_shape_mismatch_functional(backend, fn, nshape, shape, exp, got):
    with raises(ValueError, "normalized_shape", exp, got):
        getattr(NF, fn)(x_(*shape), nshape)


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
def test_weight_shape_vs_normalized_shape_functional(backend, fn):
    with raises(ValueError, "weight", shape_re(3, 5), shape_re(3, 4)):
        getattr(NF, fn)(x_(2, 3, 4), (3, 4), torch.ones(3, 5))


# ----------------------------------------------------------------------------
# eps <= 0
# ----------------------------------------------------------------------------
EPS_MODULES = [
    ("BatchNorm1d", lambda eps: nlnn.BatchNorm1d(3, eps=eps), (4, 3)),
    ("BatchNorm2d", lambda eps: nlnn.BatchNorm2d(3, eps=eps), (2, 3, 2, 2)),
    ("BatchNorm3d", lambda eps: nlnn.BatchNorm3d(3, eps=eps), (2, 3, 2, 2, 2)),
    ("InstanceNorm1d", lambda eps: nlnn.InstanceNorm1d(3, eps=eps), (2, 3, 4)),
    ("InstanceNorm2d", lambda eps: nlnn.InstanceNorm2d(3, eps=eps), (2, 3, 4, 4)),
    ("GroupNorm", lambda eps: nlnn.GroupNorm(1, 3, eps=eps), (2, 3, 4)),
    ("LayerNorm", lambda eps: nlnn.LayerNorm(4, eps=eps), (2, 4)),
    ("RMSNorm", lambda eps: nlnn.RMSNorm(4, eps=eps), (2, 4)),
]
EPS_VALUES = [(-0.5, r"-0\.5(?!\d)"), (-1e-3, r"(-0\.001|-1e-0?3)(?!\d)")]
NON_NEGATIVE = r"(>=\s*0|non-negative|at least 0)"


@pytest.mark.parametrize("eps,eps_re", EPS_VALUES, ids=["-0.5", "-1e-3"])
@pytest.mark.parametrize("cid,factory,shape", EPS_MODULES, ids=[c[0] for c in EPS_MODULES])
def test_negative_eps_rejected_module(backend, cid, factory, shape, eps, eps_re):
    with raises(ValueError, r"\beps\b", NON_NEGATIVE, eps_re):
        factory(eps)(x_(*shape))


@pytest.mark.parametrize("cid,factory,shape", EPS_MODULES, ids=[c[0] for c in EPS_MODULES])
def test_eps_zero_accepted_as_torch_module(backend, cid, factory, shape):
    """torch accepts eps=0 (a constant group then divides 0 by 0); normlab matches it."""
    m = factory(0.0)
    twin = getattr(torch.nn, cid)(**{k: getattr(m, k) for k in _ctor_keys(m)})
    twin.load_state_dict(m.state_dict())
    x = x_(*shape)
    x[0] = 1.0  # a constant row/sample: NaN where torch gives NaN
    try:
        expected = twin(x)
    except ValueError:  # torch's batch norm refuses eps=0 for batch statistics: so does normlab
        with raises(ValueError, r"\beps\b", r"> 0", r"(?<![\d.])0(?![\d.])"):
            m(x)
        return
    y = m(x)
    if cid.startswith("Instance"):
        # Documented difference: torch's InstanceNorm runs its batch-norm kernel, which defines
        # 1/sqrt(0 + 0) as 0 (a constant instance gives β); normlab gives NaN there, as torch's
        # GroupNorm and LayerNorm do. Everywhere else the outputs agree.
        const = (x == x[:, :, :1].expand_as(x)).flatten(2).all(-1)
        assert torch.isnan(y[const]).all() and torch.isfinite(expected[const]).all()
        y, expected = y[~const], expected[~const]
    torch.testing.assert_close(y, expected, equal_nan=True, rtol=1e-5, atol=1e-5)


def _ctor_keys(m):
    if isinstance(m, torch.nn.GroupNorm):
        return ("num_groups", "num_channels", "eps")
    if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        return ("normalized_shape", "eps")
    return ("num_features", "eps")


EPS_FUNCTIONAL = [
    ("batch_norm", lambda eps: NF.batch_norm(x_(4, 3), None, None, training=True, eps=eps)),
    ("batch_norm-eval", lambda eps: NF.batch_norm(x_(4, 3), torch.zeros(3), torch.ones(3), eps=eps)),
    ("instance_norm", lambda eps: NF.instance_norm(x_(2, 3, 4), eps=eps)),
    ("group_norm", lambda eps: NF.group_norm(x_(2, 3, 4), 1, eps=eps)),
    ("layer_norm", lambda eps: NF.layer_norm(x_(2, 4), (4,), eps=eps)),
    ("rms_norm", lambda eps: NF.rms_norm(x_(2, 4), (4,), eps=eps)),
]


@pytest.mark.parametrize("eps,eps_re", EPS_VALUES, ids=["-0.5", "-1e-3"])
@pytest.mark.parametrize("cid,call", EPS_FUNCTIONAL, ids=[c[0] for c in EPS_FUNCTIONAL])
def test_negative_eps_rejected_functional(backend, cid, call, eps, eps_re):
    with raises(ValueError, r"\beps\b", NON_NEGATIVE, eps_re):
        call(eps)


@pytest.mark.parametrize("cid,call", EPS_FUNCTIONAL, ids=[c[0] for c in EPS_FUNCTIONAL])
def test_eps_zero_accepted_functional(backend, cid, call):
    if cid == "batch_norm":  # batch statistics with eps=0: torch raises, so does normlab
        with raises(ValueError, r"\beps\b", r"> 0"):
            call(0.0)
        with pytest.raises(ValueError, match="eps"):
            torch.nn.functional.batch_norm(x_(4, 3), None, None, training=True, eps=0.0)
        return
    assert torch.isfinite(call(0.0)).all()


# ----------------------------------------------------------------------------
# momentum outside [0, 1]
# ----------------------------------------------------------------------------
MOM_MODULES = [
    ("BatchNorm1d", lambda m: nlnn.BatchNorm1d(3, momentum=m), (4, 3)),
    ("BatchNorm2d", lambda m: nlnn.BatchNorm2d(3, momentum=m), (2, 3, 2, 2)),
    ("InstanceNorm1d", lambda m: nlnn.InstanceNorm1d(3, momentum=m, track_running_stats=True), (2, 3, 4)),
    ("MeanOnlyBatchNorm", lambda m: nlnn.MeanOnlyBatchNorm(3, momentum=m), (4, 3)),
]
MOM_VALUES = [(1.5, r"1\.5(?!\d)"), (-0.1, r"-0\.1(?!\d)"), (2.0, r"(?<![\d.])2(\.0*)?(?!\d)")]


@pytest.mark.parametrize("mom,mom_re", MOM_VALUES, ids=["1.5", "-0.1", "2.0"])
@pytest.mark.parametrize("cid,factory,shape", MOM_MODULES, ids=[c[0] for c in MOM_MODULES])
def test_momentum_outside_unit_interval_module(backend, cid, factory, shape, mom, mom_re):
    with raises(ValueError, "momentum", UNIT_INTERVAL, mom_re):
        factory(mom)(x_(*shape))


MOM_FUNCTIONAL = [
    ("batch_norm", lambda m: NF.batch_norm(x_(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=m)),
    ("instance_norm", lambda m: NF.instance_norm(x_(2, 3, 4), torch.zeros(3), torch.ones(3), momentum=m)),
    ("mean_only", lambda m: NF.mean_only_batch_norm(x_(4, 3), torch.zeros(3), training=True, momentum=m)),
]


@pytest.mark.parametrize("mom,mom_re", MOM_VALUES, ids=["1.5", "-0.1", "2.0"])
@pytest.mark.parametrize("cid,call", MOM_FUNCTIONAL, ids=[c[0] for c in MOM_FUNCTIONAL])
def test_momentum_outside_unit_interval_functional(backend, cid, call, mom, mom_re):
    with raises(ValueError, "momentum", UNIT_INTERVAL, mom_re):
        call(mom)


@pytest.mark.parametrize("mom", [0.0, 1.0, None])
def test_momentum_boundaries_are_valid(backend, mom):
    m = nlnn.BatchNorm1d(3, momentum=mom)
    m(x_(4, 3))  # no error


# ----------------------------------------------------------------------------
# BatchNorm training with one value per channel
# ----------------------------------------------------------------------------
ONE_VALUE_MSG = [r"variance", r"(?<![\d.])(0(\.0*)?|zero)(?![\d.])", r"(GroupNorm|LayerNorm)", r"eval"]


@pytest.mark.parametrize("factory,shape", [
    (lambda: nlnn.BatchNorm1d(3), (1, 3)),
    (lambda: nlnn.BatchNorm1d(3), (1, 3, 1)),
    (lambda: nlnn.BatchNorm2d(3), (1, 3, 1, 1)),
    (lambda: nlnn.BatchNorm3d(3), (1, 3, 1, 1, 1)),
    (lambda: nlnn.BatchNorm2d(3, track_running_stats=False), (1, 3, 1, 1)),
], ids=["bn1d-NC", "bn1d-NCL", "bn2d", "bn3d", "bn2d-notrack"])
def test_batch_norm_one_value_per_channel_in_training(backend, factory, shape):
    with raises(ValueError, *ONE_VALUE_MSG):
        call_module(factory, x_(*shape), train=True)
    # eval mode with running statistics is fine
    m = factory()
    if m.track_running_stats:
        m.eval()
        assert m(x_(*shape)).shape == shape


def test_functional_batch_norm_one_value_per_channel(backend):
    with raises(ValueError, *ONE_VALUE_MSG):
        NF.batch_norm(x_(1, 3), torch.zeros(3), torch.ones(3), training=True)
    with raises(ValueError, *ONE_VALUE_MSG):
        NF.batch_norm(x_(1, 3, 1, 1), None, None, training=True)


# ----------------------------------------------------------------------------
# empty batch
# ----------------------------------------------------------------------------
EMPTY_MODULES = [
    ("BatchNorm1d", (3,), (0, 3)),
    ("BatchNorm2d", (3,), (0, 3, 4, 4)),
    ("BatchNorm3d", (3,), (0, 3, 2, 2, 2)),
    ("InstanceNorm2d", (3,), (0, 3, 4, 4)),
    ("GroupNorm", (1, 3), (0, 3, 4)),
    ("GroupNorm", (1, 3), (2, 3, 0)),
    ("LayerNorm", (4,), (0, 4)),
    ("LayerNorm", (4,), (3, 0, 4)),
    ("RMSNorm", (4,), (0, 4)),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cid,args,shape", EMPTY_MODULES, ids=[f"{c[0]}-{'x'.join(map(str, c[2]))}" for c in EMPTY_MODULES])
def test_empty_input_behaves_as_torch(backend, cid, args, shape, train):
    """An empty batch (detection heads, an empty data-parallel rank) is not an error: empty
    output, empty/zero gradients and running statistics exactly as torch leaves them."""
    kw = {"affine": True, "track_running_stats": True} if cid.startswith("Instance") else {}
    m = getattr(nlnn, cid)(*args, **kw).train(train)
    t = getattr(torch.nn, cid)(*args, **kw).train(train)
    t.load_state_dict(m.state_dict())
    x = torch.randn(shape, requires_grad=True)
    xt = x.detach().clone().requires_grad_()
    y = m(x)
    assert y.shape == shape
    try:
        yt = t(xt)
    except IndexError:  # torch's InstanceNorm with running stats crashes on an empty batch (2.13)
        yt = None
    y.sum().backward()
    assert x.grad.shape == shape
    if yt is None:
        assert cid.startswith("Instance")
        for (name, b), b0 in zip(m.named_buffers(), getattr(torch.nn, cid)(*args, **kw).buffers()):
            torch.testing.assert_close(b, b0, msg=name)  # running statistics untouched
        return
    yt.sum().backward()
    for (name, p), pt in zip(m.named_parameters(), t.parameters()):
        # torch's GroupNorm gives dγ = NaN when there are no positions; a sum over nothing is 0
        expected = torch.where(torch.isnan(pt.grad), torch.zeros_like(pt.grad), pt.grad)
        torch.testing.assert_close(p.grad, expected, msg=name)
    for (name, b), bt in zip(m.named_buffers(), t.buffers()):
        torch.testing.assert_close(b, bt, msg=name)


def test_empty_input_mean_only_batch_norm(backend):
    m = nlnn.MeanOnlyBatchNorm(3)
    m.running_mean.fill_(0.5)
    y = m(torch.randn(0, 3, 4))
    assert y.shape == (0, 3, 4)
    assert torch.equal(m.running_mean, torch.full((3,), 0.5))


EMPTY_FUNCTIONAL = [
    ("batch_norm", lambda x: NF.batch_norm(x, None, None, training=True),
     lambda x: torch.nn.functional.batch_norm(x, None, None, training=True), (0, 3)),
    ("batch_norm-eval", lambda x: NF.batch_norm(x, torch.zeros(3), torch.ones(3), training=False),
     lambda x: torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=False), (0, 3, 2)),
    ("instance_norm", NF.instance_norm, torch.nn.functional.instance_norm, (0, 3, 4)),
    ("group_norm", lambda x: NF.group_norm(x, 1), lambda x: torch.nn.functional.group_norm(x, 1), (0, 3, 4)),
    ("layer_norm", lambda x: NF.layer_norm(x, (4,)), lambda x: torch.nn.functional.layer_norm(x, (4,)), (0, 4)),
    ("rms_norm", lambda x: NF.rms_norm(x, (4,)), lambda x: torch.nn.functional.rms_norm(x, (4,)), (0, 4)),
]


@pytest.mark.parametrize("cid,ours,theirs,shape", EMPTY_FUNCTIONAL, ids=[c[0] for c in EMPTY_FUNCTIONAL])
def test_empty_input_functional(backend, cid, ours, theirs, shape):
    x = torch.randn(shape)
    assert ours(x).shape == theirs(x).shape == shape


# ----------------------------------------------------------------------------
# integer and boolean dtypes
# ----------------------------------------------------------------------------
DTYPE_MODULES = [
    ("BatchNorm1d", lambda: nlnn.BatchNorm1d(3), (4, 3)),
    ("BatchNorm2d", lambda: nlnn.BatchNorm2d(3), (2, 3, 2, 2)),
    ("InstanceNorm1d", lambda: nlnn.InstanceNorm1d(3), (2, 3, 4)),
    ("GroupNorm", lambda: nlnn.GroupNorm(1, 3), (2, 3, 4)),
    ("LayerNorm", lambda: nlnn.LayerNorm(4), (2, 4)),
    ("RMSNorm", lambda: nlnn.RMSNorm(4), (2, 4)),
    ("MeanOnlyBatchNorm", lambda: nlnn.MeanOnlyBatchNorm(3), (4, 3)),
]
BAD_DTYPES = [(torch.int64, r"int64|\blong\b"), (torch.int32, r"int32|\bint\b"), (torch.uint8, r"uint8"),
              (torch.bool, r"bool")]
FLOATING = r"(float|floating)"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,dtype_re", BAD_DTYPES, ids=["int64", "int32", "uint8", "bool"])
@pytest.mark.parametrize("cid,factory,shape", DTYPE_MODULES, ids=[c[0] for c in DTYPE_MODULES])
def test_integer_and_bool_dtypes_module(backend, cid, factory, shape, dtype, dtype_re, train):
    with raises(TypeError, r"(input|dtype)", FLOATING, dtype_re):
        call_module(factory, x_(*shape, dtype=dtype), train)


DTYPE_FUNCTIONAL = [
    ("batch_norm", lambda x: NF.batch_norm(x, None, None, training=True), (4, 3)),
    ("batch_norm-eval", lambda x: NF.batch_norm(x, torch.zeros(3), torch.ones(3)), (4, 3)),
    ("instance_norm", lambda x: NF.instance_norm(x), (2, 3, 4)),
    ("group_norm", lambda x: NF.group_norm(x, 1), (2, 3, 4)),
    ("layer_norm", lambda x: NF.layer_norm(x, (4,)), (2, 4)),
    ("rms_norm", lambda x: NF.rms_norm(x, (4,)), (2, 4)),
    ("mean_only", lambda x: NF.mean_only_batch_norm(x, torch.zeros(3), training=True), (4, 3)),
]


@pytest.mark.parametrize("dtype,dtype_re", BAD_DTYPES, ids=["int64", "int32", "uint8", "bool"])
@pytest.mark.parametrize("cid,call,shape", DTYPE_FUNCTIONAL, ids=[c[0] for c in DTYPE_FUNCTIONAL])
def test_integer_and_bool_dtypes_functional(backend, cid, call, shape, dtype, dtype_re):
    with raises(TypeError, r"(input|dtype)", FLOATING, dtype_re):
        call(x_(*shape, dtype=dtype))


# ----------------------------------------------------------------------------
# num_features / num_channels / num_groups <= 0
# ----------------------------------------------------------------------------
NONPOS = [
    ("BatchNorm1d-0", lambda: nlnn.BatchNorm1d(0), "num_features", 0),
    ("BatchNorm2d--1", lambda: nlnn.BatchNorm2d(-1), "num_features", -1),
    ("BatchNorm3d-0", lambda: nlnn.BatchNorm3d(0), "num_features", 0),
    ("InstanceNorm1d-0", lambda: nlnn.InstanceNorm1d(0), "num_features", 0),
    ("InstanceNorm2d--2", lambda: nlnn.InstanceNorm2d(-2, affine=True), "num_features", -2),
    ("MeanOnlyBatchNorm-0", lambda: nlnn.MeanOnlyBatchNorm(0), "num_features", 0),
    ("GroupNorm-groups0", lambda: nlnn.GroupNorm(0, 4), "num_groups", 0),
    ("GroupNorm-channels0", lambda: nlnn.GroupNorm(1, 0), "num_channels", 0),
    ("GroupNorm-channels-3", lambda: nlnn.GroupNorm(1, -3), "num_channels", -3),
]


@pytest.mark.parametrize("cid,factory,argname,value", NONPOS, ids=[c[0] for c in NONPOS])
def test_nonpositive_sizes(cid, factory, argname, value):
    with raises(ValueError, argname, POSITIVE, num(value)):
        factory()


def test_functional_group_norm_nonpositive_groups(backend):
    with raises(ValueError, "num_groups", POSITIVE, num(0)):
        NF.group_norm(x_(2, 4, 3), 0)
