"""docs/CONTRACTS.md's "how to add a study" example, run as written: the code block is loaded as a
study module, checked against the protocol, swept (quick profile) and reported."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from normlab.lab import studies
from normlab.lab.report import build_report
from normlab.lab.store import Store
from normlab.lab.studies import CARD_VERDICTS, Study, save_study_config
from normlab.lab.sweep import run_sweep

DOC = Path(__file__).resolve().parents[1] / "docs" / "CONTRACTS.md"


def _example_source() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## The lab: how to add a study", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"expected one python block in the recipe, got {len(blocks)}"
    return blocks[0]


@pytest.fixture
def example_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Study:
    path = tmp_path / "contracts_example_study.py"
    path.write_text(_example_source(), encoding="utf-8")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, path.stem, mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    studies._check_module(mod)  # the registry's own protocol check
    study = Study(mod)
    monkeypatch.setitem(studies.load_all(), study.name, study)
    return study


def test_recipe_example_runs_through_sweep_and_report(tmp_path: Path, example_study: Study) -> None:
    study = example_study
    assert study.name == "bn-mlp"
    cfg = study.default_config(quick=True)
    configs = study.runs(cfg)
    assert len(configs) == len(cfg.norms) * len(cfg.seeds)
    run_dir = tmp_path / "run"
    with Store(run_dir) as s:
        save_study_config(s, study, cfg, quick=True)
    results = run_sweep(study.name, configs, run_dir, workers=1, progress=False)
    assert all(r.done for r in results), [r.error for r in results if not r.done]

    cards = study.analyze(results, cfg)
    assert [c.claim for c in cards] == [study.module.CLAIM]
    card = cards[0]
    assert card.verdict in CARD_VERDICTS and card.verdict != "answer"
    assert card.effect is not None and card.effect.n == len(cfg.seeds)
    assert "BN − none" in card.measurement

    report = build_report(run_dir, strict=True)
    summary = (report.parent / "summary.md").read_text(encoding="utf-8")
    assert study.module.CLAIM in summary
    assert (report.parent / "figures" / "bn-mlp" / "bn_mlp_curves.png").stat().st_size > 0
