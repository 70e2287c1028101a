"""Issue 14, on the command line: run dirs are marked, bad input is found once up front, and every
failure is one ``Error:`` line with the documented exit status."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from normlab import cli
from normlab.lab.store import DB_NAME
from normlab.lab.sweep import MARKER_NAME

runner = CliRunner()
SMOKE = ["study", "smoke", "--quick", "--seeds", "1", "--epochs", "2", "--workers", "1", "-q"]


def invoke(*args: str):
    return runner.invoke(cli.app, list(args), prog_name="normlab")


def one_error_line(result, code: int = 2) -> str:
    """The output is exactly one ``Error: ...`` line and the exit status is ``code``."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def _images_npz(path: Path, n: int = 64, classes: int = 4, **changes) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"x": rng.random((n, 1, 8, 8)).astype(np.float32), "y": np.arange(n) % classes}
    arrays.update(changes)
    np.savez(path, **arrays)
    return path


# --------------------------------------------------------------------------------------------
# case 5: an existing folder that is not a run dir is never overwritten
# --------------------------------------------------------------------------------------------
def test_out_folder_that_is_not_a_run_dir_is_refused(tmp_path: Path) -> None:
    mine = tmp_path / "thesis"
    (mine / "report").mkdir(parents=True)
    (mine / "results.csv").write_text("my own numbers\n")
    (mine / "report" / "index.html").write_text("<p>mine</p>")
    line = one_error_line(invoke(*SMOKE, "--out", str(mine)))
    assert f"--out: {mine} is not a normlab run directory" in line and "--force" in line
    assert (mine / "results.csv").read_text() == "my own numbers\n"
    assert sorted(p.name for p in mine.iterdir()) == ["report", "results.csv"]
    result = invoke(*SMOKE, "--out", str(mine), "--force")
    assert result.exit_code == 0, result.output
    assert (mine / MARKER_NAME).is_file()
    # now it is a run dir: no --force needed to resume it
    assert invoke(*SMOKE, "--out", str(mine)).exit_code == 0


def test_new_and_empty_out_folders_are_fine(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        result = invoke(*SMOKE, "--out", str(out))
        assert result.exit_code == 0, result.output
        assert (out / MARKER_NAME).is_file()


def test_run_dir_of_an_older_normlab_is_still_a_run_dir(tmp_path: Path) -> None:
    out = tmp_path / "old"
    assert invoke(*SMOKE, "--out", str(out)).exit_code == 0
    (out / MARKER_NAME).unlink()  # as written before markers existed: results.sqlite only
    assert invoke(*SMOKE, "--out", str(out)).exit_code == 0


# --------------------------------------------------------------------------------------------
# case 6: a foreign results.sqlite is refused before anything is written
# --------------------------------------------------------------------------------------------
def test_foreign_results_sqlite_is_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    db = out / DB_NAME
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE runs (date TEXT, km REAL)")
    conn.execute("INSERT INTO runs VALUES ('2026-01-01', 10.0)")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    for force in ([], ["--force"]):
        line = one_error_line(invoke(*SMOKE, "--out", str(out), *force))
        assert f"{db}: not a normlab results store (SQLite tables: runs)" in line
    assert db.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [DB_NAME]
    line = one_error_line(invoke("report", str(out)))
    assert "not a normlab results store" in line and db.read_bytes() == before


# --------------------------------------------------------------------------------------------
# case 10: paths that cannot be used, corrupt stores, absurd grids
# --------------------------------------------------------------------------------------------
def test_out_is_a_file_or_under_a_file(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("x")
    line = one_error_line(invoke(*SMOKE, "--out", str(f)))
    assert line == f"Error: --out: expected a directory, got the file {f}"
    line = one_error_line(invoke(*SMOKE, "--out", str(f / "sub")))
    assert str(f) in line and "Not a directory" in line
    assert f.read_text() == "x"


def test_out_with_a_300_character_name(tmp_path: Path) -> None:
    line = one_error_line(invoke(*SMOKE, "--out", str(tmp_path / ("r" * 300))))
    assert "File name too long" in line


def test_out_on_an_unwritable_filesystem() -> None:
    if not Path("/sys").is_dir() or os.access("/sys", os.W_OK) and os.geteuid() != 0:
        pytest.skip("needs /sys (not writable, even by root)")
    line = one_error_line(invoke(*SMOKE, "--out", "/sys/normlab-run"))
    assert "/sys/normlab-run" in line and "cannot write" in line


def _chattr(flag: str, *paths: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    proc = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True)
    return proc.returncode == 0


def test_immutable_out_folder_and_report_on_read_only_run_dir(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert invoke(*SMOKE, "--out", str(out)).exit_code == 0
    frozen = [out, out / "report"]
    if os.geteuid() != 0:
        for p in frozen:
            p.chmod(0o555)
    elif not _chattr("+i", *frozen):
        pytest.skip("cannot make a folder read-only here (chattr +i not permitted)")
    try:
        (out / "report" / "index.html").unlink(missing_ok=True) if os.access(out / "report", os.W_OK) else None
        line = one_error_line(invoke("report", str(out)))
        assert "cannot write" in line or "read-only" in line
        line = one_error_line(invoke("study", "smoke", "--quick", "--seeds", "2", "--epochs", "2",
                                     "--workers", "1", "-q", "--out", str(out / "sub")))
        assert str(out / "sub") in line
    finally:
        if os.geteuid() == 0:
            _chattr("-i", *frozen)
        else:
            for p in frozen:
                p.chmod(0o755)


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_corrupt_store_for_study_and_report(tmp_path: Path, damage: str) -> None:
    out = tmp_path / "run"
    assert invoke(*SMOKE, "--out", str(out)).exit_code == 0
    db = out / DB_NAME
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = db.read_bytes()
    data = np.random.default_rng(1).bytes(len(raw)) if damage == "random" else raw[: len(raw) // 2]
    db.write_bytes(data)
    for args in (SMOKE + ["--out", str(out)], ["report", str(out)]):
        line = one_error_line(invoke(*args))
        assert str(db) in line
        assert "move it away" in line
    assert db.read_bytes() == data


def test_seeds_ten_million_is_refused_at_once() -> None:
    t0 = time.perf_counter()
    line = one_error_line(invoke("study", "batch-size", "--seeds", "10000000", "--dry-run"))
    assert line == "Error: --seeds: expected at most 10000 seeds, got 10000000"
    assert time.perf_counter() - t0 < 5


def test_grid_product_limit() -> None:
    norms = ",".join(["bn", "gn", "ln", "in", "none"] * 10)
    sizes = ",".join(str(b) for b in range(2, 202))
    line = one_error_line(invoke("study", "batch-size", "--norms", norms, "--batch-sizes", sizes,
                                 "--seeds", "10000", "--dry-run"))
    assert "more than the limit of 100000 runs" in line


# --------------------------------------------------------------------------------------------
# cases 9, 11, 12: bad data and models are found once, before the sweep
# --------------------------------------------------------------------------------------------
WN = ["study", "weight-norm", "--quick", "--seeds", "1", "--epochs", "1", "--workers", "1", "-q"]


def test_nonexistent_data_is_one_error_before_the_sweep(tmp_path: Path) -> None:
    out = tmp_path / "run"
    line = one_error_line(invoke(*WN, "--data", str(tmp_path / "nonexistent.npz"), "--out", str(out)))
    assert line == f"Error: data: {tmp_path / 'nonexistent.npz'} does not exist"
    assert not out.exists()  # nothing started, nothing written


def test_nan_complex_and_huge_labels_via_cli(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((64, 1, 8, 8)).astype(np.float32)
    x[3, 0, 2, 5] = np.nan
    bad = _images_npz(tmp_path / "nan.npz", x=x)
    line = one_error_line(invoke(*WN, "--data", str(bad), "--out", str(tmp_path / "a")))
    assert f"{bad}: array 'x' has a non-finite value (nan) at index (3, 0, 2, 5)" in line
    comp = _images_npz(tmp_path / "complex.npz", x=x.astype(np.complex64) + 1j)
    line = one_error_line(invoke(*WN, "--data", str(comp), "--out", str(tmp_path / "b")))
    assert "holds complex numbers" in line
    y = np.arange(64) % 4
    y[0] = 10**9
    huge = _images_npz(tmp_path / "huge.npz", y=y)
    line = one_error_line(invoke(*WN, "--data", str(huge), "--out", str(tmp_path / "c")))
    assert "got maximum label 1000000000; pass num_classes (--num-classes)" in line
    assert not any((tmp_path / d).exists() for d in "abc")


MODELS_PY = """
import math
from torch import nn

def build(norm, input_shape, num_classes, **options):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + EXTRA))

EXTRA = {extra}
"""


def test_model_from_the_current_folder_and_its_output_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    (tmp_path / "mymodels_ok.py").write_text(MODELS_PY.format(extra=0))
    (tmp_path / "mymodels_bad.py").write_text(MODELS_PY.format(extra=3))
    data = str(_images_npz(tmp_path / "mine.npz"))
    result = invoke(*WN, "--data", data, "--model", "mymodels_ok:build", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "validated; dry run, nothing written" in result.output
    line = one_error_line(invoke(*WN, "--data", data, "--model", "mymodels_bad:build", "--dry-run"))
    assert "model 'mymodels_bad:build': expected outputs of shape (2, 4)" in line and "got (2, 7)" in line
    line = one_error_line(invoke(*WN, "--data", data, "--model", "mymodelz:build", "--dry-run"))
    assert f"no module named 'mymodelz' in the current folder {tmp_path}" in line


def test_cost_study_takes_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodels_cost.py").write_text(MODELS_PY.format(extra=0))
    result = invoke("study", "cost", "--quick", "--model", "mymodels_cost:build", "--dry-run")
    assert result.exit_code == 0, result.output


def test_data_options_reach_the_loader(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            size = (8, 8) if i % 2 else (10, 9)
            Image.fromarray(np.full(size, 40 * i, np.uint8)).save(root / c / f"{i}.png")
    line = one_error_line(invoke(*WN, "--data", str(root), "--dry-run"))
    assert "pass image_size=(H, W)" in line
    result = invoke(*WN, "--data", str(root), "--data-option", "image_size=[8,8]", "--dry-run")
    assert result.exit_code == 0, result.output
    line = one_error_line(invoke(*WN, "--data", str(root), "--data-option", "oops", "--dry-run"))
    assert line == "Error: --data-option: expected key=value, got 'oops'"
    # float labels with task=classification are classes, not regression
    fl = _images_npz(tmp_path / "f.npz", y=(np.arange(64) % 4).astype(np.float64))
    result = invoke(*WN, "--data", str(fl), "--data-option", "task=classification", "--dry-run")
    assert result.exit_code == 0, result.output


def test_num_classes_option(tmp_path: Path) -> None:
    data = _images_npz(tmp_path / "mine.npz")
    result = invoke(*WN, "--data", str(data), "--num-classes", "6", "--dry-run")
    assert result.exit_code == 0, result.output
    line = one_error_line(invoke(*WN, "--data", str(data), "--num-classes", "3", "--dry-run"))
    assert "out of range for 3 classes" in line


# --------------------------------------------------------------------------------------------
# case 13: SIGTERM
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_shuts_down_cleanly_and_says_resumable(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", "from normlab.cli import main; main()", "study", "smoke",
           "--epochs", "5000", "--seeds", "4", "--workers", "2", "-q", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with sqlite3.connect(f"file:{out / DB_NAME}?mode=ro", uri=True) as conn:
                    if conn.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] > 20:
                        break
            except sqlite3.Error:
                pass
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, stderr
    assert "Terminated (SIGTERM)" in stderr and "the run directory is resumable" in stderr
    assert "Traceback" not in stderr and "leaked semaphore" not in stderr
