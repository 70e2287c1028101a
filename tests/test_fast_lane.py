"""The eager fast lane (core/ops.py ``_Lane``, the CPU backend's ``lane``) and the one-call
running-statistic updates: the same numbers as the operator path, taken exactly when it should be."""

import pytest
import torch

import normlab
import normlab.functional as F
from normlab.core import cpu, ops


def _cases():
    cl = torch.channels_last
    yield "bn", lambda x, w, b, be: F.batch_norm(x, None, None, w, b, True, backend=be), (8, 6, 5, 5), None
    yield "bn-cl", lambda x, w, b, be: F.batch_norm(x, None, None, w, b, True, backend=be), (8, 6, 5, 5), cl
    yield "bn-rows", lambda x, w, b, be: F.batch_norm(x, None, None, w, b, True, backend=be), (8, 6), None
    yield "gn", lambda x, w, b, be: F.group_norm(x, 3, w, b, backend=be), (4, 6, 5, 5), None
    yield "gn-cl", lambda x, w, b, be: F.group_norm(x, 2, w, b, backend=be), (4, 6, 5, 5), cl
    yield "ln", lambda x, w, b, be: F.layer_norm(x, (6,), w, b, backend=be), (4, 7, 6), None
    yield "rms", lambda x, w, b, be: F.rms_norm(x, (6,), w, backend=be), (4, 7, 6), None


CASES = list(_cases())


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = cpu.lane_forward

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(cpu, "lane_forward", counted)
    return calls


def _run(fn, shape, fmt, backend, affine=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x.requires_grad_()
    c = shape[1] if len(shape) < 3 or shape[-1] != 6 else 6
    w = (torch.rand(c, generator=g) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, generator=g).requires_grad_() if affine else None
    y = fn(x, w, b, backend)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    return y.detach(), [t.grad for t in (x, w, b) if t is not None], y


@pytest.mark.parametrize("name,fn,shape,fmt", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("affine", [True, False])
def test_lane_equals_the_operator_path_bitwise(spy, name, fn, shape, fmt, affine):
    y_lane, g_lane, y = _run(fn, shape, fmt, None, affine)
    assert spy, "the default eager float32 call should take the fast lane"
    n = len(spy)
    y_op, g_op, y2 = _run(fn, shape, fmt, "cpu", affine)  # a named backend takes the operator path
    assert len(spy) == n
    assert torch.equal(y_lane, y_op)
    assert y.stride() == y2.stride()
    for a, b in zip(g_lane, g_op):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("name,fn,shape,fmt", CASES[:1] + CASES[3:4] + CASES[5:6], ids=["bn", "gn", "ln"])
def test_lane_double_backward_equals_the_operator_path(name, fn, shape, fmt):
    def second(backend):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(shape, generator=g).requires_grad_()
        c = shape[-1] if name == "ln" else shape[1]
        w = (torch.rand(c, generator=g) + 0.5).requires_grad_()
        y = fn(x, w, None, backend)
        (gx,) = torch.autograd.grad((y * y.detach().sin()).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, w))

    for a, b in zip(second(None), second("cpu")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_lane_not_taken_when_a_backend_is_forced_or_for_float64(spy):
    x = torch.randn(4, 6, 3, 3)
    with normlab.use_backend("reference"):
        F.group_norm(x, 3)
    F.group_norm(x.double(), 3)
    F.group_norm(torch.empty(0, 6, 3, 3), 3)
    assert not spy
    with torch.no_grad():
        F.group_norm(x, 3)
    assert len(spy) == 1  # no-grad calls take it too


def test_lane_outputs_have_the_operator_statistics():
    x = torch.randn(4, 6, 3, 3)
    for args in ((x, None, None, 1e-5, False, ""), (x, None, None, 1e-5, True, "")):
        lane, op = ops.call("batch_norm", *args), ops._IMPLS["batch_norm"](*args)
        for a, b in zip(lane, op):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b)
    xr = torch.randn(5, 8)
    args = (xr, None, None, 1, 1e-5, True, "")
    for a, b in zip(ops.call("layer_norm", *args), ops._IMPLS["layer_norm"](*args)):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_lane_inf_input_gives_torch_means():
    x = torch.randn(4, 3, 2, 2)
    x[1, 0, 0, 0] = float("inf")
    _, mean, _, _ = ops.call("batch_norm", x, None, None, 1e-5, False, "")
    assert mean[0] == float("inf")


# ------------------------------------------------------------------------------ running statistics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_match_torch(dtype, momentum):
    torch.manual_seed(0)
    ours = normlab.nn.BatchNorm2d(6, momentum=momentum, dtype=dtype)
    theirs = torch.nn.BatchNorm2d(6, momentum=momentum, dtype=dtype)
    for _ in range(5):
        x = torch.randn(8, 6, 4, 4, dtype=dtype) * 2 + 3
        ours(x)
        theirs(x)
    # the batch statistics come from different summation orders (normlab: float64 blocks; torch:
    # its own), a few ulp apart; the update adds at most an ulp per step
    tol = 64 * torch.finfo(dtype).eps
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=tol, atol=0)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=tol, atol=0)
    assert ours.num_batches_tracked == theirs.num_batches_tracked


def test_running_update_equals_the_tensor_op_formula_exactly():
    rm = torch.randn(7)
    rv = torch.rand(7) + 0.5
    mean = torch.randn(7, dtype=torch.float64)
    var = torch.rand(7, dtype=torch.float64)
    want_m = rm * torch.tensor(0.9, dtype=torch.float32) + torch.tensor(0.1, dtype=torch.float32) * mean.float()
    want_v = rv * torch.tensor(0.9, dtype=torch.float32) + torch.tensor(0.1, dtype=torch.float32) * (var * (9 / 8)).float()
    cpu.update_bn_running(rm, rv, mean, var, 0.1, 9 / 8)
    assert torch.equal(rm, want_m)
    assert torch.equal(rv, want_v)


def test_running_update_bumps_the_version_counter():
    """A running statistic saved by an eval-mode forward and then updated by a training step is
    a stale saved tensor: autograd must refuse it, as it does for torch's BatchNorm."""
    m = normlab.nn.BatchNorm2d(3).eval()
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    with normlab.use_backend("reference"):  # saves running_var for its backward
        y = m(x)
    m.train()(torch.randn(4, 3, 2, 2))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_running_update_under_compile_and_functorch_keeps_torch_ops():
    m = normlab.nn.BatchNorm1d(4)
    x = torch.randn(8, 4)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    compiled(x)
    assert m.num_batches_tracked == 1
    ref = torch.nn.BatchNorm1d(4)
    ref(x)
    torch.testing.assert_close(m.running_mean, ref.running_mean)
