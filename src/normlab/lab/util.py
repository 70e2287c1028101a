"""Small helpers the lab's registries share (data sets, models and norms by name; ``"module:function"``)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

__all__ = ["add_entry", "import_object"]


def add_entry(registry: dict[str, Any], name: str, entry: Any, *, kind: str, overwrite: bool) -> None:
    """``registry[name] = entry``, refusing to replace an existing ``kind`` unless ``overwrite``."""
    if name in registry and not overwrite:
        raise ValueError(f"name: {kind} {name!r} is already registered (pass overwrite=True)")
    registry[name] = entry


def import_object(spec: str, what: str) -> Any:
    """Import ``obj`` from ``"package.module:obj"``; ``what`` names the argument in errors."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise ValueError(f"{what}: cannot import module {module_name!r} of {spec!r} ({exc})") from exc
        cwd = os.getcwd()
        on_path = any(os.path.abspath(p or os.curdir) == cwd for p in sys.path)
        where = (f"the current folder {cwd} and the Python path" if on_path else
                 f"the Python path, which does not include the current folder {cwd}")
        raise ValueError(
            f"{what}: cannot import module {module_name!r} of {spec!r}: no module named {exc.name!r} in "
            f"{where} (check the "
            "spelling, or run from the folder that holds it)"
        ) from None
    except ImportError as exc:
        raise ValueError(f"{what}: cannot import module {module_name!r} of {spec!r} ({exc})") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{what}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise TypeError(f"{what}: {spec!r} is a {type(obj).__name__}, expected a callable")
    return obj
