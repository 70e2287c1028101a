"""Training hooks shared by the studies' runners (see :func:`normlab.lab.train.train` for the
hook protocol: ``on_train_start``, ``on_step``, ``on_epoch_end``, all optional).

* :class:`AccuracyEvery` — validation accuracy every k steps, first step reaching a target;
* :class:`ShapeProbe` — output shape of every conv/linear layer (for :func:`stat_values`, the values a BN statistic pools);
* :class:`WeightNorms` — ``‖W‖`` of the conv/linear weights at init and after every epoch;
* :class:`ActivationNorms` — RMS of every hidden layer's input on a fixed probe batch, per epoch;
* :class:`GradNorms` — ``‖∇_W L‖`` of the conv/linear weights: first step, mean per epoch;
* :class:`LossTarget` — training loss averaged over windows of k steps, first window below a target;
* :class:`HiddenStateNorms` — ``‖h_t‖`` (and ``‖c_t‖``) of an LSTM over the time steps of a probe batch.

The measuring functions (:func:`weight_tensors`, :func:`weight_norm`, :func:`grad_norm`,
:func:`hidden_state_norms`) are public so that a test can compare them with a hand computation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from normlab.lab.train import evaluate

__all__ = [
    "AccuracyEvery",
    "ActivationNorms",
    "GradNorms",
    "HiddenStateNorms",
    "LossTarget",
    "ShapeProbe",
    "WeightNorms",
    "coefficient_of_variation",
    "grad_norm",
    "hidden_state_norms",
    "stat_values",
    "weight_layers",
    "weight_norm",
    "weight_tensors",
]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ShapeProbe:
    """Records the output shape of every conv/linear layer but the head, on the first forward.

    ``shapes`` holds one ``(N, C, *positions)`` tuple per layer (a norm follows each of them in
    the lab's models); :func:`stat_values` turns one into the number of values a batch
    statistic pools.
    """

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self._handles: list[Any] = []

    def on_train_start(self, model: Any, config: Any, data: Any) -> None:
        layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
        for m in layers[:-1]:  # the last one is the classifier head: no norm after it
            self._handles.append(m.register_forward_hook(self._record))

    def _record(self, module: Any, inputs: Any, output: Any) -> None:
        self.shapes.append(tuple(int(d) for d in output.shape))
        if len(self.shapes) >= len(self._handles):
            self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def stat_values(shape: tuple[int, ...]) -> int:
    """Values BN pools per statistic for a layer output of ``shape``: ``N · prod(positions)``
    (``N`` after a linear layer, ``N·L`` after a 1-D conv, ``N·H·W`` after a 2-D conv)."""
    return int(shape[0]) * int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else int(shape[0])


class AccuracyEvery:
    """Validation accuracy every ``every`` optimizer steps, and the first step reaching ``target``.

    ``curve`` holds ``(step, accuracy)`` pairs, step 0 being the initial model; ``hit`` is the
    first step whose accuracy is ``>= target`` (``None`` while it has not been reached). The
    accuracy is :func:`normlab.lab.train.evaluate`'s (eval mode, the model's mode restored).
    """

    def __init__(self, every: int, target: float) -> None:
        self.every, self.target = int(every), float(target)
        self.curve: list[tuple[int, float]] = []
        self.hit: int | None = None
        self._val: Any = None
        self._task = "classification"

    def on_train_start(self, model: Any, config: Any, data: Any) -> None:
        self._val, self._task = data.val, data.task
        self.curve.append((0, float(evaluate(model, self._val, task=self._task)[1])))

    def on_step(self, step: int, model: Any, batch: Any, loss: float) -> None:
        if step % self.every:
            return
        acc = float(evaluate(model, self._val, task=self._task)[1])
        self.curve.append((step, acc))
        if self.hit is None and acc >= self.target:
            self.hit = step


# --------------------------------------------------------------------------------------------
# Norms of weights, activations and gradients
# --------------------------------------------------------------------------------------------
def weight_layers(model: nn.Module) -> list[nn.Module]:
    """The conv/linear layers of ``model`` in module order (the head included)."""
    return [m for m in model.modules() if isinstance(m, _WEIGHTED)]


def weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The ``weight`` of every conv/linear layer (as used in the forward pass: a weight-normalized
    or standardized layer's reparametrized weight). Biases and the norm layers' γ, β are not
    weights here: they do not multiply the signal through the depth of the network."""
    return [m.weight for m in weight_layers(model)]


def _norm(tensors: list[torch.Tensor]) -> float:
    # ‖(W_1, …, W_L)‖ = sqrt(Σ_l ‖W_l‖²), summed in float64: no overflow for exploding weights
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


@torch.no_grad()
def weight_norm(model: nn.Module) -> float:
    r"""Euclidean norm of all conv/linear weights together, :math:`\sqrt{\sum_l \|W_l\|_F^2}`."""
    return _norm(weight_tensors(model))


def grad_norm(model: nn.Module) -> float:
    r""":math:`\sqrt{\sum_l \|\partial L/\partial W_l\|_F^2}` over the conv/linear weights that hold a
    gradient (``p.grad``; a weight-normalized layer's direction ``v`` and gain ``g`` are its
    parameters, so their gradients are used there)."""
    grads = []
    for m in weight_layers(model):
        params = [p for name, p in m.named_parameters() if "weight" in name or "original" in name]
        grads += [p.grad for p in params if p.grad is not None]
    return _norm(grads)


class WeightNorms:
    """``‖W‖`` (:func:`weight_norm`) at the start (``init``), after every epoch (metric
    ``weight_norm``; ``weight_norm_layers``: one ``‖W_l‖_F`` per conv/linear layer) and of the
    trained model (``final``)."""

    def __init__(self) -> None:
        self.init: float | None = None
        self.final: float | None = None
        self.init_layers: list[float] = []

    def on_train_start(self, model: nn.Module, config: Any, data: Any) -> None:
        self.init = weight_norm(model)
        self.init_layers = [_norm([w]) for w in weight_tensors(model)]

    def on_epoch_end(self, epoch: int, model: nn.Module, metrics: dict[str, Any]) -> dict[str, Any]:
        with torch.no_grad():
            return {"weight_norm": weight_norm(model),
                    "weight_norm_layers": [_norm([w]) for w in weight_tensors(model)]}

    def on_train_end(self, model: nn.Module, result: dict[str, Any]) -> None:
        self.final = weight_norm(model)


class ActivationNorms:
    r"""RMS :math:`\sqrt{\overline{a^2}}` of the input of every conv/linear layer but the first (the
    hidden representations, after norm and nonlinearity) and of the logits, on a fixed probe batch
    (the first ``probe`` validation samples), in eval mode, at the start (``init``) and after every
    epoch (metrics ``act_rms`` = the largest over the hidden layers, ``act_rms_layers``, and
    ``logit_rms``; ``init`` lists the hidden layers then the logits)."""

    def __init__(self, probe: int = 256) -> None:
        self.probe = int(probe)
        self.init: list[float] = []
        self._x: torch.Tensor | None = None

    def measure(self, model: nn.Module) -> list[float]:
        """The RMS of each hidden layer's input, then of the output, on the probe batch."""
        if self._x is None:
            raise RuntimeError("ActivationNorms.measure: no probe batch yet (on_train_start not called)")
        seen: list[float] = []

        def grab(_m: nn.Module, args: tuple[Any, ...]) -> None:
            seen.append(float(args[0].detach().double().pow(2).mean().sqrt()))

        handles = [m.register_forward_pre_hook(grab) for m in weight_layers(model)[1:]]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(self._x)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        return seen + [float(out.double().pow(2).mean().sqrt())]

    def on_train_start(self, model: nn.Module, config: Any, data: Any) -> None:
        self._x = data.val.tensors[0][: self.probe]
        self.init = self.measure(model)

    def on_epoch_end(self, epoch: int, model: nn.Module, metrics: dict[str, Any]) -> dict[str, Any]:
        *hidden, logits = self.measure(model)
        return {"act_rms": max(hidden) if hidden else None, "act_rms_layers": hidden, "logit_rms": logits}


class GradNorms:
    """:func:`grad_norm` after every optimizer step's backward: ``first`` (the first step, i.e. the
    gradient at initialization) and the mean over each epoch's steps (metric ``grad_norm``)."""

    def __init__(self) -> None:
        self.first: float | None = None
        self._sum, self._n = 0.0, 0

    def on_step(self, step: int, model: nn.Module, batch: Any, loss: float) -> None:
        g = grad_norm(model)
        if self.first is None:
            self.first = g
        self._sum += g
        self._n += 1

    def on_epoch_end(self, epoch: int, model: nn.Module, metrics: dict[str, Any]) -> dict[str, Any]:
        mean = self._sum / self._n if self._n else None
        self._sum, self._n = 0.0, 0
        return {"grad_norm": mean}


class LossTarget:
    """Training loss averaged over consecutive windows of ``every`` steps; ``hit`` is the last step
    of the first window whose mean is ``<= target`` (``None`` while none is). A window mean, not
    a single step's loss: one lucky batch must not count as reaching the target."""

    def __init__(self, every: int, target: float) -> None:
        if every < 1:
            raise ValueError(f"every: expected an int >= 1, got {every!r}")
        self.every, self.target = int(every), float(target)
        self.curve: list[tuple[int, float]] = []
        self.hit: int | None = None
        self._window: list[float] = []

    def on_step(self, step: int, model: Any, batch: Any, loss: float) -> None:
        self._window.append(float(loss))
        if len(self._window) < self.every:
            return
        mean = sum(self._window) / len(self._window)
        self._window = []
        self.curve.append((step, mean))
        if self.hit is None and mean <= self.target:
            self.hit = step


# --------------------------------------------------------------------------------------------
# Hidden states of recurrent networks
# --------------------------------------------------------------------------------------------
def _lstm_of(model: nn.Module) -> nn.Module:
    lstm = getattr(model, "lstm", None)
    if lstm is None or not hasattr(lstm, "hidden_size"):
        raise ValueError(f"model: expected an LSTM classifier with an .lstm layer, got {type(model).__name__}")
    return lstm


@torch.no_grad()
def hidden_state_norms(model: nn.Module, x: torch.Tensor) -> tuple[list[float], list[float]]:
    r"""Mean over the batch of :math:`\|h_t\|_2` and of :math:`\|c_t\|_2`, for t = 1..T, of the
    (last layer of the) ``model.lstm`` of a sequence classifier on ``x`` of shape (N, T, F), in
    eval mode (the model's mode restored).

    The cell is run one step at a time from the zero state, ``lstm(x[:, t:t+1], (h, c))``, so that
    ``c_t`` is seen as well; for plain and LN cells this is the same computation as one call over
    the sequence (a BN cell would normalize every call as its step 0: not supported here).
    """
    lstm = _lstm_of(model)
    if getattr(lstm, "max_steps", None) is not None:
        raise ValueError("model: hidden_state_norms steps the cell one call per step, which a "
                         "BatchNorm-LSTM (statistics per step) does not allow")
    was_training = model.training
    model.eval()
    try:
        n, steps = x.shape[0], x.shape[1]
        h = torch.zeros(lstm.num_layers, n, lstm.hidden_size, dtype=x.dtype)
        c = torch.zeros_like(h)
        hs, cs = [], []
        for t in range(steps):
            _, (h, c) = lstm(x[:, t : t + 1], (h, c))
            hs.append(float(h[-1].double().norm(dim=1).mean()))
            cs.append(float(c[-1].double().norm(dim=1).mean()))
    finally:
        model.train(was_training)
    return hs, cs


def coefficient_of_variation(values: list[float]) -> float | None:
    """std / mean (population std) of a profile of norms, e.g. ‖h_t‖ over t; ``None`` when it is
    empty, not finite or its mean is not positive (no spread to speak of)."""
    if not values or not all(math.isfinite(v) for v in values):
        return None
    mean = sum(values) / len(values)
    if mean <= 0:
        return None
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) / mean


class HiddenStateNorms:
    """:func:`hidden_state_norms` on a fixed probe batch (the first ``probe`` validation
    sequences) at the start (``init``) and after every epoch (metrics ``h_norm_cv`` and
    ``c_norm_cv``: the coefficient of variation std_t / mean_t of the per-step norms, over the
    time steps). ``last`` holds the latest ``(‖h_t‖, ‖c_t‖)`` profiles."""

    def __init__(self, probe: int = 256) -> None:
        self.probe = int(probe)
        self.init: tuple[list[float], list[float]] = ([], [])
        self.last: tuple[list[float], list[float]] = ([], [])
        self._x: torch.Tensor | None = None

    def on_train_start(self, model: nn.Module, config: Any, data: Any) -> None:
        self._x = data.val.tensors[0][: self.probe]
        self.init = self.last = hidden_state_norms(model, self._x)

    def on_epoch_end(self, epoch: int, model: nn.Module, metrics: dict[str, Any]) -> dict[str, Any]:
        assert self._x is not None
        self.last = hidden_state_norms(model, self._x)
        return {"h_norm_cv": coefficient_of_variation(self.last[0]),
                "c_norm_cv": coefficient_of_variation(self.last[1])}
