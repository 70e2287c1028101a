"""The batch-size study: grid construction, the step budget, statistics sizes, a small sweep."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from normlab.lab.studies import CARD_VERDICTS, get_study
from normlab.lab.studies import batch_size as study_mod
from normlab.lab.sweep import run_sweep

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_full_grid_and_quick_profile():
    study = get_study("batch-size")
    assert study.order == 20
    full = study.default_config()
    study.validate(full)
    configs = study.runs(full)
    grid = [c for c in configs if c["part"] == "grid"]
    # CNN: 6 norms; MLP: no InstanceNorm (a linear layer has no positions).
    assert len(grid) == (6 + 5) * 6 * 3
    assert not any(c["model"] == "mlp" and c["norm"] == "in" for c in grid)
    assert study_mod.group_choices(full) == [1, 2, 4, 8, 16]  # divide 16, 32, 32
    assert {c["norm"] for c in configs if c["part"] == "groups"} == {f"gn:{g}" for g in (1, 2, 4, 8, 16)}
    quick = study.default_config(quick=True)
    study.validate(quick)
    assert len(study.runs(quick)) <= 20
    for bad in (dict(batch_sizes=(1, 8)), dict(model="resnet"), dict(norms=("bn", "nope"))):
        with pytest.raises(ValueError):
            study.validate(dataclasses.replace(full, **bad))


def test_linear_lr_scaling_and_presets():
    cfg = study_mod.Config(data="mnist1d")
    c = next(c for c in study_mod.runs(cfg) if c["model"] == "cnn")
    assert c["lr"] == 0.05 and c["weight_decay"] == 1e-4 and c["model_options"]["channels"] == [32, 32, 32]
    assert c["lr_scaling"] == "linear" and c["base_batch"] == 32
    c2 = study_mod.runs(dataclasses.replace(study_mod.Config(), lr=0.2))[0]
    assert c2["lr"] == 0.2


def test_values_per_batch_statistic():
    assert study_mod.stat_values((2, 16, 8, 8)) == 128  # N·H·W
    assert study_mod.stat_values((2, 128)) == 2  # N
    assert study_mod.stat_values((4, 32, 40)) == 160  # conv1d: N·L


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    study = get_study("batch-size")
    cfg = dataclasses.replace(
        study.default_config(quick=True), model="cnn,mlp", norms=("bn", "gn"), batch_sizes=(2, 8),
        seeds=(0, 1), epochs=1, min_steps=20,
        limit=64, groups=(1, 16), groups_batch=8,
    )
    study.validate(cfg)
    out = tmp_path_factory.mktemp("batch_size")
    results = run_sweep(study.name, study.runs(cfg), out, workers=1, progress=False)
    return study, cfg, results, out


def test_runs_follow_the_budget_rule(swept):
    _study, cfg, results, _ = swept
    assert all(r.done for r in results), [r.error for r in results if not r.done]
    for r in results:
        bs = r.config["batch_size"]
        per_epoch = r.final["steps_per_epoch"]
        assert per_epoch == r.final["n_train"] // bs
        # at least `epochs` epochs and at least `min_steps` steps, whichever is longer
        assert r.final["steps"] == max(cfg.epochs * per_epoch, cfg.min_steps)
        assert r.final["lr"] == pytest.approx(r.config["lr"] * bs / 32)
    cnn2 = next(r for r in results if r.config["model"] == "cnn" and r.config["batch_size"] == 2)
    # 8x8 digits: conv outputs 8x8, 8x8, then 4x4 after the pool -> 2·16 values at least
    assert cnn2.final["batch_stat_values_first"] == 128 and cnn2.final["batch_stat_values_min"] == 32
    mlp2 = next(r for r in results if r.config["model"] == "mlp" and r.config["batch_size"] == 2)
    assert mlp2.final["batch_stat_values_min"] == 2


def test_analyze_and_plot(swept):
    study, cfg, results, out = swept
    cards = study.analyze(results, cfg)
    # question, BN degrades (cnn, mlp), GN independent (cnn, mlp), CNN ranking, groups
    assert len(cards) == 7
    assert all(c.verdict in CARD_VERDICTS for c in cards)
    assert [c.verdict for c in cards if c.question] == ["answer"] * 3
    assert sum(c.effect is not None for c in cards) == 4
    figs = study.plot(results, cfg, out / "fig")
    assert len(figs) == 3
    for f in figs:
        assert f.path.read_bytes()[:8] == PNG
