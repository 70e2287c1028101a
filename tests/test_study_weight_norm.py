"""The weight-norm study end to end through the sweep, on a small profile."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from normlab.lab.stats import Interval
from normlab.lab.store import RunResult
from normlab.lab.studies import CARD_VERDICTS, get_study
from normlab.lab.sweep import run_sweep

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    study = get_study("weight-norm")
    cfg = dataclasses.replace(
        study.default_config(quick=True), seeds=(0, 1), epochs=1, max_steps=12, limit=256, timing_repeats=3
    )
    study.validate(cfg)
    out = tmp_path_factory.mktemp("wn")
    results = run_sweep(study.name, study.runs(cfg), out, workers=1, progress=False)
    return study, cfg, results, out


def test_quick_profile_is_small_and_shares_runs_with_cost():
    wn = get_study("weight-norm")
    cost = get_study("cost")
    wq, cq = wn.default_config(quick=True), cost.default_config(quick=True)
    assert len(wq.seeds) == 2 and len(wn.runs(wq)) == 10
    from normlab.lab.store import run_id

    shared = {run_id(c) for c in wn.runs(wq)} & {run_id(c) for c in cost.runs(cq)}
    # The CNN runs with none, bn and wn+mobn are the same configs in both quick profiles.
    assert len(shared) == 3 * 2


def test_runs_finish_and_record_init_and_timing(swept):
    _study, cfg, results, _ = swept
    assert len(results) == len(cfg.norms) * len(cfg.seeds)
    assert all(r.done for r in results), [r.error for r in results if not r.done]
    for r in results:
        f = r.final
        assert f["train_ratio_bn"] > 0 and f["train_step_s"] > 0
        if r.config["norm"] in ("wn", "wn+mobn"):
            assert f["init_data_dependent"] is True
            # Data-dependent init: zero mean, unit variance on the init batch, every unit.
            assert f["init_max_abs_mean"] < 0.05
            assert 0.95 <= f["init_min_std"] <= f["init_max_std"] <= 1.05
        else:
            assert f["init_data_dependent"] is False
        if r.config["norm"] == "none":
            assert f["init_max_deviation"] > 0.05  # default init is not standardized


def test_cards_and_figures(swept, tmp_path):
    study, cfg, results, _ = swept
    cards = study.analyze(results, cfg)
    assert [c.claim for c in cards] == [
        "Weight norm + mean-only BatchNorm is at least as accurate as BatchNorm.",
        "Weight norm's data-dependent initialization gives zero-mean, unit-variance pre-activations.",
        "Weight normalization is cheaper per training step than BatchNorm.",
    ]
    for c in cards:
        assert c.verdict in CARD_VERDICTS and c.measurement
    # The init claim is decided by measurements that do not depend on training: supported.
    assert cards[1].verdict == "supported"
    assert "8.05%" in cards[0].details and "7.31%" in cards[0].details  # the paper's reference
    figs = study.plot(results, cfg, tmp_path)
    assert len(figs) == 4
    for f in figs:
        assert f.path.read_bytes()[:8] == PNG


def test_accuracy_verdict_is_computed_from_the_data():
    study = get_study("weight-norm")
    cfg = study.default_config()

    def fake(norm, seed, acc):
        return RunResult(run_id=f"{norm}{seed}", status="done",
                         config={"model": "cnn", "data": "digits", "norm": norm, "seed": seed},
                         final={"final_val_acc": acc})

    better = [fake("bn", s, a) for s, a in enumerate([0.950, 0.952, 0.951])] + [
        fake("wn+mobn", s, a) for s, a in enumerate([0.970, 0.972, 0.969])]
    worse = [fake("bn", s, a) for s, a in enumerate([0.950, 0.952, 0.951])] + [
        fake("wn+mobn", s, a) for s, a in enumerate([0.900, 0.902, 0.899])]
    close = [fake("bn", s, a) for s, a in enumerate([0.95, 0.97, 0.93])] + [
        fake("wn+mobn", s, a) for s, a in enumerate([0.93, 0.96, 0.95])]
    assert study.analyze(better, cfg)[0].verdict == "supported"
    assert study.analyze(worse, cfg)[0].verdict == "not supported"
    assert study.analyze(close, cfg)[0].verdict == "inconclusive"
    assert isinstance(study.analyze(better, cfg)[0].effect, Interval)
    # Without data, every card says so instead of guessing.
    assert {c.verdict for c in study.analyze([], cfg)} == {"inconclusive"}


def test_validate_rejects_unknown_norm():
    study = get_study("weight-norm")
    with pytest.raises(ValueError):
        study.validate(dataclasses.replace(study.default_config(quick=True), norms=("bn", "wn+zz")))
