"""Training hooks shared by the studies' runners (see :func:`normlab.lab.train.train` for the
hook protocol: ``on_train_start``, ``on_step``, ``on_epoch_end``, all optional)."""

from __future__ import annotations

from typing import Any

from normlab.lab.train import evaluate

__all__ = ["AccuracyEvery"]


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
