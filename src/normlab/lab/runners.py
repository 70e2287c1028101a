"""Registry of run functions: what executes one run config.

A runner is ``fn(config: dict, log: Callable[[int, dict], None]) -> dict``: it does the run
described by ``config``, calls ``log(epoch, metrics)`` after every epoch (the sweep commits each
call to the store at once) and returns the final metrics. A run config names its runner under
the key ``"runner"`` (default ``"train"``).

The built-in ``"train"`` runner trains a model with :func:`normlab.lab.train.train`; the built-in
``"measured-train"`` runner trains and then measures it (:mod:`normlab.lab.measured`). Studies
register their own runners in their module::

    from normlab.lab.runners import register_runner

    @register_runner("quadratic-gd")
    def quadratic_gd(config: dict, log) -> dict:
        ...

Runners must be defined at module level in an importable module: sweep workers are separate
processes that find them by importing that module (see :func:`runner_module`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeAlias

__all__ = [
    "DEFAULT_RUNNER",
    "LogFn",
    "Runner",
    "UnknownRunnerError",
    "available_runners",
    "get_runner",
    "register_runner",
    "runner_module",
    "runner_name",
]

LogFn: TypeAlias = Callable[[int, dict[str, Any]], None]
Runner: TypeAlias = Callable[[dict[str, Any], LogFn], dict[str, Any]]

DEFAULT_RUNNER = "train"
#: Train, then measure cost and initialization (:mod:`normlab.lab.measured`); used by several studies.

_RUNNERS: dict[str, Runner] = {}


class UnknownRunnerError(KeyError):
    """No runner is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def register_runner(name: str, *, replace: bool = False) -> Callable[[Runner], Runner]:
    """Decorator registering ``fn`` as the runner called ``name``.

    Registering another function under a taken name is an error unless ``replace=True``
    (re-registering the same function, e.g. on a module reload, is allowed).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"runner name must be a non-empty string, got {name!r}")

    def deco(fn: Runner) -> Runner:
        if not callable(fn):
            raise TypeError(f"runner {name!r} must be callable, got {type(fn).__name__}")
        old = _RUNNERS.get(name)
        same = old is not None and (
            getattr(old, "__module__", None),
            getattr(old, "__qualname__", None),
        ) == (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None))
        if old is not None and not same and not replace:
            raise ValueError(
                f"runner {name!r} is already registered by "
                f"{old.__module__}.{getattr(old, '__qualname__', old)}; pass replace=True to override"
            )
        _RUNNERS[name] = fn
        return fn

    return deco


def runner_name(config: dict[str, Any]) -> str:
    """The runner a config asks for (``config["runner"]``, default ``"train"``)."""
    name = config.get("runner", DEFAULT_RUNNER)
    if not isinstance(name, str) or not name:
        raise ValueError(f"config['runner'] must be a non-empty string, got {name!r}")
    return name


def get_runner(name: str) -> Runner:
    """The runner registered as ``name``.

    A runner is registered when the module that defines it is imported: a study's runners when
    the study is (:func:`normlab.lab.studies.get_study`, :func:`~normlab.lab.studies.load_all`).
    This registry knows no study, so an unknown name is an error listing the known runners.
    """
    fn = _RUNNERS.get(name)
    if fn is None:
        raise UnknownRunnerError(
            f"unknown runner {name!r}; registered runners: {', '.join(sorted(_RUNNERS)) or 'none'} "
            "(a runner is registered when the module defining it is imported, e.g. its study)"
        )
    return fn


def available_runners() -> list[str]:
    """Names of the runners registered so far (those of studies not imported yet are not included)."""
    return sorted(_RUNNERS)


def runner_module(name: str) -> str | None:
    """The module that defines runner ``name`` (what a worker process must import to get it).

    ``None`` for runners defined in ``__main__``, which another process cannot import by name.
    """
    mod = getattr(get_runner(name), "__module__", None)
    if not mod or mod in ("__main__", "__mp_main__"):
        return None
    return mod


def import_modules(modules: list[str] | tuple[str, ...]) -> None:
    """Import ``modules`` (used by sweep workers to register the runners they will need)."""
    for mod in modules:
        importlib.import_module(mod)


@register_runner(DEFAULT_RUNNER)
def train_runner(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Train a model with :func:`normlab.lab.train.train` (the ``"runner"`` key is dropped)."""
    # Imported lazily: the training stack (torch, models, data) is only needed inside workers.
    from normlab.lab.train import train

    cfg = {k: v for k, v in config.items() if k != "runner"}
    return train(cfg, log)
