"""The results store of a run directory: one SQLite file, ``results.sqlite``.

Tables:

* ``runs`` — one row per run. ``run_id`` is the SHA-256 of the canonical JSON of the run's full
  config (sorted keys, no whitespace), so the same config always maps to the same run and a
  sweep started again finds what it already did. ``status`` goes
  ``pending -> running -> done | failed``; ``attempts`` counts the claims.
* ``study_runs`` — which study asked for which run (a run can serve several studies when their
  configs coincide; it is computed once).
* ``epochs`` — per-epoch metrics of a run, committed as soon as they are logged.
* ``meta`` — key / JSON value: the study configs, library versions.

Concurrency: every process opens its own :class:`Store` (its own connection). The database is in
WAL mode (readers never block the writer) with a busy timeout, and every write is its own short
transaction, so a ``kill -9`` at any moment leaves a consistent file. Writes made on behalf of a
run carry the attempt number returned by :meth:`Store.claim`: a worker left over from an earlier,
interrupted attempt cannot overwrite the state of the current one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "APPLICATION_ID",
    "DB_NAME",
    "RunResult",
    "StaleAttemptError",
    "Store",
    "StoreError",
    "canonical_json",
    "flatten",
    "run_id",
]

DB_NAME = "results.sqlite"
SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` of a normlab store ("NLAB"): how a file is recognised as one before
#: anything is written to it (``PRAGMA user_version`` holds :data:`SCHEMA_VERSION`).
APPLICATION_ID = 0x4E4C4142
_SQLITE_MAGIC = b"SQLite format 3\x00"
_REQUIRED_COLUMNS = {
    "runs": {"run_id", "study", "config", "status", "final", "error", "created", "started",
             "finished", "attempts", "pid"},
    "study_runs": {"study", "run_id"},
    "epochs": {"run_id", "epoch", "metrics"},
    "meta": {"key", "value"},
}
STATUSES = ("pending", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id    TEXT PRIMARY KEY,
    study     TEXT NOT NULL,
    config    TEXT NOT NULL,
    status    TEXT NOT NULL DEFAULT 'pending'
              CHECK (status IN ('pending', 'running', 'done', 'failed')),
    final     TEXT,
    error     TEXT,
    created   REAL NOT NULL,
    started   REAL,
    finished  REAL,
    attempts  INTEGER NOT NULL DEFAULT 0,
    pid       INTEGER
);
CREATE TABLE IF NOT EXISTS study_runs (
    study   TEXT NOT NULL,
    run_id  TEXT NOT NULL REFERENCES runs(run_id),
    PRIMARY KEY (study, run_id)
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id   TEXT NOT NULL REFERENCES runs(run_id),
    epoch    INTEGER NOT NULL,
    metrics  TEXT NOT NULL,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
"""


class StaleAttemptError(RuntimeError):
    """A write for a run attempt that is no longer the current one (the run was reset/reclaimed)."""


class StoreError(ValueError):
    """The file is not a normlab results store, or it is corrupt; the message says how to recover."""


def _recover_hint(path: Path) -> str:
    return (f"move it away (e.g. `mv {path} {path}.bad`) and run the same command again to "
            "recompute the runs, or use another --out directory")


def inspect_store(path: str | os.PathLike[str]) -> None:
    """Check, reading only, that an existing ``path`` is a normlab store (not foreign, not corrupt).

    Nothing is written: a foreign or damaged file stays byte-identical. Raises :class:`StoreError`
    with one line naming the file and what to do.
    """
    p = Path(path)
    try:
        with p.open("rb") as fh:
            head = fh.read(100)
    except OSError as exc:
        raise StoreError(f"{p}: cannot read the results store ({exc.strerror or exc})") from None
    if not head.startswith(_SQLITE_MAGIC):
        raise StoreError(f"{p}: not a normlab results store (not an SQLite database); "
                         + _recover_hint(p))
    if len(head) < 100:
        raise StoreError(f"{p}: the results store is truncated ({len(head)} bytes); "
                         + _recover_hint(p))
    try:
        conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=60.0)
    except sqlite3.Error as exc:
        raise StoreError(f"{p}: cannot open the results store ({exc})") from None
    try:
        conn.execute("PRAGMA busy_timeout = 60000")
        check = conn.execute("PRAGMA quick_check(1)").fetchone()
        if check is None or check[0] != "ok":
            raise sqlite3.DatabaseError(check[0] if check else "quick_check failed")
        tables = {name: {c[1] for c in conn.execute(f"PRAGMA table_info('{name}')")}
                  for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        # Read through SQLite, not from the file header: in WAL mode the header on disk may not
        # have the latest values yet.
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0]) & 0xFFFFFFFF
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.OperationalError as exc:  # e.g. a WAL store in a read-only folder
        raise StoreError(f"{p}: cannot read the results store ({exc}); is its folder read-only?") from None
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{p}: the results store is corrupt ({exc}); " + _recover_hint(p)) from None
    finally:
        conn.close()
    if app_id not in (0, APPLICATION_ID):
        raise StoreError(f"{p}: not a normlab results store (SQLite application_id "
                         f"0x{app_id:08X}, expected 0x{APPLICATION_ID:08X}); it was left untouched")
    if app_id == APPLICATION_ID and version > SCHEMA_VERSION:
        raise StoreError(f"{p}: written by a newer normlab (store schema {version}, this version "
                         f"reads up to {SCHEMA_VERSION}); upgrade normlab")
    if app_id == 0 and not tables:
        return  # an empty SQLite file: nothing of anyone's to lose
    missing = {t: cols - tables.get(t, set()) for t, cols in _REQUIRED_COLUMNS.items()}
    missing = {t: m for t, m in missing.items() if m}
    if missing:
        found = ", ".join(sorted(tables)) or "none"
        what = "not a normlab results store" if app_id == 0 else "a damaged normlab results store"
        raise StoreError(f"{p}: {what} (SQLite tables: {found}); it was left untouched: "
                         "move it away or use another --out directory")


def _json_default(obj: Any) -> Any:
    """Make numpy / torch scalars and arrays, tuples, paths and sets JSON-serializable."""
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable: {obj!r}")


def canonical_json(config: Mapping[str, Any]) -> str:
    """The canonical JSON text of a run config: sorted keys, no whitespace, no NaN.

    NaN is refused because it would make two "equal" configs hash differently across JSON
    libraries and is never a meaningful hyperparameter.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    try:
        return json.dumps(
            config, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run config is not JSON-serializable: {exc}") from exc


def run_id(config: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of :func:`canonical_json` of ``config``."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


def _dumps(value: Any) -> str:
    # Metrics may legitimately be NaN/inf (a diverged run): Python's json round-trips them.
    return json.dumps(value, default=_json_default)


@dataclass
class RunResult:
    """One run as read back from the store.

    ``epochs`` is the list of per-epoch metric dicts in epoch order, each with its ``"epoch"``
    key; ``final`` the dict the runner returned (``None`` unless ``status == "done"``).
    """

    run_id: str
    config: dict[str, Any]
    status: str
    final: dict[str, Any] | None = None
    epochs: list[dict[str, Any]] = field(default_factory=list)
    study: str = ""
    error: str | None = None
    attempts: int = 0
    started: float | None = None
    finished: float | None = None

    @property
    def done(self) -> bool:
        """Whether the run finished successfully."""
        return self.status == "done"

    def metric(self, name: str, default: Any = None) -> Any:
        """A final metric (``default`` when the run has no final dict or no such key)."""
        return (self.final or {}).get(name, default)

    def curve(self, name: str) -> list[Any]:
        """The per-epoch values of metric ``name`` (epochs without it are skipped)."""
        return [e[name] for e in self.epochs if name in e]


def _now() -> float:
    return time.time()


def _matches_id(rid: str, config_text: Any) -> bool:
    """Whether a stored config is the one its run id is the hash of."""
    return isinstance(config_text, str) and hashlib.sha256(config_text.encode("utf-8")).hexdigest() == rid


#: First characters that make a spreadsheet treat a cell as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula gets a leading ``'``."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


class Store:
    """Access to one ``results.sqlite`` file.

    Args:
        path: the database file (``*.sqlite``, ``*.sqlite3``, ``*.db``) or a run directory (then
            ``<dir>/results.sqlite``). Missing directories are created.
        timeout: seconds to wait for a lock held by another process before failing.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 60.0) -> None:
        p = Path(path)
        if p.is_dir() or p.suffix not in (".sqlite", ".sqlite3", ".db"):
            p = p / DB_NAME
        p.parent.mkdir(parents=True, exist_ok=True)
        self.path = p
        #: ids of rows found corrupt (config not hashing to the id) and left out of results().
        self.corrupt: set[str] = set()
        #: ids of rows that :meth:`add_runs` found corrupt and reset to the caller's config.
        self.repaired: list[str] = []
        if p.exists() and p.stat().st_size > 0:
            inspect_store(p)  # read-only: a foreign or damaged file is never written to
        # isolation_level=None: autocommit; multi-statement writes use explicit BEGIN IMMEDIATE
        # so that they take the write lock up front (no deadlock-prone lock upgrades).
        self._conn = sqlite3.connect(str(p), timeout=timeout, isolation_level=None)
        self._conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL is durable against process crashes in WAL mode (only a power loss can drop the
        # last transactions), and much faster than FULL when every epoch is a commit.
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        with self._write():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._conn.execute(stmt)
            self._conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                (json.dumps(SCHEMA_VERSION),),
            )
            if self._conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                self._conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- plumbing ------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed on success and rolled back on any exception."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")

    def close(self) -> None:
        """Close the connection (the object is unusable afterwards)."""
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def run_id(config: Mapping[str, Any]) -> str:
        """See :func:`run_id`."""
        return run_id(config)

    # -- meta ----------------------------------------------------------------------------------

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON-serializable ``value`` under ``key`` (replacing any previous value)."""
        with self._write() as c:
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, _dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def meta(self) -> dict[str, Any]:
        """Every meta entry."""
        return {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM meta")}

    # -- adding and claiming runs --------------------------------------------------------------

    def add_runs(self, study: str, configs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Register runs of ``study`` (idempotent) and return their ids, in ``configs`` order.

        A config already present keeps its row (status, results) untouched; it is only linked to
        ``study`` if another study added it first.
        """
        if not isinstance(study, str) or not study:
            raise ValueError(f"study must be a non-empty string, got {study!r}")
        rows = []
        for i, cfg in enumerate(configs):
            try:
                text = canonical_json(cfg)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"configs[{i}]: {exc}") from exc
            rows.append((hashlib.sha256(text.encode("utf-8")).hexdigest(), text))
        now = _now()
        with self._write() as c:
            c.executemany(
                "INSERT OR IGNORE INTO runs(run_id, study, config, created) VALUES (?, ?, ?, ?)",
                [(rid, study, text, now) for rid, text in rows],
            )
            c.executemany(
                "INSERT OR IGNORE INTO study_runs(study, run_id) VALUES (?, ?)",
                [(study, rid) for rid, _ in rows],
            )
            # A stored row must be the config its id is the hash of. One that is not (tampered
            # with, or damaged) is never executed nor reported: it gets the caller's config back
            # and starts afresh.
            wanted = dict(rows)
            bad = []
            for rid, text in c.execute(
                "SELECT run_id, config FROM runs WHERE run_id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(wanted)),),
            ):
                if text != wanted[rid]:
                    bad.append(rid)
            for rid in bad:
                c.execute("DELETE FROM epochs WHERE run_id = ?", (rid,))
                c.execute(
                    "UPDATE runs SET config = ?, status = 'pending', final = NULL, error = NULL, "
                    "started = NULL, finished = NULL, attempts = 0, pid = NULL WHERE run_id = ?",
                    (wanted[rid], rid),
                )
        self.repaired += [r for r in bad if r not in self.repaired]
        self.corrupt.difference_update(bad)
        return [rid for rid, _ in rows]

    def claim(self, run_id: str) -> int | None:
        """Mark a pending (or failed) run as running; return the new attempt number.

        Returns ``None`` if the run is already running or done (someone else has it). Epoch rows
        left by an earlier attempt are deleted in the same transaction, so an interrupted run
        restarts from a clean slate.
        """
        with self._write() as c:
            cur = c.execute(
                "UPDATE runs SET status = 'running', attempts = attempts + 1, started = ?, "
                "finished = NULL, final = NULL, error = NULL, pid = ? "
                "WHERE run_id = ? AND status IN ('pending', 'failed')",
                (_now(), os.getpid(), run_id),
            )
            if cur.rowcount == 0:
                if c.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
                    raise KeyError(f"unknown run_id {run_id!r}")
                return None
            c.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
            (attempt,) = c.execute(
                "SELECT attempts FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        return int(attempt)

    def _guard(self, attempt: int | None) -> tuple[str, tuple[Any, ...]]:
        """SQL condition (and parameters) that the run is running under ``attempt``."""
        if attempt is None:
            return "status = 'running'", ()
        return "status = 'running' AND attempts = ?", (attempt,)

    def log_epoch(
        self, run_id: str, epoch: int, metrics: Mapping[str, Any], *, attempt: int | None = None
    ) -> None:
        """Record (and commit at once) the metrics of one epoch of a running run.

        Raises :class:`StaleAttemptError` if the run is not running (under ``attempt``, when
        given): the caller is a leftover of an attempt that was reset, and must stop.
        """
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a mapping, got {type(metrics).__name__}")
        cond, params = self._guard(attempt)
        with self._write() as c:
            cur = c.execute(
                "INSERT OR REPLACE INTO epochs(run_id, epoch, metrics) "
                f"SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM runs WHERE run_id = ? AND {cond})",
                (run_id, int(epoch), _dumps(dict(metrics)), run_id, *params),
            )
            if cur.rowcount == 0:
                raise StaleAttemptError(
                    f"run {run_id[:12]} is not running (attempt {attempt}); epoch not recorded"
                )

    def finish_run(
        self, run_id: str, final: Mapping[str, Any] | None, *, attempt: int | None = None
    ) -> None:
        """Mark a running run done with its ``final`` metrics."""
        final_text = _dumps(dict(final or {}))
        cond, params = self._guard(attempt)
        with self._write() as c:
            cur = c.execute(
                f"UPDATE runs SET status = 'done', final = ?, error = NULL, finished = ?, "
                f"pid = NULL WHERE run_id = ? AND {cond}",
                (final_text, _now(), run_id, *params),
            )
            if cur.rowcount == 0:
                raise StaleAttemptError(f"run {run_id[:12]} is not running (attempt {attempt})")

    def fail_run(self, run_id: str, error: str, *, attempt: int | None = None) -> None:
        """Mark a running (or pending) run failed, recording ``error`` (e.g. a traceback)."""
        if attempt is None:
            cond, params = "status IN ('running', 'pending')", ()
        else:
            cond, params = self._guard(attempt)
        with self._write() as c:
            cur = c.execute(
                f"UPDATE runs SET status = 'failed', error = ?, finished = ?, pid = NULL "
                f"WHERE run_id = ? AND {cond}",
                (str(error), _now(), run_id, *params),
            )
            if cur.rowcount == 0:
                raise StaleAttemptError(f"run {run_id[:12]} is not running (attempt {attempt})")

    def reset_stale(self) -> list[str]:
        """Reset every ``running`` row to ``pending`` and delete its partial epochs.

        Only call this when no other process is working on this store (the sweep holds a lock
        on the run directory for that): a ``running`` row is then a leftover of a killed process.
        """
        with self._write() as c:
            stale = [r for (r,) in c.execute("SELECT run_id FROM runs WHERE status = 'running'")]
            if stale:
                c.executemany("DELETE FROM epochs WHERE run_id = ?", [(r,) for r in stale])
                c.execute(
                    "UPDATE runs SET status = 'pending', started = NULL, pid = NULL "
                    "WHERE status = 'running'"
                )
        return stale

    def pending(self, study: str | None = None, *, include_failed: bool = False) -> list[str]:
        """Ids of the runs still to do, after resetting stale ``running`` rows (:meth:`reset_stale`).

        ``include_failed`` adds failed runs (to retry them).
        """
        self.reset_stale()
        statuses = ("pending", "failed") if include_failed else ("pending",)
        marks = ",".join("?" * len(statuses))
        if study is None:
            q = f"SELECT run_id FROM runs WHERE status IN ({marks}) ORDER BY rowid"
            return [r for (r,) in self._conn.execute(q, statuses)]
        q = (
            f"SELECT r.run_id FROM study_runs s JOIN runs r ON r.run_id = s.run_id "
            f"WHERE s.study = ? AND r.status IN ({marks}) ORDER BY s.rowid"
        )
        return [r for (r,) in self._conn.execute(q, (study, *statuses))]

    # -- reading -------------------------------------------------------------------------------

    def config(self, run_id: str) -> dict[str, Any]:
        """The config of a run."""
        row = self._conn.execute("SELECT config FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"unknown run_id {run_id!r}")
        if not _matches_id(run_id, row[0]):
            self.corrupt.add(run_id)
            raise StoreError(
                f"{self.path}: run {run_id[:12]} is corrupt (its stored config does not hash to "
                "its id); it is not executed"
            )
        return json.loads(row[0])

    def status(self, run_id: str) -> str:
        """The status of a run."""
        row = self._conn.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"unknown run_id {run_id!r}")
        return str(row[0])

    def counts(self, study: str | None = None) -> dict[str, int]:
        """Number of runs per status (every status present as a key)."""
        out = dict.fromkeys(STATUSES, 0)
        if study is None:
            q, p = "SELECT status, COUNT(*) FROM runs GROUP BY status", ()
        else:
            q = (
                "SELECT r.status, COUNT(*) FROM study_runs s JOIN runs r ON r.run_id = s.run_id "
                "WHERE s.study = ? GROUP BY r.status"
            )
            p = (study,)
        for status, n in self._conn.execute(q, p):
            out[status] = n
        return out

    def studies(self) -> list[str]:
        """The studies that have runs in this store, in the order they were first added."""
        rows = self._conn.execute(
            "SELECT study, MIN(rowid) AS first FROM study_runs GROUP BY study ORDER BY first"
        )
        return [s for s, _ in rows]

    def progress(self) -> list[tuple[str, dict[str, Any], int]]:
        """``(run_id, config, epochs logged)`` of every running run (for progress displays)."""
        q = (
            "SELECT r.run_id, r.config, (SELECT COUNT(*) FROM epochs e WHERE e.run_id = r.run_id) "
            "FROM runs r WHERE r.status = 'running' ORDER BY r.started"
        )
        return [(rid, json.loads(cfg), int(n)) for rid, cfg, n in self._conn.execute(q)]

    def results(
        self, study: str | None = None, run_ids: Iterable[str] | None = None
    ) -> list[RunResult]:
        """Runs with their configs, final metrics and epochs.

        Args:
            study: only the runs this study asked for (in the order it added them).
            run_ids: only these runs (in this order; unknown ids are skipped).
        """
        cols = "r.run_id, r.study, r.config, r.status, r.final, r.error, r.attempts, " \
            "r.started, r.finished"
        if study is None:
            rows = self._conn.execute(f"SELECT {cols} FROM runs r ORDER BY r.rowid").fetchall()
        else:
            rows = self._conn.execute(
                f"SELECT {cols} FROM study_runs s JOIN runs r ON r.run_id = s.run_id "
                "WHERE s.study = ? ORDER BY s.rowid",
                (study,),
            ).fetchall()
        by_id: dict[str, RunResult] = {}
        for rid, st, cfg, status, final, error, attempts, started, finished in rows:
            if not _matches_id(rid, cfg):
                self.corrupt.add(rid)  # tampered with or damaged: not a result of its config
                continue
            by_id[rid] = RunResult(
                run_id=rid,
                config=json.loads(cfg),
                status=status,
                final=None if final is None else json.loads(final),
                study=study if study is not None else st,
                error=error,
                attempts=int(attempts),
                started=started,
                finished=finished,
            )
        if run_ids is not None:
            ordered = [by_id[r] for r in run_ids if r in by_id]
        else:
            ordered = list(by_id.values())
        if ordered:
            # One query for all epochs (sorted), distributed to their runs.
            for rid, epoch, metrics in self._conn.execute(
                "SELECT run_id, epoch, metrics FROM epochs ORDER BY run_id, epoch"
            ):
                res = by_id.get(rid)
                if res is not None:
                    m = json.loads(metrics)
                    m["epoch"] = epoch
                    res.epochs.append(m)
        return ordered

    # -- export --------------------------------------------------------------------------------

    def to_csv(self, path: str | os.PathLike[str], study: str | None = None) -> Path:
        """Write one CSV row per run: ids, status, ``config.*`` and ``final.*`` columns.

        Nested config values are flattened with dots (``optim.lr``); lists are written as JSON.
        """
        results = self.results(study)
        flat_rows: list[dict[str, Any]] = []
        cfg_keys: set[str] = set()
        fin_keys: set[str] = set()
        for r in results:
            cfg = _csv_cells(r.config, "config.")
            fin = _csv_cells(r.final or {}, "final.")
            cfg_keys.update(cfg)
            fin_keys.update(fin)
            flat_rows.append(
                {
                    "run_id": r.run_id,
                    "study": r.study,
                    "status": r.status,
                    "attempts": r.attempts,
                    "started": _iso(r.started),
                    "finished": _iso(r.finished),
                    "epochs": len(r.epochs),
                    "error": (r.error or "").strip().splitlines()[-1] if r.error else "",
                    **cfg,
                    **fin,
                }
            )
            flat_rows[-1] = {k: _csv_safe(v) for k, v in flat_rows[-1].items()}
        header = ["run_id", "study", "status", "attempts", "started", "finished", "epochs"]
        header += sorted(cfg_keys) + sorted(fin_keys) + ["error"]
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=header)
            writer.writeheader()
            writer.writerows(flat_rows)
        return out


class _NonFinite(float):
    """A NaN/inf metric: written as ``nan``/``inf``/``-inf`` (a number, not formula text)."""

    def __str__(self) -> str:
        return str(float(self))


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys: ``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _csv_cells(d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """:func:`flatten`, with lists written as JSON and non-finite floats marked for the CSV."""
    out: dict[str, Any] = {}
    for key, v in flatten(d, prefix).items():
        if isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        elif isinstance(v, float) and not math.isfinite(v):
            out[key] = _NonFinite(v)
        else:
            out[key] = v
    return out
