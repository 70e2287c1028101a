"""`normlab advise`: a user's own model (written without normlab) and data, every method compared.

Unit tests pin the planning (budget → steps), the bounded intervals and the recommendation rule on
hand-made arms; the end-to-end test runs the command on a BatchNorm model defined in the test and a
.npz file, checks the budget is respected (wall clock of the whole command) and that a second run
of the same command does no work.
"""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from normlab.lab import advise as planner
from normlab.lab.models import OWN, build_model
from normlab.lab.stats import rate_ci
from normlab.lab.studies import advise as study
from normlab.lab.studies.advise import Arm, Config

USER_MODEL = textwrap.dedent(
    """
    from torch import nn

    def net(num_classes=3):
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def plain():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    """
)


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "usermodel_advise.py").write_text(USER_MODEL)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240)
    x = rng.normal(size=(240, 1, 8, 8)).astype(np.float32)
    for c in range(3):
        x[y == c, 0, 2 * c: 2 * c + 3, :] += 1.5  # a learnable band per class
    np.savez(tmp_path / "data.npz", x=x, y=y)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("usermodel_advise", None)
    return tmp_path


# -- the user's model, built and converted ---------------------------------------------------------


def test_plain_model_is_converted_per_method(user_dir):
    own = build_model("usermodel_advise:net", norm=OWN, input_shape=(1, 8, 8), num_classes=3)
    assert [type(m) for m in own.modules() if "Norm" in type(m).__name__] == [nn.BatchNorm2d] * 2
    gn = build_model("usermodel_advise:net", norm="gn:4", input_shape=(1, 8, 8), num_classes=3)
    norms = [m for m in gn.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 2 and all(m.num_groups == 4 for m in norms)
    none = build_model("usermodel_advise:net", norm="none", input_shape=(1, 8, 8), num_classes=3)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in none.modules())
    x = torch.randn(4, 1, 8, 8)
    for model in (own, gn, none):
        assert model(x).shape == (4, 3)


def test_plain_model_errors(user_dir):
    with pytest.raises(ValueError, match=r"^norm: expected 'own' or a method of normlab.convert"):
        build_model("usermodel_advise:net", norm="batchnorm", input_shape=(1, 8, 8), num_classes=3)
    with pytest.raises(ValueError, match="has no normalization layer to swap"):
        build_model("usermodel_advise:plain", norm="gn", input_shape=(1, 8, 8), num_classes=3)


def test_candidates_drop_duplicates_and_invalid(user_dir):
    from normlab.lab.data import load_dataset

    data = load_dataset("data.npz")
    cfg = Config(model="usermodel_advise:net", data="data.npz", methods=(OWN, "bn", "gn", "rms", "none"))
    found = planner.candidates(cfg, data)
    assert found.methods[0] == OWN and "gn" in found.methods and "none" in found.methods
    assert "bn" not in found.methods and "same layers" in found.skipped["bn"]
    assert found.labels[OWN] == "yours (BatchNorm2d ×2)"
    with pytest.raises(ValueError, match="has no normalization layers"):
        planner.candidates(Config(model="usermodel_advise:plain", data="data.npz"), data)


# -- planning --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("1.5h", 5400), ("45", 45), ("2 min", 120)])
def test_parse_budget(text, seconds):
    assert planner.parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "-3m", "ten minutes", "5d"])
def test_parse_budget_errors(text):
    with pytest.raises(ValueError, match=r"^--budget: expected a duration"):
        planner.parse_budget(text)


def test_plan_steps_formula_and_error():
    cfg = Config(model="m:f", data="d", methods=("own", "gn"), batch_sizes=(8, 32), seeds=3,
                 lrs=(1e-3, 3e-3))
    cal = {study.key(m, b): {"step_s": 0.01 * b / 8, "activation_mb": 1.0}
           for m in cfg.methods for b in cfg.batch_sizes}
    # 2 methods × 2 batch sizes × (2 + 3) runs = 20 runs; Σ step cost = 5 · (0.01+0.04) · 2 = 0.5 s/step
    steps = planner.plan_steps(cfg, cal, list(cfg.methods), budget_s=200, spent_s=10, workers=2,
                               per_run_s=1.0, startup=5.0)
    left = 200 * 0.7 - 10 - (2 * 5.0 + 1.0 * 20 / 2)
    assert steps == math.floor(left * 2 / 0.5)
    with pytest.raises(ValueError, match=r"^--budget: 20 s cannot buy 10 steps for each of 20 runs"):
        planner.plan_steps(cfg, cal, list(cfg.methods), budget_s=20, spent_s=10, workers=2,
                           per_run_s=1.0, startup=5.0)


# -- intervals and the recommendation ------------------------------------------------------------


@pytest.mark.parametrize("errors", [[0.0, 0.0, 0.0], [100.0, 100.0], [0.0, 100.0], [1.0, 60.0, 2.0]])
def test_rate_interval_stays_in_range(errors):
    iv = rate_ci(errors, 50)  # the logit-scale rate interval advise reports (lab/stats.py)
    assert 0.0 <= iv.lo <= iv.hi <= 100.0
    assert iv.mean == pytest.approx(np.mean(errors))


def _arm(method, values, step_s):
    return Arm(method, 8, 1e-3, list(values), list(range(1, len(values) + 1)), 0, step_s, 1.0)


def _card(arms):
    cfg = Config(model="m:f", data="d", methods=tuple(a.method for a in arms), labels={OWN: "yours (BN)"})
    return study.recommend(arms, cfg, classification=True, n_val=200)


def test_recommend_clear_winner_beats_own():
    card = _card([_arm(OWN, [20.0, 21.0, 19.5], 0.010), _arm("gn", [10.0, 11.0, 10.5], 0.011),
                  _arm("none", [40.0, 42.0, 39.0], 0.008)])
    assert card.measurement.startswith("At batch 8: use gn: error 10.5 %")
    assert "the lowest of the 3 methods" in card.measurement
    assert "better beyond the seed noise" in card.measurement
    assert card.effect is not None and card.effect.hi < 0  # gn − own, in points
    assert card.verdict == "answer"


def test_recommend_cheaper_method_within_tolerance():
    card = _card([_arm(OWN, [10.0, 10.4, 9.8], 0.010), _arm("gn", [10.2, 10.1, 10.3], 0.005)])
    assert card.measurement.startswith("At batch 8: use gn")
    assert "of the lowest (yours (BN)" in card.measurement and "0.50× its step time" in card.measurement


def test_recommend_keeps_own_when_nothing_is_better():
    card = _card([_arm(OWN, [10.0, 10.5, 9.5], 0.010), _arm("gn", [30.0, 35.0, 32.0], 0.012)])
    assert card.measurement.startswith("At batch 8: keep yours (BN): error 10 %")


def test_recommend_never_picks_a_much_worse_cheap_method():
    # Two seeds, wide intervals: "none" cannot be told apart, but it is 37 points worse: not picked.
    card = _card([_arm(OWN, [9.0, 16.0], 0.010), _arm("none", [2.0, 97.0], 0.009)])
    assert card.measurement.startswith("At batch 8: keep yours (BN)")
    assert "Not distinguishable from it at this number of seeds: none" in card.measurement


# -- end to end ------------------------------------------------------------------------------------


def _advise(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "normlab.cli", "advise", "--model", "usermodel_advise:net",
           "--data", "data.npz", "--batch-size", "8", "--methods", "own,bn,gn,none", "--seeds", "2",
           "--workers", "1", "--out", "runs/adv", "-q", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    return proc, time.perf_counter() - t0


@pytest.mark.slow
def test_advise_end_to_end_budget_and_resume(user_dir):
    budget = 120.0
    proc, elapsed = _advise(user_dir, "--budget", f"{budget:.0f}s")
    assert proc.returncode == 0, proc.stderr
    assert elapsed <= budget, f"advise took {elapsed:.1f} s for a {budget:.0f} s budget\n{proc.stderr}"
    assert "skipping bn: the same layers as your model" in proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("At batch 8:")]
    assert len(lines) == 1 and "over 2 seeds" in lines[0]
    report = user_dir / "runs" / "adv" / "report" / "index.html"
    assert report.is_file() and "At batch 8:" in report.read_text()
    db = user_dir / "runs" / "adv" / "results.sqlite"
    with sqlite3.connect(db) as con:
        rows = [(json.loads(c), s) for c, s in con.execute("select config, status from runs")]
    # 3 methods (bn dropped) × (3 learning rates + 2 seeds)
    assert len(rows) == 15 and all(s == "done" for _c, s in rows)
    steps = {c["max_steps"] for c, _s in rows}
    assert len(steps) == 1 and steps.pop() >= planner.MIN_STEPS

    def finished() -> dict[str, float]:
        with sqlite3.connect(db) as con:
            return dict(con.execute("select run_id, finished from runs"))

    before = finished()
    again, _ = _advise(user_dir, "--budget", f"{budget:.0f}s")
    assert again.returncode == 0, again.stderr
    assert "resuming the recorded plan" in again.stderr
    assert finished() == before  # no run was done again
    assert [ln for ln in again.stdout.splitlines() if ln.startswith("At batch 8:")] == lines


def test_advise_cli_errors(user_dir):
    from typer.testing import CliRunner

    from normlab.cli import app

    r = CliRunner().invoke(app, ["advise", "--model", "usermodel_advise:net", "--data", "data.npz",
                                 "--budget", "soon"])
    assert r.exit_code == 2 and "--budget: expected a duration" in r.output
    r = CliRunner().invoke(app, ["advise", "--model", "usermodel_advise:plain", "--data", "data.npz",
                                 "--out", str(user_dir / "o")])
    assert r.exit_code == 2 and "has no normalization layers" in r.output


def test_advise_dry_run_writes_nothing(user_dir):
    from typer.testing import CliRunner

    from normlab.cli import app

    out = user_dir / "never"
    r = CliRunner().invoke(app, ["advise", "--model", "usermodel_advise:net", "--data", "data.npz",
                                 "--methods", "own,bn,gn", "--out", str(out), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "advise: 2 methods (own, gn) × 1 batch size(s)" in r.output and "dry run, nothing written" in r.output
    assert not out.exists()
