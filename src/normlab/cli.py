"""The ``normlab`` command line.

Commands::

    normlab studies [--all]                 list the studies
    normlab study NAME [options]            run one study (resumable), then build its report
    normlab report DIR                      rebuild the report of a run directory
    normlab demo [--out DIR] [--workers N]  every study's quick profile, one report
    normlab bench ...                       benchmarks (from normlab.bench)

Bad input (unknown study, option a study does not have, malformed list) prints a one-line error
and exits with status 2, without a traceback. A sweep with failed runs still writes its report and
exits with status 1. Heavy modules (torch, matplotlib, studies) are imported only by the commands
that need them, so ``normlab --help`` is instant.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer

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
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


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
    if value < 1:
        raise ValueError(text)
    return value


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
    study: Study, quick: bool, overrides: dict[str, Any]
) -> tuple[Any, list[dict[str, Any]]]:
    """Config (profile + overrides, validated) and run configs of one study."""
    from normlab.lab.studies import StudyError, apply_overrides

    cfg = study.default_config(quick)
    cfg = apply_overrides(cfg, study=study.name, **overrides)
    study.validate(cfg)
    try:
        configs = study.runs(cfg)
    except ValueError as exc:  # a setting runs() cannot turn into runs (e.g. unknown norm)
        raise StudyError(f"study {study.name!r}: {exc}") from exc
    if not configs:
        raise StudyError(f"study {study.name!r} has no runs for this configuration")
    return cfg, configs


def _execute(
    plan: list[tuple[Study, Any, list[dict[str, Any]], bool]],
    out: Path,
    workers: int | None,
    quiet: bool,
) -> None:
    """Run the sweeps of ``plan`` in ``out`` (one pool), build the report, print its path."""
    from normlab.lab.report import build_report
    from normlab.lab.studies import config_meta
    from normlab.lab.sweep import SweepLockedError, run_many

    # The configs are recorded by the sweep once it holds the directory's lock, so a command
    # refused because another sweep is running there changes nothing.
    meta = dict(config_meta(study, cfg, quick=quick) for study, cfg, _c, quick in plan)
    jobs = [(study.name, c) for study, _cfg, configs, _q in plan for c in configs]
    if not quiet:
        n_studies = len(plan)
        typer.echo(f"{len(jobs)} run(s) of {n_studies} stud{'y' if n_studies == 1 else 'ies'} "
                   f"in {out}", err=True)
    try:
        results = run_many(jobs, out, workers=workers, progress=not quiet, meta=meta)
    except SweepLockedError as exc:
        _fail(str(exc), code=1)
    except KeyboardInterrupt:
        typer.echo(
            f"\nInterrupted. Finished runs are saved in {out}; run the same command again to "
            "resume.",
            err=True,
        )
        raise typer.Exit(130) from None
    except ValueError as exc:  # e.g. a run config naming an unknown runner
        _fail(str(exc))
    index = build_report(out)
    typer.echo(str(index))
    failed = {r.run_id for r in results if r.status == "failed"}
    if failed:
        typer.echo(f"{len(failed)} run(s) failed; see the report.", err=True)
        raise typer.Exit(1)


@app.command("study")
def study_cmd(
    name: str = typer.Argument(..., metavar="NAME", help="Study name (see `normlab studies`)."),
    quick: bool = typer.Option(False, "--quick", help="Use the study's small quick profile."),
    norms: str | None = typer.Option(None, "--norms", metavar="LIST", help="Comma-separated norms, e.g. bn,gn."),
    batch_sizes: str | None = typer.Option(
        None, "--batch-sizes", metavar="LIST", help="Comma-separated batch sizes, e.g. 2,4,32."
    ),
    seeds: int | None = typer.Option(None, "--seeds", min=1, metavar="N", help="Number of seeds (0..N-1)."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, metavar="N", help="Epochs per run."),
    data: str | None = typer.Option(None, "--data", metavar="SPEC", help="Data set spec."),
    model: str | None = typer.Option(None, "--model", metavar="SPEC", help="Model spec."),
    workers: int | None = typer.Option(
        None, "--workers", min=1, metavar="N", help="Worker processes (default: number of cores)."
    ),
    out: Path | None = typer.Option(
        None, "--out", metavar="DIR", help="Run directory (default: runs/<study>); resumes if it has results."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run one study (resuming what an earlier run left) and build its report."""
    from normlab.lab.studies import StudyError, get_study

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
        cfg, configs = _prepare(study, quick, overrides)
    except StudyError as exc:
        _fail(str(exc))
    out_dir = out if out is not None else DEFAULT_RUNS_DIR / study.name
    _execute([(study, cfg, configs, quick)], out_dir, workers, quiet)


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(DEFAULT_RUNS_DIR / "demo", "--out", metavar="DIR", help="Run directory."),
    workers: int | None = typer.Option(
        None, "--workers", min=1, metavar="N", help="Worker processes (default: number of cores)."
    ),
    include_hidden: bool = typer.Option(
        False, "--include-hidden", help="Also run hidden studies (e.g. smoke)."
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
    _execute(plan, out, workers, quiet)


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., metavar="DIR", help="A run directory (holding results.sqlite)."),
) -> None:
    """Rebuild the report of a run directory (HTML, Markdown summary, CSV)."""
    from normlab.lab.report import build_report
    from normlab.lab.store import DB_NAME

    if not (run_dir / DB_NAME).is_file():
        _fail(f"{run_dir} is not a run directory (no {DB_NAME} in it)")
    typer.echo(str(build_report(run_dir)))


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
