"""Tests for normlab.nn.utils.weight_norm (weight normalization as a parametrization)."""

from __future__ import annotations

import copy
import io
import pickle
import shutil

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from normlab.nn.utils import WeightNorm, init_weight_norm_, is_weight_normed, remove_weight_norm, weight_norm


def _reference(v: Tensor, g: Tensor, dim: int | None) -> Tensor:
    """w = g v / ||v|| written out directly (norm over every dim but `dim`)."""
    if dim is None:
        return g * v / torch.linalg.vector_norm(v)
    dims = [d for d in range(v.ndim) if d != dim]
    return g * v / torch.linalg.vector_norm(v, dim=dims, keepdim=True)


# (factory, input shape, expected default dim)
MODULES = {
    "linear": (lambda: nn.Linear(5, 4), (3, 5), 0),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 7), 0),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, groups=1, padding_mode="reflect", padding=1), (2, 3, 6, 5), 0),
    "conv3d": (lambda: nn.Conv3d(2, 4, 2), (2, 2, 4, 4, 3), 0),
    "convtranspose1d": (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), (2, 3, 5), 1),
    "convtranspose2d": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1), (2, 3, 4, 4), 1),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- the parametrization


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_registration_keeps_function_and_normalizes_per_output_unit(kind: str) -> None:
    factory, shape, expected_dim = MODULES[kind]
    module = factory().double()
    x = torch.randn(shape, dtype=torch.float64)
    before = module(x)
    assert weight_norm(module) is module
    assert is_weight_normed(module)
    assert module.parametrizations.weight[0].dim == expected_dim
    torch.testing.assert_close(module(x), before, rtol=1e-12, atol=1e-12)

    g = module.parametrizations.weight.original0
    v = module.parametrizations.weight.original1
    with torch.no_grad():
        g.copy_(torch.rand_like(g) + 0.5)
        v.mul_(torch.rand_like(v) * 3)
    w = module.weight
    torch.testing.assert_close(w, _reference(v, g, expected_dim))
    # one g per output unit: the norm of each output unit's weight slice is g
    out_dim = expected_dim
    unit_norms = torch.linalg.vector_norm(w, dim=[d for d in range(w.ndim) if d != out_dim])
    torch.testing.assert_close(unit_norms, g.flatten(), rtol=1e-12, atol=1e-12)
    assert g.shape[out_dim] == w.shape[out_dim] and g.numel() == w.shape[out_dim]


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_matches_torch_weight_norm_for_same_g_and_v(kind: str) -> None:
    factory, shape, _ = MODULES[kind]
    ours, theirs = factory(), factory()
    theirs.load_state_dict(ours.state_dict())
    weight_norm(ours, dim=0)
    parametrizations.weight_norm(theirs, dim=0)
    with torch.no_grad():
        g = torch.rand_like(ours.parametrizations.weight.original0) + 0.5
        v = torch.randn_like(ours.parametrizations.weight.original1)
        for m in (ours, theirs):
            m.parametrizations.weight.original0.copy_(g)
            m.parametrizations.weight.original1.copy_(v)
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x))
    # Same state_dict layout: a checkpoint of torch's weight_norm loads into ours as is.
    fresh = weight_norm(factory(), dim=0)
    fresh.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(fresh(x), theirs(x))


def test_dim_none_uses_whole_tensor_norm() -> None:
    conv = weight_norm(nn.Conv2d(3, 4, 3), dim=None)
    g = conv.parametrizations.weight.original0
    v = conv.parametrizations.weight.original1
    assert g.shape == ()  # scalar g
    with torch.no_grad():
        g.fill_(2.5)
    torch.testing.assert_close(conv.weight, 2.5 * v / v.norm())
    torch.testing.assert_close(conv.weight.norm(), torch.tensor(2.5))


def test_explicit_and_negative_dim() -> None:
    a = weight_norm(nn.Linear(5, 4), dim=-1)  # torch convention: -1 is the last dim (here 1)
    assert a.parametrizations.weight[0].dim == 1
    assert a.parametrizations.weight.original0.shape == (1, 5)
    torch.testing.assert_close(a.weight.norm(dim=0), a.parametrizations.weight.original0.flatten())
    t = weight_norm(nn.ConvTranspose2d(3, 4, 3), dim=0)  # per input channel, if asked for
    assert t.parametrizations.weight.original0.shape == (3, 1, 1, 1)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_gradcheck_wrt_g_and_v(dim: int | None) -> None:
    wn = WeightNorm(dim)
    v = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    g = (wn.right_inverse(v.detach())[0] * (torch.rand(()) + 0.5)).requires_grad_()
    x = torch.randn(5, 6, dtype=torch.float64)

    def f(g: Tensor, v: Tensor) -> Tensor:
        return x @ wn(g, v).reshape(4, 6).T

    assert torch.autograd.gradcheck(f, (g, v))
    assert torch.autograd.gradgradcheck(f, (g, v))


def test_gradients_through_module_reach_g_and_v() -> None:
    lin = weight_norm(nn.Linear(3, 2).double())
    lin(torch.randn(4, 3, dtype=torch.float64)).square().sum().backward()
    g, v = lin.parametrizations.weight.original0, lin.parametrizations.weight.original1
    assert g.grad is not None and v.grad is not None
    # The gradient w.r.t. v is orthogonal to v (per unit): w does not depend on ||v||.
    torch.testing.assert_close((v.grad * v).sum(1), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_zero_v_gives_no_nan() -> None:
    lin = weight_norm(nn.Linear(3, 2))
    with torch.no_grad():
        lin.parametrizations.weight.original1[0].zero_()
    out = lin(torch.randn(4, 3))
    assert torch.isfinite(out).all()
    assert torch.all(lin.weight[0] == 0)
    out.sum().backward()
    for p in lin.parametrizations.weight.parameters():
        assert torch.isfinite(p.grad).all()


def test_half_precision_norm_is_computed_in_float32() -> None:
    # 300^2 * 8 overflows float16 (max 65504); the norm must not.
    v = torch.full((2, 8), 300.0, dtype=torch.float16)
    wn = WeightNorm(0)
    g, v2 = wn.right_inverse(v)
    assert g.dtype == torch.float16 and torch.isfinite(g).all()
    w = wn(torch.ones(2, 1, dtype=torch.float16), v)
    assert w.dtype == torch.float16
    torch.testing.assert_close(w, torch.full((2, 8), 8**-0.5, dtype=torch.float16))


def test_assigning_weight_sets_g_and_v() -> None:
    lin = weight_norm(nn.Linear(3, 2))
    new = torch.randn(2, 3)
    with torch.no_grad():
        lin.weight = new
    torch.testing.assert_close(lin.weight, new)
    torch.testing.assert_close(lin.parametrizations.weight.original0.flatten(), new.norm(dim=1))


# --------------------------------------------------------------------------- RNNs


@pytest.mark.parametrize("rnn_cls", [nn.LSTM, nn.GRU])
def test_rnn_weights(rnn_cls: type[nn.RNNBase]) -> None:
    rnn = rnn_cls(3, 4, num_layers=2)
    x = torch.randn(6, 2, 3)
    before = rnn(x)[0]
    weight_norm(rnn, "weight_hh_l0")
    weight_norm(rnn, "weight_ih_l0")
    weight_norm(rnn, "weight_ih_l1", dim=None)
    torch.testing.assert_close(rnn(x)[0], before)
    # Changing g must reach the RNN kernel, i.e. the cached _flat_weights get refreshed.
    with torch.no_grad():
        rnn.parametrizations.weight_hh_l0.original0.mul_(3.0)
    after = rnn(x)[0]
    assert not torch.allclose(after, before)
    idx = rnn._flat_weights_names.index("weight_hh_l0")
    torch.testing.assert_close(rnn._flat_weights[idx], rnn.weight_hh_l0)
    # ... and training reaches g and v.
    after.sum().backward()
    assert rnn.parametrizations.weight_hh_l0.original0.grad is not None
    assert rnn.parametrizations.weight_hh_l0.original1.grad is not None
    # deepcopy after a forward pass (torch's own parametrization fails here: _flat_weights hold
    # non-leaf tensors) and pickle of the whole module.
    for clone in (copy.deepcopy(rnn), pickle.loads(pickle.dumps(rnn))):
        torch.testing.assert_close(clone(x)[0], after)
    remove_weight_norm(rnn, "weight_hh_l0")
    remove_weight_norm(rnn, "weight_ih_l0")
    remove_weight_norm(rnn, "weight_ih_l1")
    assert type(rnn) is rnn_cls
    torch.testing.assert_close(rnn(x)[0], after, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- copies and checkpoints


def _perturbed(kind: str) -> tuple[nn.Module, Tensor]:
    factory, shape, _ = MODULES[kind]
    module = weight_norm(factory())
    with torch.no_grad():
        module.parametrizations.weight.original0.mul_(1.7)  # ||v|| != g: copies must keep both
    return module, torch.randn(shape)


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_deepcopy_and_pickle(kind: str) -> None:
    module, x = _perturbed(kind)
    expected = module(x)
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert is_weight_normed(clone) and type(clone).__bases__[0] is type(module).__bases__[0]
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
        # independent parameters
        v_clone, v_orig = clone.parametrizations.weight.original1, module.parametrizations.weight.original1
        assert v_clone.data_ptr() != v_orig.data_ptr()
        # and still fully functional: train step, then remove
        clone(x).sum().backward()
        assert clone.parametrizations.weight.original0.grad is not None
        remove_weight_norm(clone)
        torch.testing.assert_close(clone(x), expected, rtol=1e-6, atol=1e-6)


def test_pickle_a_model_with_shared_and_nested_modules() -> None:
    lin = weight_norm(nn.Linear(4, 4))
    model = nn.Sequential(lin, nn.ReLU(), lin, weight_norm(nn.Linear(4, 2)))
    x = torch.randn(3, 4)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded[0] is loaded[2]  # sharing survives
    dc = copy.deepcopy(model)
    assert dc[0] is dc[2]


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_state_dict_roundtrip(kind: str) -> None:
    module, x = _perturbed(kind)
    sd = module.state_dict()
    assert "parametrizations.weight.original0" in sd and "parametrizations.weight.original1" in sd
    assert "weight" not in sd
    fresh = weight_norm(MODULES[kind][0]())
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), module(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_remove_weight_norm(kind: str) -> None:
    module, x = _perturbed(kind)
    expected = module(x)
    cls = type(module).__bases__[0]
    assert remove_weight_norm(module) is module
    assert type(module) is cls and not parametrize.is_parametrized(module)
    assert isinstance(module.weight, nn.Parameter) and module.weight.requires_grad
    assert "weight" in module.state_dict()
    torch.testing.assert_close(module(x), expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- torch.compile


# torch.compile's own imports trigger this DeprecationWarning inside torch; not ours to fix.
_JIT_DEPRECATION = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"


@pytest.mark.filterwarnings(_JIT_DEPRECATION)
def test_compile_aot_eager_matches_eager() -> None:
    """Dynamo traces the parametrization property (fullgraph) and AOTAutograd differentiates it."""
    module, x = _perturbed("conv1d")
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x))
    compiled(x).sum().backward()
    g_grad = module.parametrizations.weight.original0.grad.clone()
    module.zero_grad()
    module(x).sum().backward()
    torch.testing.assert_close(g_grad, module.parametrizations.weight.original0.grad)


@pytest.mark.slow
@pytest.mark.filterwarnings(_JIT_DEPRECATION)
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler"
)
def test_compile_inductor_matches_eager() -> None:
    """Real CPU codegen (inductor + C++): outputs match eager, and a later change of g is seen."""
    lin = weight_norm(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    # Inference graph only (gradients are covered by the aot_eager test): keeps the compile short.
    with torch.no_grad():
        compiled = torch.compile(lin, backend="inductor", fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(x), lin(x))
        lin.parametrizations.weight.original0.mul_(2.0)
        torch.testing.assert_close(compiled(x), lin(x))


# --------------------------------------------------------------------------- data-dependent init


def _unit_stats(model: nn.Module, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-output-unit mean and std of every weight-normed layer's output on x."""
    stats: dict[str, tuple[Tensor, Tensor]] = {}

    def make_hook(name: str, unit_dim: int):
        def hook(_m: nn.Module, _args: tuple[Tensor, ...], out: Tensor) -> None:
            dims = [d for d in range(out.ndim) if d != unit_dim % out.ndim]
            stats[name] = (out.mean(dim=dims), out.std(dim=dims, correction=0))

        return hook

    handles = [
        m.register_forward_hook(make_hook(name, -1 if isinstance(m, nn.Linear) else 1))
        for name, m in model.named_modules()
        if is_weight_normed(m)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return stats


def _check_init(model: nn.Module, x: Tensor, n_layers: int) -> None:
    assert init_weight_norm_(model, x) is model
    stats = _unit_stats(model, x)
    assert len(stats) == n_layers
    for name, (mean, std) in stats.items():
        assert mean.abs().max() < 1e-5, name
        assert (std - 1).abs().max() < 1e-4, name


def test_data_dependent_init_mlp() -> None:
    model = nn.Sequential(
        weight_norm(nn.Linear(10, 32)), nn.ReLU(),
        weight_norm(nn.Linear(32, 16)), nn.Tanh(),
        weight_norm(nn.Linear(16, 3)),
    ).double()  # fmt: skip
    x = torch.randn(256, 10, dtype=torch.float64) * 4 + 1
    _check_init(model, x, 3)
    # The last layer was initialized on the already-initialized activations: a second init is a no-op.
    g_last = model[4].parametrizations.weight.original0.clone()
    init_weight_norm_(model, x)
    torch.testing.assert_close(model[4].parametrizations.weight.original0, g_last, rtol=1e-9, atol=1e-9)


def test_data_dependent_init_cnn() -> None:
    model = nn.Sequential(
        weight_norm(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU(),
        weight_norm(nn.Conv2d(8, 8, 3, stride=2)), nn.ReLU(),
        weight_norm(nn.ConvTranspose2d(8, 4, 2, stride=2)), nn.ReLU(),
        nn.Flatten(), weight_norm(nn.Linear(4 * 12 * 12, 5)),
    ).double()  # fmt: skip
    x = torch.randn(32, 3, 13, 13, dtype=torch.float64)
    _check_init(model, x, 4)


def test_data_dependent_init_float32_model() -> None:
    model = nn.Sequential(
        weight_norm(nn.Conv1d(2, 6, 3)), nn.ReLU(), nn.Flatten(), weight_norm(nn.Linear(6 * 8, 4))
    )
    x = torch.randn(64, 2, 10)
    init_weight_norm_(model, x)
    for mean, std in _unit_stats(model, x).values():
        assert mean.abs().max() < 1e-4 and (std - 1).abs().max() < 1e-3


def test_data_dependent_init_accepts_tuple_batch_and_skips_plain_layers() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = weight_norm(nn.Linear(3, 4))
            self.plain = nn.Linear(4, 4)  # not weight-normed: left alone

        def forward(self, x: Tensor, shift: Tensor) -> Tensor:
            return self.plain(self.a(x + shift))

    model = TwoInputs().double()
    plain_w = model.plain.weight.clone()
    x = torch.randn(50, 3, dtype=torch.float64)
    init_weight_norm_(model, (x, torch.ones(3, dtype=torch.float64)))
    assert torch.equal(model.plain.weight, plain_w)
    out = model.a(x + 1)
    assert out.mean(0).abs().max() < 1e-5


def test_data_dependent_init_errors() -> None:
    with pytest.raises(ValueError, match="no weight-normalized"):
        init_weight_norm_(nn.Sequential(nn.Linear(2, 2)), torch.randn(3, 2))
    with pytest.raises(ValueError, match="dim=None"):
        init_weight_norm_(weight_norm(nn.Linear(2, 2), dim=None), torch.randn(3, 2))

    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = weight_norm(nn.Linear(2, 2))
            self.unused = weight_norm(nn.Linear(2, 2))

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    with pytest.raises(RuntimeError, match="unused"):
        init_weight_norm_(Skips(), torch.randn(3, 2))
    with pytest.raises(TypeError, match="batch: expected a Tensor"):
        init_weight_norm_(weight_norm(nn.Linear(2, 2)), 3.0)


# --------------------------------------------------------------------------- errors


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"name='wieght' is not a parameter of Linear.*\['weight', 'bias'\]"):
        weight_norm(nn.Linear(2, 2), name="wieght")
    bn = nn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="is a buffer"):
        weight_norm(bn, name="running_mean")
    with pytest.raises(ValueError, match=r"dim=2 is out of range.*\[-2, 1\]"):
        weight_norm(nn.Linear(2, 2), dim=2)
    with pytest.raises(ValueError, match="dim: expected an int, None or 'auto'"):
        weight_norm(nn.Linear(2, 2), dim="last")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dim: expected an int, None or 'auto', got float"):
        weight_norm(nn.Linear(2, 2), dim=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="module: expected a torch.nn.Module"):
        weight_norm(torch.randn(2, 2))  # type: ignore[arg-type]
    twice = weight_norm(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already weight-normalized"):
        weight_norm(twice)
    theirs = parametrizations.weight_norm(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already has a parametrization"):
        weight_norm(theirs)
    with pytest.raises(ValueError, match="not weight-normalized"):
        remove_weight_norm(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not weight-normalized"):
        remove_weight_norm(twice, name="bias")
    with pytest.raises(ValueError, match="dim: expected a non-negative int or None"):
        WeightNorm(-1)
