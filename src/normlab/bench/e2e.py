"""End-to-end benchmark: time per training step of the lab's CNN and ResNet.

The model is built once by :func:`normlab.lab.models.build_model` (normlab layers) and a twin is
made by swapping every normlab normalization layer for its torch.nn counterpart (same
hyper-parameters and state; mean-only BN, which torch lacks, becomes the composite
``x − mean + β``). One training step = forward, cross-entropy, backward, SGD update. Contenders:

* ``torch``: the twin with torch.nn layers;
* ``cpu``: normlab layers on the fused numba backend (the default dispatch on CPU);
* ``reference``: normlab layers on the pure-torch reference backend.

They are timed interleaved (one step each per repetition, alternating order) after warm-up
steps, on the same random batch; the reported number is the median step time.
"""

from __future__ import annotations

import copy
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

__all__ = ["MODELS", "NORMS", "run", "render", "save", "torchify"]

MODELS = {"cnn": {"channels": (32, 64, 128)}, "resnet": {"depth": 20}}
NORMS = ("bn", "gn", "in", "ln", "mobn")
CONTENDERS = ("torch", "cpu", "reference")


class TorchMeanOnlyBN(nn.Module):
    """Mean-only batch norm from torch primitives (torch.nn has none)."""

    def __init__(self, num_features: int, momentum: float = 0.1):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.momentum = momentum

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = (0,) + tuple(range(2, x.dim()))
        if self.training:
            mean = x.mean(dims)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
        else:
            mean = self.running_mean
        return x - mean.view(shape) + self.bias.view(shape)


def _torch_twin(m: nn.Module) -> nn.Module | None:
    import normlab.nn as L

    def bn_args(mod):
        return dict(eps=mod.eps, momentum=mod.momentum, affine=mod.affine,
                    track_running_stats=mod.track_running_stats)

    if isinstance(m, L.MeanOnlyBatchNorm):
        t = TorchMeanOnlyBN(m.num_features, m.momentum or 0.1)
    elif isinstance(m, L.BatchNorm1d):
        t = nn.BatchNorm1d(m.num_features, **bn_args(m))
    elif isinstance(m, L.BatchNorm2d):
        t = nn.BatchNorm2d(m.num_features, **bn_args(m))
    elif isinstance(m, L.InstanceNorm1d):
        t = nn.InstanceNorm1d(m.num_features, **bn_args(m))
    elif isinstance(m, L.InstanceNorm2d):
        t = nn.InstanceNorm2d(m.num_features, **bn_args(m))
    elif isinstance(m, L.GroupNorm):
        t = nn.GroupNorm(m.num_groups, m.num_channels, eps=m.eps, affine=m.affine)
    elif isinstance(m, L.LayerNorm):
        t = nn.LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                         bias=getattr(m, "bias", None) is not None)
    elif isinstance(m, L.RMSNorm):
        t = nn.RMSNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.weight is not None)
    else:
        return None
    t.load_state_dict(m.state_dict(), strict=False)
    return t.train(m.training)


def torchify(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` with every normlab norm layer replaced by its torch.nn twin."""
    twin = copy.deepcopy(model)

    def walk(mod: nn.Module):
        for name, child in list(mod.named_children()):
            t = _torch_twin(child)
            if t is not None:
                setattr(mod, name, t)
            else:
                walk(child)

    walk(twin)
    return twin


def _count_norms(model: nn.Module) -> int:
    from normlab.nn.utils import is_norm_layer

    return sum(is_norm_layer(m) for m in model.modules())


def _step_fn(model: nn.Module, x, target, backend: str | None):
    from normlab.core.dispatch import use_backend

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        if backend is None:
            loss = loss_fn(model(x), target)
            loss.backward()
        else:
            with use_backend(backend):
                loss = loss_fn(model(x), target)
                loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def run(models, norms, *, steps: int, batch: int, image: int, channels_last: bool = False,
        warmup: int = 2, console=None) -> list[dict]:
    from normlab.lab.models import build_model

    results = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image, image, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (batch,), generator=g)
    for name in models:
        for norm in norms:
            try:
                model = build_model(name, norm=norm, input_shape=(3, image, image), num_classes=10,
                                    **MODELS[name])
            except (ValueError, TypeError) as exc:
                if console:
                    console.print(f"  skip {name}/{norm}: {exc}")
                continue
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            twin = torchify(model)
            models_by = {"torch": twin, "cpu": model, "reference": copy.deepcopy(model)}
            steps_by = {
                c: _step_fn(models_by[c], x, target, None if c == "torch" else c) for c in CONTENDERS
            }
            for c in CONTENDERS:
                for _ in range(warmup):
                    steps_by[c]()
            samples = {c: [] for c in CONTENDERS}
            gc.collect()
            for rep in range(steps):
                order = CONTENDERS if rep % 2 == 0 else CONTENDERS[::-1]
                for c in order:
                    t = time.perf_counter()
                    steps_by[c]()
                    samples[c].append(time.perf_counter() - t)
            med = {c: statistics.median(v) for c, v in samples.items()}
            row = {
                "model": name,
                "norm": norm,
                "norm_layers": _count_norms(model),
                "params": sum(p.numel() for p in model.parameters()),
                "step_ms": {c: med[c] * 1e3 for c in CONTENDERS},
                "speedup_vs_torch": {c: med["torch"] / med[c] for c in CONTENDERS},
                "samples_ms": {c: [s * 1e3 for s in v] for c, v in samples.items()},
            }
            results.append(row)
            if console:
                console.print(f"  {name}/{norm}: " + ", ".join(
                    f"{c} {row['step_ms'][c]:.1f} ms" for c in CONTENDERS), highlight=False)
    return results


def render(results: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="training step time (median ms): normlab layers vs torch.nn layers")
    for col in ("model", "norm", "norm layers", "torch ms", "cpu ms", "reference ms",
                "cpu ×", "reference ×"):
        t.add_column(col, justify="left" if col in ("model", "norm") else "right")
    for r in results:
        s = r["step_ms"]
        t.add_row(r["model"], r["norm"], str(r["norm_layers"]), f"{s['torch']:.1f}",
                  f"{s['cpu']:.1f}", f"{s['reference']:.1f}",
                  f"{r['speedup_vs_torch']['cpu']:.2f}", f"{r['speedup_vs_torch']['reference']:.2f}")
    console.print(t)


def save(results, out: Path, meta: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "e2e.json"
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return path


# --------------------------------------------------------------------------------------------
# real architectures (bench/zoo.py): torch layers vs the same model after normlab.convert,
# eager and torch.compile'd, at several thread counts, interleaved in one process
# --------------------------------------------------------------------------------------------

ZOO_CONTENDERS = ("torch", "normlab", "torch+compile", "normlab+compile")

_BUSY = (
    "import time, torch\n"
    "torch.set_num_threads(1)\n"
    "a = torch.randn(512, 512)\n"
    "end = time.time() + {seconds}\n"
    "while time.time() < end:\n"
    "    a = torch.tanh(a @ a)\n"
)


def _zoo_step(workload, model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = workload.loss(model, workload.inputs)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _contenders(name: str, batch: int, compiled: bool):
    import normlab
    from normlab.bench import zoo

    w = zoo.build(name, batch)
    ours = normlab.convert(copy.deepcopy(w.model))
    models = {"torch": w.model, "normlab": ours}
    if compiled:
        models["torch+compile"] = torch.compile(copy.deepcopy(w.model))
        models["normlab+compile"] = torch.compile(copy.deepcopy(ours))
    return w, {c: _zoo_step(w, m) for c, m in models.items()}


def _time_interleaved(steps_by: dict, reps: int, warmup: int) -> dict[str, list[float]]:
    for step in steps_by.values():
        for _ in range(warmup):
            step()
    names = list(steps_by)
    samples = {c: [] for c in names}
    gc.collect()
    for rep in range(reps):
        for c in (names if rep % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            steps_by[c]()
            samples[c].append(time.perf_counter() - t)
    return samples


def run_zoo(names, *, threads=(1, 2), reps: int = 15, batch: int = 16, compiled: bool = True,
            contention: bool = False, warmup: int = 3, console=None) -> list[dict]:
    """Median training-step time per (model, threads, contender); ratios are torch / normlab."""
    import subprocess
    import sys

    results = []
    before = torch.get_num_threads()
    try:
        for name in names:
            w, steps_by = _contenders(name, batch, compiled)
            settings = [(t, False) for t in threads]
            if contention:
                settings.append((max(threads), True))
            for nt, busy in settings:
                torch.set_num_threads(nt)
                proc = None
                if busy:
                    proc = subprocess.Popen([sys.executable, "-c", _BUSY.format(seconds=600)])
                try:
                    samples = _time_interleaved(steps_by, reps, warmup)
                finally:
                    if proc is not None:
                        proc.kill()
                        proc.wait()
                med = {c: statistics.median(v) * 1e3 for c, v in samples.items()}
                row = {"model": name, "threads": nt, "competing_process": busy,
                       "norm_layers": sum(1 for m in w.model.modules() if _is_norm(m)),
                       "step_ms": med,
                       "normlab_speedup": med["torch"] / med["normlab"],
                       "samples_ms": {c: [s * 1e3 for s in v] for c, v in samples.items()}}
                if compiled:
                    row["normlab_compiled_speedup"] = med["torch+compile"] / med["normlab+compile"]
                results.append(row)
                if console:
                    console.print(f"  {name} ×{nt}{' busy' if busy else ''}: " + ", ".join(
                        f"{c} {v:.1f} ms" for c, v in med.items()), highlight=False)
    finally:
        torch.set_num_threads(before)
    return results


def _is_norm(m: nn.Module) -> bool:
    from normlab.nn.utils import is_norm_layer

    # Model zoos define their own RMSNorm classes (not torch subclasses): counted by name.
    return is_norm_layer(m) or type(m).__name__.endswith("RMSNorm")


def render_zoo(results: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="training step (median ms): torch.nn layers vs normlab.convert(model)")
    cols = ["model", "threads", "norm layers", *[f"{c} ms" for c in ZOO_CONTENDERS], "eager ×", "compiled ×"]
    for col in cols:
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        s = r["step_ms"]
        t.add_row(r["model"], f"{r['threads']}{' +busy' if r['competing_process'] else ''}", str(r["norm_layers"]),
                  *[f"{s[c]:.1f}" if c in s else "-" for c in ZOO_CONTENDERS],
                  f"{r['normlab_speedup']:.2f}",
                  f"{r['normlab_compiled_speedup']:.2f}" if "normlab_compiled_speedup" in r else "-")
    console.print(t)
