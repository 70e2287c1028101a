"""The lab's sweeps on a Ray cluster (``--executor ray``), on a local Ray instance of 2 CPUs.

One Ray instance serves the whole module (starting one costs seconds); it ships the fake runners'
module to its workers as a cluster would (``py_modules``). The reference for every result is the
local executor on the same configs, which is bit-for-bit reproducible (test_lab_safety.py).
"""

from __future__ import annotations

import io
import logging
import os
import sqlite3
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'normlab[ray]')",
                         exc_type=ImportError)

import lab_fake_runners  # noqa: E402  (registers the fake-* runners)
from typer.testing import CliRunner  # noqa: E402

from normlab import cli  # noqa: E402
from normlab.lab.store import DB_NAME, Store  # noqa: E402
from normlab.lab.sweep import (  # noqa: E402
    ExecutorError,
    RayExecutor,
    _local_modules,
    check_ray_address,
    run_many,
    run_sweep,
)

pytestmark = pytest.mark.slow

_TIMING = ("time", "peak_rss", "pid")
TINY_TRAIN = {"runner": "train", "data": "digits", "model": "mlp", "norm": "bn", "epochs": 2,
              "batch_size": 32, "max_steps": 6, "seed": 0}


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():  # pragma: no cover - someone else's instance
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"py_modules": [lab_fake_runners]})
    yield
    ray.shutdown()


def _strip(d: dict | None) -> dict:
    return {k: v for k, v in (d or {}).items() if not any(t in k for t in _TIMING)}


def _rows(results: list) -> list:
    return [(r.run_id, r.status, _strip(r.final), [_strip(e) for e in r.epochs]) for r in results]


def _differences(a: list, b: list) -> list:
    """(run, where, key, value in a, value in b) for every metric that differs."""
    out = []
    for ra, rb in zip(_rows(a), _rows(b)):
        label = (ra[0][:12], rb[0][:12])
        if ra[:2] != rb[:2]:
            out.append((label, "status", None, ra[1], rb[1]))
        for where, da, db in [("final", ra[2], rb[2])] + [
                (f"epoch {i}", ea, eb) for i, (ea, eb) in enumerate(zip(ra[3], rb[3]))]:
            out += [(label, where, k, da.get(k), db.get(k)) for k in sorted(set(da) | set(db))
                    if da.get(k) != db.get(k)]
        if len(ra[3]) != len(rb[3]):
            out.append((label, "epochs", None, len(ra[3]), len(rb[3])))
    return out


def _echo(i: int, epochs: int = 3) -> dict:
    return {"runner": "fake-echo", "value": i, "epochs": epochs}


def test_same_results_as_the_local_executor(ray_cluster, tmp_path: Path) -> None:
    configs = [TINY_TRAIN, {**TINY_TRAIN, "norm": "gn:4"}, _echo(1),
               {"runner": "fake-fail", "message": "bad thing 42"}]
    local = run_sweep("s", configs, tmp_path / "local", workers=1, progress=False)
    remote = run_sweep("s", configs, tmp_path / "ray", executor=RayExecutor(), progress=False)
    assert [r.status for r in remote] == ["done", "done", "done", "failed"], [r.error for r in remote]
    assert local[2].final["pid"] == os.getpid() != remote[2].final["pid"]  # ran in a worker
    # bit for bit: JSON floats round-trip exactly, so == on the parsed values is bitwise
    assert len(remote) == len(local) and not _differences(remote, local)
    assert "ValueError: bad thing 42" in remote[3].error and "Traceback" in remote[3].error
    assert [r.attempts for r in remote] == [1, 1, 1, 1]


def test_rerun_does_no_work_and_threads_follow_the_config(ray_cluster, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    configs = [{"runner": "fake-sleepy", "index": i, "epochs": 2, "sleep": 0.0,
                "marker_dir": str(markers)} for i in range(3)]
    configs.append({"runner": "fake-threads", "threads": 2})
    first = run_sweep("r", configs, tmp_path / "run", executor="ray", progress=False)
    assert all(r.done for r in first), [r.error for r in first]
    assert first[3].final["threads"] == 2 and first[3].final["omp"] == "2"
    again = run_sweep("r", configs, tmp_path / "run", executor="ray", progress=False)
    assert [(r.finished, r.attempts, r.final) for r in again] == \
        [(r.finished, r.attempts, r.final) for r in first]
    for i in range(3):  # each runner started once, in the first sweep only
        assert (markers / f"{i}.log").read_text().split()[::2] == ["start", "end"]


def test_lost_worker_loses_no_finished_run(ray_cluster, tmp_path: Path) -> None:
    die_once = {"runner": "fake-die-once", "marker": str(tmp_path / "died"), "epochs": 3}
    configs = [_echo(i, epochs=2) for i in range(3)] + [die_once]
    results = run_sweep("k", configs, tmp_path / "run", executor="ray", progress=False)
    assert [r.status for r in results] == ["done"] * 4, [r.error for r in results]
    assert [r.attempts for r in results[:3]] == [1, 1, 1]
    retried = results[3]
    assert retried.attempts == 2
    token = retried.final["token"]
    assert [e["epoch"] for e in retried.epochs] == [0, 1, 2]
    assert {e["token"] for e in retried.epochs} == {token}  # nothing of the killed attempt
    # A worker lost every time is reported, once it has been lost max_lost times (1 here, to
    # kill one process, not two), and the rest of the sweep completes.
    err = io.StringIO()
    results = run_many([("k", c) for c in configs + [{"runner": "fake-crash", "crash": True}]],
                       tmp_path / "run", executor=RayExecutor(max_lost=1), progress=True,
                       stream=err)
    assert [r.status for r in results] == ["done"] * 4 + ["failed"]
    assert [r.attempts for r in results] == [1, 1, 1, 2, 1]  # finished runs untouched
    failed = results[4]
    assert "Ray worker running this run was lost" in failed.error
    assert "lost 1 time, not tried again" in failed.error and "WorkerCrashedError" in failed.error
    assert "1 run(s) failed" in err.getvalue() and "WorkerCrashedError" in err.getvalue()
    with sqlite3.connect(tmp_path / "run" / DB_NAME) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'running'").fetchone() == (0,)


def test_cli_executor_ray_and_bad_address(ray_cluster, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "smoke"
    res = runner.invoke(cli.app, ["study", "smoke", "--quick", "--seeds", "1", "--epochs", "2",
                                  "--executor", "ray", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    with Store(out) as s:
        assert s.counts()["done"] == 2 and s.counts()["failed"] == 0
    local = tmp_path / "local"
    res = runner.invoke(cli.app, ["study", "smoke", "--quick", "--seeds", "1", "--epochs", "2",
                                  "--workers", "1", "--out", str(local), "--quiet"])
    assert res.exit_code == 0, res.output
    with Store(out) as a, Store(local) as b:
        assert not _differences(a.results(), b.results())

    for args, message in [
        (["--address", "127.0.0.1:1"], "Error: ray address 127.0.0.1:1: no Ray cluster answers "
                                       "there (Connection refused)"),
        (["--address", "not an address"], "Error: ray address: expected auto or HOST:PORT"),
    ]:
        bad = tmp_path / "bad"
        res = runner.invoke(cli.app, ["study", "smoke", "--quick", "--executor", "ray",
                                      "--out", str(bad), *args])
        assert res.exit_code == 2, res.output
        assert res.output.startswith(message) and res.output.count("\n") == 1, res.output
        assert not bad.exists()  # checked before anything is written
    res = runner.invoke(cli.app, ["study", "smoke", "--quick", "--address", "auto",
                                  "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--address: expected only with --executor ray" in res.output
    res = runner.invoke(cli.app, ["study", "smoke", "--quick", "--executor", "dask",
                                  "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--executor: expected one of local, ray, got 'dask'" in res.output


def test_address_and_shipped_modules() -> None:
    assert check_ray_address(None) is None and check_ray_address("auto") == "auto"
    with pytest.raises(ExecutorError, match=r"^ray address: expected auto or HOST:PORT.*'h:99999'"):
        check_ray_address("h:99999")
    import numpy
    import typer

    # this machine's own files are shipped; normlab and installed packages must be on the nodes
    shipped = _local_modules(["lab_fake_runners", "normlab.lab.studies.smoke", "numpy", "typer",
                              "json", "no_such_module_xyz"])
    assert shipped == [lab_fake_runners]
    assert numpy not in shipped and typer not in shipped
