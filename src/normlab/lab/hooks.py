"""Training hooks shared by the studies' runners (see :func:`normlab.lab.train.train` for the
hook protocol: ``on_train_start``, ``on_step``, ``on_epoch_end``, all optional)."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from normlab.lab.train import evaluate

__all__ = ["AccuracyEvery", "ShapeProbe", "stat_values"]


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
