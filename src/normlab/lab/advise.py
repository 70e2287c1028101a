"""The planning half of ``normlab advise``: candidates, calibration and the step budget.

The experiment itself is the hidden ``advise`` study (:mod:`normlab.lab.studies.advise`); this
module decides what it can afford:

* :func:`candidates` builds the user's model once per method (:func:`normlab.convert` swaps its
  normalization) and keeps the methods that build and run on a batch of the user's data; a method
  that yields the very layers the model already has is dropped as a duplicate of ``own``.
* :func:`calibrate` times a few training steps of each (method, batch size) with one thread (what a
  sweep worker uses) and measures the activation memory a step keeps for backward.
* :func:`plan_steps` turns a wall-clock budget into optimizer steps per run:
  ``steps = (0.7·budget − spent − overhead) · workers / Σ_runs step_time``, the overhead being
  two worker start-ups (:func:`startup_s`) and each run's data load, model build and evaluation
  (:func:`run_overhead_s`), all measured on this machine before anything runs.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normlab.lab.data import DataBundle
from normlab.lab.models import OWN, build_model, norm_layers
from normlab.lab.studies.advise import Config, key

__all__ = ["Candidates", "calibrate", "candidates", "parse_budget", "plan_steps", "run_overhead_s", "startup_s"]

#: fewest optimizer steps per run an advice is worth giving on
MIN_STEPS = 10
_SAFETY = 0.7

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*$")


def parse_budget(text: str) -> float:
    """``"90s"``, ``"10m"``, ``"1.5h"`` or a number of seconds → seconds."""
    m = _BUDGET.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--budget: expected a duration such as 90s, 10m or 1h, got {text!r}")
    return float(m.group(1)) * {"s": 1, "sec": 1, None: 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]


@dataclass
class Candidates:
    methods: list[str]
    labels: dict[str, str]
    skipped: dict[str, str]  # method -> why


def _layers(model: nn.Module) -> list[str]:
    return [type(m).__name__ for _path, m in norm_layers(model)]


def _describe(names: list[str]) -> str:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(f"{n} ×{c}" if c > 1 else n for n, c in counts.items()) or "no norm layers"


def candidates(cfg: Config, data: DataBundle) -> Candidates:
    """The methods of ``cfg.methods`` that build and run on ``data`` (see the module docstring)."""
    x = data.train.tensors[0][: min(4, data.n_train)]
    shape = data.input_shape
    kept: list[str] = []
    labels: dict[str, str] = {}
    skipped: dict[str, str] = {}
    own_layers: list[str] | None = None
    for method in cfg.methods:
        try:
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = build_model(cfg.model, norm=method, input_shape=shape,
                                    num_classes=data.num_classes, **cfg.model_options)
            model.train()
            with torch.no_grad():
                model(x)
        except (ValueError, TypeError, RuntimeError) as exc:
            skipped[method] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            continue
        layers = _layers(model)
        if method == OWN:
            own_layers = layers
            labels[OWN] = f"yours ({_describe(layers)})"
        elif own_layers is not None and layers == own_layers and method != "none":
            skipped[method] = f"the same layers as your model ({_describe(layers)})"
            continue
        kept.append(method)
    if OWN in cfg.methods and OWN not in kept:
        raise ValueError(f"model {cfg.model!r}: cannot build or run it on {data.name} "
                         f"({skipped.get(OWN, 'unknown error')})")
    if own_layers is not None and not own_layers:
        raise ValueError(f"model {cfg.model!r} has no normalization layers: advise swaps the ones a "
                         "model has (add one where you want normalization, e.g. nn.BatchNorm2d)")
    if len(kept) < 2:
        raise ValueError(f"model {cfg.model!r}: fewer than two methods apply "
                         f"(skipped: {'; '.join(f'{m}: {r}' for m, r in skipped.items())})")
    return Candidates(kept, labels, skipped)


def _activation_mb(model: nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """MB of tensors autograd keeps for backward in one training step (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x))
    loss.backward()
    return sum(seen.values()) / 2**20


def calibrate(
    cfg: Config, data: DataBundle, methods: list[str], *, steps: int = 4,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """``{"method@batch": {"step_s", "activation_mb"}}``: median step time (1 thread) and memory."""
    from normlab.lab.train import _loss

    task = data.task
    xs, ys = data.train.tensors
    out: dict[str, dict[str, float]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for b in cfg.batch_sizes:
            gen = torch.Generator().manual_seed(0)
            for m in methods:
                if progress is not None:
                    progress(f"calibrating {m} at batch {b}")
                torch.manual_seed(0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = build_model(cfg.model, norm=m, input_shape=data.input_shape,
                                        num_classes=data.num_classes, **cfg.model_options)
                model.train()
                opt = torch.optim.Adam(model.parameters(), lr=1e-4)
                times = []
                for i in range(steps + 2):  # two warm-up steps (first calls compile kernels)
                    idx = torch.randint(0, data.n_train, (b,), generator=gen)
                    t0 = time.perf_counter()
                    loss = _loss(model(xs[idx]), ys[idx], task)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if i >= 2:
                        times.append(time.perf_counter() - t0)
                idx = torch.randint(0, data.n_train, (b,), generator=gen)
                mem = _activation_mb(model, xs[idx], lambda out, y=ys[idx]: _loss(out, y, task))
                out[key(m, b)] = {"step_s": sorted(times)[len(times) // 2], "activation_mb": mem}
    finally:
        torch.set_num_threads(threads)
    return out


def startup_s() -> float:
    """Seconds a fresh worker process takes to import the training stack (paid once per phase)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import normlab.lab.train, normlab.lab.sweep"],
                   check=False, capture_output=True, timeout=600)
    return time.perf_counter() - t0


def run_overhead_s(cfg: Config, data: DataBundle, methods: list[str]) -> float:
    """Seconds a run spends outside its training steps: data load, model build, the final
    evaluation (the slowest method's), measured here with one thread."""
    from normlab.lab.data import load_dataset
    from normlab.lab.train import evaluate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        load_dataset(cfg.data, seed=0, val_fraction=0.2, **cfg.data_options)
        fixed = time.perf_counter() - t0
        worst = 0.0
        for m in methods:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = build_model(cfg.model, norm=m, input_shape=data.input_shape,
                                    num_classes=data.num_classes, **cfg.model_options)
            evaluate(model, data.val, task=data.task)
            worst = max(worst, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return fixed + worst + 0.2  # 0.2 s: store writes and scheduling


def plan_steps(
    cfg: Config, calibration: dict[str, dict[str, float]], methods: list[str], *,
    budget_s: float, spent_s: float, workers: float, per_run_s: float, startup: float,
) -> int:
    """Optimizer steps per run that fit the rest of ``budget_s`` (see the module docstring).

    ``workers``: how many runs effectively go at once (fewer than the worker processes when other
    work holds some of the cores).

    Raises ``ValueError`` naming the budget needed when not even :data:`MIN_STEPS` fit.
    """
    per_pair = len(cfg.lrs) + cfg.seeds  # runs per (method, batch size)
    step_cost = sum(calibration[key(m, b)]["step_s"] * per_pair for m in methods for b in cfg.batch_sizes)
    n_runs = per_pair * len(methods) * len(cfg.batch_sizes)
    overhead = 2 * startup + per_run_s * n_runs / workers  # two phases, two worker pools
    left = budget_s * _SAFETY - spent_s - overhead
    steps = math.floor(left * workers / step_cost) if step_cost > 0 else 0
    if steps < MIN_STEPS:
        need = (spent_s + overhead + MIN_STEPS * step_cost / workers) / _SAFETY
        raise ValueError(
            f"--budget: {budget_s:.0f} s cannot buy {MIN_STEPS} steps for each of {n_runs} runs "
            f"({len(methods)} methods × {len(cfg.batch_sizes)} batch sizes × ({len(cfg.lrs)} "
            f"learning rates + {cfg.seeds} seeds)); it needs about {math.ceil(need)} s, or fewer "
            "--methods/--batch-size/--seeds"
        )
    return int(steps)
