"""Tests of the sweep engine (normlab.lab.sweep) and the runner registry: execution in-process and
in worker processes, failures, crashes, locking, and resuming after ``kill -9``."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lab_fake_runners  # noqa: F401  (registers the fake-* runners)
from normlab.lab import runners
from normlab.lab.store import DB_NAME, Store
from normlab.lab.sweep import SweepLockedError, _dir_lock, run_many, run_sweep

TESTS_DIR = Path(__file__).resolve().parent


def _echo(i: int, epochs: int = 3) -> dict:
    return {"runner": "fake-echo", "value": i, "epochs": epochs}


# -- runner registry --------------------------------------------------------------------------


def test_register_runner_rules() -> None:
    @runners.register_runner("test-dup")
    def a(config: dict, log) -> dict:  # noqa: ANN001
        return {}

    def b(config: dict, log) -> dict:  # noqa: ANN001
        return {}

    with pytest.raises(ValueError, match="already registered"):
        runners.register_runner("test-dup")(b)
    runners.register_runner("test-dup", replace=True)(b)
    assert runners.get_runner("test-dup") is b
    with pytest.raises(ValueError, match="non-empty"):
        runners.register_runner("")
    assert "train" in runners.available_runners()
    assert runners.runner_name({}) == "train"
    assert runners.runner_module("fake-echo") == "lab_fake_runners"
    with pytest.raises(runners.UnknownRunnerError, match="unknown runner 'nope'.*fake-echo"):
        runners.get_runner("nope")


# -- in-process sweeps ------------------------------------------------------------------------


def test_inline_sweep_runs_and_resumes(tmp_path: Path) -> None:
    configs = [_echo(i) for i in range(3)] + [_echo(0)]  # a duplicate config is one run
    results = run_sweep("echo", configs, tmp_path, workers=1, progress=False)
    assert [r.status for r in results] == ["done"] * 4
    assert [r.final["value"] for r in results] == [0, 1, 2, 0]
    assert results[0].run_id == results[3].run_id
    assert all([e["epoch"] for e in r.epochs] == [0, 1, 2] for r in results)
    assert all(r.final["pid"] == os.getpid() for r in results)  # workers=1 runs in-process
    before = {r.run_id: (r.finished, r.attempts) for r in results}
    again = run_sweep("echo", configs + [_echo(7)], tmp_path, workers=1, progress=False)
    assert {r.run_id: (r.finished, r.attempts) for r in again[:4]} == before  # not repeated
    assert again[4].status == "done" and again[4].final["value"] == 7
    with Store(tmp_path) as s:
        assert s.counts() == {"pending": 0, "running": 0, "done": 4, "failed": 0}
        assert s.get_meta("versions")["python"]


def test_failures_are_recorded_and_retried(tmp_path: Path) -> None:
    configs = [_echo(1), {"runner": "fake-fail", "message": "bad thing 42"}, _echo(2)]
    err = io.StringIO()
    results = run_many([("f", c) for c in configs], tmp_path, workers=1, progress=True, stream=err)
    assert [r.status for r in results] == ["done", "failed", "done"]
    assert "Traceback" in results[1].error and "ValueError: bad thing 42" in results[1].error
    assert "1 run(s) failed" in err.getvalue() and "bad thing 42" in err.getvalue()
    assert "3/3" in err.getvalue()  # the progress bar
    kept = run_sweep("f", configs, tmp_path, workers=1, progress=False, retry_failed=False)
    assert kept[1].attempts == 1
    retried = run_sweep("f", configs, tmp_path, workers=1, progress=False)
    assert retried[1].status == "failed" and retried[1].attempts == 2
    assert retried[0].attempts == 1


def test_numpy_and_nan_results(tmp_path: Path) -> None:
    (r,) = run_sweep("np", [{"runner": "fake-numpy"}], tmp_path, workers=1, progress=False)
    assert r.status == "done", r.error
    assert r.final["acc"] == 0.75 and r.final["steps"] == 3 and r.final["curve"] == [0, 1, 2]
    assert r.epochs[0]["loss"] == 0.5


def test_unknown_runner_fails_before_running(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run config 1: unknown runner 'no-such-runner'"):
        run_sweep("x", [_echo(1), {"runner": "no-such-runner"}], tmp_path, workers=1,
                  progress=False)
    with pytest.raises(ValueError, match="workers"):
        run_sweep("x", [_echo(1)], tmp_path, workers=0, progress=False)


def test_lock_prevents_concurrent_sweeps(tmp_path: Path) -> None:
    with _dir_lock(tmp_path):
        with pytest.raises(SweepLockedError, match="another sweep"):
            run_sweep("x", [_echo(1)], tmp_path, workers=1, progress=False)
    assert run_sweep("x", [_echo(1)], tmp_path, workers=1, progress=False)[0].done


# -- worker processes -------------------------------------------------------------------------


def test_pool_sweep_threads_and_processes(tmp_path: Path) -> None:
    configs = [_echo(i, epochs=2) for i in range(4)] + [
        {"runner": "fake-threads", "i": i} for i in range(2)
    ]
    results = run_sweep("pool", configs, tmp_path, workers=2, progress=False)
    assert all(r.status == "done" for r in results), [r.error for r in results]
    assert all(r.final.get("pid", -1) != os.getpid() for r in results[:4])
    # A run's threads come from its config (default 1), never from the number of workers.
    for r in results[4:]:
        assert r.config["threads"] == 1
        assert r.final["threads"] == 1
        assert r.final["omp"] == "1"
    assert all(len(r.epochs) == 2 for r in results[:4])


def test_crashing_worker_fails_its_run_only(tmp_path: Path) -> None:
    configs = [{"runner": "fake-crash", "i": i} for i in range(3)] + [
        {"runner": "fake-crash", "crash": True}
    ]
    results = run_sweep("crash", configs, tmp_path, workers=2, progress=False)
    assert [r.status for r in results] == ["done", "done", "done", "failed"]
    assert "worker process died" in results[3].error


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _db_state(db: Path) -> tuple[int, list[tuple[str, int, int]]]:
    """(number of done runs, [(run_id, pid, epochs logged) of running runs]) read-only."""
    if not db.exists():
        return 0, []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            done = conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'done'").fetchone()[0]
            running = conn.execute(
                "SELECT r.run_id, r.pid, (SELECT COUNT(*) FROM epochs e WHERE e.run_id = r.run_id)"
                " FROM runs r WHERE r.status = 'running'"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.OperationalError:  # tables not created yet
        return 0, []
    return done, running


SWEEP_SCRIPT = """
import json, sys
import lab_fake_runners  # the sweep derives the module its workers must import from this
from normlab.lab.sweep import run_sweep
run_sweep("kill-test", json.loads(sys.argv[1]), sys.argv[2], workers=2, progress=False)
"""


def _start_sweep(configs: list[dict], run_dir: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(
        [sys.executable, "-c", SWEEP_SCRIPT, json.dumps(configs), str(run_dir)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own process group: killpg hits the sweep and its workers only
    )


def _wait_mid_sweep(proc: subprocess.Popen, db: Path, timeout: float = 120.0) -> list:
    """Wait until >= 2 runs are done and one is running with >= 1 epoch; return the running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, running = _db_state(db)
        if done >= 2 and any(n >= 1 for _, _, n in running):
            return running
        assert proc.poll() is None, "the sweep ended before it could be killed mid-way"
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the sweep to get going")


def _sleepy_configs(marker_dir: Path, n: int = 8) -> list[dict]:
    marker_dir.mkdir()
    return [
        {"runner": "fake-sleepy", "index": i, "epochs": 3, "sleep": 0.1,
         "marker_dir": str(marker_dir)}
        for i in range(n)
    ]


def _check_resumed(run_dir: Path, configs: list[dict], snapshot: dict, marker_dir: Path) -> None:
    """Every run done exactly once, complete epochs from its final attempt, old results intact."""
    results = run_sweep("kill-test", configs, run_dir, workers=1, progress=False)
    assert [r.status for r in results] == ["done"] * len(configs), [r.error for r in results]
    with Store(run_dir) as s:
        assert len(s.results()) == len(configs)
    for cfg, r in zip(configs, results):
        token = r.final["token"]
        assert [e["epoch"] for e in r.epochs] == list(range(cfg["epochs"]))
        assert {e["token"] for e in r.epochs} == {token}  # no leftover of an interrupted attempt
        lines = (marker_dir / f"{cfg['index']}.log").read_text().split()
        if r.run_id in snapshot:
            # finished before the kill: untouched and not run again
            assert (r.finished, r.attempts, r.final, r.epochs) == snapshot[r.run_id]
            assert lines == ["start", token, "end", token]
        else:
            assert lines[-2:] == ["end", token]
            assert lines.count("end") >= 1


def _snapshot(run_dir: Path) -> dict:
    with Store(run_dir) as s:
        return {r.run_id: (r.finished, r.attempts, r.final, r.epochs)
                for r in s.results() if r.done}


@pytest.mark.slow
def test_kill9_process_group_then_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    marker_dir = tmp_path / "markers"
    configs = _sleepy_configs(marker_dir)
    proc = _start_sweep(configs, run_dir)
    try:
        running = _wait_mid_sweep(proc, run_dir / DB_NAME)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its workers, at once
        proc.wait(timeout=30)
    for _, pid, _ in running:
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    snapshot = _snapshot(run_dir)
    assert 2 <= len(snapshot) < len(configs)
    _check_resumed(run_dir, configs, snapshot, marker_dir)
    # the interrupted runs were started again
    with Store(run_dir) as s:
        interrupted = [r for r in s.results() if r.run_id in {rid for rid, _, _ in running}]
    assert interrupted and all(r.attempts >= 2 for r in interrupted)


@pytest.mark.slow
def test_kill9_main_process_only_workers_die_too(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    marker_dir = tmp_path / "markers"
    configs = _sleepy_configs(marker_dir, n=6)
    proc = _start_sweep(configs, run_dir)
    try:
        running = _wait_mid_sweep(proc, run_dir / DB_NAME)
        os.kill(proc.pid, signal.SIGKILL)  # the main process only
        proc.wait(timeout=30)
        worker_pids = {pid for _, pid, _ in running}
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in worker_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        # workers were told to die with their parent: none is left writing to the store
        assert not any(_alive(p) for p in worker_pids)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    snapshot = _snapshot(run_dir)
    _check_resumed(run_dir, configs, snapshot, marker_dir)


# -- end to end with the real training loop ----------------------------------------------------


def test_end_to_end_train_runner(tmp_path: Path) -> None:
    pytest.importorskip("normlab.lab.train", reason="normlab.lab.train is not written yet")
    config = {
        "runner": "train", "data": "digits", "model": "mlp", "norm": "bn", "epochs": 2,
        "batch_size": 32, "max_steps": 6, "seed": 0,
    }
    (r,) = run_sweep("e2e", [config], tmp_path, workers=1, progress=False)
    assert r.status == "done", r.error
    assert r.epochs and "train_loss" in r.epochs[-1]
    assert 0.0 <= r.final["final_val_acc"] <= 1.0
