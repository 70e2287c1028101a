"""Tests of the SQLite results store (normlab.lab.store)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from normlab.lab.store import DB_NAME, RunResult, StaleAttemptError, Store, canonical_json, run_id


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path)
    yield s
    s.close()


def test_run_id_is_sha256_of_canonical_json() -> None:
    cfg = {"b": 1, "a": [1, 2], "c": {"y": 0.5, "x": "s"}}
    text = '{"a":[1,2],"b":1,"c":{"x":"s","y":0.5}}'
    assert canonical_json(cfg) == text
    assert run_id(cfg) == hashlib.sha256(text.encode()).hexdigest()
    # key order and tuple/list do not matter; values do
    assert run_id({"c": {"x": "s", "y": 0.5}, "a": (1, 2), "b": 1}) == run_id(cfg)
    assert run_id({**cfg, "b": 2}) != run_id(cfg)
    assert Store.run_id(cfg) == run_id(cfg)


@pytest.mark.parametrize("bad", [{"x": object()}, {"x": float("nan")}, {"x": float("inf")}])
def test_run_id_rejects_unserializable(bad: dict) -> None:
    with pytest.raises(ValueError, match="not JSON-serializable"):
        run_id(bad)


def test_store_file_and_wal(tmp_path: Path) -> None:
    with Store(tmp_path / "sub") as s:
        assert s.path == tmp_path / "sub" / DB_NAME
    with Store(tmp_path / "x.sqlite") as s:
        assert s.path == tmp_path / "x.sqlite"
    conn = sqlite3.connect(tmp_path / "sub" / DB_NAME)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "epochs", "meta", "study_runs"} <= tables


def test_add_runs_idempotent_and_shared(store: Store) -> None:
    cfgs = [{"runner": "x", "seed": i} for i in range(3)]
    ids = store.add_runs("s1", cfgs)
    assert ids == [run_id(c) for c in cfgs]
    assert store.add_runs("s1", cfgs) == ids  # again: nothing new
    assert len(store.results()) == 3
    # a second study asking for an existing config shares the run
    ids2 = store.add_runs("s2", [cfgs[1], {"runner": "x", "seed": 9}])
    assert ids2[0] == ids[1]
    assert len(store.results()) == 4
    assert [r.run_id for r in store.results("s2")] == ids2
    assert [r.study for r in store.results("s2")] == ["s2", "s2"]
    assert store.studies() == ["s1", "s2"]
    assert store.counts("s1") == {"pending": 3, "running": 0, "done": 0, "failed": 0}
    with pytest.raises(ValueError, match=r"configs\[1\]"):
        store.add_runs("s1", [{"ok": 1}, {"bad": object()}])
    with pytest.raises(ValueError, match="study"):
        store.add_runs("", cfgs)


def test_lifecycle_done(store: Store) -> None:
    (rid,) = store.add_runs("s", [{"runner": "x"}])
    assert store.pending() == [rid]
    attempt = store.claim(rid)
    assert attempt == 1
    assert store.claim(rid) is None  # already running
    store.log_epoch(rid, 0, {"loss": 1.0}, attempt=attempt)
    store.log_epoch(rid, 1, {"loss": 0.5, "nan": float("nan")}, attempt=attempt)
    store.finish_run(rid, {"acc": np.float64(0.9), "steps": np.int64(4)}, attempt=attempt)
    assert store.claim(rid) is None  # done runs are never claimed again
    (r,) = store.results()
    assert isinstance(r, RunResult)
    assert r.status == "done" and r.done and r.attempts == 1
    assert r.final == {"acc": 0.9, "steps": 4}
    assert [e["epoch"] for e in r.epochs] == [0, 1]
    assert r.curve("loss") == [1.0, 0.5]
    assert math.isnan(r.epochs[1]["nan"])
    assert r.metric("acc") == 0.9 and r.metric("missing", 7) == 7
    assert r.started is not None and r.finished is not None and r.finished >= r.started
    assert store.pending() == []


def test_fail_and_retry_cleans_epochs(store: Store) -> None:
    (rid,) = store.add_runs("s", [{"runner": "x"}])
    a1 = store.claim(rid)
    store.log_epoch(rid, 0, {"loss": 1.0}, attempt=a1)
    store.fail_run(rid, "Traceback...\nValueError: boom", attempt=a1)
    (r,) = store.results()
    assert r.status == "failed" and r.error.endswith("boom") and r.final is None
    assert store.pending() == [] and store.pending(include_failed=True) == [rid]
    a2 = store.claim(rid)
    assert a2 == 2
    (r,) = store.results()
    assert r.status == "running" and r.epochs == [] and r.error is None


def test_stale_running_rows_are_reset(store: Store) -> None:
    ids = store.add_runs("s", [{"i": i} for i in range(3)])
    a = store.claim(ids[0])
    store.log_epoch(ids[0], 0, {"loss": 1.0}, attempt=a)
    store.finish_run(ids[0], {}, attempt=a)
    b = store.claim(ids[1])
    store.log_epoch(ids[1], 0, {"loss": 1.0}, attempt=b)  # then the process is "killed"
    assert store.progress()[0][0] == ids[1]
    assert store.pending() == [ids[1], ids[2]]  # the running one is reset
    r1 = store.results(run_ids=[ids[1]])[0]
    assert r1.status == "pending" and r1.epochs == []
    assert store.results(run_ids=[ids[0]])[0].status == "done"  # untouched
    # a leftover writer of the old attempt can no longer write
    b2 = store.claim(ids[1])
    assert b2 == b + 1
    with pytest.raises(StaleAttemptError):
        store.log_epoch(ids[1], 0, {"loss": 9.0}, attempt=b)
    with pytest.raises(StaleAttemptError):
        store.finish_run(ids[1], {"x": 1}, attempt=b)
    with pytest.raises(StaleAttemptError):
        store.fail_run(ids[1], "late", attempt=b)
    store.log_epoch(ids[1], 0, {"loss": 0.1}, attempt=b2)
    assert store.results(run_ids=[ids[1]])[0].epochs[0]["loss"] == 0.1


def test_log_epoch_requires_running(store: Store) -> None:
    (rid,) = store.add_runs("s", [{"x": 1}])
    with pytest.raises(StaleAttemptError):
        store.log_epoch(rid, 0, {"loss": 1.0})
    with pytest.raises(TypeError, match="metrics"):
        store.log_epoch(rid, 0, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        store.claim("nope")


def test_epoch_committed_immediately(tmp_path: Path) -> None:
    """Another connection sees an epoch as soon as log_epoch returns (no open transaction)."""
    writer = Store(tmp_path)
    (rid,) = writer.add_runs("s", [{"x": 1}])
    a = writer.claim(rid)
    writer.log_epoch(rid, 0, {"loss": 1.0}, attempt=a)
    reader = sqlite3.connect(tmp_path / DB_NAME)
    assert reader.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 1
    assert not writer._conn.in_transaction
    reader.close()
    writer.close()


def test_meta(store: Store) -> None:
    assert store.get_meta("missing", 3) == 3
    store.set_meta("study:x:config", {"seeds": [0, 1], "quick": True})
    store.set_meta("study:x:config", {"seeds": [0, 1, 2]})
    assert store.get_meta("study:x:config") == {"seeds": [0, 1, 2]}
    assert store.meta()["schema_version"] == 1


def test_results_order_and_filter(store: Store) -> None:
    ids = store.add_runs("s", [{"i": i} for i in range(4)])
    assert [r.run_id for r in store.results(run_ids=[ids[2], "unknown", ids[0]])] == [ids[2], ids[0]]
    assert store.config(ids[3]) == {"i": 3}
    assert store.status(ids[3]) == "pending"


def test_to_csv(store: Store, tmp_path: Path) -> None:
    ids = store.add_runs("s", [{"runner": "x", "opt": {"lr": 0.1}, "sizes": [1, 2]}, {"runner": "y"}])
    a = store.claim(ids[0])
    store.log_epoch(ids[0], 0, {"loss": 1.0}, attempt=a)
    store.finish_run(ids[0], {"acc": 0.5, "loss": float("nan")}, attempt=a)
    b = store.claim(ids[1])
    store.fail_run(ids[1], "Traceback\nRuntimeError: bad, \"quoted\"", attempt=b)
    path = store.to_csv(tmp_path / "out" / "results.csv")
    rows = list(csv.DictReader(path.open()))
    assert [r["run_id"] for r in rows] == ids
    assert rows[0]["config.opt.lr"] == "0.1" and json.loads(rows[0]["config.sizes"]) == [1, 2]
    assert rows[0]["final.acc"] == "0.5" and rows[0]["final.loss"] == "nan"
    assert rows[0]["epochs"] == "1" and rows[0]["status"] == "done"
    assert rows[1]["status"] == "failed" and rows[1]["error"] == 'RuntimeError: bad, "quoted"'
    assert rows[1]["config.opt.lr"] == ""
