"""Fake runners for the lab engine's tests (importable by sweep worker processes).

pytest puts ``tests/`` on ``sys.path`` and spawned workers inherit it, so a sweep started from a
test finds these runners: the sweep tells its workers to import the module that defines each
runner. Subprocess-based tests put ``tests/`` on ``PYTHONPATH`` themselves.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from normlab.lab.runners import LogFn, register_runner


@register_runner("fake-echo")
def echo(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Logs ``epochs`` epochs of a decreasing loss; returns the config's ``value``."""
    epochs = int(config.get("epochs", 2))
    for e in range(epochs):
        log(e, {"loss": 1.0 / (e + 1), "value": config.get("value")})
    return {"value": config.get("value"), "loss": 1.0 / epochs, "pid": os.getpid()}


@register_runner("fake-fail")
def fail(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Logs one epoch, then raises with the config's ``message``."""
    log(0, {"loss": 1.0})
    raise ValueError(str(config.get("message", "boom")))


@register_runner("fake-sleepy")
def sleepy(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Sleeps ``sleep`` seconds per epoch; leaves a trace of every start and end on disk.

    ``<marker_dir>/<index>.log`` gets a line ``start <token>`` when the runner starts and
    ``end <token>`` when it returns; every epoch's metrics and the final dict carry the token,
    so a test can tell which attempt wrote what.
    """
    token = uuid.uuid4().hex
    marker = Path(config["marker_dir"]) / f"{config['index']}.log"
    with marker.open("a") as fh:
        fh.write(f"start {token}\n")
    for e in range(int(config["epochs"])):
        time.sleep(float(config["sleep"]))
        log(e, {"token": token, "loss": 1.0 / (e + 1)})
    with marker.open("a") as fh:
        fh.write(f"end {token}\n")
    return {"token": token, "pid": os.getpid()}


@register_runner("fake-threads")
def threads(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Reports the torch thread count and thread environment this worker runs with."""
    import torch

    log(0, {"threads": torch.get_num_threads()})
    return {"threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}


@register_runner("fake-crash")
def crash(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Kills its own process (like a segfault) when ``crash`` is true; else returns at once."""
    if config.get("crash"):
        time.sleep(0.2)
        os._exit(3)
    time.sleep(float(config.get("sleep", 0.0)))
    log(0, {"ok": 1})
    return {"ok": True}


@register_runner("fake-numpy")
def numpy_final(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Returns numpy scalars and NaN (must be stored as JSON)."""
    import numpy as np

    log(0, {"loss": np.float32(0.5), "nan": float("nan")})
    return {"acc": np.float64(0.75), "steps": np.int64(3), "curve": np.arange(3), "nan": float("nan")}


@register_runner("fake-die-once")
def die_once(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Logs an epoch, then kills its own process on the first attempt (``<marker>`` absent).

    Every epoch and the final dict carry a per-attempt token, so a test can check that nothing
    of the killed attempt is left in the store.
    """
    token = uuid.uuid4().hex
    marker = Path(config["marker"])
    first = not marker.exists()
    marker.write_text(token)
    log(0, {"token": token})
    if first:
        time.sleep(0.2)
        os._exit(3)
    for e in range(1, int(config.get("epochs", 3))):
        log(e, {"token": token})
    return {"token": token, "pid": os.getpid()}
