"""Cost study: which normalization gives the best trade-off between cost and accuracy?

The article asks (question 3) which normalization is the best compromise between complexity and
accuracy. Each run trains one (model, norm, seed) briefly on digits and then measures, in the
same worker process:

* **accuracy**: validation accuracy after the short training (eval mode);
* **parameters added**: trainable parameters minus those of the same model without normalization
  (norm layers bring γ/β, weight norm one ``g`` per unit; a conv before a norm with a shift loses
  its bias);
* **time per training step** (forward + backward + optimizer step on one batch) and **per
  inference step** (eval-mode forward of a validation batch, no autograd): the median of repeated
  timed calls. The run's model is timed in turns with the same architecture without
  normalization and with BatchNorm (:func:`normlab.lab.metrics.interleaved_times`), so the
  ratios "× none" and "× BN" compare models under the same machine load — on a shared machine
  absolute times drift by tens of percent, ratios much less. Threads: whatever the sweep set
  (``torch.set_num_threads``; recorded as ``threads``);
* **memory**: bytes of one training step (parameters, gradients, optimizer state and the
  activations autograd saves for the backward pass — the part a norm layer adds); exact, unlike
  a process's peak RSS, which never goes down and depends on what the worker ran before;
* **BN folding** (:func:`normlab.nn.utils.fold.fold_batch_norm`): for models with BatchNorm
  after a conv/linear layer, the inference speed-up of the folded model and the largest
  difference of its outputs from the unfolded model's on the validation set.

Analysis: per model, the mean accuracy against the mean time per training step relative to no
normalization, and the Pareto front (no other norm is both faster and more accurate).

The runner (``"measured-train"``) is shared with the weight-norm and regularization studies:
identical run configs are computed once in a run directory.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab.metrics import interleaved_times, median_ratio, pareto_front
from normlab.lab.stats import combine_verdicts
from normlab.lab.runners import LogFn, register_runner
from normlab.lab.stats import Interval, format_interval, mean_ci, verdict
from normlab.lab.store import RunResult
from normlab.lab.studies import Card, Figure, save_png, select

NAME = "cost"
TITLE = "Cost and accuracy: the trade-off between normalizations"
SUMMARY = (
    "Parameters, time per training/inference step, memory and accuracy of every norm on a CNN "
    "and a ResNet; Pareto front; BatchNorm folded into convolutions for inference."
)
ORDER = 60

QUESTION = "Which normalization gives the best trade-off between cost and accuracy?"
FOLD_CLAIM = "Folding BatchNorm into the preceding convolution makes inference cheaper at identical outputs."
FOLD_TOLERANCE = 1e-5  # largest |output difference| counted as identical

RUNNER = "measured-train"

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

#: Digits training setup shared by the cost and weight-norm studies (their CNN runs coincide).
DIGITS_TRAIN: dict[str, Any] = {
    "data": "digits",
    "batch_size": 32,
    "optimizer": "adam",
    "lr": 0.003,
    "lr_scaling": "none",
}


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
        "runner": RUNNER,
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


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------
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
        import torch

        from normlab.lab.metrics import capture_normalized_outputs, standardization_deviation, unit_stats
        from normlab.lab.models import needs_data_init

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
    import torch
    import torch.nn.functional as F

    from normlab.lab.models import build_model

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
    import torch

    from normlab.nn.utils.fold import fold_batch_norm, foldable_pairs

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


@register_runner(RUNNER)
def measured_train(config: dict[str, Any], log: LogFn) -> dict[str, Any]:
    """Train with :func:`normlab.lab.train.train`, then measure (see the module docstring).

    ``config`` holds TrainConfig fields plus ``"measure"`` (keys of :data:`MEASURE_DEFAULTS`).
    Returns train()'s final metrics plus: ``init_*`` (pre-activation statistics on the init
    batch), ``train_eval_loss``/``train_eval_acc`` and ``gap_acc`` (train − val accuracy),
    ``gap_loss`` (val − train loss), ``train_step_s``/``infer_step_s`` and ratios to each
    reference norm (``train_ratio_none``...), ``param_bytes``/``saved_bytes``/``train_bytes``,
    ``fold_*``, and ``cpu_time_s`` (process CPU time of the whole run).
    """
    import torch
    import torch.nn.functional as F

    from normlab.lab.metrics import training_step_memory
    from normlab.lab.train import TrainConfig, evaluate, train

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


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------
ALL_NORMS: tuple[str, ...] = ("none", "bn", "gn", "ln", "in", "rms", "mobn", "wn", "wn+mobn")


@dataclass
class Config:
    """Full grid of the cost study (``quick()`` is the small profile)."""

    models: tuple[str, ...] = ("cnn", "resnet")
    norms: tuple[str, ...] = ALL_NORMS
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 10  # as the weight-norm study: their CNN runs (seeds 0-2) are shared
    data: str = "digits"
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 0.003
    resnet_depth: int = 8
    max_steps: int | None = None
    limit: int | None = None
    timing_repeats: int = 30

    @classmethod
    def quick(cls) -> Config:
        return cls(
            norms=("none", "bn", "gn", "wn+mobn"),
            seeds=(0, 1),
            epochs=3,
            max_steps=60,
            limit=640,
            timing_repeats=12,
        )


def _model_options(cfg: Config, model: str) -> dict[str, Any]:
    return {"depth": int(cfg.resnet_depth)} if model == "resnet" else {}


def validate(cfg: Config) -> None:
    from normlab.lab.norms import get_norm

    for n in cfg.norms:
        get_norm(n)  # ValueError with the list of valid names
    bad = [m for m in cfg.models if m not in ("cnn", "resnet", "mlp") and ":" not in m]
    if bad:
        raise ValueError(f"models: expected cnn, resnet, mlp or 'package.module:function', got {bad}")
    if "none" not in cfg.norms:
        raise ValueError("norms must include 'none' (the baseline for parameters and time)")
    if cfg.epochs < 1 or cfg.timing_repeats < 3:
        raise ValueError("epochs must be >= 1 and timing_repeats >= 3")


def runs(cfg: Config) -> list[dict[str, Any]]:
    out = []
    for model in cfg.models:
        for norm in cfg.norms:
            if model == "mlp" and norm == "in":
                continue  # InstanceNorm has no positions to normalize over in an MLP
            for seed in cfg.seeds:
                out.append(
                    measured_config(
                        model=model,
                        norm=norm,
                        seed=seed,
                        epochs=cfg.epochs,
                        data=cfg.data,
                        batch_size=cfg.batch_size,
                        optimizer=cfg.optimizer,
                        lr=cfg.lr,
                        max_steps=cfg.max_steps,
                        limit=cfg.limit,
                        model_options=_model_options(cfg, model),
                        measure={"timing_repeats": cfg.timing_repeats},
                    )
                )
    return out


def _vals(results: list[RunResult], metric: str, **where: Any) -> list[float]:
    out = []
    for r in select(results, **where):
        v = r.metric(metric)
        if v is not None and isinstance(v, (int, float)) and not math.isnan(float(v)):
            out.append(float(v))
    return out


def _log_ratio_ci(ratios: list[float]) -> tuple[Interval, Interval]:
    """CI of mean log ratio, and the same as a ratio (geometric mean, exp of the bounds)."""
    logs = mean_ci([math.log(r) for r in ratios])
    return logs, Interval(math.exp(logs.mean), math.exp(logs.lo), math.exp(logs.hi), logs.n, logs.level)


def _pct(iv: Interval) -> str:
    return format_interval(Interval(100 * iv.mean, 100 * iv.lo, 100 * iv.hi, iv.n, iv.level), 3, "%")


def summary_table(results: list[RunResult], cfg: Config) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {norm: {acc, time_rel, infer_rel, params_added, saved_kib, n}}}`` (means)."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for model in cfg.models:
        base_params = _vals(results, "n_params", model=model, norm="none")
        rows: dict[str, dict[str, Any]] = {}
        for norm in cfg.norms:
            acc = _vals(results, "final_val_acc", model=model, norm=norm)
            if not acc:
                continue
            tr = _vals(results, "train_ratio_none", model=model, norm=norm)
            inf = _vals(results, "infer_ratio_none", model=model, norm=norm)
            params = _vals(results, "n_params", model=model, norm=norm)
            saved = _vals(results, "saved_bytes", model=model, norm=norm)
            rows[norm] = {
                "acc": mean_ci(acc),
                "time_rel": _log_ratio_ci(tr)[1] if tr else None,
                "infer_rel": _log_ratio_ci(inf)[1] if inf else None,
                "train_step_ms": 1e3 * float(np.mean(_vals(results, "train_step_s", model=model, norm=norm) or [math.nan])),
                "params_added": (int(params[0] - base_params[0]) if params and base_params else None),
                "saved_kib": float(np.mean(saved)) / 1024 if saved else None,
                "n": len(acc),
            }
        table[model] = rows
    return table


def analyze(results: list[RunResult], cfg: Config) -> list[Card]:
    cards: list[Card] = []
    table = summary_table(results, cfg)
    answer_parts, detail_lines = [], []
    for model, rows in table.items():
        points = {
            n: (r["time_rel"].mean, r["acc"].mean)
            for n, r in rows.items()
            if r["time_rel"] is not None and math.isfinite(r["acc"].mean)
        }
        if not points:
            continue
        front = pareto_front(points)
        answer_parts.append(
            f"{model}: Pareto set "
            + ", ".join(
                f"{n} ({rows[n]['time_rel'].mean:.2f}× none per training step, accuracy "
                f"{_pct(rows[n]['acc'])})"
                for n in front
            )
        )
        detail_lines.append(f"{model} (means over seeds; time relative to the same model without norm):")
        for n, r in rows.items():
            tr, inf = r["time_rel"], r["infer_rel"]
            parts = [f"accuracy {_pct(r['acc'])}"]
            if tr is not None:
                parts.append(f"training step {format_interval(tr)}× ({r['train_step_ms']:.2f} ms)")
            if inf is not None:
                parts.append(f"inference {format_interval(inf)}×")
            if r["params_added"] is not None:
                parts.append(f"parameters added {r['params_added']:+d}")
            if r["saved_kib"] is not None:
                parts.append(f"activation memory {r['saved_kib']:.0f} KiB")
            detail_lines.append(f"  {n}: " + "; ".join(parts))
    cards.append(
        Card(
            study=NAME,
            claim=QUESTION,
            question=QUESTION,
            measurement=("; ".join(answer_parts) if answer_parts else "no finished runs")
            + f". Accuracy: validation, after {cfg.epochs} epochs"
            + (f" (at most {cfg.max_steps} steps)" if cfg.max_steps else "")
            + f" on {cfg.data}; cost: median time per training step, timed in turns with the "
            "unnormalized model in the same process.",
            verdict="answer",
            details="\n".join(
                [
                    "The Pareto set holds the norms that no other norm beats on both accuracy and "
                    "time per training step (means over seeds; a norm inside another's confidence "
                    "interval is not reliably better or worse).",
                    *detail_lines,
                ]
            ),
        )
    )
    cards.append(_fold_card(results, cfg))
    return cards


def _fold_card(results: list[RunResult], cfg: Config) -> Card:
    speedups, diffs, per_model = [], [], []
    for model in cfg.models:
        s = _vals(results, "fold_speedup", model=model, norm="bn")
        d = _vals(results, "fold_max_abs_diff", model=model, norm="bn")
        speedups += s
        diffs += d
        if s:
            per_model.append(f"{model} {format_interval(_log_ratio_ci(s)[1])}×" if len(s) > 1 else f"{model} {s[0]:.2f}×")
    if not speedups:
        return Card(
            study=NAME,
            claim=FOLD_CLAIM,
            measurement="needs finished 'bn' runs (none found)",
            verdict="inconclusive",
        )
    log_ci, ratio_ci = _log_ratio_ci(speedups)
    v_speed = verdict(log_ci, "greater")
    # Identical outputs: a bound that must hold in every run (checked run by run).
    max_diff = max(diffs) if diffs else math.nan
    if not diffs:
        v_same = "inconclusive"
    else:
        v_same = "supported" if max_diff <= FOLD_TOLERANCE else "not supported"
    return Card(
        study=NAME,
        claim=FOLD_CLAIM,
        measurement=(
            f"inference speed-up of the folded BN model (unfolded time / folded time, geometric "
            f"mean): {format_interval(ratio_ci)}× over {len(speedups)} runs ({'; '.join(per_model)}); "
            f"largest |output difference| on the validation set {max_diff:.2g} "
            f"(tolerance {FOLD_TOLERANCE:g})"
        ),
        verdict=combine_verdicts([v_speed, v_same]),
        effect=ratio_ci,
        details=(
            "Speed-up: verdict from the 95% CI of the mean log ratio (> 0 means faster); "
            f"outputs identical when every run's largest difference is ≤ {FOLD_TOLERANCE:g}. "
            "Eval-mode BatchNorm is a per-channel affine map; folding it into the conv removes "
            "one pass over the activations per layer. "
            + ("" if v_speed == "supported" else "The speed-up is not established here: on small "
               "CPU models the BN pass is a small share of the time, so its removal can be "
               "within the timing noise. ")
        ),
    )


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def plot(results: list[RunResult], cfg: Config, outdir: Path) -> list[Figure]:
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    table = summary_table(results, cfg)
    figures: list[Figure] = []

    models = [m for m in cfg.models if table.get(m)]
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5.2 * max(1, len(models)), 3.8), dpi=100,
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = table[model]
        points = {n: (r["time_rel"].mean, r["acc"].mean) for n, r in rows.items() if r["time_rel"]}
        front = pareto_front(points) if points else []
        xs_all = []
        for n, r in rows.items():
            if not r["time_rel"]:
                continue
            t, a = r["time_rel"], r["acc"]
            color = "C3" if n in front else "0.5"
            # Seeds as faint dots; the mean with its CI (only when it is informative: n >= 3).
            tr = _vals(results, "train_ratio_none", model=model, norm=n)
            acc = _vals(results, "final_val_acc", model=model, norm=n)
            if len(tr) == len(acc):
                ax.scatter(tr, [100 * v for v in acc], s=10, color=color, alpha=0.35)
                xs_all += tr
            xs_all.append(t.mean)
            show_ci = t.n >= 3 and math.isfinite(t.lo)
            xerr = [[t.mean - t.lo], [t.hi - t.mean]] if show_ci else None
            yerr = [[100 * (a.mean - a.lo)], [100 * (a.hi - a.mean)]] if show_ci else None
            ax.errorbar(t.mean, 100 * a.mean, xerr=xerr, yerr=yerr, fmt="none", ecolor=color,
                        elinewidth=0.8, alpha=0.5, capsize=2)
            ax.plot(t.mean, 100 * a.mean, "o" if n in front else "s", color=color, ms=6)
            ax.annotate(n, (t.mean, 100 * a.mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if xs_all:
            lo, hi = min(xs_all), max(xs_all)
            pad = 0.1 * (hi - lo) + 0.05
            ax.set_xlim(lo - pad, hi + pad)
        if front:
            fx = [points[n][0] for n in front]
            fy = [100 * points[n][1] for n in front]
            ax.step(fx, fy, where="post", color="C3", lw=1, alpha=0.6, label="Pareto front")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("time per training step (× no normalization)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(model)
    fig.tight_layout()
    path = outdir / "cost_pareto.png"
    save_png(fig, path)
    figures.append(Figure("Accuracy vs cost (Pareto front)", path,
                          "Mean validation accuracy against the mean time per training step "
                          "relative to the same model without normalization (geometric mean; 95% "
                          "CIs when there are at least 3 seeds; faint dots: seeds). Red: the "
                          "Pareto front."))

    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5.2 * max(1, len(models)), 3.6), dpi=100,
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = table[model]
        names = [n for n in rows if rows[n]["time_rel"]]
        xs = np.arange(len(names))
        tr = [rows[n]["time_rel"].mean for n in names]
        inf = [rows[n]["infer_rel"].mean if rows[n]["infer_rel"] else math.nan for n in names]
        ax.bar(xs - 0.2, tr, 0.4, label="training step")
        ax.bar(xs + 0.2, inf, 0.4, label="inference")
        folded = []
        for i, n in enumerate(names):
            s = _vals(results, "fold_speedup", model=model, norm=n)
            if s and np.isfinite(inf[i]):
                folded.append((i, inf[i] / float(np.exp(np.mean(np.log(s))))))
        if folded:
            ax.scatter([xs[i] + 0.2 for i, _ in folded], [v for _, v in folded], marker="v", color="k",
                       zorder=3, label="inference, BN folded")
        ax.axhline(1.0, color="0.4", lw=0.8, ls="--")
        ax.set_xticks(xs, names, rotation=30, fontsize=8)
        ax.set_ylabel("time (× no normalization)")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = outdir / "cost_times.png"
    save_png(fig, path)
    figures.append(Figure("Time per step relative to no normalization", path,
                          "Median time per training step and per inference step (eval mode, no "
                          "autograd), each relative to the unnormalized model timed in turns in the "
                          "same process (geometric mean over seeds). Triangles: inference after "
                          "folding BatchNorm into the convolutions."))

    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5.2 * max(1, len(models)), 3.4), dpi=100,
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = table[model]
        names = [n for n in rows if rows[n]["saved_kib"] is not None]
        ax.bar(names, [rows[n]["saved_kib"] for n in names], color="C2")
        for i, n in enumerate(names):
            pa = rows[n]["params_added"]
            ax.annotate(f"+{pa}" if pa and pa > 0 else str(pa), (i, rows[n]["saved_kib"]),
                        ha="center", va="bottom", fontsize=7)
        ax.set_ylabel("activations saved for backward (KiB)")
        ax.set_title(f"{model} (labels: parameters added)")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    path = outdir / "cost_memory.png"
    save_png(fig, path)
    figures.append(Figure("Memory and parameters", path,
                          f"Activation memory of one training step (batch {cfg.batch_size}; "
                          "tensors autograd keeps for the backward pass) and, on each bar, the "
                          "parameters the norm adds to the unnormalized model."))
    return figures
