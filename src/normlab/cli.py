"""The ``normlab`` command line.

Commands::

    normlab studies [--all]                 list the studies
    normlab study NAME [options]            run one study (resumable), then build its report
    normlab report DIR                      rebuild the report of a run directory
    normlab demo [--out DIR] [--workers N]  every study's quick profile, one report
      (study and demo: --executor ray [--address auto|HOST:PORT] runs them on a Ray cluster)
    normlab advise --model M --data D       which normalization for your own model and data
    normlab bench ...                       benchmarks (from normlab.bench)

Every failure prints one line, ``Error: ...``, without a traceback. Exit status 2: bad input
(unknown study, option a study does not have, malformed list, data or model that does not load,
an ``--out`` that is not a run directory, a foreign or corrupt ``results.sqlite``); 1: a sweep with
failed runs (its report is still written); 130: interrupted (Ctrl-C); 143: terminated (SIGTERM).
Interrupted or terminated, the run directory is resumable: the same command continues it.

Before a sweep starts, its data and model are validated once (data loads, labels and features
are sane, the model's output fits the classes on one batch), so bad input is one error, not one
failed run per config. The current folder is importable for ``--model``/``--data`` specs
``module:function`` (as with ``python -m``). Heavy modules (torch, matplotlib, studies) are
imported only by the commands that need them, so ``normlab --help`` is instant.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer

from normlab._checks import check_positive_int

if TYPE_CHECKING:
    from normlab.lab.studies import Study

__all__ = ["app", "main"]

T = TypeVar("T")

DEFAULT_RUNS_DIR = Path("runs")

app = typer.Typer(
    name="normlab",
    help="normlab: normalization layers for PyTorch, and a lab that tests the literature's claims.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print ``Error: message`` on stderr and exit with ``code`` (2 = bad input)."""
    line = " ".join(str(message).split())  # one line, whatever the message held
    typer.echo(f"Error: {line}", err=True)
    raise typer.Exit(code)


def _os_error(exc: OSError, what: str) -> str:
    where = exc.filename if exc.filename is not None else what
    return f"cannot write {where}: {exc.strerror or exc}"


def _cwd_importable() -> None:
    """Make the current folder importable, as ``python -m`` does (for ``--model mod:fn``)."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or os.curdir) == cwd for p in sys.path):
        sys.path.insert(0, cwd)  # spawned sweep workers start with this process's sys.path


def _parse_data_options(items: list[str] | None, num_classes: int | None) -> dict[str, Any]:
    """``--data-option key=value`` (value as JSON when it parses: numbers, lists, true/false)."""
    import json

    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            _fail(f"--data-option: expected key=value, got {item!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        options[key] = value
    if num_classes is not None:
        options["num_classes"] = num_classes
    return options


def _parse_list(text: str | None, option: str, convert: Callable[[str], T]) -> list[T] | None:
    """Parse a comma-separated option value (``"2,4,8"``); errors name the option."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        _fail(f"{option} needs at least one value (comma-separated), got {text!r}")
    out: list[T] = []
    for item in items:
        try:
            out.append(convert(item))
        except ValueError:
            _fail(f"{option}: invalid value {item!r}")
    return out


def _positive_int(text: str) -> int:
    value = int(text)
    check_positive_int(value, "value")  # a ValueError: the caller names the option and the value
    return value


def _executor(name: str) -> str:
    """The ``--executor`` value, checked (``local`` or ``ray``)."""
    choices = ("local", "ray")
    if name not in choices:
        _fail(f"--executor: expected one of {', '.join(choices)}, got {name!r}")
    return name


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"normlab {version('normlab')}")
        except PackageNotFoundError:
            typer.echo("normlab (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version."
    ),
) -> None:
    """normlab: normalization layers for PyTorch, and a lab that tests the literature's claims."""
    _cwd_importable()


# -- studies ---------------------------------------------------------------------------------------


@app.command("studies")
def studies_cmd(
    all_: bool = typer.Option(False, "--all", help="Include hidden studies (e.g. smoke)."),
) -> None:
    """List the registered studies: name and one-line summary."""
    import warnings

    from normlab.lab.studies import all_studies, broken_studies

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        studies = all_studies(include_hidden=all_)
        broken = broken_studies()
    if not studies:
        typer.echo("No studies registered.")
    width = max((len(s.name) for s in studies), default=0)
    for s in studies:
        mark = " (hidden)" if s.hidden else ""
        typer.echo(f"{s.name:<{width}}  {s.summary}{mark}")
    for mod, err in broken.items():
        typer.echo(f"warning: study module {mod} failed to load: {err}", err=True)


# -- running ---------------------------------------------------------------------------------------


def _prepare(
    study: Study, quick: bool, overrides: dict[str, Any], data_options: dict[str, Any] | None = None
) -> tuple[Any, list[dict[str, Any]]]:
    """Config (profile + overrides, validated) and run configs of one study."""
    import dataclasses
    import math

    from normlab.lab.studies import MAX_RUNS, StudyError, apply_overrides, merge_data_options

    cfg = study.default_config(quick)
    cfg = apply_overrides(cfg, study=study.name, **overrides)
    study.validate(cfg)
    axes = [getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name in ("norms", "batch_sizes", "seeds", "models", "data")]
    size = math.prod(len(a) for a in axes if isinstance(a, (list, tuple)) and a)
    if size > MAX_RUNS:
        raise StudyError(f"study {study.name!r}: the grid has {size} combinations, more than the "
                         f"limit of {MAX_RUNS} runs; use fewer seeds, norms or batch sizes")
    try:
        configs = study.runs(cfg)
    except ValueError as exc:  # a setting runs() cannot turn into runs (e.g. unknown norm)
        raise StudyError(f"study {study.name!r}: {exc}") from exc
    if not configs:
        raise StudyError(f"study {study.name!r} has no runs for this configuration")
    if len(configs) > MAX_RUNS:
        raise StudyError(f"study {study.name!r}: {len(configs)} runs, more than the limit of {MAX_RUNS}")
    if data_options:
        if not any("data" in c for c in configs):
            raise StudyError(f"study {study.name!r} has no data to pass --data-option to")
        configs = merge_data_options(configs, data_options)
    return cfg, configs


def _validate(configs: list[dict[str, Any]], check_builtin: bool) -> None:
    """Load each distinct data set once and run each distinct model on one batch of it.

    Built-in data (and built-in models on it) are checked only when ``check_builtin`` (the user
    passed data options): they are tested with the library. Raises ``ValueError`` with one line.
    """
    import json

    from normlab.lab.data import dataset_names, load_dataset

    builtin = set(dataset_names())
    loaded: dict[str, Any] = {}
    checked: set[str] = set()
    for c in configs:
        spec = c.get("data")
        if not isinstance(spec, str):
            continue
        user_model = isinstance(c.get("model"), str) and ":" in c["model"]
        if spec in builtin and not check_builtin and not user_model:
            continue
        opts = c.get("data_options") or {}
        key = json.dumps([spec, opts, c.get("data_seed", 0), c.get("val_fraction", 0.2)],
                         sort_keys=True, default=str)
        if key not in loaded:
            try:
                loaded[key] = load_dataset(spec, seed=int(c.get("data_seed", 0)),
                                           val_fraction=c.get("val_fraction", 0.2), **opts)
            except (ValueError, TypeError, OSError) as exc:
                raise ValueError(str(exc) if str(exc).startswith(("data", spec)) or spec in str(exc)
                                 else f"data {spec!r}: {exc}") from None
        bundle = loaded[key]
        if not isinstance(c.get("model"), str) or not isinstance(c.get("norm"), str):
            continue
        mkey = json.dumps([key, c["model"], c.get("model_options") or {}], sort_keys=True, default=str)
        if mkey in checked or (not user_model and spec in builtin):
            continue
        checked.add(mkey)
        _check_model(c, bundle)


def _check_model(c: dict[str, Any], bundle: Any) -> None:
    """Build the config's model for ``bundle`` and check its output shape on one batch."""
    import torch

    from normlab.core.dispatch import use_backend
    from normlab.lab.models import build_model

    spec = c["model"]
    try:
        model = build_model(spec, norm=c["norm"], input_shape=bundle.input_shape,
                            num_classes=bundle.num_classes, **(c.get("model_options") or {}))
        x = bundle.train.tensors[0][:2]
        model.eval()
        # shapes are all this checks: the reference backend gives the same ones without loading
        # the CPU kernels into this process, which trains nothing (~3 s of a demo's start)
        with torch.no_grad(), use_backend("reference"):
            out = model(x)
    except (ValueError, TypeError) as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:
        raise ValueError(f"model {spec!r}: building it or running it on one batch of "
                         f"{bundle.name} failed ({type(exc).__name__}: {exc})") from None
    k = bundle.num_classes or 1
    ok = isinstance(out, torch.Tensor) and (tuple(out.shape) == (len(x), k) or
                                            (bundle.num_classes == 0 and tuple(out.shape) == (len(x),)))
    if not ok:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        what = f"{k} classes" if bundle.num_classes else "regression: 1 output"
        raise ValueError(f"model {spec!r}: expected outputs of shape ({len(x)}, {k}) for a batch of "
                         f"{len(x)} ({what} in {bundle.name}), got {shape}")


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that the sweep shuts down like on Ctrl-C."""


def _execute(
    plan: list[tuple[Study, Any, list[dict[str, Any]], bool]],
    out: Path,
    workers: int | None,
    quiet: bool,
    *,
    force: bool = False,
    dry_run: bool = False,
    data_options: dict[str, Any] | None = None,
    executor: str = "local",
    address: str | None = None,
    report: bool = True,
) -> list[Any]:
    """Run the sweeps of ``plan`` in ``out`` (one pool), build the report, print its path.

    ``report=False`` (a first phase of a command that runs more): no report, failed runs are
    returned with the others instead of ending the command."""
    import signal
    import sqlite3

    from normlab.lab.report import build_report
    from normlab.lab.store import StoreError
    from normlab.lab.studies import config_meta
    from normlab.lab.sweep import (
        ExecutorError,
        RayExecutor,
        RunDirError,
        SweepLockedError,
        check_run_dir,
        run_many,
    )

    runs_on: Any = "local"
    if executor == "ray":
        try:  # before anything is written: a bad address leaves the run directory untouched
            runs_on = RayExecutor(address, max_in_flight=workers)
        except ExecutorError as exc:
            _fail(str(exc))
    elif address is not None:
        _fail(f"--address: expected only with --executor ray, got --executor {executor}")
    try:
        check_run_dir(out, force=force)  # reads only: refused folders and files stay untouched
    except (RunDirError, StoreError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"--out: cannot use {out} ({exc.strerror or exc})")
    jobs = [(study.name, c) for study, _cfg, configs, _q in plan for c in configs]
    try:
        _validate([c for _s, c in jobs], bool(data_options))
    except ValueError as exc:
        _fail(str(exc))
    n_studies = len(plan)
    summary = f"{len(jobs)} run(s) of {n_studies} stud{'y' if n_studies == 1 else 'ies'} in {out}"
    if executor == "ray":
        summary += f" on Ray ({address or 'default address'})"
    if dry_run:
        typer.echo(f"{summary}: data and model validated; dry run, nothing written")
        return []
    # The configs are recorded by the sweep once it holds the directory's lock, so a command
    # refused because another sweep is running there changes nothing.
    meta = dict(config_meta(study, cfg, quick=quick, data_options=data_options)
                for study, cfg, _c, quick in plan)
    if not quiet:
        typer.echo(summary, err=True)

    def on_term(signum: int, frame: Any) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    resume = (f"Finished runs are saved in {out}; the run directory is resumable: run the same "
              "command again to continue.")
    try:
        results = run_many(jobs, out, workers=workers, progress=not quiet, meta=meta,
                           executor=runs_on)
        if not report:
            return results
        index = build_report(out)
    except SweepLockedError as exc:
        _fail(str(exc), code=1)
    except ExecutorError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo(f"\nInterrupted. {resume}", err=True)
        raise typer.Exit(130) from None
    except _Terminated:
        typer.echo(f"\nTerminated (SIGTERM). {resume}", err=True)
        raise typer.Exit(143) from None
    except StoreError as exc:
        _fail(str(exc))
    except sqlite3.DatabaseError as exc:
        _fail(f"{out / 'results.sqlite'}: {exc}")
    except OSError as exc:
        _fail(_os_error(exc, str(out)))
    except ValueError as exc:  # e.g. a run config naming an unknown runner
        _fail(str(exc))
    finally:
        signal.signal(signal.SIGTERM, previous)
    typer.echo(str(index))
    failed = {r.run_id for r in results if r.status == "failed"}
    if failed:
        typer.echo(f"{len(failed)} run(s) failed; see the report.", err=True)
        raise typer.Exit(1)
    return results


@app.command("study")
def study_cmd(
    name: str = typer.Argument(..., metavar="NAME", help="Study name (see `normlab studies`)."),
    quick: bool = typer.Option(False, "--quick", help="Use the study's small quick profile."),
    norms: str | None = typer.Option(None, "--norms", metavar="LIST", help="Comma-separated norms, e.g. bn,gn."),
    batch_sizes: str | None = typer.Option(
        None, "--batch-sizes", metavar="LIST", help="Comma-separated batch sizes, e.g. 2,4,32."
    ),
    seeds: int | None = typer.Option(None, "--seeds", metavar="N", help="Number of seeds (0..N-1)."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, metavar="N", help="Epochs per run."),
    data: str | None = typer.Option(None, "--data", metavar="SPEC", help="Data set spec."),
    model: str | None = typer.Option(None, "--model", metavar="SPEC", help="Model spec."),
    workers: int | None = typer.Option(
        None, "--workers", min=1, metavar="N",
        help="Runs at once (default: number of cores; with --executor ray: as the cluster schedules).",
    ),
    executor: str = typer.Option(
        "local", "--executor", metavar="local|ray",
        help="Where runs execute: worker processes here (local) or tasks on a Ray cluster (ray).",
    ),
    address: str | None = typer.Option(
        None, "--address", metavar="auto|HOST:PORT",
        help="With --executor ray: the cluster (default: RAY_ADDRESS, else a local Ray instance).",
    ),
    out: Path | None = typer.Option(
        None, "--out", metavar="DIR", help="Run directory (default: runs/<study>); resumes if it has results."
    ),
    data_option: list[str] | None = typer.Option(
        None, "--data-option", metavar="KEY=VALUE",
        help="Data loader option (repeatable), e.g. image_size=[32,32] or task=classification.",
    ),
    num_classes: int | None = typer.Option(
        None, "--num-classes", min=1, metavar="K", help="Number of classes (labels in 0..K-1)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Write into an existing folder that is not a normlab run directory."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate the study, data and model; run nothing, write nothing."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run one study (resuming what an earlier run left) and build its report."""
    from normlab.lab.studies import StudyError, get_study

    if seeds is not None:
        try:
            check_positive_int(seeds, "--seeds")
        except ValueError as exc:
            _fail(str(exc))
    data_options = _parse_data_options(data_option, num_classes)

    overrides = {
        "norms": _parse_list(norms, "--norms", str),
        "batch_sizes": _parse_list(batch_sizes, "--batch-sizes", _positive_int),
        "seeds": seeds,
        "epochs": epochs,
        "data": data,
        "model": model,
    }
    try:
        study = get_study(name)
        cfg, configs = _prepare(study, quick, overrides, data_options)
    except StudyError as exc:
        _fail(str(exc))
    out_dir = out if out is not None else DEFAULT_RUNS_DIR / study.name
    _execute([(study, cfg, configs, quick)], out_dir, workers, quiet, force=force,
             dry_run=dry_run, data_options=data_options, executor=_executor(executor),
             address=address)


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(DEFAULT_RUNS_DIR / "demo", "--out", metavar="DIR", help="Run directory."),
    workers: int | None = typer.Option(
        None, "--workers", min=1, metavar="N",
        help="Runs at once (default: number of cores; with --executor ray: as the cluster schedules).",
    ),
    executor: str = typer.Option(
        "local", "--executor", metavar="local|ray",
        help="Where runs execute: worker processes here (local) or tasks on a Ray cluster (ray).",
    ),
    address: str | None = typer.Option(
        None, "--address", metavar="auto|HOST:PORT",
        help="With --executor ray: the cluster (default: RAY_ADDRESS, else a local Ray instance).",
    ),
    include_hidden: bool = typer.Option(
        False, "--include-hidden", help="Also run hidden studies (e.g. smoke)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Write into an existing folder that is not a normlab run directory."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate every study's runs; run nothing, write nothing."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Every study in its quick profile on built-in data, one run directory, one report."""
    import warnings

    from normlab.lab.studies import StudyError, all_studies, broken_studies

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        studies = all_studies(include_hidden=include_hidden)
        for mod, err in broken_studies().items():
            typer.echo(f"warning: study module {mod} failed to load: {err}", err=True)
    if not studies:
        _fail("no studies registered (hidden ones need --include-hidden)", code=1)
    plan = []
    try:
        for study in studies:
            cfg, configs = _prepare(study, True, {})
            plan.append((study, cfg, configs, True))
    except StudyError as exc:
        _fail(str(exc))
    _execute(plan, out, workers, quiet, force=force, dry_run=dry_run,
             executor=_executor(executor), address=address)


@app.command("advise")
def advise_cmd(
    model: str = typer.Option(
        ..., "--model", metavar="SPEC",
        help="Your model: package.module:function returning an nn.Module (it may take input_shape "
             "and num_classes; it needs no norm parameter).",
    ),
    data: str = typer.Option(..., "--data", metavar="SPEC", help="Your data (any spec `normlab study` takes)."),
    batch_size: str = typer.Option("32", "--batch-size", metavar="LIST", help="Batch size(s), e.g. 8,64."),
    budget: str = typer.Option("10m", "--budget", metavar="TIME", help="Wall-clock budget, e.g. 90s, 10m, 1h."),
    methods: str | None = typer.Option(
        None, "--methods", metavar="LIST",
        help="Methods to try (default: own,bn,gn,ln,rms,ws+gn,frn,brn,none; own = your model as written).",
    ),
    seeds: int = typer.Option(3, "--seeds", min=2, metavar="N", help="Evaluation seeds per method."),
    optimizer: str = typer.Option("adam", "--optimizer", metavar="NAME", help="adam or sgd."),
    steps: int | None = typer.Option(
        None, "--steps", min=1, metavar="N", help="Steps per run, instead of what --budget buys."
    ),
    model_option: list[str] | None = typer.Option(
        None, "--model-option", metavar="KEY=VALUE", help="Keyword argument for your model function (repeatable)."
    ),
    data_option: list[str] | None = typer.Option(
        None, "--data-option", metavar="KEY=VALUE", help="Data loader option (repeatable)."
    ),
    num_classes: int | None = typer.Option(None, "--num-classes", min=1, metavar="K", help="Number of classes."),
    workers: int | None = typer.Option(
        None, "--workers", min=1, metavar="N", help="Worker processes (default: number of cores)."
    ),
    out: Path = typer.Option(DEFAULT_RUNS_DIR / "advise", "--out", metavar="DIR", help="Run directory (resumable)."),
    force: bool = typer.Option(
        False, "--force", help="Write into an existing folder that is not a normlab run directory."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate the model, data and methods; run nothing, write nothing."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Which normalization for your model? Swap it for each method, train, compare, recommend.

    Each method replaces your model's normalization layers (normlab.convert); every (method, batch
    size) gets a short learning-rate search (seed 0), then fresh seeds at the best rate, all within
    --budget. The report gives error and step time per method with 95% intervals, the Pareto
    front, and one recommendation computed from the data.
    """
    import dataclasses
    import time

    from normlab.lab import advise as planner
    from normlab.lab.data import load_dataset
    from normlab.lab.store import DB_NAME, Store, StoreError
    from normlab.lab.studies import get_study, load_study_config
    from normlab.lab.studies import advise as study_mod
    from normlab.lab.sweep import RunDirError, available_cores, check_run_dir

    t_start = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    try:
        budget_s = planner.parse_budget(budget)
    except ValueError as exc:
        _fail(str(exc))
    if optimizer not in study_mod.LRS:
        _fail(f"--optimizer: expected one of {sorted(study_mod.LRS)}, got {optimizer!r}")
    sizes = _parse_list(batch_size, "--batch-size", _positive_int) or []
    wanted = tuple(_parse_list(methods, "--methods", str) or study_mod.METHODS)
    model_options = _parse_data_options(model_option, None)
    data_options = _parse_data_options(data_option, num_classes)
    study = get_study(study_mod.NAME)
    cfg = study_mod.Config(model=model, data=data, model_options=model_options,
                           data_options=data_options, methods=wanted,
                           batch_sizes=tuple(sizes), seeds=seeds, optimizer=optimizer,
                           lrs=study_mod.LRS[optimizer], budget_s=budget_s)
    try:
        check_run_dir(out, force=force)
    except (RunDirError, StoreError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"--out: cannot use {out} ({exc.strerror or exc})")
    settings = ("model", "data", "model_options", "data_options", "batch_sizes", "seeds", "optimizer", "lrs", "budget_s")
    previous = None
    if (out / DB_NAME).is_file():
        try:
            with Store(out / DB_NAME) as store:
                previous = load_study_config(store, study)
        except (StoreError, ValueError, TypeError) as exc:
            _fail(str(exc))
    asked = wanted
    if previous is not None and all(getattr(previous, f) == getattr(cfg, f) for f in settings) and \
            previous.asked == asked and (steps is None or steps == previous.steps):
        # the same command again: the same plan (so the same runs; finished ones are not redone)
        cfg = dataclasses.replace(previous, chosen={})
        note = "resuming the recorded plan"
    else:
        try:
            bundle = load_dataset(data, seed=0, val_fraction=0.2, **data_options)
            found = planner.candidates(cfg, bundle)
        except (ValueError, TypeError, OSError) as exc:
            _fail(str(exc))
        for m, why in found.skipped.items():
            typer.echo(f"advise: skipping {m}: {why}", err=True)
        if dry_run:
            typer.echo(f"advise: {len(found.methods)} methods ({', '.join(found.methods)}) × "
                       f"{len(sizes)} batch size(s) on {bundle.name}: model, data and methods "
                       "validated; dry run, nothing written")
            return
        cfg = dataclasses.replace(cfg, methods=tuple(found.methods),
                                  labels=found.labels, asked=asked)
        say = None if quiet else (lambda text: typer.echo(f"advise: {text}", err=True))
        calibration = planner.calibrate(cfg, bundle, found.methods, progress=say)
        # runs in parallel: the workers, but no more than the cores other processes leave free
        # (load average at the start, before this command's own calibration adds to it)
        n_workers = min(workers or available_cores(), available_cores(),
                        max(1.0, available_cores() - load_before))
        if steps is None:
            try:
                per_run = planner.run_overhead_s(cfg, bundle, found.methods)
                startup = planner.startup_s()
                steps = planner.plan_steps(cfg, calibration, found.methods, budget_s=budget_s,
                                           spent_s=time.perf_counter() - t_start, workers=n_workers,
                                           per_run_s=per_run, startup=startup)
            except ValueError as exc:
                _fail(str(exc))
        cfg = dataclasses.replace(cfg, steps=steps, calibration=calibration)
        note = "calibrated"
    n_pairs = len(cfg.methods) * len(cfg.batch_sizes)
    typer.echo(f"advise: {note}: {len(cfg.methods)} methods ({', '.join(cfg.methods)}) × "
               f"{len(cfg.batch_sizes)} batch size(s); {n_pairs * (len(cfg.lrs) + cfg.seeds)} runs of "
               f"{cfg.steps} steps", err=True)
    try:
        study.validate(cfg)
    except ValueError as exc:
        _fail(str(exc))
    search = _execute([(study, cfg, study.runs(cfg), False)], out, workers, quiet, force=force,
                      report=False)
    cfg = dataclasses.replace(cfg, chosen=study_mod.choose_lrs(search, cfg))
    results = _execute([(study, cfg, study.runs(cfg), False)], out, workers, quiet)
    done = [r for r in results if r.done]
    for card in study_mod.analyze(done, cfg):
        typer.echo(card.measurement)
    typer.echo(f"advise: {time.perf_counter() - t_start:.0f} s of the {budget_s:.0f} s budget", err=True)


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., metavar="DIR", help="A run directory (holding results.sqlite)."),
) -> None:
    """Rebuild the report of a run directory (HTML, Markdown summary, CSV)."""
    import sqlite3

    from normlab.lab.report import build_report
    from normlab.lab.store import DB_NAME, StoreError, inspect_store

    db = run_dir / DB_NAME
    if not db.is_file():
        _fail(f"{run_dir} is not a run directory (no {DB_NAME} in it)")
    try:
        inspect_store(db)
        index = build_report(run_dir)
    except StoreError as exc:
        _fail(str(exc))
    except sqlite3.DatabaseError as exc:
        _fail(f"{db}: {exc}; the run directory may be read-only or damaged")
    except OSError as exc:
        _fail(_os_error(exc, str(run_dir / "report")) + " (the report needs a writable run directory)")
    typer.echo(str(index))


# -- bench (lazy sub-app) --------------------------------------------------------------------------


@app.command(
    "bench",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench_cmd(ctx: typer.Context) -> None:
    """Benchmarks of the normalization kernels (`normlab bench --help` for their commands)."""
    try:
        from normlab.bench import app as bench_app
    except ModuleNotFoundError as exc:
        if exc.name not in ("normlab.bench",):
            raise  # a dependency of the bench module is missing: show the real error
        _fail("the benchmark module (normlab.bench) is not available in this installation", 1)
    except ImportError as exc:
        _fail(f"the benchmark module (normlab.bench) could not be loaded: {exc}", 1)
    bench_app(args=list(ctx.args), prog_name="normlab bench")


def main() -> None:
    """Console-script entry point."""
    # Figures are written to files only: never pick an interactive backend.
    os.environ.setdefault("MPLBACKEND", "Agg")
    app(prog_name="normlab")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
