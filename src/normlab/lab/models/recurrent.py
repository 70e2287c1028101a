"""LSTM sequence classifier for the lab, with the recurrent cell chosen by norm name.

``build_model("lstm", norm=..., input_shape=(T, F), num_classes=K, **options)`` (registered here
with :func:`normlab.lab.models.register_model`) reads a ``(N, T, F)`` sequence with one LSTM
layer and classifies it from the last hidden state ``h_T`` with a linear head. The norm name
picks the cell of :mod:`normlab.nn.rnn`:

========= =============================================================================
norm      cell
========= =============================================================================
``none``  :class:`~normlab.nn.rnn.NormLSTM` (numerically ``torch.nn.LSTM``)
``ln``    :class:`~normlab.nn.rnn.LayerNormLSTM` (Ba et al. 2016)
``bn``    :class:`~normlab.nn.rnn.BatchNormLSTM` (Cooijmans et al. 2016), statistics per step
``wn``    :class:`~normlab.nn.rnn.WeightNormLSTM` (Salimans & Kingma 2016)
========= =============================================================================

Any other norm name is rejected with a ``ValueError`` (GroupNorm, InstanceNorm... have no
recurrent cell here). With ``wn`` the engine's :func:`~normlab.lab.models.build_model` also
weight-normalizes the linear head and marks the model for the data-dependent init, as it does for
every model under a weight-norm choice: the head then starts with zero-mean, unit-variance logits
on a sample of the training data (the LSTM weights keep torch's init with ``g = ‖v‖``).

Options:

* ``hidden`` (int, default 64): hidden units ``H``;
* ``gamma_init`` (float, BN only, default 0.1): initial γ of the batch norms (the paper's 0.1;
  1.0 is the "naive" choice whose saturation Cooijmans et al. warn about);
* ``stats_steps`` (int, BN only, default ``T``): the number of time steps with their own running
  statistics (``BatchNormLSTM(max_steps=...)``). ``1`` shares one set of running statistics
  across all steps; training still normalizes each step with its own batch statistics, so this
  changes what the model uses at evaluation (eval mode), which is where the per-step statistics
  of the paper matter once trained.

Importing this module (or :mod:`normlab.lab.models`) registers the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normlab._checks import check_positive_int
from normlab.lab.models.registry import register_model
from normlab.lab.norms import NormSpec
from normlab.nn.rnn import BatchNormLSTM, LayerNormLSTM, NormLSTM, WeightNormLSTM

__all__ = ["LSTM_NORMS", "LSTMClassifier", "MODEL_NAME", "make_cell"]

MODEL_NAME = "lstm"

#: Norm name -> recurrent cell class.
LSTM_NORMS: dict[str, type[NormLSTM]] = {
    "none": NormLSTM,
    "ln": LayerNormLSTM,
    "bn": BatchNormLSTM,
    "wn": WeightNormLSTM,
}


def make_cell(
    norm: str,
    input_size: int,
    hidden_size: int,
    *,
    steps: int,
    gamma_init: float | None = None,
    stats_steps: int | None = None,
) -> NormLSTM:
    """The one-layer, batch-first LSTM for ``norm`` (see the module docstring)."""
    if norm not in LSTM_NORMS:
        raise ValueError(
            f"norm: model {MODEL_NAME!r} has recurrent cells for {sorted(LSTM_NORMS)}, got {norm!r}"
        )
    if norm != "bn" and (gamma_init is not None or stats_steps is not None):
        raise ValueError(
            f"gamma_init / stats_steps are options of the BN-LSTM only, not of norm {norm!r}"
        )
    if norm == "bn":
        kw: dict[str, Any] = {"max_steps": int(stats_steps if stats_steps is not None else steps)}
        if gamma_init is not None:
            kw["gamma_init"] = float(gamma_init)
        return BatchNormLSTM(input_size, hidden_size, batch_first=True, **kw)
    return LSTM_NORMS[norm](input_size, hidden_size, batch_first=True)


class LSTMClassifier(nn.Module):
    """One LSTM layer over the sequence, then ``Linear(H, K)`` on the last hidden state."""

    def __init__(
        self,
        norm: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        hidden: int = 64,
        gamma_init: float | None = None,
        stats_steps: int | None = None,
    ) -> None:
        super().__init__()
        if len(input_shape) != 2:
            raise ValueError(
                f"input_shape: model {MODEL_NAME!r} needs sequences (T, F), got {tuple(input_shape)}"
            )
        check_positive_int(hidden, "hidden")
        steps, features = int(input_shape[0]), int(input_shape[1])
        self.norm = norm
        self.lstm = make_cell(
            norm, features, hidden, steps=steps, gamma_init=gamma_init, stats_steps=stats_steps
        )
        self.head = nn.Linear(hidden, num_classes if num_classes > 0 else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(x)
        return self.head(h_n[-1])


def _build(spec: NormSpec, input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
    return LSTMClassifier(spec.name, input_shape, num_classes, **options)


register_model(MODEL_NAME, _build)
