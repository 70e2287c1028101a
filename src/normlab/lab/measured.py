"""The ``measured-train`` runner: train a model, then measure what it costs and how it starts.

Shared by the cost, weight-norm and regularization studies (their identical run configs are then
computed once in a run directory); it registers itself with :mod:`normlab.lab.runners` when
imported (sweep workers import it by the runner's module, as for a study's runners). After :func:`normlab.lab.train.train`, in the same
process, it measures (each part switched by a ``measure`` key, :data:`MEASURE_DEFAULTS`):

* ``init_check``: pre-activation statistics on the batch weight norm's data-dependent init used
  (every conv/linear output after the norm layer it feeds, per unit: mean and std);
* ``train_eval``: loss and accuracy on the training set in eval mode, and the gaps to validation;
* ``timing``: median time per training step (forward + backward + optimizer step, lr 0) and per
  inference step, the run's model timed in turns with the same architecture under the
  ``references`` norms (:func:`normlab.lab.metrics.interleaved_times`): ratios immune to the
  machine's load drifting;
* ``memory``: bytes of one training step (:func:`normlab.lab.metrics.training_step_memory`);
* ``fold``: BatchNorm folded into the preceding conv/linear layers — inference speed-up and the
  largest output difference on the validation set.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from normlab.lab.metrics import (
    capture_normalized_outputs,
    interleaved_times,
    median_ratio,
    standardization_deviation,
    training_step_memory,
    unit_stats,
)
from normlab.lab.models import build_model, needs_data_init
from normlab.lab.runners import LogFn, register_runner
from normlab.lab.train import TrainConfig, evaluate, train
from normlab.nn.utils.fold import fold_batch_norm, foldable_pairs

__all__ = ["MEASURED_RUNNER", "MEASURE_DEFAULTS", "STUDY_SETTINGS", "measured_config", "measured_train", "study_settings"]

#: the runner name run configs give (``"runner"``)
MEASURED_RUNNER = "measured-train"

#: What the measured-train runner measures, and how (defaults for keys a config leaves out).
MEASURE_DEFAULTS: dict[str, Any] = {
    "init_check": True,  # pre-activation statistics on the data-init batch, before training
    "train_eval": True,  # loss/accuracy on the training set in eval mode, after training
    "timing": True,  # time per training/inference step, own model vs references, in turns
    "timing_repeats": 20,
    "references": ["none", "bn"],
    "infer_batch": 256,
    "memory": True,
    "fold": True,  # fold BatchNorm (if any) and time / compare the folded model
}


#: Fields a study's Config shares by name with :func:`measured_config` (see :func:`study_settings`).
STUDY_SETTINGS: tuple[str, ...] = ("epochs", "data", "batch_size", "optimizer", "lr", "max_steps", "limit")


def study_settings(cfg: Any) -> dict[str, Any]:
    """The :data:`STUDY_SETTINGS` fields that the study Config ``cfg`` has, by name."""
    return {k: getattr(cfg, k) for k in STUDY_SETTINGS if hasattr(cfg, k)}


def measured_config(
    *,
    model: str,
    norm: str,
    seed: int,
    epochs: int,
    data: str = "digits",
    batch_size: int = 32,
    optimizer: str = "adam",
    lr: float = 0.003,
    lr_scaling: str = "none",
    max_steps: int | None = None,
    limit: int | None = None,
    model_options: dict[str, Any] | None = None,
    measure: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A full ``measured-train`` run config (TrainConfig fields + ``runner`` + ``measure``)."""
    cfg: dict[str, Any] = {
        "runner": MEASURED_RUNNER,
        "data": data,
        "model": model,
        "norm": norm,
        "seed": int(seed),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "optimizer": optimizer,
        "lr": float(lr),
        "lr_scaling": lr_scaling,
        "max_steps": None if max_steps is None else int(max_steps),
        "data_options": {} if limit is None else {"limit": int(limit)},
        "model_options": dict(model_options or {}),
        "measure": {**MEASURE_DEFAULTS, **(measure or {})},
    }
    return cfg


class _MeasureHook:
    """Keeps the model and data of a train() call and checks the pre-activations at the start.

    Pre-activations: each conv/linear layer's output after the norm layer it feeds (the head's
    logits included), per unit, on the batch the data-dependent init used.
    """

    def __init__(self, init_check: bool) -> None:
        self.init_check = init_check
        self.model: Any = None
        self.data: Any = None
        self.init: dict[str, Any] = {}

    def on_train_start(self, model: Any, config: Any, data: Any) -> None:
        self.model, self.data = model, data
        if not self.init_check:
            return
        # The batch weight norm's data-dependent init used: train() draws it this way (see
        # normlab.lab.train.train); recomputed here so that every norm is checked on it.
        gen = torch.Generator().manual_seed(config.seed + 1)
        idx = torch.randperm(data.n_train, generator=gen)[: config.init_samples]
        x = data.train.tensors[0][idx]
        try:
            acts = [t for _, t in capture_normalized_outputs(model, x)]
        except ValueError:  # no conv/linear layer in a user model: nothing to check
            return
        dev = standardization_deviation(acts)
        means, stds = zip(*(unit_stats(a) for a in acts))
        self.init = {
            "init_data_dependent": needs_data_init(model),
            "init_max_abs_mean": dev["max_abs_mean"],
            "init_min_std": dev["min_std"],
            "init_max_std": dev["max_std"],
            "init_max_deviation": dev["max_deviation"],
            "init_unit_means": [float(v) for m in means for v in m],
            "init_unit_stds": [float(v) for s in stds for v in s],
        }


def _timings(model: Any, cfg: Any, data: Any, measure: dict[str, Any]) -> dict[str, Any]:
    """Median time per training / inference step of ``model`` and of the reference norms."""
    x_all, y_all = data.train.tensors
    x, y = x_all[: cfg.batch_size], y_all[: cfg.batch_size]
    xi = data.val.tensors[0][: int(measure["infer_batch"])]
    models = {"self": model}
    for ref in measure["references"]:
        if ref != cfg.norm:
            torch.manual_seed(cfg.seed)
            models[ref] = build_model(
                cfg.model, norm=ref, input_shape=data.input_shape, num_classes=data.num_classes,
                **cfg.model_options,
            )
    task_loss = F.cross_entropy if data.num_classes > 0 else (lambda o, t: F.mse_loss(o.squeeze(-1), t))

    def train_step(m: Any) -> Any:
        # lr = 0: the step does all the work of a real one but leaves the weights as they are.
        opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
        kw = {} if cfg.optimizer == "adam" else {"momentum": cfg.momentum}
        opt = opt_cls(m.parameters(), lr=0.0, **kw)

        def step() -> None:
            loss = task_loss(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def infer_step(m: Any) -> Any:
        def step() -> None:
            with torch.no_grad():
                m(xi)

        return step

    repeats = int(measure["timing_repeats"])
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for m in models.values():
        m.train()
    t_train = interleaved_times({k: train_step(m) for k, m in models.items()}, repeats=repeats)
    for m in models.values():
        m.eval()
    t_infer = interleaved_times({k: infer_step(m) for k, m in models.items()}, repeats=repeats)
    model.load_state_dict(snapshot)
    out["train_step_s"] = float(np.median(t_train["self"]))
    out["infer_step_s"] = float(np.median(t_infer["self"]))
    for ref in measure["references"]:
        key = ref.replace("+", "_")
        if ref == cfg.norm:
            out[f"train_ratio_{key}"] = out[f"infer_ratio_{key}"] = 1.0
        else:
            out[f"train_ratio_{key}"] = median_ratio(t_train["self"], t_train[ref])
            out[f"infer_ratio_{key}"] = median_ratio(t_infer["self"], t_infer[ref])
    return out


def _fold(model: Any, data: Any, measure: dict[str, Any]) -> dict[str, Any]:
    """Fold BatchNorm into convs: largest output difference on the val set, inference speed-up."""
    pairs = foldable_pairs(model)
    if not pairs:
        return {"fold_pairs": 0}
    model.eval()
    folded = fold_batch_norm(model)
    with torch.no_grad():
        x_val = data.val.tensors[0]
        diff = float((model(x_val) - folded(x_val)).abs().max())
    xi = x_val[: int(measure["infer_batch"])]

    def call(m: Any) -> Any:
        def f() -> None:
            with torch.no_grad():
                m(xi)

        return f

    times = interleaved_times(
        {"bn": call(model), "folded": call(folded)}, repeats=int(measure["timing_repeats"])
    )
    return {
        "fold_pairs": len(pairs),
        "fold_max_abs_diff": diff,
        "fold_speedup": median_ratio(times["bn"], times["folded"]),
        "infer_folded_s": float(np.median(times["folded"])),
    }


@register_runner(MEASURED_RUNNER)
def measured_train(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Train with :func:`normlab.lab.train.train`, then measure (see the module docstring).

    ``config`` holds TrainConfig fields plus ``"measure"`` (keys of :data:`MEASURE_DEFAULTS`).
    Returns train()'s final metrics plus: ``init_*`` (pre-activation statistics on the init
    batch), ``train_eval_loss``/``train_eval_acc`` and ``gap_acc`` (train − val accuracy),
    ``gap_loss`` (val − train loss), ``train_step_s``/``infer_step_s`` and ratios to each
    reference norm (``train_ratio_none``...), ``param_bytes``/``saved_bytes``/``train_bytes``,
    ``fold_*``, and ``cpu_time_s`` (process CPU time of the whole run).
    """
    cpu0, wall0 = time.process_time(), time.perf_counter()
    threads = torch.get_num_threads()
    measure = {**MEASURE_DEFAULTS, **config.get("measure", {})}
    unknown = sorted(set(measure) - set(MEASURE_DEFAULTS))
    if unknown:
        raise ValueError(f"measure: unknown keys {unknown}; expected some of {sorted(MEASURE_DEFAULTS)}")
    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k not in ("runner", "measure")})
    hook = _MeasureHook(bool(measure["init_check"]))
    result = dict(train(cfg, log, hooks=[hook]))
    model, data = hook.model, hook.data
    result.update(hook.init)
    torch.set_num_threads(threads)

    if measure["train_eval"]:
        loss_tr, acc_tr = evaluate(model, data.train, task=data.task)
        result["train_eval_loss"] = loss_tr
        result["train_eval_acc"] = acc_tr
        result["gap_loss"] = result["final_val_loss"] - loss_tr
        if acc_tr is not None and result.get("final_val_acc") is not None:
            result["gap_acc"] = acc_tr - result["final_val_acc"]
    if measure["timing"]:
        result.update(_timings(model, cfg, data, measure))
    if measure["memory"] and data.num_classes > 0:
        x, y = data.train.tensors[0][: cfg.batch_size], data.train.tensors[1][: cfg.batch_size]
        model.train()
        result.update(
            training_step_memory(
                model, F.cross_entropy, (x, y), optimizer_state_per_param=2 if cfg.optimizer == "adam" else 1
            )
        )
    if measure["fold"]:
        result.update(_fold(model, data, measure))
    result["threads"] = torch.get_num_threads()
    result["cpu_time_s"] = time.process_time() - cpu0
    result["wall_time_s"] = time.perf_counter() - wall0
    return result
