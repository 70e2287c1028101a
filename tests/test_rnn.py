"""Tests of normlab.nn.rnn: NormLSTM (= torch.nn.LSTM), LayerNormLSTM, BatchNormLSTM, WeightNormLSTM."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF  # noqa: N812
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from normlab.nn.rnn import BatchNormLSTM, LayerNormLSTM, NormLSTM, WeightNormLSTM

ALL = [NormLSTM, LayerNormLSTM, BatchNormLSTM, WeightNormLSTM]
D64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The recurrences are many tiny ops: intra-op threads only add contention on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pair(num_layers: int, seed: int = 0, **kw) -> tuple[torch.nn.LSTM, NormLSTM]:
    torch.manual_seed(seed)
    ref = torch.nn.LSTM(4, 5, num_layers, **kw)
    m = NormLSTM(4, 5, num_layers, **kw)
    m.load_state_dict(ref.state_dict())
    return ref, m


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ------------------------------------------------------------------------ equality with torch


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_matches_torch_lstm(num_layers: int, batch_first: bool, with_hx: bool) -> None:
    ref, m = _pair(num_layers, batch_first=batch_first)
    x = torch.randn(3, 6, 4) if batch_first else torch.randn(6, 3, 4)
    hx = (torch.randn(num_layers, 3, 5), torch.randn(num_layers, 3, 5)) if with_hx else None
    x_ref, x_m = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, (h_r, c_r) = ref(x_ref, hx)
    out_m, (h_m, c_m) = m(x_m, hx)
    assert out_m.shape == out_r.shape == ((3, 6, 5) if batch_first else (6, 3, 5))
    _close(out_m, out_r)
    _close(h_m, h_r)
    _close(c_m, c_r)
    (out_r.sum() + c_r.sum()).backward()
    (out_m.sum() + c_m.sum()).backward()
    _close(x_m.grad, x_ref.grad, atol=1e-5)
    for name, p in ref.named_parameters():
        _close(m.get_parameter(name).grad, p.grad, atol=1e-5)


def test_matches_torch_lstm_no_bias_unbatched_and_eval_dropout() -> None:
    ref, m = _pair(2, bias=False, dropout=0.3)
    ref.eval(), m.eval()  # dropout acts only in training
    x = torch.randn(7, 4)
    hx = (torch.randn(2, 5), torch.randn(2, 5))
    out_r, (h_r, c_r) = ref(x, hx)
    out_m, (h_m, c_m) = m(x, hx)
    assert out_m.shape == (7, 5) and h_m.shape == c_m.shape == (2, 5)
    _close(out_m, out_r)
    _close(h_m, h_r)
    _close(c_m, c_r)


def test_dropout_between_layers_in_training() -> None:
    _, m = _pair(2, dropout=0.5)
    x = torch.randn(5, 3, 4)
    m.eval()
    y_eval = m(x)[0]
    m.train()
    torch.manual_seed(1)
    y1 = m(x)[0]
    torch.manual_seed(2)
    y2 = m(x)[0]
    assert not torch.allclose(y1, y2) and not torch.allclose(y1, y_eval)
    # The last layer's output is not dropped: no exact zeros appear.
    assert (y1 != 0).all()


def test_packed_sequence_matches_torch() -> None:
    ref, m = _pair(2)
    lengths = torch.tensor([3, 6, 1, 6, 4])  # unsorted, with ties
    x = torch.randn(6, 5, 4)
    hx = (torch.randn(2, 5, 5), torch.randn(2, 5, 5))
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out_r, (h_r, c_r) = ref(packed, hx)
    out_m, (h_m, c_m) = m(packed, hx)
    assert torch.equal(out_m.batch_sizes, out_r.batch_sizes)
    assert torch.equal(out_m.sorted_indices, out_r.sorted_indices)
    _close(out_m.data, out_r.data)
    _close(h_m, h_r)
    _close(c_m, c_r)
    # The lengths= route gives the same padded result.
    out_l, (h_l, c_l) = m(x, hx, lengths=lengths)
    _close(out_l, pad_packed_sequence(out_m)[0], atol=0)
    _close(h_l, h_m, atol=0)


def test_loads_torch_weights_into_every_variant() -> None:
    ref = torch.nn.LSTM(4, 5, 2)
    for cls in (LayerNormLSTM, BatchNormLSTM):
        m = cls(4, 5, 2)
        result = m.load_state_dict(ref.state_dict(), strict=False)
        assert not result.unexpected_keys
        assert all(k.startswith(("ln_", "bn_", "running_")) for k in result.missing_keys)
        assert torch.equal(m.weight_hh_l1, ref.weight_hh_l1)
    # Weight norm: assigning a weight goes through right_inverse (g = ||w||, v = w): same function.
    wn = WeightNormLSTM(4, 5, 2)
    for name, p in ref.named_parameters():
        setattr(wn, name, p.detach().clone()) if name.startswith("weight") else wn.get_parameter(name).data.copy_(p)
    x = torch.randn(6, 3, 4)
    _close(wn(x)[0], ref(x)[0])


# ------------------------------------------------------------------------ gradcheck (float64)


def _gradcheck(m: NormLSTM, lengths: list[int] | None = None) -> None:
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in m.named_parameters()]
    buffers = dict(m.named_buffers())
    torch.manual_seed(0)
    x = torch.randn(3, 3, m.input_size, dtype=D64, requires_grad=True)
    h0 = torch.randn(m.num_layers, 3, m.hidden_size, dtype=D64, requires_grad=True)
    c0 = torch.randn(m.num_layers, 3, m.hidden_size, dtype=D64, requires_grad=True)

    def f(x, h0, c0, *ps):
        state = {**dict(zip(names, ps)), **buffers}
        out, (h, c) = functional_call(m, state, (x, (h0, c0)), {"lengths": lengths})
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", ALL)
def test_gradcheck(cls: type[NormLSTM]) -> None:
    torch.manual_seed(0)
    m = cls(2, 2, 2, dtype=D64)
    if isinstance(m, (LayerNormLSTM, BatchNormLSTM)):
        with torch.no_grad():  # away from the init values so that γ, β are generic
            for name, p in m.named_parameters():
                if name.startswith(("ln_", "bn_")):
                    p.add_(0.3 * torch.randn_like(p))
    _gradcheck(m)


def test_gradcheck_batchnorm_eval_and_variable_lengths() -> None:
    torch.manual_seed(0)
    m = BatchNormLSTM(2, 2, 1, dtype=D64, max_steps=2)
    with torch.no_grad():
        for name in ("ih", "hh", "c"):
            getattr(m, f"running_mean_{name}_l0").normal_()
            getattr(m, f"running_var_{name}_l0").uniform_(0.5, 2.0)
    m.eval()
    _gradcheck(m)
    m.train()
    _gradcheck(m, lengths=[3, 2, 3])  # step 2 normalizes over two sequences only


# ------------------------------------------------------------------------ independent references


def _ref_layer_norm_lstm(m: LayerNormLSTM, x, h, c):
    """Single-layer LN-LSTM written directly from Ba et al. with torch.nn.functional."""

    def ln(a, which):
        w, b = getattr(m, f"ln_weight_{which}_l0"), getattr(m, f"ln_bias_{which}_l0")
        return TF.layer_norm(a, (a.shape[-1],), w, b, m.eps)

    outs = []
    for t in range(x.shape[0]):
        gates = ln(x[t] @ m.weight_ih_l0.T, "ih") + ln(h @ m.weight_hh_l0.T, "hh") + m.bias_ih_l0 + m.bias_hh_l0
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(ln(c, "c"))
        outs.append(h)
    return torch.stack(outs), h, c


def _ref_batch_norm_lstm(m: BatchNormLSTM, x, h, c, running: dict[str, torch.Tensor], training: bool):
    """Single-layer BN-LSTM from Cooijmans et al. with torch.nn.functional.batch_norm per step."""

    def bn(a, which, t):
        s = min(t, m.max_steps - 1)
        w = getattr(m, f"bn_weight_{which}_l0")
        b = m.bn_bias_c_l0 if which == "c" else None
        mean, var = running[f"mean_{which}"][s], running[f"var_{which}"][s]
        return TF.batch_norm(a, mean, var, w, b, training, m.momentum, m.eps)

    outs = []
    for t in range(x.shape[0]):
        gates = bn(x[t] @ m.weight_ih_l0.T, "ih", t) + bn(h @ m.weight_hh_l0.T, "hh", t) + m.bias_ih_l0 + m.bias_hh_l0
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(bn(c, "c", t))
        outs.append(h)
    return torch.stack(outs), h, c


def _perturb_norm_params(m: NormLSTM) -> None:
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith(("ln_", "bn_")):
                p.add_(0.2 * torch.randn_like(p))


def test_layer_norm_lstm_matches_reference() -> None:
    torch.manual_seed(0)
    m = LayerNormLSTM(3, 4, dtype=D64)
    _perturb_norm_params(m)
    x, h0, c0 = torch.randn(5, 6, 3, dtype=D64), torch.randn(1, 6, 4, dtype=D64), torch.randn(1, 6, 4, dtype=D64)
    out, (h, c) = m(x, (h0, c0))
    out_r, h_r, c_r = _ref_layer_norm_lstm(m, x, h0[0], c0[0])
    _close(out, out_r, atol=1e-12)
    _close(h[0], h_r, atol=1e-12)
    _close(c[0], c_r, atol=1e-12)


@pytest.mark.parametrize("steps", [3, 6])  # within T_max = 4 and beyond it
def test_batch_norm_lstm_matches_reference_train_then_eval(steps: int) -> None:
    torch.manual_seed(0)
    m = BatchNormLSTM(3, 4, dtype=D64, max_steps=4, momentum=0.2)
    _perturb_norm_params(m)
    running = {
        f"{s}_{w}": getattr(m, f"running_{s}_{w}_l0").clone() for s in ("mean", "var") for w in ("ih", "hh", "c")
    }
    for _ in range(2):  # two training passes: running statistics accumulate per step
        x = torch.randn(steps, 6, 3, dtype=D64)
        h0, c0 = torch.randn(1, 6, 4, dtype=D64), torch.randn(1, 6, 4, dtype=D64)
        out, (h, c) = m(x, (h0, c0))
        out_r, h_r, c_r = _ref_batch_norm_lstm(m, x, h0[0], c0[0], running, training=True)
        _close(out, out_r, atol=1e-12)
        _close(c[0], c_r, atol=1e-12)
    for key, value in running.items():
        stat, which = key.split("_")
        _close(getattr(m, f"running_{stat}_{which}_l0"), value, atol=1e-12)
    m.eval()
    out, (h, c) = m(x, (h0, c0))
    out_r, h_r, c_r = _ref_batch_norm_lstm(m, x, h0[0], c0[0], running, training=False)
    _close(out, out_r, atol=1e-12)
    _close(h[0], h_r, atol=1e-12)


# ------------------------------------------------------------------------ BN-LSTM statistics


def test_batch_norm_lstm_gamma_init_and_parameters() -> None:
    m = BatchNormLSTM(3, 4, 2, max_steps=7)
    for k in range(2):
        for which in ("ih", "hh", "c"):
            assert torch.all(getattr(m, f"bn_weight_{which}_l{k}") == 0.1)
        assert torch.all(m.get_parameter(f"bn_bias_c_l{k}") == 0)
        assert m.get_buffer(f"running_mean_ih_l{k}").shape == (7, 16)
        assert m.get_buffer(f"running_var_c_l{k}").shape == (7, 4)
    # β of the two pre-activation norms is fixed at 0: no such parameter exists.
    names = {n for n, _ in m.named_parameters()}
    assert not any(n.startswith(("bn_bias_ih", "bn_bias_hh")) for n in names)
    m2 = BatchNormLSTM(3, 4, gamma_init=0.5)
    assert torch.all(m2.bn_weight_hh_l0 == 0.5)
    m2.bn_weight_hh_l0.data.fill_(3.0)
    m2.reset_parameters()
    assert torch.all(m2.bn_weight_hh_l0 == 0.5)


def test_batch_norm_lstm_running_stats_per_step() -> None:
    torch.manual_seed(0)
    m = BatchNormLSTM(3, 4, max_steps=5, momentum=0.1)
    # Each step with its own input distribution, so the per-step statistics differ.
    scale, shift = torch.tensor([1.0, 3.0, 0.3]).view(3, 1, 1), torch.tensor([0.0, 2.0, -1.0]).view(3, 1, 1)
    x = torch.randn(3, 8, 3) * scale + shift
    m(x)
    # The input projection does not depend on the recurrence: its step-t statistics are known.
    a = x @ m.weight_ih_l0.detach().T  # (L, N, 4H)
    rm, rv = m.running_mean_ih_l0, m.running_var_ih_l0
    for t in range(3):
        _close(rm[t], 0.1 * a[t].mean(0), atol=1e-6)
        _close(rv[t], 0.9 + 0.1 * a[t].var(0, unbiased=True), atol=1e-5)
    assert not torch.allclose(rm[0], rm[1]) and not torch.allclose(rm[1], rm[2])
    assert not torch.allclose(m.running_var_c_l0[0], m.running_var_c_l0[2])
    # Steps never run keep their initial statistics.
    assert torch.all(rm[3:] == 0) and torch.all(rv[3:] == 1)


def test_batch_norm_lstm_steps_beyond_max_share_last_slot_in_training() -> None:
    torch.manual_seed(0)
    m = BatchNormLSTM(3, 4, max_steps=2, momentum=0.1)
    x = torch.randn(4, 8, 3) + torch.arange(4.0).view(4, 1, 1)
    m(x)
    a = x @ m.weight_ih_l0.detach().T
    expected = torch.zeros(16)
    for t in (1, 2, 3):  # slot 1 = T_max - 1 is updated by steps 1, 2 and 3 in turn
        expected = 0.9 * expected + 0.1 * a[t].mean(0)
    _close(m.running_mean_ih_l0[1], expected, atol=1e-6)
    _close(m.running_mean_ih_l0[0], 0.1 * a[0].mean(0), atol=1e-6)


def test_batch_norm_lstm_eval_reuses_last_slot_deterministic_batch_independent() -> None:
    torch.manual_seed(0)
    short = BatchNormLSTM(3, 4, 2, max_steps=3)
    for _ in range(3):
        short(torch.randn(5, 6, 3))  # training: fill per-step running statistics
    short.eval()
    # A twin with room for 8 steps whose rows 3..7 copy row 2 must give the same eval outputs.
    long = BatchNormLSTM(3, 4, 2, max_steps=8)
    state = {}
    for key, value in short.state_dict().items():
        state[key] = torch.cat([value, value[-1:].expand(5, -1)]) if key.startswith("running_") else value
    long.load_state_dict(state)
    long.eval()
    x = torch.randn(7, 5, 3)
    y = short(x)[0]
    _close(y, long(x)[0], atol=0)
    # Rows of distinct steps really differ (so the check above is not vacuous).
    assert not torch.allclose(short.running_mean_hh_l1[1], short.running_mean_hh_l1[2])
    # Deterministic, statistics untouched, and each sample independent of the rest of the batch.
    before = copy.deepcopy(short.state_dict())
    _close(short(x)[0], y, atol=0)
    for key, value in short.state_dict().items():
        assert torch.equal(value, before[key])
    for n in range(5):
        _close(short(x[:, n : n + 1])[0][:, 0], y[:, n], atol=1e-6)
    # In training the same sample's output does depend on the batch.
    short.train()
    assert not torch.allclose(short(x[:, :2])[0][:, 0], short(x)[0][:, 0])


def test_batch_norm_lstm_single_sequence_in_training_uses_running_stats() -> None:
    torch.manual_seed(0)
    m = BatchNormLSTM(3, 4, max_steps=4)
    m(torch.randn(4, 6, 3))
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(4, 1, 3)
    y_train = m(x)[0]  # one sequence: no batch variance, so the running statistics are used
    for key, value in m.state_dict().items():
        assert torch.equal(value, before[key])
    m.eval()
    _close(y_train, m(x)[0], atol=0)


# ------------------------------------------------------------------------ LN-LSTM statistics


def test_layer_norm_lstm_normalized_rows_have_zero_mean_unit_variance() -> None:
    torch.manual_seed(0)
    # Tiny eps: the normalized variance is σ²/(σ² + ε), which should read as 1 here.
    m = LayerNormLSTM(3, 6, 2, eps=1e-10)
    seen: dict[str, list[torch.Tensor]] = {"x": [], "h": [], "c": []}
    for kind in seen:
        original = getattr(m, f"norm_{kind}")

        def record(layer, step, a, _orig=original, _kind=kind):
            out = _orig(layer, step, a)
            seen[_kind].append(out.detach())
            return out

        setattr(m, f"norm_{kind}", record)  # instance attribute shadows the method
    x = 5.0 * torch.randn(4, 7, 3) + 3.0
    m(x, (torch.randn(2, 7, 6), torch.randn(2, 7, 6)))
    for kind, outs in seen.items():
        assert len(outs) == 2 * 4  # every (layer, step)
        width = 6 if kind == "c" else 24
        for y in outs:  # γ = 1, β = 0 at init: the normalized rows themselves
            assert y.shape == (7, width)
            _close(y.mean(1), torch.zeros(7), atol=1e-5)
            _close(y.var(1, unbiased=False), torch.ones(7), atol=1e-4)
    # Per-sample statistics: a sample's output does not depend on the rest of the batch.
    y = m(x)[0]
    _close(m(x[:, 2:3])[0][:, 0], y[:, 2], atol=1e-6)


# ------------------------------------------------------------------------ WN-LSTM


def test_weight_norm_lstm_weights_are_g_v_over_norm() -> None:
    torch.manual_seed(0)
    m = WeightNormLSTM(3, 4, 2)
    g = m.parametrizations.weight_hh_l1.original0
    v = m.parametrizations.weight_hh_l1.original1
    assert g.shape == (16, 1) and v.shape == (16, 4)
    with torch.no_grad():
        g.uniform_(0.5, 2.0)
        v.mul_(torch.rand(16, 1) * 5)  # the row norms of v do not matter, only g
    w = m.weight_hh_l1
    _close(w, g * v / v.norm(dim=1, keepdim=True))
    _close(w.norm(dim=1), g.flatten(), atol=1e-6)
    # Same function as a plain NormLSTM holding the computed weights.
    plain = NormLSTM(3, 4, 2)
    plain.load_state_dict({k: getattr(m, k).detach() for k, _ in plain.named_parameters()})
    x = torch.randn(5, 2, 3)
    y = m(x)[0]
    _close(y, plain(x)[0], atol=0)
    y.sum().backward()
    assert g.grad is not None and v.grad is not None
    # Directional gradient: the gradient of v is orthogonal to v row-wise.
    _close((v.grad * v).sum(1), torch.zeros(16), atol=1e-6)


# ------------------------------------------------------------------------ variable lengths


def _padded_batch(seed: int = 0):
    torch.manual_seed(seed)
    lengths = [5, 2, 4, 1]
    x = torch.randn(5, 4, 3)
    for n, length in enumerate(lengths):
        x[length:, n] = float("nan")  # padding content must not matter at all
    return x, lengths


@pytest.mark.parametrize("cls", ALL)
def test_variable_lengths_match_running_each_sequence_alone(cls: type[NormLSTM]) -> None:
    torch.manual_seed(0)
    m = cls(3, 4, 2, batch_first=True)
    if isinstance(m, BatchNormLSTM):
        m(torch.randn(6, 5, 3))  # statistics to use, then eval (per-sample) for the comparison
        m.eval()
    x, lengths = _padded_batch()
    x = x.transpose(0, 1)  # batch_first
    hx = (torch.randn(2, 4, 4), torch.randn(2, 4, 4))
    out, (h, c) = m(x, hx, lengths=torch.tensor(lengths))
    assert out.shape == (4, 5, 4)
    for n, length in enumerate(lengths):
        assert torch.all(out[n, length:] == 0)
        alone, (h1, c1) = m(x[n : n + 1, :length], (hx[0][:, n : n + 1], hx[1][:, n : n + 1]))
        # float32: a batch of 1 vs 4 rounds the matmuls differently, the norms amplify it a bit.
        _close(out[n, :length], alone[0], atol=1e-5)
        _close(h[:, n], h1[:, 0], atol=1e-5)
        _close(c[:, n], c1[:, 0], atol=1e-5)
    # Gradients stay finite even with NaN padding.
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_batch_norm_lstm_variable_lengths_statistics_over_active_sequences() -> None:
    torch.manual_seed(0)
    m = BatchNormLSTM(3, 4, max_steps=5)
    x, lengths = _padded_batch()
    out, _ = m(x, lengths=lengths)
    assert torch.isfinite(out).all()
    a = torch.nan_to_num(x) @ m.weight_ih_l0.detach().T
    for t in range(4):  # step 4 has a single active sequence: no batch statistics, no update
        active = [n for n, length in enumerate(lengths) if length > t]
        _close(m.running_mean_ih_l0[t], 0.1 * a[t, active].mean(0), atol=1e-6)
        _close(m.running_var_ih_l0[t], 0.9 + 0.1 * a[t, active].var(0, unbiased=True), atol=1e-5)
    assert torch.all(m.running_mean_ih_l0[4] == 0)
    # Packed input runs the same computation.
    m2 = copy.deepcopy(m)
    m.reset_running_stats(), m2.reset_running_stats()
    y_len = m(x, lengths=lengths)[0]
    y_pack = pad_packed_sequence(m2(pack_padded_sequence(x, lengths, enforce_sorted=False))[0])[0]
    _close(y_len, y_pack, atol=1e-6)
    _close(m.running_var_c_l0, m2.running_var_c_l0, atol=1e-6)


# ------------------------------------------------------------------------ state_dict


@pytest.mark.parametrize("cls", ALL)
def test_state_dict_round_trip(cls: type[NormLSTM]) -> None:
    torch.manual_seed(0)
    a = cls(3, 4, 2)
    _perturb_norm_params(a)
    a(torch.randn(4, 5, 3))  # BN: non-trivial running statistics
    torch.manual_seed(1)
    b = cls(3, 4, 2)
    b.load_state_dict(a.state_dict())
    assert list(a.state_dict()) == list(b.state_dict())
    a.eval(), b.eval()
    x = torch.randn(6, 2, 3)
    _close(a(x)[0], b(x)[0], atol=0)
    c = copy.deepcopy(a)
    _close(c(x)[0], a(x)[0], atol=0)


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize("cls", ALL)
def test_clear_errors(cls: type[NormLSTM]) -> None:
    m = cls(3, 4, 2)
    with pytest.raises(ValueError, match=r"input: expected input_size=3 .* got 5"):
        m(torch.randn(2, 2, 5))
    with pytest.raises(ValueError, match=r"input: \w+ expected 2-D .* or 3-D .* got 4-D"):
        m(torch.randn(2, 2, 2, 3))
    with pytest.raises(ValueError, match=r"got 1-D"):
        m(torch.randn(3))
    with pytest.raises(TypeError, match=r"input: expected dtype torch.float32 .* got torch.float64"):
        m(torch.randn(2, 2, 3, dtype=D64))
    with pytest.raises(ValueError, match=r"hx\[0\] \(h_0\): expected shape \(2, 2, 4\) .* got \(1, 2, 4\)"):
        m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(ValueError, match=r"hx\[1\] \(c_0\): expected shape \(2, 4\) for unbatched"):
        m(torch.randn(5, 3), (torch.zeros(2, 4), torch.zeros(2, 1, 4)))
    with pytest.raises(ValueError, match=r"lengths: expected shape \(2,\)"):
        m(torch.randn(5, 2, 3), lengths=[5, 4, 3])
    with pytest.raises(ValueError, match=r"lengths: expected every length in \[1, 5\]"):
        m(torch.randn(5, 2, 3), lengths=[6, 0])
    with pytest.raises(ValueError, match=r"lengths: expected None for unbatched"):
        m(torch.randn(5, 3), lengths=[5])
    with pytest.raises(ValueError, match=r"lengths: expected None with a PackedSequence"):
        m(pack_padded_sequence(torch.randn(5, 2, 3), [5, 3]), lengths=[5, 3])
    with pytest.raises(NotImplementedError, match=r"bidirectional"):
        cls(3, 4, bidirectional=True)
    with pytest.raises(ValueError, match=r"hidden_size: expected a positive int, got 0"):
        cls(3, 0)
    with pytest.raises(ValueError, match=r"dropout: expected a number in \[0, 1\], got 1.5"):
        cls(3, 4, 2, dropout=1.5)


def test_batch_norm_lstm_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"max_steps: expected a positive int, got 0"):
        BatchNormLSTM(3, 4, max_steps=0)
    with pytest.raises(ValueError, match=r"gamma_init: expected a finite number"):
        BatchNormLSTM(3, 4, gamma_init=float("inf"))
    with pytest.raises(ValueError, match=r"momentum"):
        BatchNormLSTM(3, 4, momentum=2.0)
    with pytest.raises(ValueError, match=r"eps"):
        LayerNormLSTM(3, 4, eps=-1.0)  # eps = 0 is valid, as for torch.nn.LayerNorm
