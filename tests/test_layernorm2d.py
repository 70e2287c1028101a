"""Channels-first LayerNorm (normlab.LayerNorm2d, F.layer_norm_2d) against float64 and torch."""
from __future__ import annotations

import pytest
import torch

import normlab
from normlab import functional as NF
from normlab.core import ops

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPES = [(2, 8, 5, 5), (3, 96, 7, 9), (2, 5, 130), (1, 3, 2, 2, 2), (4, 6), (2, 4, 1, 70)]


def _ref64(x, w, b, eps):
    xd = x.double()
    m = xd.mean(1, keepdim=True)
    v = ((xd - m) ** 2).mean(1, keepdim=True)
    view = (1, -1) + (1,) * (x.dim() - 2)
    return (xd - m) / torch.sqrt(v + eps) * w.double().view(view) + b.double().view(view)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(backend, layout, dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1e3).to(dtype)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    x.requires_grad_()
    w = torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    y = NF.layer_norm_2d(x, w, b, 1e-6, backend=backend)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    yr = _ref64(*leaves, 1e-6)
    tol = {torch.float32: 2e-6, torch.float64: 1e-11}[dtype]
    torch.testing.assert_close(y.double(), yr, rtol=tol, atol=tol * 10)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(y, (x, w, b), dy.to(dtype))
    grads_r = torch.autograd.grad(yr, leaves, dy)
    for name, a, e in zip(("dx", "dw", "db"), grads, grads_r):
        scale = max(1.0, float(e.abs().max()))
        torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol * scale, msg=name)
    if layout == "channels_last" and x.dim() > 2:
        assert y.movedim(1, -1).is_contiguous() and grads[0].movedim(1, -1).is_contiguous()


def test_layer_equals_torch_layernorm_on_permuted_input():
    m = normlab.LayerNorm2d(16)
    assert isinstance(m, torch.nn.LayerNorm) and m.eps == 1e-6 and m.normalized_shape == (16,)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    t = torch.nn.LayerNorm(16, eps=1e-6)
    t.load_state_dict(m.state_dict())
    x = torch.randn(2, 16, 6, 6)
    expected = t(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for backend in ("cpu", "reference"):
        f = lambda x, w, b: NF.layer_norm_2d(x, w, b, 1e-5, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("cl", [False, True])
def test_opcheck(cl):
    x = torch.randn(2, 8, 5, 5)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    for backend in ("", "reference"):
        torch.library.opcheck(ops._ops["layer_norm_channels"], (x.requires_grad_(), w, b, 1e-6, backend))


def test_errors():
    with pytest.raises(ValueError, match=r"weight: expected shape \(3,\), got \(4,\)"):
        NF.layer_norm_2d(torch.randn(2, 3, 4), torch.ones(4))
    with pytest.raises(ValueError, match=r"eps: expected a number >= 0, got -1"):
        normlab.LayerNorm2d(3, eps=-1)
