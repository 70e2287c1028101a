"""The learning-rate study: the percentile probe, the drift measure, a small sweep end to end."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from normlab.lab.models import build_model
from normlab.lab.studies import CARD_VERDICTS, get_study
from normlab.lab.studies import learning_rate as study_mod
from normlab.lab.sweep import run_sweep

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_grid():
    study = get_study("learning-rate")
    assert study.order == 30
    cfg = study.default_config()
    study.validate(cfg)
    configs = study.runs(cfg)
    assert len(configs) == 2 * 3 * len(cfg.seeds)
    assert sorted({c["lr"] for c in configs}) == pytest.approx([cfg.base_lr, 5 * cfg.base_lr, 30 * cfg.base_lr])
    quick = study.default_config(quick=True)
    study.validate(quick)
    assert len(study.runs(quick)) == 2 * 2 * 2  # norms × rates ×1, ×5 × seeds
    with pytest.raises(ValueError):
        study.validate(dataclasses.replace(cfg, probe_layer=3))


def test_probe_measures_percentiles_and_leaves_bn_state_alone():
    torch.manual_seed(0)
    model = build_model("mlp", norm="bn", input_shape=(8,), num_classes=3, hidden=(6, 5), activation="sigmoid")
    x = torch.randn(64, 8) * 3 + 1
    data = SimpleNamespace(train=TensorDataset(x, torch.zeros(64, dtype=torch.long)))
    before = {n: b.clone() for n, b in model.named_buffers()}
    probe = study_mod.PercentileProbe(layer=-1, every=1, samples=32, activation=torch.nn.Sigmoid)
    probe.on_train_start(model, None, data)
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    assert probe.steps == [0] and probe.pct[0].shape == (3, 5)
    # Training-mode BN with gamma=1, beta=0: each unit's inputs are standardized over the probe batch.
    p15, p50, p85 = probe.pct[0]
    assert np.all(p15 < p50) and np.all(p50 < p85)
    assert np.all(np.abs(p50) < 0.6) and np.all(np.abs(p85 - p15 - 2.07) < 0.8)


def test_drift_known_answer():
    probe = study_mod.PercentileProbe(layer=-1, every=1, samples=1)
    probe.pct = [np.zeros((3, 4)) for _ in range(10)]
    assert probe.drift() == 0.0
    probe.pct = [np.zeros((3, 4))] * 5 + [np.ones((3, 4)) * 2.0] * 5
    assert probe.drift(window=0.1) == pytest.approx(2.0)
    probe.pct = [np.full((3, 4), float(t)) for t in range(10)]  # linear ramp: |9 - 0|
    assert probe.drift(window=0.1) == pytest.approx(9.0)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    study = get_study("learning-rate")
    cfg = dataclasses.replace(
        study.default_config(quick=True), seeds=(0, 1), multipliers=(1.0, 30.0), hidden=(16, 16, 16),
        max_steps=60, eval_every_steps=10, probe_every_steps=10, probe_samples=64, limit=200,
    )
    study.validate(cfg)
    out = tmp_path_factory.mktemp("learning_rate")
    results = run_sweep(study.name, study.runs(cfg), out, workers=1, progress=False)
    return study, cfg, results, out


def test_runs_record_probes(swept):
    _study, cfg, results, _ = swept
    assert len(results) == 8
    assert all(r.done for r in results), [r.error for r in results if not r.done]
    for r in results:
        f = r.final
        assert f["probe_steps"] == list(range(0, cfg.max_steps + 1, cfg.probe_every_steps))
        assert len(f["pct_unit0"]) == 3 and len(f["pct_unit0"][0]) == len(f["probe_steps"])
        assert f["drift"] is not None and f["drift"] >= 0
        assert isinstance(f["failed"], bool)
        if f["steps_to_target"] is None:
            assert f["steps_to_target_censored"] == cfg.max_steps and not f["reached"]
        else:
            assert f["steps_to_target_censored"] == f["steps_to_target"] and f["reached"]


def test_analyze_and_plot(swept):
    study, cfg, results, out = swept
    cards = study.analyze(results, cfg)
    assert len(cards) == 4
    assert all(c.verdict in CARD_VERDICTS and c.verdict != "answer" for c in cards)
    assert all(c.effect is not None for c in cards)
    figs = study.plot(results, cfg, out / "fig")
    assert len(figs) == 3
    for f in figs:
        assert f.path.read_bytes()[:8] == PNG
