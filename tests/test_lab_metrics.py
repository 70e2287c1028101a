"""Known-answer tests of normlab.lab.metrics (landscape, ICS, activation and cost measurements)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from normlab.lab import stats as S
from torch import nn

import normlab.nn as lnn
from normlab.lab import metrics as M
from normlab.lab.stats import Interval


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def quadratic(a: torch.Tensor):
    """f(x) = ½ xᵀAx: loss and gradient Ax."""

    def f(x: torch.Tensor):
        x = x.double()
        return float(0.5 * x @ a @ x), a @ x

    return f


def spd(eigs, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T, q


# --------------------------------------------------------------------------------------------
# probe_gradient_direction
# --------------------------------------------------------------------------------------------
def test_beta_smoothness_of_quadratic_is_lambda_max_along_top_eigenvector():
    eigs = [5.0, 2.0, 1.0, 0.3]
    a, q = spd(eigs)
    f = quadratic(a)
    # x = top eigenvector: the gradient A x = 5 x is an eigenvector, β = λmax exactly.
    probe = M.probe_gradient_direction(f, q[:, 0].clone(), step=0.01)
    assert probe.beta_smoothness == pytest.approx(5.0, rel=1e-12)
    # The gradient change is linear in the distance: ‖g_s − g‖ = λ · s · η · ‖g‖.
    for s, c in zip(probe.scales, probe.grad_changes):
        assert c == pytest.approx(5.0 * s * 0.01 * probe.grad_norm, rel=1e-12)


def test_beta_smoothness_of_quadratic_bounded_by_lambda_max_and_equal_to_rayleigh_ratio():
    eigs = [5.0, 2.0, 1.0, 0.3]
    a, _ = spd(eigs, seed=1)
    f = quadratic(a)
    x = torch.randn(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    probe = M.probe_gradient_direction(f, x, step=0.05)
    g = a @ x
    expected = float(torch.linalg.vector_norm(a @ g) / torch.linalg.vector_norm(g))
    assert probe.beta_smoothness == pytest.approx(expected, rel=1e-10)
    assert min(eigs) - 1e-12 <= probe.beta_smoothness <= max(eigs) + 1e-12
    assert probe.beta_smoothness < max(eigs) - 1e-3  # a generic direction is not the top eigenvector


def test_loss_range_of_linear_function():
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def f(x):
        return float(c @ x.double()), c.clone()

    theta = torch.tensor([0.3, 0.1, -1.0], dtype=torch.float64)
    eta = 0.1
    probe = M.probe_gradient_direction(f, theta, eta, scales=(0.25, 0.5, 1, 2, 4))
    # L(θ − sηc) = cᵀθ − sη‖c‖²: range over s ∈ [0.25, 4] is (4 − 0.25)·η·‖c‖².
    assert probe.loss_range == pytest.approx((4 - 0.25) * eta * float(c @ c), rel=1e-12)
    # The gradient of a linear function does not change: predictiveness perfect, β = 0.
    assert probe.max_grad_change == 0.0
    assert probe.beta_smoothness == 0.0
    assert probe.loss0 == pytest.approx(float(c @ theta))


def test_probe_at_a_stationary_point_has_no_direction():
    a, _ = spd([1.0, 2.0])
    probe = M.probe_gradient_direction(quadratic(a), torch.zeros(2, dtype=torch.float64), 0.1)
    assert probe.loss_range == 0.0 and probe.max_grad_change == 0.0
    assert math.isnan(probe.beta_smoothness)


def test_probe_rejects_bad_arguments():
    f = quadratic(torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="scales"):
        M.probe_gradient_direction(f, torch.ones(2), 0.1, scales=(0.5, -1))
    with pytest.raises(ValueError, match="step"):
        M.probe_gradient_direction(f, torch.ones(2), 0.0)


def test_loss_grad_fn_matches_autograd_and_preserve_state_restores_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), lnn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with M.preserve_state(model):
        f = M.loss_grad_fn(model, nn.functional.cross_entropy, (x, y))
        theta = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
        loss, g = f(theta + 0.1)
        f(theta)  # a second call also runs BN in train mode
    # Nothing changed: parameters, running statistics, num_batches_tracked.
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # The gradient is the autograd gradient at θ + 0.1.
    ref = nn.Sequential(nn.Linear(4, 8), lnn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    ref.load_state_dict(state)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1)
    ref_loss = nn.functional.cross_entropy(ref(x), y)
    ref_loss.backward()
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-6)
    assert torch.allclose(g, M.flat_grad(list(ref.parameters())), atol=1e-6)


# --------------------------------------------------------------------------------------------
# internal_covariate_shift
# --------------------------------------------------------------------------------------------
def _net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))


def _values(model, shift: dict[str, float] | None = None):
    out = {}
    for n, p in model.named_parameters():
        out[n] = p.detach().clone() + (shift or {}).get(n, 0.0)
    return out


def test_ics_is_zero_when_the_earlier_layers_do_not_change():
    model = _net()
    batch = (torch.randn(10, 5), torch.randint(0, 3, (10,)))
    before = _values(model)
    # Only the last two layers moved: layer 2 (net.2) has nothing before it that changed.
    after = _values(model, {"2.weight": 0.3, "2.bias": -0.1, "4.weight": 0.2})
    res = M.internal_covariate_shift(model, nn.functional.cross_entropy, batch, before, after,
                                     ["0.weight", "2.weight", "4.weight"])
    first, second, third = res
    assert first.l2 == 0.0 and first.cosine == pytest.approx(1.0)  # nothing before layer 1, ever
    assert second.l2 == 0.0 and second.cosine == pytest.approx(1.0)  # layer 1 did not change
    assert third.l2 > 0.0 and third.cosine < 1.0  # layer 2 changed before layer 3
    # The model is left as it was.
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_ics_matches_a_direct_computation():
    model = _net()
    batch = (torch.randn(10, 5), torch.randint(0, 3, (10,)))
    before = _values(model)
    after = _values(model, {"0.weight": 0.05, "0.bias": 0.02, "2.weight": -0.04})
    (res,) = M.internal_covariate_shift(model, nn.functional.cross_entropy, batch, before, after, ["4.weight"])
    # Direct: gradient of 4.weight with all layers at `before`, then with layers 0 and 2 at `after`.
    grads = []
    for vals in (before, {**before, **{k: after[k] for k in ("0.weight", "0.bias", "2.weight", "2.bias")}}):
        m = _net()
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(vals[n])
        nn.functional.cross_entropy(m(batch[0]), batch[1]).backward()
        grads.append(m[4].weight.grad.reshape(-1).double())
    g, g2 = grads
    assert res.l2 == pytest.approx(float(torch.linalg.vector_norm(g - g2)), rel=1e-6)
    assert res.cosine == pytest.approx(float(g @ g2 / (g.norm() * g2.norm())), rel=1e-6)
    assert res.rel_l2 == pytest.approx(res.l2 / float(g.norm()), rel=1e-9)


def test_ics_rejects_unknown_names():
    model = _net()
    vals = _values(model)
    with pytest.raises(ValueError, match="not a parameter"):
        M.internal_covariate_shift(model, nn.functional.cross_entropy, (torch.randn(2, 5), torch.zeros(2, dtype=torch.long)),
                                   vals, vals, ["9.weight"])


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------
def test_capture_preactivations_and_unit_stats():
    torch.manual_seed(0)
    bn = lnn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), bn, nn.ReLU(), nn.Conv2d(4, 2, 1), nn.ReLU())
    x = torch.randn(8, 1, 5, 5)
    before = bn.running_mean.clone()
    acts = M.capture_preactivations(model, x)
    assert [a.shape for a in acts] == [(8, 4, 5, 5), (8, 2, 5, 5)]
    assert torch.equal(bn.running_mean, before)  # train-mode BN statistics restored
    mean, std = M.unit_stats(acts[0])
    np.testing.assert_allclose(mean, 0.0, atol=1e-6)  # BN output in train mode: per-channel 0 / 1
    np.testing.assert_allclose(std, 1.0, atol=1e-3)
    dev = M.standardization_deviation(acts[:1])
    assert dev["max_deviation"] < 1e-3


def test_capture_normalized_outputs_pairs_layers_with_their_norm():
    from normlab.lab.models import build_model
    from normlab.nn.utils import init_weight_norm_

    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8)
    # ResNet: block outputs are sums of two branches, but each conv's normalized output is
    # what weight norm's data-dependent init standardizes.
    model = build_model("resnet", norm="wn+mobn", input_shape=(1, 8, 8), num_classes=10, depth=8)
    model.train()
    init_weight_norm_(model, x)
    outs = M.capture_normalized_outputs(model, x)
    names = [n for n, _ in outs]
    assert names[0] == "stem.0" and names[-1] == "head" and len(outs) == 10  # 9 convs + head
    assert M.standardization_deviation([t for _, t in outs])["max_deviation"] < 1e-3
    # ReLU inputs of the same model include the two-branch sums: not standardized.
    assert M.standardization_deviation(M.capture_preactivations(model, x))["max_deviation"] > 0.1
    # A conv followed by BN: the captured tensor is the BN output (zero mean per channel).
    cnn = build_model("cnn", norm="bn", input_shape=(1, 8, 8), num_classes=10)
    first = M.capture_normalized_outputs(cnn, x)[0][1]
    np.testing.assert_allclose(M.unit_stats(first)[0], 0.0, atol=1e-5)


def test_standardization_deviation_known_values():
    t = torch.zeros(4, 2)
    t[:, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0]) + 0.2  # mean 0.2, std 1
    t[:, 1] = torch.tensor([2.0, -2.0, 2.0, -2.0])  # mean 0, std 2
    dev = M.standardization_deviation([t])
    assert dev["max_abs_mean"] == pytest.approx(0.2)
    assert dev["min_std"] == pytest.approx(1.0) and dev["max_std"] == pytest.approx(2.0)
    assert dev["max_deviation"] == pytest.approx(1.0)


def test_distribution_instability():
    assert M.distribution_instability(np.ones((5, 3)), np.ones((5, 3))) == 0.0
    means = np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])  # unit 0 alternates 0, 1, 0
    stds = np.array([[1.0, 1.0], [1.0, 3.0], [1.0, 3.0]])  # unit 1's std jumps by 2 once
    # mean |Δμ| = (1 + 0 + 1 + 0) / 4 = 0.5; mean |Δσ| = (0 + 2 + 0 + 0) / 4 = 0.5
    assert M.distribution_instability(means, stds) == pytest.approx(1.0)
    assert math.isnan(M.distribution_instability(np.ones((1, 3)), np.ones((1, 3))))
    with pytest.raises(ValueError):
        M.distribution_instability(np.ones((2, 3)), np.ones((3, 2)))


# --------------------------------------------------------------------------------------------
# cost helpers
# --------------------------------------------------------------------------------------------
def test_interleaved_times_and_median_ratio():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = M.interleaved_times(fns, repeats=4, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4}
    assert calls[:2] == ["a", "b"]  # warm-up round
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # order rotates each round
    assert M.median_ratio([2.0, 4.0, 6.0], [1.0, 1.0, 2.0]) == 3.0
    with pytest.raises(ValueError):
        M.median_ratio([1.0], [])


def test_training_step_memory_counts_saved_activations():
    x, y = torch.randn(16, 10), torch.randint(0, 2, (16,))
    plain = nn.Sequential(nn.Linear(10, 32, bias=False), nn.ReLU(), nn.Linear(32, 2, bias=False))
    normed = nn.Sequential(nn.Linear(10, 32, bias=False), lnn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2, bias=False))
    a = M.training_step_memory(plain, nn.functional.cross_entropy, (x, y))
    b = M.training_step_memory(normed, nn.functional.cross_entropy, (x, y))
    assert a["param_bytes"] == (10 * 32 + 32 * 2) * 4
    assert b["param_bytes"] == a["param_bytes"] + 2 * 32 * 4  # BN's γ and β
    # The plain net saves at least its input and the ReLU output (16×10 and 16×32 floats).
    assert a["saved_bytes"] >= (16 * 10 + 16 * 32) * 4
    assert b["saved_bytes"] > a["saved_bytes"]  # BN keeps its input / normalized values too
    assert a["train_bytes"] == 3 * a["param_bytes"] + a["saved_bytes"]


def test_pareto_front():
    pts = {"a": (1.0, 0.90), "b": (1.2, 0.95), "c": (1.5, 0.94), "d": (2.0, 0.99), "e": (1.0, 0.85)}
    assert M.pareto_front(pts) == ["a", "b", "d"]  # c is beaten by b, e by a
    assert M.pareto_front({"x": (1.0, 1.0)}) == ["x"]
    assert M.pareto_front({"x": (1.0, 1.0), "y": (1.0, 1.0)}) == ["x", "y"]  # ties: neither dominates


def test_verdict_helpers():
    iv = Interval(0.5, 0.2, 0.8, 3)
    s = S.shift_interval(iv, 1.0)
    assert (s.mean, s.lo, s.hi, s.n) == (1.5, 1.2, 1.8, 3)
    assert S.combine_verdicts(["supported", "supported"]) == "supported"
    assert S.combine_verdicts(["supported", "inconclusive"]) == "inconclusive"
    assert S.combine_verdicts(["supported", "not supported"]) == "not supported"
    assert S.combine_verdicts(["inconclusive", "not supported"]) == "not supported"
    assert S.combine_verdicts([]) == "inconclusive"
