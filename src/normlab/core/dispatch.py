"""Backend selection: each op call goes to the fastest backend that supports its input.

A backend is a module exposing the ops of docs/CONTRACTS.md (``batch_norm``, ``batch_norm_eval``,
``group_norm``, ``layer_norm``) plus a ``supports(op, x) -> bool`` predicate. Backends are tried
in priority order; ``reference`` supports everything and is the fallback. Force one with::

    with normlab.use_backend("reference"):
        y = layer(x)

or per layer with the ``backend=`` keyword of the modules.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Iterator
from types import ModuleType

from torch import Tensor

# name -> (module path, priority); lower priority is tried first. Modules are imported lazily so
# that importing normlab does not compile kernels.
_REGISTRY: dict[str, tuple[str, int]] = {
    "gpu": ("normlab.core.gpu", -10),  # Triton kernels for CUDA tensors (needs the `gpu` extra)
    "cpu": ("normlab.core.cpu", 0),
    "reference": ("normlab.core.reference", 100),
}
_loaded: dict[str, ModuleType | None] = {}
_forced = threading.local()


_ORDER: list[str] = []


def _order() -> list[str]:
    if len(_ORDER) != len(_REGISTRY):
        _ORDER[:] = sorted(_REGISTRY, key=lambda n: _REGISTRY[n][1])
    return _ORDER


def register_backend(name: str, module_path: str, priority: int = 50) -> None:
    """Add a backend module (imported on first use) at ``priority`` (lower is preferred)."""
    _REGISTRY[name] = (module_path, priority)
    _loaded.pop(name, None)
    _ORDER.clear()


def available_backends() -> list[str]:
    """Names of the registered backends that import on this machine, in priority order."""
    return [n for n in _order() if _load(n) is not None]


def _load(name: str) -> ModuleType | None:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_REGISTRY[name][0])
        except ImportError:
            _loaded[name] = None  # e.g. numba missing: the backend is simply unavailable
    return _loaded[name]


def lane_ok() -> bool:
    """No backend is forced in this thread and none but "gpu" (CUDA tensors only) precedes "cpu":
    for a CPU tensor the CPU backend's fast lane is what :func:`backend_module` would pick."""
    if getattr(_forced, "name", None) is not None:
        return False
    order = _order()
    return all(n == "gpu" for n in order[: order.index("cpu")]) if "cpu" in order else False


def loaded(name: str) -> ModuleType | None:
    """Backend ``name`` if it has been imported already (never imports it), else None."""
    return _loaded.get(name)


def load(name: str) -> ModuleType | None:
    """Backend ``name``, imported on first use; None where it cannot be imported here."""
    return _load(name)


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"backend: expected one of {sorted(_REGISTRY)}, got {name!r}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager forcing every normlab op in this thread onto backend ``name``."""
    _check_name(name)
    if _load(name) is None:
        raise RuntimeError(f"backend {name!r} is registered but could not be imported")
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


def current_backend() -> str | None:
    """The backend forced by :func:`use_backend` in this thread, or None for automatic choice."""
    return getattr(_forced, "name", None)


def backend_module(op: str, x: Tensor, backend: str | None = None) -> ModuleType:
    """The backend module that runs forward op ``op`` (and its backward) for input ``x``.

    Precedence: the ``backend`` argument (a per-layer override), then :func:`use_backend`, then
    the first backend by priority whose ``supports(op, x)`` is true. A forced backend that does
    not support the input falls back to the reference (documented: 16-bit floats on the CPU
    backend, for example), so forcing never produces an error for a valid input.
    """
    name = backend or getattr(_forced, "name", None)
    if name is not None:
        _check_name(name)
        module = _load(name)
        # asked for by name: wait for it to be ready (e.g. the CPU kernels compiling) if it can
        if module is not None and getattr(module, "wait_ready", module.supports)(op, x):
            return module
        return _load("reference")
    for candidate in _order():
        module = _load(candidate)
        if module is not None and module.supports(op, x):
            return module
    raise RuntimeError(f"no backend supports {op} for {x.dtype} on {x.device}")  # unreachable


def resolve(op: str, x: Tensor, backend: str | None = None):
    """The backend function implementing ``op`` for ``x`` (see :func:`backend_module`)."""
    return getattr(backend_module(op, x, backend), op)
