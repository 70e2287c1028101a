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

The runner is the lab's ``"measured-train"`` (:mod:`normlab.lab.measured`), shared with the
weight-norm and regularization studies: identical run configs are computed once in a run
directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab import plotting
from normlab.lab.analysis import log_ratio_ci, n_val, pct, values
from normlab.lab.measured import measured_config, study_settings
from normlab.lab.metrics import pareto_front
from normlab.lab.norms import get_norm
from normlab.lab.stats import combine_verdicts, format_interval, rate_ci, verdict
from normlab.lab.store import RunResult
from normlab.lab.studies import Card, Figure, Ranking

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

#: A time ratio or fold difference that overflowed counts (as an infinite value), not vanishes.
_values = partial(values, keep_inf=True)

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
                        **study_settings(cfg),
                        model_options=_model_options(cfg, model),
                        measure={"timing_repeats": cfg.timing_repeats},
                    )
                )
    return out


def summary_table(results: list[RunResult], cfg: Config) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {norm: {acc, time_rel, infer_rel, params_added, saved_kib, n}}}`` (means)."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for model in cfg.models:
        base_params = _values(results, "n_params", model=model, norm="none")
        rows: dict[str, dict[str, Any]] = {}
        for norm in cfg.norms:
            acc = _values(results, "final_val_acc", model=model, norm=norm)
            if not acc:
                continue
            tr = _values(results, "train_ratio_none", model=model, norm=norm)
            inf = _values(results, "infer_ratio_none", model=model, norm=norm)
            params = _values(results, "n_params", model=model, norm=norm)
            saved = _values(results, "saved_bytes", model=model, norm=norm)
            rows[norm] = {
                "acc": rate_ci(acc, n_val(results, model=model, norm=norm), scale=1),
                "time_rel": log_ratio_ci(tr)[1] if tr else None,
                "infer_rel": log_ratio_ci(inf)[1] if inf else None,
                "train_step_ms": 1e3 * float(np.mean(_values(results, "train_step_s", model=model, norm=norm) or [math.nan])),
                "params_added": (int(params[0] - base_params[0]) if params and base_params else None),
                "saved_kib": float(np.mean(saved)) / 1024 if saved else None,
                "n": len(acc),
            }
        table[model] = rows
    return table


def analyze(results: list[RunResult], cfg: Config) -> list[Card]:
    """The question card (Pareto set per model) and the BN-folding claim."""
    question = _card_question(results, cfg)
    question.answers, question.figure = "cost", "cost_pareto.png"  # quoted in the report's answers
    return [question, _card_fold(results, cfg)]


_LABELS = {"cnn": "CNN", "resnet": "ResNet", "mlp": "MLP"}


def ranking(results: list[RunResult], cfg: Config) -> list[Ranking]:
    """Validation accuracy (%) of every norm per model: the report quotes it in its answer to "which
    normalization for CNNs…" (the quick batch-size profile has no CNN) and counts it in BN's rank."""
    return [
        Ranking(study=NAME, task=f"{_LABELS.get(model, model)} on {cfg.data} (cost study, batch {cfg.batch_size})",
                metric="validation accuracy",
                values={n: [100 * v for v in _values(results, "final_val_acc", model=model, norm=n)]
                        for n in cfg.norms},
                lower_is_better=False, unit="%", bounds=(0.0, 100.0), evidence=QUESTION,
                figure="cost_pareto.png", question="architecture")
        for model in cfg.models
    ]


def _card_question(results: list[RunResult], cfg: Config) -> Card:
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
                f"{pct(rows[n]['acc'])})"
                for n in front
            )
        )
        detail_lines.append(f"{model} (means over seeds; time relative to the same model without norm):")
        for n, r in rows.items():
            tr, inf = r["time_rel"], r["infer_rel"]
            parts = [f"accuracy {pct(r['acc'])}"]
            if tr is not None:
                parts.append(f"training step {format_interval(tr)}× ({r['train_step_ms']:.2f} ms)")
            if inf is not None:
                parts.append(f"inference {format_interval(inf)}×")
            if r["params_added"] is not None:
                parts.append(f"parameters added {r['params_added']:+d}")
            if r["saved_kib"] is not None:
                parts.append(f"activation memory {r['saved_kib']:.0f} KiB")
            detail_lines.append(f"  {n}: " + "; ".join(parts))
    return Card(
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


def _card_fold(results: list[RunResult], cfg: Config) -> Card:
    speedups, diffs, per_model = [], [], []
    for model in cfg.models:
        s = _values(results, "fold_speedup", model=model, norm="bn")
        d = _values(results, "fold_max_abs_diff", model=model, norm="bn")
        speedups += s
        diffs += d
        if s:
            per_model.append(f"{model} {format_interval(log_ratio_ci(s)[1])}×" if len(s) > 1 else f"{model} {s[0]:.2f}×")
    if not speedups:
        return Card(
            study=NAME,
            claim=FOLD_CLAIM,
            measurement="needs finished 'bn' runs (none found)",
            verdict="inconclusive",
        )
    log_ci, ratio_ci = log_ratio_ci(speedups)
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
        effect_label="inference time, unfolded / BN folded into the convs (×)",
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
    """Accuracy vs time (Pareto front), time per step, memory and parameters."""
    outdir.mkdir(parents=True, exist_ok=True)
    table = summary_table(results, cfg)
    models = [m for m in cfg.models if table.get(m)]
    return [
        _fig_pareto(results, table, models, outdir),
        _fig_times(results, table, models, outdir),
        _fig_memory(cfg, table, models, outdir),
    ]


def _fig_pareto(results: list[RunResult], table: dict[str, Any], models: list[str], outdir: Path) -> Figure:
    fig, axes = plotting.panels(1, max(1, len(models)), (5.2, 3.8))
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
            tr = _values(results, "train_ratio_none", model=model, norm=n)
            acc = _values(results, "final_val_acc", model=model, norm=n)
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
    return plotting.finish(fig, outdir / "cost_pareto.png", "Accuracy vs cost (Pareto front)",
                  "Mean validation accuracy against the mean time per training step "
                  "relative to the same model without normalization (geometric mean; 95% "
                  "CIs when there are at least 3 seeds; faint dots: seeds). Red: the "
                  "Pareto front.")


def _fig_times(results: list[RunResult], table: dict[str, Any], models: list[str], outdir: Path) -> Figure:
    fig, axes = plotting.panels(1, max(1, len(models)), (5.2, 3.6))
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
            s = _values(results, "fold_speedup", model=model, norm=n)
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
    return plotting.finish(fig, outdir / "cost_times.png", "Time per step relative to no normalization",
                  "Median time per training step and per inference step (eval mode, no "
                  "autograd), each relative to the unnormalized model timed in turns in the "
                  "same process (geometric mean over seeds). Triangles: inference after "
                  "folding BatchNorm into the convolutions.")


def _fig_memory(cfg: Config, table: dict[str, Any], models: list[str], outdir: Path) -> Figure:
    fig, axes = plotting.panels(1, max(1, len(models)), (5.2, 3.4))
    for ax, model in zip(axes[0], models):
        rows = table[model]
        names = [n for n in rows if rows[n]["saved_kib"] is not None]
        ax.bar(names, [rows[n]["saved_kib"] for n in names], color=[plotting.color(n) or "C2" for n in names])
        for i, n in enumerate(names):
            pa = rows[n]["params_added"]
            ax.annotate(f"+{pa}" if pa and pa > 0 else str(pa), (i, rows[n]["saved_kib"]),
                        ha="center", va="bottom", fontsize=7)
        ax.set_ylabel("activations saved for backward (KiB)")
        ax.set_title(f"{model} (labels: parameters added)")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    return plotting.finish(fig, outdir / "cost_memory.png", "Memory and parameters",
                  f"Activation memory of one training step (batch {cfg.batch_size}; "
                  "tensors autograd keeps for the backward pass) and, on each bar, the "
                  "parameters the norm adds to the unnormalized model.")
