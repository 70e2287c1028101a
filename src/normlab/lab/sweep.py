"""Execute a study's runs in worker processes or on a Ray cluster, resumably.

:func:`run_sweep` adds the runs to the store of a run directory, skips the finished ones and
hands the rest to an :class:`Executor`: :class:`InlineExecutor` (this process, ``workers=1``),
:class:`LocalPoolExecutor` (the default: a process pool, ``spawn`` context: no fork of a process
that has torch threads running) or :class:`RayExecutor` (Ray tasks; see its docstring for why
only the driver writes the store there). A local worker opens its own SQLite connection, claims
a run, logs every epoch as it comes (one commit each) and marks the run done or failed; a
failing run records its traceback and the sweep goes on. Everything else (locking, what is left
to do, progress bar, results, failure summary) is the same code for every executor.

Resuming: kill the sweep at any moment (even ``kill -9`` of the whole process group) and start
it again: finished runs are kept and not repeated; runs that were in progress are reset to
pending, their partial epochs deleted, and run again from scratch. A lock file in the run
directory keeps two sweeps from working on the same directory at once, which is what makes
resetting "running" rows safe.

Threads: a run's thread count is part of its config (``"threads"``, default 1, added here when a
config has none) and is applied with ``torch.set_num_threads`` around the run, in a worker or in
this process; ``workers`` only says how many runs go at once, so it never changes a result
(floating-point sums split over another number of threads round differently).

Data: a config naming its data under ``"data"`` gets ``"data_identity"`` (the content hash of the
user's files, or the built-in generator's version, :func:`normlab.lab.data.data_identity`), so a
changed data file gives new run ids instead of stale results. Both keys are removed from the
config before the runner sees it.

Trust: a run executes only a config the current call generated: rows whose stored config does
not hash to their id are reset to the caller's config (:meth:`Store.add_runs`), and
:meth:`Store.config` refuses to hand out such a row.
"""

from __future__ import annotations

import abc
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures import ProcessPoolExecutor as _ProcessPool
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from normlab.lab.runners import LogFn, get_runner, runner_module, runner_name
from normlab.lab.store import DB_NAME, RunResult, StaleAttemptError, Store, StoreError

__all__ = [
    "EXECUTORS",
    "MARKER_NAME",
    "Executor",
    "ExecutorError",
    "InlineExecutor",
    "LocalPoolExecutor",
    "RayExecutor",
    "RunDirError",
    "SweepLockedError",
    "available_cores",
    "check_ray_address",
    "check_run_dir",
    "prepare_configs",
    "run_many",
    "run_sweep",
]

LOCK_NAME = ".sweep.lock"
#: The file that marks a folder as a normlab run directory (written by every sweep).
MARKER_NAME = ".normlab-run"
#: Config keys the sweep adds and consumes (never passed to the runner).
RESERVED_KEYS = ("threads", "data_identity")
DEFAULT_THREADS = 1
# NUMBA_NUM_THREADS: the fused CPU kernels run on numba's pool, which must share the budget too.
_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMBA_NUM_THREADS",
)


class SweepLockedError(RuntimeError):
    """Another sweep is running in the same run directory."""


class RunDirError(ValueError):
    """The ``--out`` folder cannot be used as a run directory (the message says why)."""


def check_run_dir(run_dir: str | os.PathLike[str], *, force: bool = False) -> str:
    """Check that ``run_dir`` may be written to as a run directory; returns its state.

    ``"new"`` (missing or empty), ``"run dir"`` (has the :data:`MARKER_NAME` marker, or a
    normlab ``results.sqlite``: a run directory of an older normlab) or ``"forced"`` (another
    non-empty folder, accepted because ``force``). Otherwise :class:`RunDirError`: normlab never
    overwrites the files of a folder that is not its own. A ``results.sqlite`` that is not a
    normlab store is refused even with ``force`` (:class:`~normlab.lab.store.StoreError`).
    Nothing is written.
    """
    from normlab.lab.store import inspect_store

    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out: expected a directory, got the file {path}")
    if not path.exists():
        return "new"
    try:
        entries = [e.name for e in os.scandir(path)]
    except OSError as exc:
        raise RunDirError(f"--out: cannot read {path} ({exc.strerror or exc})") from None
    db = path / DB_NAME
    if db.exists() and db.stat().st_size > 0:
        inspect_store(db)  # a foreign or corrupt store: StoreError, file untouched
    if MARKER_NAME in entries or DB_NAME in entries:
        return "run dir"
    if not entries:
        return "new"
    if force:
        return "forced"
    shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
    raise RunDirError(
        f"--out: {path} is not a normlab run directory (it holds {shown}; no {MARKER_NAME} "
        "marker); choose an empty or new folder, or pass --force to write into it anyway"
    )


def prepare_configs(configs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``configs`` with ``threads`` (default 1) and, for data specs, ``data_identity``.

    Idempotent. Raises ``ValueError`` for a ``threads`` that is not a positive int.
    """
    from normlab.lab.data import data_identity

    out = []
    for i, cfg in enumerate(configs):
        cfg = dict(cfg)
        threads = cfg.setdefault("threads", DEFAULT_THREADS)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"run config {i}: threads: expected a positive int, got {threads!r}")
        if isinstance(cfg.get("data"), str) and "data_identity" not in cfg:
            ident = data_identity(cfg["data"])
            if ident is not None:
                cfg["data_identity"] = ident
        out.append(cfg)
    return out


def available_cores() -> int:
    """CPU cores this process may use (affinity-aware where the OS tells; else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _dir_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive, non-blocking lock on ``run_dir`` for the duration of a sweep.

    ``flock`` is released by the kernel when the holder dies (even by SIGKILL), so a killed
    sweep never leaves a stale lock behind.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, documented limitation
        yield
        return
    fh = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held for the whole block
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepLockedError(
                f"another sweep is already running in {run_dir} (lock file {LOCK_NAME}); "
                "wait for it to finish or use another --out directory"
            ) from None
        yield
    finally:
        fh.close()


# -- worker side ------------------------------------------------------------------------------

_WORKER_STORES: dict[str, Store] = {}


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the process that spawned it dies.

    Without it a ``kill -9`` of the sweep leaves workers running on as orphans (the attempt
    guard in the store would keep them from corrupting anything, but they would waste cores).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() == 1:  # the parent died before prctl: do not linger
            os._exit(1)
    except Exception:  # pragma: no cover - best effort
        pass


def _init_worker(threads: int, imports: Sequence[str]) -> None:
    """Pool initializer: thread environment, parent-death signal, runner modules."""
    _die_with_parent()
    # Ctrl-C is the main process's business: it stops the pool (and the workers die with it);
    # workers that handled SIGINT themselves would only print a traceback each.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Environment first: OpenMP, BLAS and numba size their pools from these when they start,
    # which caps what a run may ask for; each run then sets its own count (_run_threads).
    for var in _THREAD_ENV:
        os.environ[var] = str(threads)
    from normlab.lab.runners import import_modules

    import_modules(list(imports))


@contextlib.contextmanager
def _run_threads(n: int) -> Iterator[None]:
    """torch (and so the CPU kernels) use ``n`` threads for the run; restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    if previous != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _worker_store(db_path: str) -> Store:
    store = _WORKER_STORES.get(db_path)
    if store is None:
        store = _WORKER_STORES[db_path] = Store(db_path)
    return store


def _run_config(config: Mapping[str, Any], log: LogFn) -> dict[str, Any]:
    """Execute one run config with its runner and thread count; return its final metrics.

    The part of a run that is the same wherever it executes (a pool worker, this process, a Ray
    worker on another machine): the reserved keys are consumed here, never seen by the runner.
    """
    threads = config.get("threads", DEFAULT_THREADS)
    config = {k: v for k, v in config.items() if k not in RESERVED_KEYS}
    runner = get_runner(runner_name(config))
    with _run_threads(int(threads)):
        final = runner(config, log)
    if final is None:
        final = {}
    if not isinstance(final, dict):
        raise TypeError(f"runner returned {type(final).__name__}, expected a dict")
    return final


def _execute(db_path: str, run_id: str) -> tuple[str, str, str | None]:
    """Run one run (in a worker, or in-process): returns ``(run_id, status, error)``."""
    store = _worker_store(db_path)
    attempt = store.claim(run_id)
    if attempt is None:  # done, or taken by someone else in the meantime
        return run_id, store.status(run_id), None
    try:
        config = store.config(run_id)  # refused (StoreError) unless it hashes to run_id

        def log(epoch: int, metrics: dict[str, Any]) -> None:
            store.log_epoch(run_id, epoch, metrics, attempt=attempt)

        final = _run_config(config, log)
        store.finish_run(run_id, final, attempt=attempt)
        return run_id, "done", None
    except StaleAttemptError:
        # Our attempt was superseded (the run was reset by a newer sweep): leave its row alone.
        return run_id, "stale", None
    except Exception:
        err = traceback.format_exc()
        try:
            store.fail_run(run_id, err, attempt=attempt)
        except StaleAttemptError:
            return run_id, "stale", None
        return run_id, "failed", err


# -- main side --------------------------------------------------------------------------------


@dataclass
class _Job:
    study: str
    config: dict[str, Any]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("normlab", "torch", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _runner_imports(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Check every config's runner exists; return the modules workers must import for them."""
    mods: list[str] = []
    for i, cfg in enumerate(configs):
        try:
            mod = runner_module(runner_name(cfg))
        except KeyError as exc:  # UnknownRunnerError
            raise ValueError(f"run config {i}: {exc}") from None
        if mod is not None and mod not in mods:
            mods.append(mod)
    return mods


class _Progress:
    """A rich progress bar (runs done / total with ETA, and the epochs of running runs)."""

    def __init__(self, total: int, done: int, enabled: bool, label: str, stream: TextIO | None):
        self.enabled = enabled and total > 0
        self._bar: Any = None
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[running]}"),
            console=Console(file=stream or sys.stderr),
            transient=False,
        )
        from rich.markup import escape

        self._task = self._bar.add_task(escape(label), total=total, completed=done, running="")
        self._bar.start()

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def running(self, store: Store) -> None:
        if self._bar is None:
            return
        parts = []
        for _rid, cfg, n in store.progress()[:4]:
            total = cfg.get("epochs")
            parts.append(f"{n}/{total}" if isinstance(total, int) else f"{n}")
        self._bar.update(self._task, running=("epochs " + " ".join(parts)) if parts else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def run_sweep(
    study_name: str,
    configs: list[dict[str, Any]],
    run_dir: str | os.PathLike[str],
    *,
    workers: int | None = None,
    progress: bool = True,
    retry_failed: bool = True,
    imports: Sequence[str] = (),
    executor: Executor | str = "local",
) -> list[RunResult]:
    """Run every config of ``study_name`` that is not finished yet; return all their results.

    Args:
        study_name: the study the runs belong to (recorded in the store).
        configs: full run configs (JSON-serializable dicts, runner under ``"runner"``).
        run_dir: the run directory (created); the store is ``run_dir/results.sqlite``.
        workers: runs at once (default: the number of cores for the local executor, as many as
            the cluster schedules for Ray); locally ``1`` runs in this process.
        progress: show a rich progress bar on stderr (``False`` for quiet runs and tests).
        retry_failed: run again the runs that failed in an earlier sweep.
        imports: extra modules each worker imports first (to register runners defined outside
            the study modules, e.g. in tests).
        executor: ``"local"`` (worker processes on this machine, the default), ``"ray"``
            (tasks on a Ray cluster, :class:`RayExecutor`) or an :class:`Executor`.

    Returns:
        The :class:`RunResult` of every config, in ``configs`` order (failed runs have
        ``status == "failed"`` and their traceback in ``error``).
    """
    return run_many(
        [(study_name, c) for c in configs],
        run_dir,
        workers=workers,
        progress=progress,
        retry_failed=retry_failed,
        imports=imports,
        executor=executor,
    )


def run_many(
    jobs: Sequence[tuple[str, dict[str, Any]]],
    run_dir: str | os.PathLike[str],
    *,
    workers: int | None = None,
    progress: bool = True,
    retry_failed: bool = True,
    imports: Sequence[str] = (),
    stream: TextIO | None = None,
    meta: Mapping[str, Any] | None = None,
    executor: Executor | str = "local",
) -> list[RunResult]:
    """:func:`run_sweep` for runs of several studies at once, in one worker pool.

    ``jobs`` is a list of ``(study_name, config)``. ``normlab demo`` uses it so that all studies
    share one pool (worker start-up is paid once). ``meta`` entries (e.g. the study configs) are
    written to the store once the run directory is locked; ``stream`` receives the progress bar
    and the failure summary (default: stderr).
    """
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    if isinstance(executor, str) and executor not in EXECUTORS:
        raise ValueError(f"executor: expected one of {', '.join(EXECUTORS)}, got {executor!r}")
    run_dir = Path(run_dir)
    for i, (_s, c) in enumerate(jobs):
        if not isinstance(c, dict):
            raise TypeError(f"jobs[{i}]: config must be a dict, got {type(c).__name__}")
    prepared = prepare_configs([c for _s, c in jobs])
    job_list = [_Job(s, c) for (s, _c), c in zip(jobs, prepared)]
    run_dir.mkdir(parents=True, exist_ok=True)
    from normlab.lab.runners import import_modules

    import_modules(list(imports))  # so that runners defined there are found here too
    modules = list(imports) + [m for m in _runner_imports([j.config for j in job_list])
                               if m not in imports]

    with _dir_lock(run_dir):
        store = Store(run_dir / DB_NAME)
        try:
            marker = run_dir / MARKER_NAME
            if not marker.exists():
                marker.write_text("normlab run directory: results.sqlite holds its runs\n")
            store.set_meta("versions", _versions())
            for key, value in (meta or {}).items():
                store.set_meta(key, value)
            # One add_runs call (one transaction) per study; ids back in the jobs' order.
            by_study: dict[str, list[int]] = {}
            for i, job in enumerate(job_list):
                by_study.setdefault(job.study, []).append(i)
            ids = [""] * len(job_list)
            for study, idx in by_study.items():
                for i, rid in zip(idx, store.add_runs(study, [job_list[i].config for i in idx])):
                    ids[i] = rid
            if store.repaired:
                print(
                    f"warning: {store.path}: {len(store.repaired)} run row(s) did not match "
                    "their id (tampered with or damaged); they were reset and run again from "
                    "this command's configs",
                    file=stream or sys.stderr,
                )
            todo_set = set(store.pending(include_failed=retry_failed))
            # Keep the caller's order, without duplicates (identical configs are one run).
            todo = list(dict.fromkeys(r for r in ids if r in todo_set))
            unique = list(dict.fromkeys(ids))
            runner = _resolve_executor(executor, workers, len(todo))
            bar = _Progress(
                total=len(unique),
                done=len(unique) - len(todo),
                enabled=progress,
                label=", ".join(by_study)[:40] or "sweep",
                stream=stream,
            )
            try:
                if todo:
                    runner.run(store, todo, modules, bar)
            finally:
                bar.close()
            results = store.results(run_ids=unique)
        finally:
            store.close()
    by_id = {r.run_id: r for r in results}
    out = [by_id[r] for r in ids]
    failed = [r for r in results if r.status == "failed"]
    if progress and failed:
        _report_failures(failed, stream or sys.stderr)
    return out


# -- executors --------------------------------------------------------------------------------

#: The executor names :func:`run_many` and ``normlab study --executor`` accept.
EXECUTORS = ("local", "ray")


class ExecutorError(RuntimeError):
    """An executor cannot run at all (e.g. no Ray cluster at the address); one-line message."""


class Executor(abc.ABC):
    """Where and how a sweep's runs execute.

    :func:`run_many` does everything around the execution the same way for every executor (the
    run directory's lock, registering the runs, choosing what is left to do, the progress bar,
    the results and the failure summary) and hands the ids of the runs to do to
    :meth:`run`. An executor must leave the store as a local sweep would: every run it was given
    ends ``done`` or ``failed`` (with its traceback), each epoch committed as it comes under the
    run's current attempt (:meth:`Store.claim`), and an interruption (Ctrl-C, SIGTERM, a crash
    of this process) loses no finished run: rows still ``running`` are reset by the next sweep.
    """

    #: Shown in messages ("local", "inline", "ray").
    name: str = ""

    @abc.abstractmethod
    def run(self, store: Store, todo: list[str], modules: list[str], progress: _Progress) -> None:
        """Execute the runs ``todo`` (pending or failed in ``store``) to completion.

        ``modules`` are the modules that register the runners (a worker must import them);
        ``progress`` is advanced once per run that ends and refreshed with the running ones.
        Interrupted (any ``BaseException``), it stops what it started and re-raises.
        """


class InlineExecutor(Executor):
    """The runs one after the other in this process (``workers=1``)."""

    name = "inline"

    def run(self, store: Store, todo: list[str], modules: list[str], progress: _Progress) -> None:
        db_path = str(store.path)
        _WORKER_STORES[db_path] = store  # reuse the open connection
        try:
            for rid in todo:
                _execute(db_path, rid)
                progress.advance()
        finally:
            _WORKER_STORES.pop(db_path, None)


class LocalPoolExecutor(Executor):
    """The runs in a pool of ``workers`` spawned processes on this machine.

    Each worker opens the store itself (same machine, same file) and commits its runs' epochs.
    A worker that dies (segfault, out of memory, killed) breaks the whole pool, and Python does
    not say which run was the culprit: a run alone in flight is marked failed; when several were
    in flight they are reset and retried in a new pool, and one in flight during two crashes is
    marked failed.
    """

    name = "local"

    def __init__(self, workers: int) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: expected a positive int, got {workers!r}")
        self.workers = workers

    def run(self, store: Store, todo: list[str], modules: list[str], progress: _Progress) -> None:
        bar = progress
        n_workers = self.workers
        threads = max([DEFAULT_THREADS] + [int(store.config(r).get("threads", 1)) for r in todo])
        db_path = str(store.path)
        remaining = list(todo)
        crashes: dict[str, int] = {}
        while remaining:
            pool = _ProcessPool(
                max_workers=min(n_workers, len(remaining)),
                mp_context=get_context("spawn"),
                initializer=_init_worker,
                initargs=(threads, tuple(modules)),
            )
            broken = False
            before = len(remaining)
            try:
                futures: dict[Future[tuple[str, str, str | None]], str] = {
                    pool.submit(_execute, db_path, rid): rid for rid in remaining
                }
                pending_f = set(futures)
                while pending_f and not broken:
                    done_f, pending_f = wait(pending_f, timeout=0.5, return_when=FIRST_COMPLETED)
                    for f in done_f:
                        try:
                            f.result()
                        except BrokenProcessPool:
                            broken = True
                            continue
                        remaining.remove(futures[f])
                        bar.advance()
                    bar.running(store)
            except BaseException:
                # Ctrl-C or an error here: stop the runs in flight instead of waiting for them
                # (their rows stay "running" and are reset when the sweep is started again).
                _kill_workers(pool)
                pool.shutdown(wait=False, cancel_futures=True)
                # Let the pool's manager thread finish its clean-up before this process exits:
                # CPython 3.11's exit hook wakes it without a lock, and racing its close of the
                # wake-up pipe printed "OSError: handle is closed" from threading._shutdown.
                manager = getattr(pool, "_executor_manager_thread", None)
                if manager is not None:
                    manager.join(timeout=10)
                raise
            pool.shutdown(wait=True, cancel_futures=True)
            if not broken:
                break
            # The pool is gone, so rows still "running" were held by its (dead) workers.
            in_flight = store.progress()
            if not in_flight and len(remaining) == before:
                # Nothing ran at all: the workers die at start-up (e.g. an import error), and a
                # new pool would die the same way.
                raise RuntimeError(
                    "sweep worker processes died before running anything; their error output is "
                    "above (a worker re-imports the __main__ script and the runner modules)"
                )
            for rid, _cfg, _n in in_flight:
                crashes[rid] = crashes.get(rid, 0) + 1
                # Alone in flight, the run is the culprit; otherwise it gets a second chance.
                if len(in_flight) == 1 or crashes[rid] >= 2:
                    store.fail_run(
                        rid,
                        "worker process died unexpectedly while running this run (crash, or "
                        "killed e.g. for lack of memory)",
                    )
            store.reset_stale()
            for rid in list(remaining):
                if store.status(rid) in ("done", "failed"):
                    remaining.remove(rid)
                    bar.advance()


def _resolve_executor(executor: Executor | str, workers: int | None, n_todo: int) -> Executor:
    """The executor object for ``executor``: ``"local"`` is inline for one worker, else a pool."""
    if isinstance(executor, Executor):
        return executor
    if executor == "ray":
        return RayExecutor(max_in_flight=workers)
    n_workers = min(workers or available_cores(), max(1, n_todo))
    return InlineExecutor() if n_workers == 1 else LocalPoolExecutor(n_workers)


def _kill_workers(pool: _ProcessPool) -> None:
    """Terminate the pool's worker processes at once (the executor has no public API for it)."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            proc.kill()


# -- Ray --------------------------------------------------------------------------------------

#: How many times a run may lose its Ray worker (process killed, node gone, out of memory) before
#: it is marked failed; a lost worker is not the run's fault, so it is run again once.
RAY_MAX_LOST = 2
_LOST_HINT = "process killed, out of memory, or its node left the cluster"
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})$")
_MODULE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _ray_task(
    run_id: str, config: dict[str, Any], modules: list[str], versions: dict[str, str]
) -> Iterator[tuple[Any, ...]]:
    """One run as a Ray task: a streaming generator of what the driver writes to the store.

    Yields ``("start", info)`` first (the driver claims the run then, so a run waiting for a
    free CPU is not shown as running), one ``("epoch", epoch, metrics)`` per epoch as the runner
    logs it, and last ``("done", final)`` or ``("error", traceback)``. The runner runs in a
    thread of the task, because it reports epochs through a callback and a generator can only
    yield from its own frame. Metrics are converted to JSON values inside the callback, as a
    local worker's store does when it commits them: the runner may change its objects after
    ``log`` returns, and a value that cannot be stored fails the run here, not in the driver.
    """
    import queue
    import threading

    from normlab.lab.runners import import_modules
    from normlab.lab.store import _dumps

    yield ("start", {"host": platform.node(), "pid": os.getpid()})
    mine = _versions()
    differ = [f"{k} {mine.get(k)} here, {versions.get(k)} on the driver"
              for k in ("normlab", "torch", "numpy") if mine.get(k) != versions.get(k)]
    if differ:
        yield ("error", f"ray worker on {platform.node()}: {'; '.join(differ)}; install the same "
                        "versions on every node of the cluster (results would not be comparable)")
        return

    def snapshot(value: Any) -> Any:
        return json.loads(_dumps(value))

    items: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

    def log(epoch: int, metrics: dict[str, Any]) -> None:
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a mapping, got {type(metrics).__name__}")
        items.put(("epoch", int(epoch), snapshot(dict(metrics))))

    def work() -> None:
        try:
            import_modules(modules)
            items.put(("done", snapshot(_run_config(config, log))))
        except BaseException as exc:
            text = traceback.format_exc()
            if isinstance(exc, ModuleNotFoundError):
                text += ("(a Ray worker imports normlab and the runner modules: install them on "
                         "every node, or let the sweep ship local modules by starting it with "
                         "Ray not yet initialized)\n")
            items.put(("error", text))

    thread = threading.Thread(target=work, name=f"normlab-run-{run_id[:12]}", daemon=True)
    thread.start()
    while True:
        item = items.get()
        yield item
        if item[0] != "epoch":
            break
    thread.join()


def _local_modules(names: Iterable[str]) -> list[ModuleType]:
    """The top-level modules among ``names`` that are this machine's own files.

    That is, neither normlab (which every node must have installed) nor anything installed in
    site-packages or the standard library: a cluster's other machines do not have them unless
    Ray ships them (``runtime_env["py_modules"]``, uploaded to the cluster at ``ray.init``).
    """
    import importlib
    import sysconfig

    installed = [Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib",
                                                                     "purelib", "platlib")]
    out: list[ModuleType] = []
    for name in names:
        top = name.partition(".")[0]
        if top == "normlab":
            continue
        try:
            mod = sys.modules.get(top) or importlib.import_module(top)
        except ImportError:
            continue
        file = getattr(mod, "__file__", None)
        if not file:
            continue  # built-in or namespace package
        path = Path(file).resolve()
        if any(part in ("site-packages", "dist-packages") for part in path.parts):
            continue
        if any(path.is_relative_to(p) for p in installed):
            continue
        if mod not in out:
            out.append(mod)
    return out


def _spec_modules(configs: Iterable[Mapping[str, Any]]) -> list[str]:
    """Modules named by ``module:function`` specs of data and models in ``configs``."""
    out: list[str] = []
    for cfg in configs:
        for key in ("data", "model"):
            spec = cfg.get(key)
            if isinstance(spec, str) and _MODULE_SPEC.match(spec):
                mod = spec.partition(":")[0]
                if mod not in out:
                    out.append(mod)
    return out


def check_ray_address(address: str | None) -> str | None:
    """Validate a Ray cluster address: ``None`` (Ray's default), ``"auto"`` or ``HOST:PORT``.

    For ``HOST:PORT`` the head node must accept a TCP connection within 5 s: Ray itself would
    retry an unreachable address for minutes. Raises :class:`ExecutorError` with one line.
    """
    if address is None or address == "auto":
        return address
    m = _HOST_PORT.match(address) if isinstance(address, str) else None
    if m is None or not 0 < int(m["port"]) < 65536:
        raise ExecutorError(
            "ray address: expected auto or HOST:PORT of the cluster's head node (e.g. "
            f"10.0.0.5:6379), got {address!r}"
        )
    host = m["host"].strip("[]")
    try:
        with socket.create_connection((host, int(m["port"])), timeout=5.0):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ExecutorError(
            f"ray address {address}: no Ray cluster answers there ({reason}); start one with "
            "`ray start --head` on the head node, or check the host and port"
        ) from None
    return address


@dataclass
class _RayRun:
    run_id: str
    attempt: int | None = None


class RayExecutor(Executor):
    """Each run is a Ray task on a Ray cluster; the store is written by this process only.

    Why through the driver: the machines of a cluster need not share a filesystem (and SQLite
    on a network filesystem is not safe with writers on several machines), so workers never
    open the store. A run's task is a streaming generator (:func:`_ray_task`) that yields one
    item per epoch as the runner logs it; the driver commits each one at once under the run's
    attempt, then the final metrics or the traceback, so the store holds exactly what a local
    sweep would. Resuming is the local sweep's: a killed driver loses only the runs in flight
    (their rows stay ``running`` and are reset by the next sweep; Ray ends the tasks of a job
    whose driver died), and finished runs are never run again.

    A run asks Ray for ``threads`` CPUs (its config's thread count, default 1), and its task
    gets the thread environment variables set before the worker process starts (OpenMP, BLAS
    and numba size their pools from them), so the thread budget is the same as locally.

    A lost worker (killed process, out of memory, node gone) is not the run's fault: the run is
    marked failed with the reason and run again; lost :data:`RAY_MAX_LOST` times, it stays
    failed. Interrupted (Ctrl-C, SIGTERM), the driver cancels its tasks.

    Args:
        address: ``None`` (Ray's default: ``RAY_ADDRESS``, or a new local Ray instance),
            ``"auto"`` (the cluster started on this machine with ``ray start``) or the
            ``HOST:PORT`` of a cluster's head node. Checked at once (:func:`check_ray_address`).
        max_in_flight: runs submitted at once (default: all; the cluster's CPUs decide).
        runtime_env: Ray runtime environment for the job (merged with the ``py_modules`` the
            sweep ships: the runner and data modules that are this machine's own files).
        max_lost: times a run may lose its worker before it is marked failed.

    Ray must not be initialized yet for the sweep to ship local modules; if it is (e.g. by the
    caller), that connection and its runtime environment are used as they are.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        max_in_flight: int | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        max_lost: int = RAY_MAX_LOST,
    ) -> None:
        import importlib.util

        if max_in_flight is not None and (isinstance(max_in_flight, bool) or
                                          not isinstance(max_in_flight, int) or max_in_flight < 1):
            raise ValueError(
                f"max_in_flight: expected a positive int or None, got {max_in_flight!r}"
            )
        if isinstance(max_lost, bool) or not isinstance(max_lost, int) or max_lost < 1:
            raise ValueError(f"max_lost: expected a positive int, got {max_lost!r}")
        if importlib.util.find_spec("ray") is None:
            raise ExecutorError("executor ray: expected Ray to be installed, got no module "
                                "'ray'; install it with pip install 'normlab[ray]'")
        self.address = check_ray_address(address)
        self.max_in_flight = max_in_flight
        self.runtime_env = dict(runtime_env or {})
        self.max_lost = max_lost

    def run(self, store: Store, todo: list[str], modules: list[str], progress: _Progress) -> None:
        import ray

        configs: dict[str, dict[str, Any]] = {}
        refused: dict[str, str] = {}
        for rid in todo:
            try:
                configs[rid] = store.config(rid)
            except StoreError:
                refused[rid] = traceback.format_exc()  # failed below, never sent to a worker
        ours = self._connect(ray, modules, list(configs.values()))
        try:
            self._drive(ray, store, todo, configs, refused, modules, progress)
        finally:
            if ours:
                ray.shutdown()

    def _connect(self, ray: Any, modules: list[str], configs: list[dict[str, Any]]) -> bool:
        """``ray.init`` unless Ray is initialized already; whether this call initialized it."""
        if ray.is_initialized():
            return False
        import logging

        env = dict(self.runtime_env)
        ship = _local_modules(list(modules) + _spec_modules(configs))
        if ship:
            env["py_modules"] = list(env.get("py_modules", [])) + ship
        kwargs: dict[str, Any] = {"runtime_env": env or None, "logging_level": logging.WARNING}
        if self.address is None and not os.environ.get("RAY_ADDRESS"):
            kwargs["include_dashboard"] = False  # a local instance for this sweep only
        try:
            ray.init(address=self.address, **kwargs)
        except ConnectionError as exc:
            where = self.address or os.environ.get("RAY_ADDRESS") or "the default address"
            raise ExecutorError(f"ray address {where}: cannot connect ({exc})") from None
        return True

    def _drive(
        self,
        ray: Any,
        store: Store,
        todo: list[str],
        configs: dict[str, dict[str, Any]],
        refused: dict[str, str],
        modules: list[str],
        progress: _Progress,
    ) -> None:
        """Submit the runs, commit what their tasks stream back, retry lost ones."""
        from ray import exceptions as rex

        lost_errors = (rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError,
                       rex.LocalRayletDiedError, rex.OutOfMemoryError, rex.TaskCancelledError)
        task = ray.remote(_ray_task)
        versions = _versions()
        queue = list(todo)
        lost: dict[str, int] = {}
        in_flight: dict[Any, _RayRun] = {}
        cap = self.max_in_flight or len(todo)

        def claim(run: _RayRun) -> None:
            if run.attempt is None:
                attempt = store.claim(run.run_id)
                if attempt is None:  # cannot happen while this sweep holds the lock
                    raise StaleAttemptError(f"run {run.run_id[:12]} was claimed by someone else")
                run.attempt = attempt

        def end(run: _RayRun, error: str) -> None:
            claim(run)
            store.fail_run(run.run_id, error, attempt=run.attempt)
            progress.advance()

        try:
            while queue or in_flight:
                while queue and len(in_flight) < cap:
                    rid = queue.pop(0)
                    if rid in refused:
                        end(_RayRun(rid), refused[rid])
                        continue
                    config = configs[rid]
                    threads = int(config.get("threads", DEFAULT_THREADS))
                    gen = task.options(
                        num_returns="streaming",
                        max_retries=0,  # lost workers are retried here, where the store is
                        num_cpus=threads,
                        runtime_env={"env_vars": {v: str(threads) for v in _THREAD_ENV}},
                        name=f"normlab-run-{rid[:12]}",
                    ).remote(rid, config, list(modules), versions)
                    in_flight[gen] = _RayRun(rid)
                if not in_flight:
                    continue
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
                for gen in ready:
                    run = in_flight[gen]
                    try:
                        item = ray.get(next(gen))
                    except StopIteration:
                        item = ("lost", "its task ended without a result")
                    except lost_errors as exc:
                        item = ("lost", f"{type(exc).__name__}: {_first_line(exc)}")
                    except rex.RayError as exc:  # e.g. the runtime environment failed to set up
                        item = ("error", f"{type(exc).__name__}: {exc}")
                    kind = item[0]
                    try:
                        if kind == "start":
                            claim(run)
                            continue
                        if kind == "epoch":
                            store.log_epoch(run.run_id, item[1], item[2], attempt=run.attempt)
                            continue
                        del in_flight[gen]
                        if kind == "done":
                            store.finish_run(run.run_id, item[1], attempt=run.attempt)
                            progress.advance()
                        elif kind == "error":
                            end(run, item[1])
                        else:  # lost
                            lost[run.run_id] = n = lost.get(run.run_id, 0) + 1
                            why = (f"the Ray worker running this run was lost ({_LOST_HINT}): "
                                   f"{item[1]}")
                            if n < self.max_lost:
                                # Failed, not pending, until it starts again: a driver killed
                                # meanwhile leaves a row that the next sweep retries.
                                claim(run)
                                store.fail_run(run.run_id, why + "; it is being run again",
                                               attempt=run.attempt)
                                queue.insert(0, run.run_id)
                            else:
                                times = f"{n} time{'s' if n > 1 else ''}"
                                end(run, f"{why}; lost {times}, not tried again")
                    except StaleAttemptError:
                        in_flight.pop(gen, None)
                        with contextlib.suppress(Exception):
                            ray.cancel(gen, force=True)
                progress.running(store)
        except BaseException:
            # Ctrl-C, SIGTERM or an error here: stop the tasks (their rows stay "running" and are
            # reset when the sweep is started again).
            for gen in in_flight:
                with contextlib.suppress(Exception):
                    ray.cancel(gen, force=True)
            raise


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _report_failures(failed: list[RunResult], stream: TextIO) -> None:
    """Print one line per failed run (its last traceback line) at the end of a sweep."""
    print(f"\n{len(failed)} run(s) failed:", file=stream)
    for r in failed:
        last = (r.error or "").strip().splitlines()[-1:] or ["(no error recorded)"]
        print(f"  {r.run_id[:12]} [{r.study}] {last[0]}", file=stream)
