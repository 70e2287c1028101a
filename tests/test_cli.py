"""Tests of the ``normlab`` command line and of the study registry / CLI overrides it relies on."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lab_fake_runners  # noqa: F401  (registers the fake-* runners)
from normlab import cli
from normlab.lab import studies
from normlab.lab.store import Store
from normlab.lab.studies import Card, StudyError, apply_overrides, get_study

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(cli.app, list(args), prog_name="normlab")
    return result


# -- registry and overrides ---------------------------------------------------------------------


def test_registry_discovers_smoke() -> None:
    names = [s.name for s in studies.all_studies(include_hidden=True)]
    assert "smoke" in names
    assert "smoke" not in [s.name for s in studies.all_studies()]  # hidden
    smoke = get_study("smoke")
    assert smoke.hidden and smoke.title and smoke.summary
    orders = [(s.order, s.name) for s in studies.all_studies(include_hidden=True)]
    assert orders == sorted(orders)


def test_get_study_unknown_lists_valid_names() -> None:
    with pytest.raises(StudyError, match=r"unknown study 'nope'; valid studies: .*smoke"):
        get_study("nope")


def test_apply_overrides() -> None:
    smoke = get_study("smoke")
    cfg = smoke.Config()
    new = apply_overrides(cfg, study="smoke", norms=["none"], seeds=2, epochs=3, data=None)
    assert new.norms == ("none",) and new.seeds == (0, 1) and new.epochs == 3
    assert cfg.seeds == (0, 1, 2, 3, 4)  # the original is not modified
    assert apply_overrides(cfg, study="smoke") is cfg
    with pytest.raises(StudyError, match=r"study 'smoke' has no option --batch-sizes.*--norms"):
        apply_overrides(cfg, study="smoke", batch_sizes=[2, 4])
    with pytest.raises(StudyError, match="--model"):
        apply_overrides(cfg, study="smoke", model="cnn")
    with pytest.raises(StudyError, match="--seeds must be >= 1"):
        apply_overrides(cfg, study="smoke", seeds=0)
    with pytest.raises(StudyError, match="unknown override"):
        apply_overrides(cfg, study="smoke", colour="red")

    @dataclasses.dataclass
    class IntSeeds:
        seeds: int = 3
        batch_sizes: list[int] = dataclasses.field(default_factory=lambda: [32])

    new = apply_overrides(IntSeeds(), seeds=5, batch_sizes=(2, 4))
    assert new.seeds == 5 and new.batch_sizes == [2, 4]


def test_card_validates_verdict() -> None:
    with pytest.raises(ValueError, match="Card.verdict must be one of"):
        Card(study="s", claim="c", measurement="m", verdict="maybe")


def test_broken_study_module_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A study module that fails to import is skipped with a warning, not fatal."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "broken_one.py").write_text("raise ImportError('missing dependency xyz')\n")
    monkeypatch.setattr(studies, "__path__", [*studies.__path__, str(pkg)])
    monkeypatch.setattr(studies, "_STUDIES", None)
    monkeypatch.setattr(studies, "_BROKEN", {})
    with pytest.warns(UserWarning, match="missing dependency xyz"):
        loaded = studies.load_all()
    assert "smoke" in loaded
    assert "missing dependency xyz" in studies.broken_studies()["normlab.lab.studies.broken_one"]
    with pytest.raises(StudyError, match="failed to load: ImportError: missing dependency xyz"):
        get_study("broken-one")
    sys.modules.pop("normlab.lab.studies.broken_one", None)


# -- commands ---------------------------------------------------------------------------------


def test_studies_command() -> None:
    result = invoke("studies")
    assert result.exit_code == 0, result.output
    assert "smoke" not in result.stdout
    result = invoke("studies", "--all")
    assert "smoke" in result.stdout and "(hidden)" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["study", "nope"], "unknown study 'nope'; valid studies:"),
        (["study", "smoke", "--batch-sizes", "2,4"], "study 'smoke' has no option --batch-sizes"),
        (["study", "smoke", "--norms", "bogus"], "unknown norm(s) bogus"),
        (["study", "smoke", "--norms", ","], "--norms needs at least one value"),
        (["study", "smoke", "--seeds", "0"], "--seeds"),
        (["study", "smoke", "--workers", "0"], "--workers"),
        (["report", "/definitely/not/here"], "is not a run directory"),
    ],
)
def test_bad_input_exits_2_without_traceback(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_batch_sizes_must_be_integers(monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke("study", "smoke", "--batch-sizes", "2,x")
    assert result.exit_code == 2 and "--batch-sizes: invalid value 'x'" in result.output


def test_study_command_runs_resumes_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "smoke-run"
    args = ["study", "smoke", "--quick", "--seeds", "2", "--epochs", "3", "--workers", "1",
            "--out", str(out), "-q"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    index = out / "report" / "index.html"
    assert result.stdout.strip().splitlines()[-1] == str(index)
    assert index.is_file() and (out / "report" / "summary.md").is_file()
    assert (out / "results.csv").is_file()
    with Store(out) as s:
        first = {r.run_id: r.finished for r in s.results()}
        assert len(first) == 4 and all(len(r.epochs) == 3 for r in s.results())
        assert s.get_meta("study:smoke:config")["quick"] is True
    # again: everything is already done, nothing is re-run
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    with Store(out) as s:
        assert {r.run_id: r.finished for r in s.results()} == first
    # and the report alone can be rebuilt
    index.unlink()
    result = invoke("report", str(out))
    assert result.exit_code == 0 and index.is_file()


def test_study_with_failed_runs_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smoke = get_study("smoke")
    fake = types.ModuleType("fake_failing")
    for attr in ("NAME", "TITLE", "SUMMARY", "ORDER", "Config", "analyze", "plot"):
        setattr(fake, attr, getattr(smoke.module, attr))
    fake.NAME = "failing"
    fake.runs = lambda cfg: [{"runner": "fake-fail", "message": "kaput"}]
    monkeypatch.setitem(studies.load_all(), "failing", studies.Study(fake))
    result = invoke("study", "failing", "--workers", "1", "--out", str(tmp_path), "-q")
    assert result.exit_code == 1
    assert "1 run(s) failed" in result.output
    assert (tmp_path / "report" / "index.html").is_file()


def test_demo_runs_every_visible_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smoke = get_study("smoke")
    calls: list[bool] = []

    def only_smoke(include_hidden: bool = False) -> list[studies.Study]:
        calls.append(include_hidden)
        return [smoke]

    monkeypatch.setattr(studies, "all_studies", only_smoke)
    result = invoke("demo", "--out", str(tmp_path / "demo"), "--workers", "1", "-q")
    assert result.exit_code == 0, result.output
    assert calls == [False]
    assert result.stdout.strip().endswith(str(tmp_path / "demo" / "report" / "index.html"))
    with Store(tmp_path / "demo") as s:
        assert s.get_meta("study:smoke:config")["quick"] is True
        assert s.counts()["done"] == len(smoke.runs(smoke.Config.quick()))


def test_demo_without_studies(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(studies, "all_studies", lambda include_hidden=False: [])
    result = invoke("demo", "--out", str(tmp_path))
    assert result.exit_code == 1 and "no studies registered" in result.output


def test_bench_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "normlab.bench", None)  # import fails as if absent
    result = invoke("bench", "run")
    assert result.exit_code == 1
    assert "normlab.bench" in result.output and "Traceback" not in result.output


def test_bench_dispatches_to_sub_app(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    sub = typer.Typer()
    seen: list[str] = []

    @sub.command()
    def run(size: int = typer.Option(1, "--size")) -> None:
        seen.append(f"run {size}")

    @sub.command()
    def other() -> None:
        seen.append("other")

    fake = types.ModuleType("normlab.bench")
    fake.app = sub
    monkeypatch.setitem(sys.modules, "normlab.bench", fake)
    result = invoke("bench", "run", "--size", "3")
    assert result.exit_code == 0, result.output
    assert seen == ["run 3"]
    result = invoke("bench", "--help")
    assert result.exit_code == 0 and "other" in result.output


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("normlab ")


def test_console_script_entry_point() -> None:
    """The installed ``normlab`` script: clean error, exit status 2, no traceback."""
    exe = Path(sys.executable).parent / "normlab"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from normlab.cli import main; main()"]
    proc = subprocess.run(cmd + ["study", "no-such-study"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "unknown study 'no-such-study'" in proc.stderr
    assert "Traceback" not in proc.stderr
