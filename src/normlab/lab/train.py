"""The lab's training loop: one explicit function, meant to be read in one sitting.

``train(config)`` loads the data, builds the model, trains it with SGD (momentum 0.9) or Adam at a
constant learning rate, evaluates it in eval mode after each epoch (or every ``eval_every``
epochs) and returns the final metrics. Runs are deterministic on CPU for a given config: the
seed fixes the model init and the batch order (the data set and its split are fixed separately
by ``data_seed``), ``torch.use_deterministic_algorithms`` is on during the run, and batches are
drawn in the main process.

Metrics logged after each epoch (``log(epoch, metrics)``):

* ``epoch``, ``step`` (optimizer steps so far), ``samples_seen``, ``lr``;
* ``train_loss``: mean training loss over the epoch's steps (in train mode, as the model was
  updated);
* ``val_loss``, ``val_acc`` (fraction in [0, 1]; ``None`` for regression): on evaluated epochs;
* ``epoch_time_s``: wall time of the epoch's training steps (evaluation excluded);
  ``time_per_step_s``: the same divided by its steps; ``eval_time_s``;
* ``peak_rss_mb``: the peak resident set size of the whole process so far (``ru_maxrss``). It
  never goes down and includes everything the process did before this run: to compare the memory
  of two configurations, run each in a fresh process;
* ``diverged``: a training loss (or validation loss) was NaN/inf; training then stops.

Hooks (``hooks=[...]``) are objects with any of the :class:`TrainHook` methods; they let studies
measure things during training (activation percentiles, gradient norms...) without touching the
loop. ``on_epoch_end`` may return a dict of extra metrics, merged into the logged ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from normlab._checks import check_positive_int
from normlab.lab.data import DataBundle, load_dataset
from normlab.lab.models import build_model, count_parameters, needs_data_init
from normlab.nn.utils import init_weight_norm_

__all__ = [
    "TrainConfig",
    "TrainHook",
    "evaluate",
    "peak_rss_mb",
    "seed_everything",
    "set_threads",
    "train",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
LR_SCALINGS: tuple[str, ...] = ("linear", "none")
LogFn = Callable[[int, dict[str, Any]], None]


@dataclass
class TrainConfig:
    """Everything that defines a run; JSON-serializable (:meth:`to_dict` / :meth:`from_dict`).

    Attributes:
        data: data spec for :func:`normlab.lab.data.load_dataset`.
        model: model name for :func:`normlab.lab.models.build_model`.
        norm: norm name (``"bn"``, ``"gn:4"``, ``"wn+mobn"``...).
        batch_size: training batch size; the last incomplete batch of an epoch is dropped (so
            BN never sees a batch of 1).
        epochs: number of passes over the training set.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        lr: base learning rate.
        lr_scaling: ``"linear"``: the rate used is ``lr * batch_size / base_batch`` (the linear
            scaling rule used in the Group Norm paper); ``"none"``: ``lr`` as given.
        base_batch: the batch size at which ``lr`` applies unscaled.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 weight decay on every parameter.
        seed: seeds model init and batch order.
        data_seed: seeds the data (synthetic draws, split of user data); kept apart from
            ``seed`` so that repeated seeds vary the training, not the data set.
        val_fraction: held-out fraction when the data has no validation part.
        max_steps: stop after this many optimizer steps (a budget for quick profiles), or None.
        data_options: extra options for ``load_dataset`` (e.g. ``{"limit": 500}``).
        model_options: extra options for ``build_model`` (e.g. ``{"hidden": [64]}``).
        eval_every: evaluate every this many epochs (the last epoch is always evaluated).
        init_samples: number of training samples for weight norm's data-dependent init; fixed,
            not ``batch_size``, so the init does not change with the batch size under study.
    """

    data: str = "digits"
    model: str = "cnn"
    norm: str = "bn"
    batch_size: int = 32
    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 0.1
    lr_scaling: str = "linear"
    base_batch: int = 32
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    data_seed: int = 0
    val_fraction: float = 0.2
    max_steps: int | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 1
    init_samples: int = 256

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "base_batch", "eval_every", "init_samples"):
            check_positive_int(getattr(self, name), name)
        check_positive_int(self.max_steps, "max_steps", allow_none=True)
        for name in ("data", "model", "norm"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name}: expected a str, got {type(getattr(self, name)).__name__}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr_scaling not in LR_SCALINGS:
            raise ValueError(f"lr_scaling: expected one of {list(LR_SCALINGS)}, got {self.lr_scaling!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr: expected a number > 0, got {self.lr!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected a number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: expected a number in [0, 1), got {self.momentum!r}")
        for name in ("data_options", "model_options"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name}: expected a dict, got {type(getattr(self, name)).__name__}")

    @property
    def effective_lr(self) -> float:
        """The learning rate actually used, after ``lr_scaling``."""
        if self.lr_scaling == "linear":
            return self.lr * self.batch_size / self.base_batch
        return float(self.lr)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (deep copy), ready for ``json.dumps``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys are an error (a typo must not pass silently)."""
        if not isinstance(values, dict):
            raise TypeError(f"config: expected a TrainConfig or dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; expected some of {sorted(known)}")
        return cls(**values)


class TrainHook:
    """Base class for training hooks; override the methods you need (all are optional).

    A hook may also be any object that has some of these methods.
    """

    def on_train_start(self, model: nn.Module, config: TrainConfig, data: DataBundle) -> None:
        """Called once, after the model is built (and data-initialized), before the first step."""

    def on_step(
        self, step: int, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], loss: float
    ) -> None:
        """Called after each optimizer step; gradients of this step are still in ``p.grad``."""

    def on_epoch_end(self, epoch: int, model: nn.Module, metrics: dict[str, Any]) -> dict[str, Any] | None:
        """Called before ``log``; a returned dict is merged into the epoch's metrics."""
        return None

    def on_train_end(self, model: nn.Module, result: dict[str, Any]) -> None:
        """Called with the trained model and the final metrics."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def set_threads(n: int) -> int:
    """Set torch's intra-op thread count to ``n``; returns the previous count."""
    check_positive_int(n, "n")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    return previous


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process so far, in MiB (None where unavailable)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Turn on deterministic algorithms for the run and restore the previous setting after."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # warn_only: an op without a deterministic kernel warns instead of failing the run.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _batches(
    data: TensorDataset, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled full batches of an in-memory dataset (the incomplete last batch is dropped).

    Indexing the tensors directly replaces a DataLoader: with tiny models and batch size 2, the
    DataLoader's per-sample collation would cost more than the training step itself.
    """
    x, y = data.tensors
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def _loss(out: torch.Tensor, y: torch.Tensor, task: str, reduction: str = "mean") -> torch.Tensor:
    if task == "regression":
        return F.mse_loss(out.squeeze(-1), y, reduction=reduction)
    return F.cross_entropy(out, y, reduction=reduction)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: TensorDataset, *, task: str = "classification", batch_size: int = 512
) -> tuple[float, float | None]:
    """Mean loss and accuracy (``None`` for regression) of ``model`` on ``data``, in eval mode.

    Eval mode makes BN use its running statistics, so the result does not depend on
    ``batch_size``. The model's previous mode is restored.
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")
    was_training = model.training
    model.eval()
    try:
        x_all, y_all = data.tensors
        total_loss, correct = 0.0, 0
        for start in range(0, len(y_all), batch_size):
            x, y = x_all[start : start + batch_size], y_all[start : start + batch_size]
            out = model(x)
            total_loss += _loss(out, y, task, reduction="sum").item()
            if task == "classification":
                correct += (out.argmax(dim=1) == y).sum().item()
    finally:
        model.train(was_training)
    n = max(len(y_all), 1)
    return total_loss / n, (correct / n if task == "classification" else None)


@torch.no_grad()
def _check_outputs(model: nn.Module, data: DataBundle, spec: str) -> None:
    """The model must give one output per class (1 for regression): checked on two samples.

    Eval mode and no autograd: nothing in the model changes (no running-statistics update).
    """
    x = data.train.tensors[0][:2]
    was_training = model.training
    model.eval()
    try:
        out = model(x)
    finally:
        model.train(was_training)
    k = data.num_classes or 1
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    if shape != (len(x), k) and not (data.num_classes == 0 and shape == (len(x),)):
        raise ValueError(
            f"model {spec!r}: expected outputs of shape ({len(x)}, {k}) for a batch of {len(x)} "
            f"({data.num_classes} classes in {data.name}), got {shape or type(out).__name__}"
        )


def _call_hooks(hooks: Sequence[Any], method: str, *args: Any) -> list[Any]:
    return [getattr(h, method)(*args) for h in hooks if callable(getattr(h, method, None))]


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def train(
    config: TrainConfig | dict[str, Any],
    log: LogFn | None = None,
    *,
    hooks: Sequence[Any] | Any | None = None,
) -> dict[str, Any]:
    """Train one configuration and return its final metrics (see the module docstring).

    Args:
        config: a :class:`TrainConfig` or a dict of its fields.
        log: called as ``log(epoch, metrics)`` after each epoch.
        hooks: a hook or a sequence of hooks (see :class:`TrainHook`).

    Returns:
        ``final_val_loss``, ``final_val_acc``, ``best_val_acc``, ``best_val_loss``,
        ``best_epoch``, ``final_train_loss``, ``epochs``, ``steps``, ``samples_seen``,
        ``diverged``, ``time_per_step_s``, ``train_time_s``, ``total_time_s``, ``lr``,
        ``n_params``, ``n_train``, ``n_val``, ``task``, ``peak_rss_mb``.
        Accuracies are fractions; ``None`` for regression.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if hooks is None:
        hook_list: list[Any] = []
    elif isinstance(hooks, (list, tuple)):
        hook_list = list(hooks)
    else:
        hook_list = [hooks]
    t_start = time.perf_counter()

    with _deterministic():
        # Data is fixed by data_seed (also for user functions that draw from the global
        # generators); everything after the second seed_everything depends on seed only.
        seed_everything(cfg.data_seed)
        data = load_dataset(cfg.data, seed=cfg.data_seed, val_fraction=cfg.val_fraction, **cfg.data_options)
        if data.n_train < cfg.batch_size:
            raise ValueError(
                f"batch_size: {cfg.batch_size} is larger than the {data.n_train} training samples"
            )
        seed_everything(cfg.seed)
        model = build_model(
            cfg.model,
            norm=cfg.norm,
            input_shape=data.input_shape,
            num_classes=data.num_classes,
            **cfg.model_options,
        )
        task = data.task
        _check_outputs(model, data, cfg.model)
        batch_gen = torch.Generator().manual_seed(cfg.seed)

        if needs_data_init(model):
            # Weight norm's data-dependent init (Salimans & Kingma): scale/shift each layer so
            # that its outputs start with zero mean and unit variance on a sample of the data.
            init_gen = torch.Generator().manual_seed(cfg.seed + 1)
            idx = torch.randperm(data.n_train, generator=init_gen)[: cfg.init_samples]
            model.train()
            init_weight_norm_(model, data.train.tensors[0][idx])

        lr = cfg.effective_lr
        if cfg.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        else:
            opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        _call_hooks(hook_list, "on_train_start", model, cfg, data)

        step, epoch, samples_seen, train_time = 0, 0, 0, 0.0
        diverged, out_of_steps = False, False
        train_loss = val_loss = float("nan")
        val_acc: float | None = None
        best_val_acc: float | None = None
        best_val_loss, best_epoch = math.inf, 0

        while epoch < cfg.epochs and not diverged and not out_of_steps:
            epoch += 1
            model.train()
            loss_sum, epoch_steps = 0.0, 0
            t0 = time.perf_counter()
            for x, y in _batches(data.train, cfg.batch_size, batch_gen):
                loss = _loss(model(x), y, task)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    diverged = True  # stop before the bad gradient reaches the weights
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                epoch_steps += 1
                samples_seen += len(y)
                loss_sum += loss_value
                _call_hooks(hook_list, "on_step", step, model, (x, y), loss_value)
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    out_of_steps = True
                    break
            epoch_time = time.perf_counter() - t0
            train_time += epoch_time
            train_loss = loss_sum / epoch_steps if epoch_steps else float("nan")

            metrics: dict[str, Any] = {
                "epoch": epoch,
                "step": step,
                "samples_seen": samples_seen,
                "lr": lr,
                "train_loss": train_loss,
                "epoch_time_s": epoch_time,
                "time_per_step_s": epoch_time / epoch_steps if epoch_steps else None,
            }
            last = epoch == cfg.epochs or diverged or out_of_steps
            if last or epoch % cfg.eval_every == 0:
                t1 = time.perf_counter()
                val_loss, val_acc = evaluate(model, data.val, task=task)
                if not math.isfinite(val_loss):
                    diverged = True
                metrics.update(val_loss=val_loss, val_acc=val_acc, eval_time_s=time.perf_counter() - t1)
                if val_acc is not None and (best_val_acc is None or val_acc > best_val_acc):
                    best_val_acc, best_epoch = val_acc, epoch
                if val_loss < best_val_loss:
                    best_val_loss = val_loss
                    if val_acc is None:
                        best_epoch = epoch
            metrics.update(peak_rss_mb=peak_rss_mb(), diverged=diverged)
            for extra in _call_hooks(hook_list, "on_epoch_end", epoch, model, metrics):
                if extra:
                    metrics.update(extra)
            if log is not None:
                log(epoch, metrics)

    result: dict[str, Any] = {
        "final_val_loss": val_loss,
        "final_val_acc": val_acc,
        "best_val_acc": best_val_acc,
        "best_val_loss": best_val_loss if math.isfinite(best_val_loss) else None,
        "best_epoch": best_epoch,
        "final_train_loss": train_loss,
        "epochs": epoch,
        "steps": step,
        "samples_seen": samples_seen,
        "diverged": diverged,
        "time_per_step_s": train_time / step if step else None,
        "train_time_s": train_time,
        "total_time_s": time.perf_counter() - t_start,
        "lr": lr,
        "n_params": count_parameters(model),
        "n_train": data.n_train,
        "n_val": data.n_val,
        "task": task,
        "peak_rss_mb": peak_rss_mb(),
    }
    _call_hooks(hook_list, "on_train_end", model, result)
    return result
