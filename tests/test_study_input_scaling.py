"""The input-scaling study: known answers of the quadratic math, and a small run end to end."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from normlab.lab.studies import CARD_VERDICTS, get_study
from normlab.lab.studies import input_scaling as study_mod
from normlab.lab.sweep import run_sweep

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- known answers ---------------------------------------------------------------------------------


def test_condition_number_of_a_diagonal_hessian():
    # Orthogonal, zero-mean columns: XᵀX/n = diag(a², b²) exactly, κ = (a/b)².
    a, b = 200.0, 10.0
    x = np.array([[a, b], [-a, b], [a, -b], [-a, -b]])
    y = x @ np.array([0.05, 1.0])
    q = study_mod.quadratic(x, y)
    np.testing.assert_allclose(q["h"], np.diag([a**2, b**2]))
    assert q["condition"] == pytest.approx((a / b) ** 2)
    np.testing.assert_allclose(q["w_star"], [0.05, 1.0])
    assert q["l_star"] == pytest.approx(0.0, abs=1e-12)


def test_standardized_features_are_well_conditioned():
    rng = np.random.default_rng(0)
    x = np.stack([rng.uniform(-200, 200, 800), rng.uniform(-10, 10, 800)], axis=1)
    xs, tool = study_mod.standardize(x)
    np.testing.assert_allclose(xs.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(xs.std(axis=0), 1.0, rtol=1e-10)
    assert tool == "normlab.nn.Standardizer"
    y = x @ np.array([0.05, 1.0])
    assert 300 < study_mod.quadratic(x, y)["condition"] < 500  # ≈ 200²/10² = 400
    assert study_mod.quadratic(xs, y)["condition"] < 1.3


@pytest.mark.parametrize("frac", [0.1, 0.3, 0.7, 0.9])
def test_iterations_match_the_closed_form_in_one_dimension(frac):
    # L - L* = ½ λ (1 - ηλ)^{2t} (w0 - w*)²: the first t with ratio ≤ tol is
    # ceil(ln tol / (2 ln|1 - ηλ|)).
    lam, w_star, tol = 4.0, 3.0, 1e-6
    h, b = np.array([[lam]]), np.array([lam * w_star])
    eta = frac * 2.0 / lam
    (got,) = study_mod.gd_iterations(h, b, np.array([eta]), tolerance=tol, max_iters=10_000)
    expected = math.ceil(math.log(tol) / (2.0 * math.log(abs(1.0 - eta * lam))))
    assert got == expected


def test_step_one_over_lambda_converges_in_one_iteration():
    h, b = np.array([[5.0]]), np.array([10.0])
    assert study_mod.gd_iterations(h, b, np.array([1 / 5.0]), tolerance=1e-12, max_iters=10) == [1]


def test_gradient_descent_diverges_above_two_over_lambda_max():
    h = np.diag([100.0, 1.0])
    b = h @ np.array([1.0, 1.0])
    lmax = 100.0
    stable, unstable = 0.99 * 2 / lmax, 1.1 * 2 / lmax
    got = study_mod.gd_iterations(h, b, np.array([stable, unstable]), tolerance=1e-6, max_iters=20_000)
    assert got[0] is not None and got[1] is None
    traj = study_mod.gd_trajectory(h, b, unstable, 50)
    exc = study_mod.excess_loss(traj, h, np.array([1.0, 1.0]))
    assert exc[-1] > 1e6 * exc[0]  # |1 - 1.1·2| = 1.2 per step in the steep direction
    assert np.all(np.diff(exc[5:]) > 0)


def test_theory_iterations_for_kappa_400():
    # rate (κ-1)/(κ+1); ln(1e6) / (2 ln(401/399)) ≈ 1 382
    assert study_mod._theory_iterations(400.0, 1e-6) == pytest.approx(1381.6, rel=1e-3)
    assert study_mod._theory_iterations(1.0, 1e-6) == 1.0


# -- end to end ---------------------------------------------------------------------------------------


def test_registered_with_quick_profile():
    study = get_study("input-scaling")
    assert study.order == 10 and not study.hidden
    q = study.default_config(quick=True)
    study.validate(q)
    assert len(q.seeds) <= 3 and len(q.lrs) <= 2
    with pytest.raises(ValueError):
        study.validate(dataclasses.replace(q, step_fractions=(0.5, 1.2)))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    study = get_study("input-scaling")
    cfg = dataclasses.replace(
        study.default_config(quick=True), seeds=(0, 1), lrs=(0.1,), max_steps=40, samples=200,
        eval_every_steps=4,
    )
    study.validate(cfg)
    out = tmp_path_factory.mktemp("input_scaling")
    results = run_sweep(study.name, study.runs(cfg), out, workers=1, progress=False)
    return study, cfg, results, out


def test_runs_finish_with_expected_numbers(swept):
    _study, cfg, results, _ = swept
    assert len(results) == len(cfg.seeds) * 2 * (1 + len(cfg.lrs))
    assert all(r.done for r in results), [r.error for r in results if not r.done]
    gd = {(r.config["scaling"], r.config["data_seed"]): r.final for r in results if r.config["part"] == "gd"}
    for seed in cfg.seeds:
        raw, std = gd[("raw", seed)], gd[("standardized", seed)]
        assert 200 < raw["condition"] < 700 and std["condition"] < 1.5
        assert raw["iterations"] > 100 * std["iterations"]
        assert raw["diverged"] and std["diverged"]  # 1.1 · 2/λmax: the loss grows
        assert std["standardizer"] == "normlab.nn.Standardizer"
    for r in results:
        if r.config["part"] == "mlp":
            assert r.final["steps"] == cfg.max_steps
            assert r.final["acc_curve"][0][0] == 0


def test_analyze_and_plot(swept):
    study, cfg, results, out = swept
    cards = study.analyze(results, cfg)
    assert len(cards) == 3
    assert all(c.verdict in CARD_VERDICTS and c.study == "input-scaling" for c in cards)
    assert all(c.effect is not None for c in cards)
    # The quadratic part is deterministic: both claims hold by a wide margin.
    assert cards[0].verdict == "supported" and cards[1].verdict == "supported"
    figs = study.plot(results, cfg, out / "fig")
    assert len(figs) == 3
    for f in figs:
        assert f.path.read_bytes()[:8] == PNG
