r"""LSTMs with normalization: layer-normalized, batch-normalized (per time step) and weight-normalized.

All three share one recurrence, :class:`NormLSTM`, and differ only in three hooks::

    a_x = W_ih x_t                                  (4H gate pre-activations from the input)
    a_h = W_hh h_{t-1}                              (4H gate pre-activations from the state)
    (i, f, g, o) = split(norm_x(a_x) + norm_h(a_h) + b),   b = b_ih + b_hh
    c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g)
    h_t = σ(o) ⊙ tanh(norm_c(c_t))

(gate order i, f, g, o as :class:`torch.nn.LSTM`). With identity hooks this is exactly
``torch.nn.LSTM``; the subclasses are

* :class:`LayerNormLSTM` (Ba, Kiros & Hinton 2016): ``norm_x``, ``norm_h``, ``norm_c`` are layer
  norms with their own γ, β;
* :class:`BatchNormLSTM` (Cooijmans et al. 2016): ``norm_x``, ``norm_h`` are batch norms without
  shift and ``norm_c`` a batch norm with shift, each with separate (running) statistics per time step;
* :class:`WeightNormLSTM` (Salimans & Kingma 2016): identity hooks, but ``W_ih`` and ``W_hh`` are
  reparametrized as g·v/‖v‖ per output unit with :func:`normlab.nn.utils.weight_norm.weight_norm`.

Interface (all classes): ``torch.nn.LSTM``'s constructor and ``forward(input, hx=None, *,
lengths=None) -> (output, (h_n, c_n))``, with the same shapes, ``batch_first``, unbatched
``(L, H_in)`` input, inter-layer ``dropout`` and parameter names ``weight_ih_l{k}``,
``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}`` (so a ``torch.nn.LSTM`` state_dict loads).
``bidirectional=True`` and ``proj_size`` are not supported.

Variable sequence lengths: pass a :class:`torch.nn.utils.rnn.PackedSequence` (output is packed the
same way) or a padded batch with ``lengths=`` (N,). Sequence n then runs for ``lengths[n]`` steps:
its outputs past that are zero, its ``h_n``/``c_n`` are the states after its last valid step, and
every time step only computes the sequences still active — so batch statistics at step t are over
those sequences alone.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as TF  # noqa: N812
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from normlab import functional as F
from normlab._checks import check_eps, check_momentum, check_positive_int
from normlab.nn.utils.weight_norm import weight_norm

__all__ = ["NormLSTM", "LayerNormLSTM", "BatchNormLSTM", "WeightNormLSTM"]

_State = tuple[Tensor, Tensor]


class NormLSTM(nn.Module):
    r"""Multi-layer LSTM whose gate pre-activations and cell state pass through overridable hooks.

    For each layer k and time step t (gate order i, f, g, o as in :class:`torch.nn.LSTM`):

    .. math::

        \begin{aligned}
        (i, f, g, o) &= \mathrm{norm}_x(W_{ih} x_t) + \mathrm{norm}_h(W_{hh} h_{t-1}) + b_{ih} + b_{hh} \\
        c_t &= \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g) \\
        h_t &= \sigma(o) \odot \tanh(\mathrm{norm}_c(c_t))
        \end{aligned}

    This base class has identity hooks and is then numerically ``torch.nn.LSTM`` (same parameters,
    names, initialization U(−1/√H, 1/√H) and outputs up to float rounding). Subclasses override
    :meth:`norm_x`, :meth:`norm_h`, :meth:`norm_c` (each receives only the rows of the sequences
    still active at step t) and add their own parameters in ``__init__``.

    The bias is added after ``norm_x``/``norm_h`` so that a normalization cannot cancel it (a
    centring normalization would remove any constant added before it).

    Args:
        input_size: features of the input, H_in.
        hidden_size: features of the hidden and cell state, H.
        num_layers: stacked LSTM layers; layer k > 0 reads layer k−1's output.
        bias: whether to use ``bias_ih_l{k}`` and ``bias_hh_l{k}``.
        batch_first: batched input/output as (N, L, ·) instead of (L, N, ·); not applied to
            unbatched input, ``hx`` or ``(h_n, c_n)`` (as in torch).
        dropout: dropout probability on the outputs of every layer but the last (training only).
        bidirectional: must be False (raises ``NotImplementedError`` otherwise).
        device, dtype: factory arguments of the parameters.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(input_size, "input_size")
        check_positive_int(hidden_size, "hidden_size")
        check_positive_int(num_layers, "num_layers")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout: expected a number in [0, 1], got {dropout!r}")
        if bidirectional:
            raise NotImplementedError(
                f"bidirectional: {type(self).__name__} supports only bidirectional=False, got True; "
                "run a second instance on the time-reversed input for the backward direction"
            )
        if dropout > 0 and num_layers == 1:
            # Same warning as torch: dropout only acts between layers.
            warnings.warn(
                f"dropout={dropout} has no effect with num_layers=1: dropout is applied to the "
                "outputs of every layer except the last",
                stacklevel=2,
            )
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = False
        # For messages: weight norm later swaps type(self) for a generated "Parametrized..." class.
        self._name = type(self).__name__
        factory = {"device": device, "dtype": dtype}
        gates = 4 * hidden_size
        # Registered in torch.nn.LSTM's order so named_parameters() lines up with it.
        for k in range(num_layers):
            layer_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(gates, layer_in, **factory)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(gates, hidden_size, **factory)))
            if bias:
                self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(gates, **factory)))
                self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(gates, **factory)))
        self._reset_lstm_parameters()

    # ------------------------------------------------------------------------------- parameters

    def _lstm_parameter_names(self) -> list[str]:
        kinds = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if self.bias else ())
        return [f"{kind}_l{k}" for k in range(self.num_layers) for kind in kinds]

    @torch.no_grad()
    def _reset_lstm_parameters(self) -> None:
        """torch.nn.LSTM's initialization: every weight and bias ~ U(−1/√H, 1/√H)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name in self._lstm_parameter_names():
            param = self._parameters.get(name)
            if param is not None:
                nn.init.uniform_(param, -bound, bound)
            else:
                # A parametrized weight (weight norm): assigning goes through the
                # parametrization's right_inverse, which sets its own parameters (g, v).
                current = getattr(self, name)
                setattr(self, name, torch.empty_like(current).uniform_(-bound, bound))

    def _reset_norm_parameters(self) -> None:
        """Initialize the normalization parameters and statistics (none in the base class)."""

    def reset_parameters(self) -> None:
        """Re-initialize the LSTM weights as torch does and the normalization parameters."""
        self._reset_lstm_parameters()
        self._reset_norm_parameters()

    def _layer_weights(self, layer: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(W_ih, W_hh, b_ih + b_hh) of ``layer`` (one access per forward: parametrized weights
        such as weight norm are recomputed on each attribute access)."""
        w_ih = getattr(self, f"weight_ih_l{layer}")
        w_hh = getattr(self, f"weight_hh_l{layer}")
        b = getattr(self, f"bias_ih_l{layer}") + getattr(self, f"bias_hh_l{layer}") if self.bias else None
        return w_ih, w_hh, b

    # ------------------------------------------------------------------------------- the hooks

    def norm_x(self, layer: int, step: int, a: Tensor) -> Tensor:
        """Normalize the input pre-activations a = W_ih x_t, (n_active, 4H). Identity here."""
        return a

    def norm_h(self, layer: int, step: int, a: Tensor) -> Tensor:
        """Normalize the recurrent pre-activations a = W_hh h_{t-1}, (n_active, 4H). Identity here."""
        return a

    def norm_c(self, layer: int, step: int, c: Tensor) -> Tensor:
        """Normalize the cell state c_t, (n_active, H), before the output tanh. Identity here.

        Only the output path h_t = σ(o) ⊙ tanh(norm_c(c_t)) sees it; c_t itself is carried on
        unnormalized, as in both papers.
        """
        return c

    # ------------------------------------------------------------------------------- forward

    def _cell(
        self, layer: int, step: int, a_x: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b: Tensor | None
    ) -> _State:
        """One LSTM step for the active rows: returns (h_t, c_t)."""
        gates = self.norm_x(layer, step, a_x) + self.norm_h(layer, step, TF.linear(h, w_hh))
        if b is not None:
            gates = gates + b
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(self.norm_c(layer, step, c_new))
        return h_new, c_new

    def _check_input(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"input: expected a torch.Tensor or PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(
                f"input: {self._name} expected 2-D (L, H_in) unbatched or 3-D batched input, "
                f"got {input.dim()}-D input of shape {tuple(input.shape)}"
            )
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"input: expected input_size={self.input_size} features in the last dim, got "
                f"{input.shape[-1]} in shape {tuple(input.shape)}"
            )
        if input.numel() == 0:
            raise ValueError(f"input: expected a non-empty tensor, got shape {tuple(input.shape)}")
        dtype = next(self.parameters()).dtype
        if input.dtype != dtype:
            raise TypeError(
                f"input: expected dtype {dtype} (the dtype of the parameters), got {input.dtype}; "
                f"convert the input or the module with .to({dtype}) / .to({input.dtype})"
            )

    def _check_lengths(self, lengths: Tensor | Sequence[int], steps: int, batch: int) -> Tensor:
        """lengths as a CPU int64 tensor of shape (N,) with values in [1, L]."""
        if isinstance(lengths, Tensor):
            if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
                raise TypeError(f"lengths: expected an integer tensor, got dtype {lengths.dtype}")
            lens = lengths.detach().to("cpu", torch.int64)
        else:
            try:
                lens = torch.as_tensor(list(lengths), dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"lengths: expected a sequence of ints or an integer tensor, got {lengths!r}") from err
        if tuple(lens.shape) != (batch,):
            raise ValueError(f"lengths: expected shape ({batch},) (one length per sequence), got {tuple(lens.shape)}")
        if bool((lens < 1).any()) or bool((lens > steps).any()):
            raise ValueError(
                f"lengths: expected every length in [1, {steps}] (the padded length L), got {lens.tolist()}"
            )
        return lens

    def _initial_state(self, hx: object, batch: int | None, like: Tensor) -> tuple[Tensor, Tensor]:
        """(h_0, c_0) of shape (num_layers, N, H); ``batch=None`` for unbatched input."""
        if batch is None:
            shape: tuple[int, ...] = (self.num_layers, self.hidden_size)
        else:
            shape = (self.num_layers, batch, self.hidden_size)
        if hx is None:
            zeros = torch.zeros(shape, dtype=like.dtype, device=like.device)
            h0 = c0 = zeros
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"hx: expected a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
            h0, c0 = hx
            for t, name in ((h0, "hx[0] (h_0)"), (c0, "hx[1] (c_0)")):
                if not isinstance(t, Tensor):
                    raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
                if tuple(t.shape) != shape:
                    kind = "unbatched" if batch is None else "batched"
                    raise ValueError(f"{name}: expected shape {shape} for {kind} input, got {tuple(t.shape)}")
                if t.dtype != like.dtype:
                    raise TypeError(f"{name}: expected dtype {like.dtype} (the input's), got {t.dtype}")
        if batch is None:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        return h0, c0

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None = None,
        *,
        lengths: Tensor | Sequence[int] | None = None,
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        """Run the LSTM over a sequence.

        Args:
            input: (L, N, H_in), (N, L, H_in) with ``batch_first``, unbatched (L, H_in), or a
                :class:`PackedSequence` of (·, H_in).
            hx: optional (h_0, c_0), each (num_layers, N, H) — (num_layers, H) for unbatched
                input; zeros when None. Batch order is the input's (also for packed input).
            lengths: optional (N,) valid lengths of a padded batched input (ints in [1, L], any
                order). Not allowed with a PackedSequence (it carries its own lengths) or with
                unbatched input.

        Returns:
            ``(output, (h_n, c_n))``: output is (L, N, H) / (N, L, H) / (L, H) like the input, or a
            PackedSequence for packed input, zero past each sequence's length; h_n, c_n are
            (num_layers, N, H) (or (num_layers, H)) at each sequence's last valid step.
        """
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError(
                    "lengths: expected None with a PackedSequence input (it carries its lengths), got a value"
                )
            self._check_input(input.data)
            # Padded batch in the caller's (unsorted) order, the order of hx and h_n.
            x, lens = pad_packed_sequence(input, batch_first=False)
            batch: int | None = x.shape[1]
        else:
            self._check_input(input)
            if input.dim() == 2:
                if lengths is not None:
                    raise ValueError("lengths: expected None for unbatched (L, H_in) input, got a value")
                x, batch = input.unsqueeze(1), None
            else:
                x = input.transpose(0, 1) if self.batch_first else input
                batch = x.shape[1]
            lens = None if lengths is None else self._check_lengths(lengths, x.shape[0], x.shape[1])
        h0, c0 = self._initial_state(hx, batch, x)
        out, h_n, c_n = self._run(x, h0, c0, lens)

        if packed:
            sorted_idx = input.sorted_indices
            if sorted_idx is not None:
                out = out.index_select(1, sorted_idx)
                lens = lens.index_select(0, sorted_idx.cpu())
            # Same batch_sizes and index maps as the input: pack the sorted padded output.
            data = pack_padded_sequence(out, lens, enforce_sorted=True).data
            return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), (h_n, c_n)
        if batch is None:
            return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, (h_n, c_n)

    def _run(self, x: Tensor, h0: Tensor, c0: Tensor, lens: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Time-major recurrence: x (L, N, H_in) -> output (L, N, H), h_n, c_n (num_layers, N, H)."""
        steps = x.shape[0]
        # Rows active at each step: None = all (the fast path, no gathering), else an index tensor.
        active: list[Tensor | None] = [None] * steps
        if lens is not None:
            for t in range(steps):
                if int(lens.min()) <= t:
                    active[t] = (lens > t).nonzero().flatten().to(x.device)
            # Padded steps are never computed, but the batched input projection below multiplies
            # them too: zero them so that even NaN padding cannot reach W_ih's gradient (0·NaN = NaN).
            valid = torch.arange(steps).unsqueeze(1) < lens.unsqueeze(0)  # (L, N)
            x = x.masked_fill(~valid.to(x.device).unsqueeze(-1), 0.0)
        h_n, c_n = [], []
        layer_input = x
        for k in range(self.num_layers):
            w_ih, w_hh, b = self._layer_weights(k)
            # The input projection of all steps at once: one matmul instead of L.
            a_x = TF.linear(layer_input, w_ih)
            h, c = h0[k], c0[k]
            outputs: list[Tensor] = []
            for t in range(steps):
                idx = active[t]
                if idx is None:
                    h, c = self._cell(k, t, a_x[t], h, c, w_hh, b)
                    outputs.append(h)
                    continue
                if idx.numel() == 0:  # padded past every sequence
                    outputs.append(torch.zeros_like(h))
                    continue
                a_t, h_t, c_t = (v.index_select(0, idx) for v in (a_x[t], h, c))
                h_a, c_a = self._cell(k, t, a_t, h_t, c_t, w_hh, b)
                # Finished sequences keep their last state; their output is zero.
                h = h.index_copy(0, idx, h_a)
                c = c.index_copy(0, idx, c_a)
                outputs.append(torch.zeros_like(h).index_copy(0, idx, h_a))
            out = torch.stack(outputs)
            if self.dropout > 0 and self.training and k < self.num_layers - 1:
                out = TF.dropout(out, self.dropout, training=True)
            layer_input = out
            h_n.append(h)
            c_n.append(c)
        return layer_input, torch.stack(h_n), torch.stack(c_n)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s


class LayerNormLSTM(NormLSTM):
    r"""Layer-normalized LSTM (Ba, Kiros & Hinton 2016, §3.1).

    .. math::

        \begin{aligned}
        (i, f, g, o) &= \mathrm{LN}(W_{ih} x_t;\, \gamma_{ih}, \beta_{ih})
                       + \mathrm{LN}(W_{hh} h_{t-1};\, \gamma_{hh}, \beta_{hh}) + b \\
        c_t &= \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g) \\
        h_t &= \sigma(o) \odot \tanh(\mathrm{LN}(c_t;\, \gamma_c, \beta_c))
        \end{aligned}

    with :math:`\mathrm{LN}(a; \gamma, \beta) = \gamma \odot (a - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta`,
    μ and σ² over the 4H gate units of each row (each sample, each step) for the two
    pre-activations and over the H units for the cell state. Normalizing W_ih x and W_hh h
    separately keeps either from dominating the gates by its scale. The LSTM bias
    b = b_ih + b_hh is added once, after the norms (β_ih, β_hh and b overlap: all three shift the
    gates; b keeps torch's names so its weights load). Per-sample statistics: train and eval are
    identical and independent of the batch.

    Parameters per layer k (besides the LSTM's): ``ln_weight_ih_l{k}``, ``ln_bias_ih_l{k}``,
    ``ln_weight_hh_l{k}``, ``ln_bias_hh_l{k}`` (4H) and ``ln_weight_c_l{k}``, ``ln_bias_c_l{k}`` (H);
    γ = 1, β = 0 at init.

    Args: those of :class:`NormLSTM`, plus keyword-only ``eps`` (of the layer norms) and
    ``backend`` (normlab backend of the norms, see :mod:`normlab.core.dispatch`).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        eps: float = 1e-5,
        backend: str | None = None,
    ) -> None:
        check_eps(eps)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device, dtype)
        self.eps = float(eps)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        for k in range(num_layers):
            for which, size in (("ih", 4 * hidden_size), ("hh", 4 * hidden_size), ("c", hidden_size)):
                self.register_parameter(f"ln_weight_{which}_l{k}", nn.Parameter(torch.empty(size, **factory)))
                self.register_parameter(f"ln_bias_{which}_l{k}", nn.Parameter(torch.empty(size, **factory)))
        self._reset_norm_parameters()

    @torch.no_grad()
    def _reset_norm_parameters(self) -> None:
        for k in range(self.num_layers):
            for which in ("ih", "hh", "c"):
                getattr(self, f"ln_weight_{which}_l{k}").fill_(1.0)
                getattr(self, f"ln_bias_{which}_l{k}").zero_()

    def _ln(self, which: str, layer: int, a: Tensor) -> Tensor:
        w = getattr(self, f"ln_weight_{which}_l{layer}")
        b = getattr(self, f"ln_bias_{which}_l{layer}")
        return F.layer_norm(a, a.shape[-1], w, b, self.eps, backend=self.backend)

    def norm_x(self, layer: int, step: int, a: Tensor) -> Tensor:
        """LN(W_ih x_t; γ_ih, β_ih) over the 4H gate units of each row."""
        return self._ln("ih", layer, a)

    def norm_h(self, layer: int, step: int, a: Tensor) -> Tensor:
        """LN(W_hh h_{t-1}; γ_hh, β_hh) over the 4H gate units of each row."""
        return self._ln("hh", layer, a)

    def norm_c(self, layer: int, step: int, c: Tensor) -> Tensor:
        """LN(c_t; γ_c, β_c) over the H units of each row."""
        return self._ln("c", layer, c)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"


class BatchNormLSTM(NormLSTM):
    r"""Batch-normalized LSTM (Cooijmans, Ballas, Laurent, Gülçehre & Courville 2016).

    .. math::

        \begin{aligned}
        (i, f, g, o) &= \mathrm{BN}_t(W_{ih} x_t;\, \gamma_{ih}, 0)
                       + \mathrm{BN}_t(W_{hh} h_{t-1};\, \gamma_{hh}, 0) + b \\
        c_t &= \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g) \\
        h_t &= \sigma(o) \odot \tanh(\mathrm{BN}_t(c_t;\, \gamma_c, \beta_c))
        \end{aligned}

    with :math:`\mathrm{BN}_t(a; \gamma, \beta) = \gamma \odot (a - \mu_t)/\sqrt{\sigma_t^2 + \epsilon} + \beta`
    per unit. The two pre-activation norms have no shift (β fixed at 0): the LSTM bias
    b = b_ih + b_hh plays that role, and two more shifts would only duplicate it. γ, β are shared
    across time; the statistics are not:

    * training: μ_t, σ²_t are the statistics of step t over the batch — over the sequences still
      active at t when lengths vary — and update step t's running statistics
      (``running ← (1 − momentum)·running + momentum·batch``, unbiased variance tracked);
    * eval: step t's running statistics; the output is then deterministic and each sample's output
      independent of the rest of the batch.

    Steps t ≥ ``max_steps`` (T_max) share the last slot, T_max − 1: in eval they use its running
    statistics (the paper's generalization to longer sequences), in training they still use their
    own batch statistics and also update that slot, which thus tracks the long-sequence tail.
    A training step with a single active sequence has no batch variance; it uses (and does not
    update) that step's running statistics instead of failing, which happens at the tail of a
    batch whose longest sequence is unique.

    γ starts at ``gamma_init`` = 0.1 (the paper's choice: with γ = 1 the normalized
    pre-activations would saturate the sigmoids and tanh and vanish the gradients), β_c at 0.

    Parameters per layer k (besides the LSTM's): ``bn_weight_ih_l{k}``, ``bn_weight_hh_l{k}`` (4H),
    ``bn_weight_c_l{k}``, ``bn_bias_c_l{k}`` (H). Buffers: ``running_mean_{ih,hh}_l{k}``,
    ``running_var_{ih,hh}_l{k}`` of shape (T_max, 4H) and ``running_mean_c_l{k}``,
    ``running_var_c_l{k}`` of shape (T_max, H), row t for step t (zeros / ones at init).

    Args: those of :class:`NormLSTM`, plus keyword-only ``max_steps`` (T_max, default 100),
    ``gamma_init``, ``eps``, ``momentum`` (a number in [0, 1]) and ``backend``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        max_steps: int = 100,
        gamma_init: float = 0.1,
        eps: float = 1e-5,
        momentum: float = 0.1,
        backend: str | None = None,
    ) -> None:
        check_positive_int(max_steps, "max_steps")
        if isinstance(gamma_init, bool) or not isinstance(gamma_init, numbers.Real) or not math.isfinite(gamma_init):
            raise ValueError(f"gamma_init: expected a finite number, got {gamma_init!r}")
        check_eps(eps)
        check_momentum(momentum)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device, dtype)
        self.max_steps = int(max_steps)
        self.gamma_init = float(gamma_init)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        gates = 4 * hidden_size
        for k in range(num_layers):
            self.register_parameter(f"bn_weight_ih_l{k}", nn.Parameter(torch.empty(gates, **factory)))
            self.register_parameter(f"bn_weight_hh_l{k}", nn.Parameter(torch.empty(gates, **factory)))
            self.register_parameter(f"bn_weight_c_l{k}", nn.Parameter(torch.empty(hidden_size, **factory)))
            self.register_parameter(f"bn_bias_c_l{k}", nn.Parameter(torch.empty(hidden_size, **factory)))
            for which, size in (("ih", gates), ("hh", gates), ("c", hidden_size)):
                # One row per time step in one tensor: a fixed set of state_dict keys whatever T_max.
                self.register_buffer(f"running_mean_{which}_l{k}", torch.zeros(max_steps, size, **factory))
                self.register_buffer(f"running_var_{which}_l{k}", torch.ones(max_steps, size, **factory))
        self._reset_norm_parameters()

    def reset_running_stats(self) -> None:
        """Running means to 0 and variances to 1 at every step."""
        for k in range(self.num_layers):
            for which in ("ih", "hh", "c"):
                getattr(self, f"running_mean_{which}_l{k}").zero_()
                getattr(self, f"running_var_{which}_l{k}").fill_(1.0)

    @torch.no_grad()
    def _reset_norm_parameters(self) -> None:
        for k in range(self.num_layers):
            for which in ("ih", "hh", "c"):
                getattr(self, f"bn_weight_{which}_l{k}").fill_(self.gamma_init)
            getattr(self, f"bn_bias_c_l{k}").zero_()
        self.reset_running_stats()

    def _bn(self, which: str, layer: int, step: int, a: Tensor) -> Tensor:
        slot = min(step, self.max_steps - 1)
        # Row views of the stacked buffers: F.batch_norm updates them in place, i.e. the buffer.
        running_mean = getattr(self, f"running_mean_{which}_l{layer}")[slot]
        running_var = getattr(self, f"running_var_{which}_l{layer}")[slot]
        weight = getattr(self, f"bn_weight_{which}_l{layer}")
        bias = getattr(self, f"bn_bias_c_l{layer}") if which == "c" else None
        batch_stats = self.training and a.shape[0] > 1
        return F.batch_norm(
            a, running_mean, running_var, weight, bias, batch_stats, self.momentum, self.eps, backend=self.backend
        )

    def norm_x(self, layer: int, step: int, a: Tensor) -> Tensor:
        """BN_t(W_ih x_t; γ_ih, 0) with step t's statistics."""
        return self._bn("ih", layer, step, a)

    def norm_h(self, layer: int, step: int, a: Tensor) -> Tensor:
        """BN_t(W_hh h_{t-1}; γ_hh, 0) with step t's statistics."""
        return self._bn("hh", layer, step, a)

    def norm_c(self, layer: int, step: int, c: Tensor) -> Tensor:
        """BN_t(c_t; γ_c, β_c) with step t's statistics."""
        return self._bn("c", layer, step, c)

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", max_steps={self.max_steps}, gamma_init={self.gamma_init}, eps={self.eps}, momentum={self.momentum}"
        )


class WeightNormLSTM(NormLSTM):
    r"""LSTM with weight-normalized W_ih and W_hh (Salimans & Kingma 2016), one g per output unit.

    .. math::

        W_{ih} = g_{ih} \odot \frac{V_{ih}}{\lVert V_{ih} \rVert_{\text{row}}}, \qquad
        W_{hh} = g_{hh} \odot \frac{V_{hh}}{\lVert V_{hh} \rVert_{\text{row}}}

    (each of the 4H rows — one gate unit — has its own scale g_j and direction v_j/‖v_j‖), then the
    plain LSTM recurrence of :class:`NormLSTM`. Implemented with
    :func:`normlab.nn.utils.weight_norm.weight_norm` (``dim=0``) on every ``weight_ih_l{k}`` and
    ``weight_hh_l{k}``: the attribute ``weight_ih_l{k}`` becomes the computed g·v/‖v‖, and the
    parameters are ``parametrizations.weight_ih_l{k}.original0`` (g, shape (4H, 1)) and
    ``...original1`` (v, shape (4H, H_in)). At construction g = ‖v‖, so the initial function is
    torch.nn.LSTM's; assigning ``module.weight_ih_l0 = w`` (e.g. torch LSTM weights) sets g = ‖w‖
    and v = w. Biases are not normalized.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device, dtype)
        for k in range(num_layers):
            for which in ("ih", "hh"):
                weight_norm(self, f"weight_{which}_l{k}", dim=0)
