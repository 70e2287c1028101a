"""``normlab bench``: benchmarks of the normalization kernels.

Commands::

    normlab bench kernels [--quick] [--out DIR] [--norms bn,gn,...] [--reps N] [--no-compile]
                          [--device cpu|cuda]
    normlab bench e2e     [--quick] [--out DIR] [--models resnet18-bn,bert,...|cnn,resnet] [--threads 1,2]
                          [--compile/--no-compile] [--contention] [--steps N]
    normlab bench compile [--quick]

``kernels``: every norm on a CNN shape set (N=32, C=64…512, H×W=8²…64², NCHW and NHWC) and a
transformer shape set (rows × hidden 256…8192), torch native vs the normlab backends, forward and
forward+backward, interleaved in one process; speed-ups, effective GB/s and % of a preallocated
copy's bandwidth; first-call (compile) time in fresh processes, cold and cached. Writes a table,
``kernels.json`` and ``kernels.png`` to ``--out`` (default ``bench-results``).

``kernels --device cuda``: the same on a CUDA device for the norms the Triton ``gpu`` backend
implements: torch native, torch.compile and normlab's gpu backend, timed with CUDA events, GB/s
and % of a device-to-device copy in the same run (``bench/gpu_quick.sh`` runs it with the GPU
tests).

``e2e``: time per training step of real architectures (``bench/zoo.py``) with torch.nn layers vs
the same model after ``normlab.convert``, eager and compiled (or of the lab's CNN and ResNet
with ``--models cnn,resnet``). Writes ``e2e.json``.

Timings are medians; the machine may be shared, so compare numbers from the same run only.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import typer

__all__ = ["app"]

app = typer.Typer(
    name="bench",
    help="Benchmarks of the normalization kernels.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

DEFAULT_OUT = Path("bench-results")


def _split(text: str | None, allowed: list[str], option: str) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        typer.echo(f"Error: {option}: unknown {bad or text!r}; expected some of {allowed}", err=True)
        raise typer.Exit(2)
    return items


def _console():
    """A rich console; wide when writing to a file or pipe (tables must not be truncated)."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=220)
    return console


def _meta(**extra) -> dict:
    import numba
    import torch

    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


@app.command("kernels")
def kernels_cmd(
    quick: bool = typer.Option(False, "--quick", help="2 shapes per set, 5 repetitions (< 60 s)"),
    large: bool = typer.Option(False, "--large", help="only the full set's smallest shape of at least 64 MiB "
                               "per set and layout (the bandwidth targets), 3 repetitions"),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="output directory"),
    norms: str = typer.Option(None, "--norms", help="comma-separated subset of the norms"),
    reps: int = typer.Option(None, "--reps", help="repetitions per contender (default 5 quick, 7 full)"),
    backends: str = typer.Option(None, "--backends",
                                 help="normlab contenders (default reference,cpu; full run adds cpu-nopool)"),
    compile_time: bool = typer.Option(True, "--compile/--no-compile",
                                      help="measure first-call time in fresh processes"),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda: the Triton gpu backend on a CUDA device"),
) -> None:
    """Kernel speed: torch native vs normlab backends, per norm and shape."""
    import torch

    from normlab.bench import kernels as K

    if device not in ("cpu", "cuda"):
        typer.echo(f"Error: --device: expected 'cpu' or 'cuda', got {device!r}", err=True)
        raise typer.Exit(2)
    if device == "cuda":
        _kernels_cuda(K, quick, out, norms, reps)
        return

    all_norms = list(K.NORMS)
    chosen = _split(norms, all_norms, "--norms") or all_norms
    default_be = ["reference", "cpu"] if quick else ["reference", "cpu", "cpu-nopool"]
    be = _split(backends, ["reference", "cpu", "cpu-nopool", "torch-compile"], "--backends") or default_be
    if "cpu" not in be:
        be.append("cpu")
    if backends is None and any(n in K.COMPOSED for n in chosen):
        be.insert(0, "torch-compile")  # the methods torch lacks: also vs the compiled composition
    contenders = ["torch", *be]
    if quick and large:
        typer.echo("Error: --large: not with --quick (the quick shapes are all below 64 MiB)", err=True)
        raise typer.Exit(2)
    reps = reps or (5 if quick else 3 if large else 7)
    console = _console()
    console.print(f"normlab bench kernels: {len(K.cases(quick, chosen, large=large))} cases × {contenders}, "
                  f"{reps} reps, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    from normlab.core import cpu

    cpu.warmup((torch.float32,))

    def progress(i, n, case):
        console.print(f"  [{i + 1}/{n}] {case.norm} {case.label}", highlight=False)

    results = K.run(quick, chosen, contenders, reps, progress=progress if not quick else None, large=large)
    compile_info = K.compile_times(full=not quick) if compile_time else None
    K.render(results, contenders, compile_info, console)
    paths = K.save(results, contenders, compile_info, out,
                   _meta(quick=quick, large=large, reps=reps, wall_s=time.perf_counter() - t0))
    console.print(f"wrote {paths['json']} and {paths['png']} ({time.perf_counter() - t0:.0f} s)")


def _kernels_cuda(K, quick: bool, out: Path, norms: str | None, reps: int | None) -> None:
    """``kernels --device cuda``: torch native, torch.compile and the gpu backend on the GPU."""
    import torch

    from normlab.core import dispatch

    if not torch.cuda.is_available():
        typer.echo("Error: --device cuda: no CUDA device (torch.cuda.is_available() is False)", err=True)
        raise typer.Exit(2)
    if "gpu" not in dispatch.available_backends():
        typer.echo("Error: --device cuda: the gpu backend needs triton: pip install 'normlab[gpu]'", err=True)
        raise typer.Exit(2)
    chosen = _split(norms, K.CUDA_NORMS, "--norms") or K.CUDA_NORMS
    contenders = ["torch", "torch-compile", "gpu"]
    reps = reps or (7 if quick else 11)
    console = _console()
    todo = K.cases(quick, chosen, "cuda")
    console.print(f"normlab bench kernels --device cuda ({torch.cuda.get_device_name()}): {len(todo)} cases × "
                  f"{contenders}, {reps} reps")
    t0 = time.perf_counter()

    def progress(i, n, case):
        console.print(f"  [{i + 1}/{n}] {case.norm} {case.label}", highlight=False)

    results = K.run(quick, chosen, contenders, reps, progress=progress, device="cuda")
    K.render_device(results, contenders, console)
    paths = K.save(results, contenders, None, out,
                   _meta(quick=quick, reps=reps, device=torch.cuda.get_device_name(),
                         wall_s=time.perf_counter() - t0))
    console.print(f"wrote {paths['json']} and {paths['png']} ({time.perf_counter() - t0:.0f} s)")


@app.command("compile")
def compile_cmd(quick: bool = typer.Option(False, "--quick", help="layer-norm kernels, float32 only")) -> None:
    """First-call time of the cpu kernels in fresh processes: cold cache, then cached."""
    from normlab.bench import kernels as K

    K.render([], ["torch", "cpu"], K.compile_times(full=not quick), _console())


@app.command("e2e")
def e2e_cmd(
    quick: bool = typer.Option(False, "--quick", help="fewer steps, no torch.compile contenders"),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="output directory"),
    models: str = typer.Option(None, "--models", help="comma-separated zoo models (resnet18-bn, resnet18-gn, "
                               "convnext, vit, bert, gpt2, qwen3) or the lab's cnn, resnet"),
    norms: str = typer.Option(None, "--norms", help="lab models only: norms (bn, gn, in, ln, mobn)"),
    steps: int = typer.Option(None, "--steps", help="timed training steps per contender"),
    batch: int = typer.Option(None, "--batch", help="batch size (zoo 16, lab 32)"),
    image: int = typer.Option(32, "--image", help="lab models only: image side"),
    threads: str = typer.Option("1,2", "--threads", help="comma-separated torch thread counts (zoo)"),
    compiled: bool = typer.Option(True, "--compile/--no-compile", help="also time torch.compile'd models (zoo)"),
    contention: bool = typer.Option(False, "--contention", help="add a row with a competing busy process (zoo)"),
    channels_last: bool = typer.Option(False, "--channels-last", help="lab models only: channels_last"),
) -> None:
    """Time per training step: real architectures with torch.nn layers vs after normlab.convert.

    Default: the zoo (ResNet-18 BN/GN, ConvNeXt, ViT, BERT, GPT-2, Qwen3; tiny random-init
    configs), eager and compiled, interleaved in one process, medians, at 1 and 2 threads.
    """
    from normlab.bench import e2e as E
    from normlab.bench import zoo

    console = _console()
    lab = list(E.MODELS)
    chosen = _split(models, zoo.available() + lab, "--models") or zoo.available()
    t0 = time.perf_counter()
    res: dict = {}
    zoo_names = [m for m in chosen if m not in lab]
    if zoo_names:
        nts = tuple(int(t) for t in threads.split(","))
        res["zoo"] = E.run_zoo(zoo_names, threads=nts, reps=steps or (5 if quick else 15), batch=batch or 16,
                               compiled=compiled and not quick, contention=contention, console=console)
        E.render_zoo(res["zoo"], console)
    lab_names = [m for m in chosen if m in lab]
    if lab_names:
        chosen_norms = _split(norms, list(E.NORMS), "--norms") or (["bn", "gn"] if quick else list(E.NORMS))
        res["lab"] = E.run(lab_names, chosen_norms, steps=steps or (5 if quick else 15), batch=batch or 32,
                           image=image, channels_last=channels_last, console=console)
        E.render(res["lab"], console)
    path = E.save(res, out, _meta(quick=quick, threads=threads, contention=contention))
    console.print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
