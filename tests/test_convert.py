"""normlab.convert: torch and third-party layers become normlab's with outputs unchanged; method swaps; errors.

Every comparison is against the *original* model (torch's or a hand-written third-party layer),
never against normlab's own outputs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import normlab
import normlab.nn as nl
from normlab.nn.utils import BatchNormAct2d, ConversionReport, GroupNormAct


# ----------------------------------------------------------------------------- third-party-style layers


class LlamaRMSNorm(nn.Module):
    """Hugging Face's RMSNorm (Llama/Qwen2/Qwen3/Mistral), verbatim in structure and math."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class T5LayerNorm(nn.Module):
    """Hugging Face's T5LayerNorm: an RMSNorm (no mean subtraction, no bias)."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: x̂ · (1 + w), w initialised at 0 -- different math, must be left alone."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class SqrtPlusEpsRMSNorm(nn.Module):
    """x / (rms + eps): differs from RMSNorm only where eps matters (the small-scale probe)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)


class TimmLayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: an nn.LayerNorm over the channels of (N, C, H, W)."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class TimmBatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: BatchNorm2d + drop + act submodules."""

    def __init__(self, num_features, act_layer=nn.ReLU, drop=0.0, **kw):
        super().__init__(num_features, **kw)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d subclass that doubles its output: must not be converted."""

    def forward(self, x):
        return 2 * super().forward(x)


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, LlamaRMSNorm, T5LayerNorm,
          GemmaRMSNorm, SqrtPlusEpsRMSNorm)


def _randomize_(model, seed=0):
    """Random γ, β and running statistics for the norm layers (conv/linear keep torch's init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            if t.is_floating_point() and isinstance(owner, _NORMS):
                r = torch.randn(t.shape, generator=g)
                t.copy_(r.abs() + 0.5 if name.endswith("running_var") else 1 + 0.3 * r if name.endswith("weight") else 0.3 * r)
    return model


def cnn():
    torch.manual_seed(0)
    return _randomize_(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16), nn.BatchNorm1d(16), nn.Linear(16, 4),
    ))


class Block(nn.Module):
    """A pre-norm transformer block (LayerNorm or any norm class)."""

    def __init__(self, d=16, norm=nn.LayerNorm):
        super().__init__()
        self.ln1, self.ln2 = norm(d), norm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))
        self.final = norm(d)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return self.final(x + self.mlp(self.ln2(x)))


def _converted_equal(model, x, train=False, **kw):
    model.train(train)
    ref = model(x)
    new, rep = normlab.convert(model, report=True, **kw)
    assert_close(new(x), ref, rtol=1e-6, atol=1e-6)
    return new, rep


# ----------------------------------------------------------------------------- method=None


def test_torch_cnn_identical_eval_and_train_and_state_copied():
    model = cnn()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.fill_(7)
    model[4].weight.requires_grad_(False)
    x = torch.randn(4, 3, 6, 6)
    new, rep = _converted_equal(model, x)
    assert [type(new[i]) for i in (1, 4, 7, 10)] == [nl.BatchNorm2d, nl.GroupNorm, nl.InstanceNorm2d, nl.BatchNorm1d]
    assert [(p, a, b) for p, a, b in rep.converted] == [
        ("1", nn.BatchNorm2d, nl.BatchNorm2d), ("4", nn.GroupNorm, nl.GroupNorm),
        ("7", nn.InstanceNorm2d, nl.InstanceNorm2d), ("10", nn.BatchNorm1d, nl.BatchNorm1d)]
    assert rep.left_alone == [] and isinstance(rep, ConversionReport)
    assert new.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(new.state_dict()[k], v), k
    assert int(new[1].num_batches_tracked) == 7 and not new[4].weight.requires_grad and not new.training
    assert new[1].momentum == model[1].momentum and new[1].eps == model[1].eps
    # a copy by default: the original keeps torch's layers
    assert type(model[1]) is nn.BatchNorm2d
    # train mode: outputs, running statistics and gradients as torch's
    # (float64: a train-mode BatchNorm1d over 4 samples amplifies float32 rounding)
    m2 = cnn().double().train()
    n2 = normlab.convert(m2)
    y1, y2 = m2(x.double()), n2(x.double())
    assert_close(y2, y1, rtol=1e-10, atol=1e-10)
    y1.square().sum().backward()
    y2.square().sum().backward()
    for (k, p1), p2 in zip(m2.named_parameters(), n2.parameters()):
        assert_close(p2.grad, p1.grad, rtol=1e-8, atol=1e-9, msg=k)
    for k, v in m2.state_dict().items():
        assert_close(n2.state_dict()[k], v, rtol=1e-10, atol=1e-10, msg=k)


def test_inplace_moves_the_same_tensors_and_keeps_hooks_and_dtype():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.LayerNorm(6)).double()
    calls = []
    model[2].register_forward_hook(lambda m, a, y: calls.append(1))
    w, rm = model[1].weight, model[1].running_mean
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = normlab.convert(model, inplace=True)
    assert out is model and type(model[1]) is nl.BatchNorm1d and type(model[2]) is nl.LayerNorm
    assert model[1].weight is w and model[1].running_mean is rm and w.dtype == torch.float64
    model(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    assert calls == [1] and w.grad is not None


def test_transformer_block_layernorm_identical():
    torch.manual_seed(1)
    model = _randomize_(Block())
    x = torch.randn(2, 5, 16)
    new, rep = _converted_equal(model, x)
    assert all(type(getattr(new, n)) is nl.LayerNorm for n in ("ln1", "ln2", "final"))
    assert len(rep.converted) == 3


def test_hf_style_rmsnorms_recognised_and_identical():
    torch.manual_seed(2)
    model = _randomize_(nn.Sequential(Block(norm=LlamaRMSNorm), T5LayerNorm(16)))
    x = torch.randn(2, 5, 16)
    new, rep = _converted_equal(model, x)
    assert type(new[0].ln1) is nl.RMSNorm and type(new[1]) is nl.RMSNorm
    assert new[0].ln1.eps == 1e-6 and new[0].ln1.weight is not model[0].ln1.weight  # a copy
    assert {(a, b) for _, a, b in rep.converted} == {(LlamaRMSNorm, nl.RMSNorm), (T5LayerNorm, nl.RMSNorm)}
    assert new.state_dict().keys() == model.state_dict().keys()


def test_gemma_style_rmsnorm_is_left_alone_and_reported():
    model = nn.Sequential(nn.Linear(8, 8), GemmaRMSNorm(8), SqrtPlusEpsRMSNorm(8), nn.LayerNorm(8))
    x = torch.randn(3, 8)
    new, rep = _converted_equal(model, x)
    assert type(new[1]) is GemmaRMSNorm and type(new[2]) is SqrtPlusEpsRMSNorm and type(new[3]) is nl.LayerNorm
    left = {p: (c, r) for p, c, r in rep.left_alone}
    assert set(left) == {"1", "2"} and left["1"][0] is GemmaRMSNorm
    assert "math differs from RMSNorm" in left["1"][1]
    with pytest.warns(UserWarning, match=r"left 2 layer\(s\) alone[\s\S]*1 \(.*GemmaRMSNorm\)"):
        normlab.convert(model)


def test_converted_layernorm2d_keeps_the_output_layout_of_the_module_it_replaces():
    """timm's LayerNorm2d (permute → LN → permute) returns channels-last memory for NCHW input, so
    the convolutions after it run channels-last; its normlab twin must hand them the same layout
    (ConvNeXt: 55 → 80 ms per step when it did not, the blocks' LNs then copying their input)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), TimmLayerNorm2d(8), nn.Conv2d(8, 4, 1))
    new = normlab.convert(model)
    assert new[1].memory_format is torch.channels_last and "memory_format=torch.channels_last" in repr(new[1])
    x = torch.randn(2, 3, 7, 7)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        h = model[0](inp)
        want, got = model[1](h), new[1](h)
        assert got.stride() == want.stride()
        assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a LayerNorm2d that computes natively keeps the input's layout (and so does a converted one
    # of a module that does)
    plain = nl.LayerNorm2d(8)
    h = torch.randn(2, 8, 5, 5)
    assert plain.memory_format is None and plain(h).is_contiguous()
    assert normlab.convert(nn.Sequential(nl.LayerNorm2d(8)))[0].memory_format is None
    with pytest.raises(ValueError, match=r"^memory_format: expected None or torch.channels_last, got torch.channels_last_3d$"):
        nl.LayerNorm2d(8, memory_format=torch.channels_last_3d)


def test_timm_style_layernorm2d_and_batchnormact2d():
    torch.manual_seed(3)
    model = _randomize_(nn.Sequential(
        nn.Conv2d(3, 8, 3), TimmBatchNormAct2d(8, act_layer=nn.SiLU, drop=0.1), nn.Conv2d(8, 8, 1),
        TimmLayerNorm2d(8), nn.Conv2d(8, 4, 1), TimmBatchNormAct2d(4, act_layer=nn.PReLU),
    ))
    x = torch.randn(2, 3, 7, 7)
    new, rep = _converted_equal(model, x)
    assert type(new[1]) is BatchNormAct2d and type(new[3]) is nl.LayerNorm2d and type(new[5]) is BatchNormAct2d
    assert isinstance(new[1].act, nn.SiLU) and isinstance(new[1].drop, nn.Dropout)
    assert isinstance(new[1], nn.BatchNorm2d) and isinstance(new[3], nn.LayerNorm)
    assert new.state_dict().keys() == model.state_dict().keys()  # includes the PReLU's act.weight
    assert rep.left_alone == []
    # training mode (dropout off to compare): outputs and running statistics as the original's
    model[1].drop.p = new[1].drop.p = 0.0
    model.train()
    new.train()
    assert_close(new(x), model(x), rtol=1e-5, atol=1e-5)
    assert_close(new[1].running_var, model[1].running_var)


def test_subclass_with_other_math_left_alone_and_normlab_layers_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), ScaledBatchNorm2d(4), nl.GroupNorm(2, 4), nn.SyncBatchNorm(4),
                          nn.LocalResponseNorm(2))
    keep = model[2]
    new, rep = normlab.convert(model, inplace=True, report=True)
    assert type(new[1]) is ScaledBatchNorm2d and new[2] is keep and type(new[3]) is nn.SyncBatchNorm
    left = {p: r for p, _, r in rep.left_alone}
    assert set(left) == {"1", "3", "4"} and "SyncBatchNorm" in left["3"] and "math differs" in left["1"]
    assert rep.converted == []


def test_model_that_is_a_norm_layer_and_shared_modules():
    ln = nn.LayerNorm(4)
    out = normlab.convert(ln)
    assert type(out) is nl.LayerNorm
    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    new = normlab.convert(model)
    assert type(new[0]) is nl.BatchNorm1d and new[0] is new[2]


def test_no_warning_when_everything_converts():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normlab.convert(cnn())


# ----------------------------------------------------------------------------- method swaps


def test_bn_to_gn_keeps_affine_and_matches_torch_groupnorm():
    model = cnn().eval()
    new, rep = normlab.convert(model, "gn", groups=4, report=True)
    assert type(new[1]) is nl.GroupNorm and new[1].num_groups == 4
    assert type(new[4]) is nl.GroupNorm and new[4].num_groups == 4  # regrouped: groups given
    assert type(new[10]) is nl.GroupNorm  # BatchNorm1d on (N, C): GroupNorm accepts it
    assert new[1].weight is not model[1].weight and torch.equal(new[1].weight, model[1].weight)
    # reference: the same model built with torch's GroupNorm and the same parameters
    ref = cnn().eval()
    for i in (1, 4, 7, 10):
        g = nn.GroupNorm(4, ref[i].weight.numel(), eps=ref[i].eps)
        with torch.no_grad():
            g.weight.copy_(ref[i].weight)
            g.bias.copy_(ref[i].bias)
        ref[i] = g
    x = torch.randn(4, 3, 6, 6)
    assert_close(new(x), ref(x), rtol=1e-5, atol=1e-5)


def test_gn_groups_clipped_to_a_divisor_with_a_note():
    model = nn.Sequential(nn.Conv2d(3, 12, 1), nn.BatchNorm2d(12))
    new, rep = normlab.convert(model, "gn:8", report=True)
    assert new[1].num_groups == 6
    assert rep.notes and "6 groups" in rep.notes[0][1]
    with pytest.warns(UserWarning, match="6 groups"):
        normlab.convert(model, "gn", groups=8)


def test_gn_to_bn_fresh_statistics_and_matches_torch_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU())
    _randomize_(model)
    new, rep = normlab.convert(model, "bn", report=True)
    assert type(new[1]) is nl.BatchNorm2d and torch.equal(new[1].running_mean, torch.zeros(8))
    assert any("recalibrate" in m for _, m in rep.notes) and any("assumed" in m for _, m in rep.notes)
    ref = nn.BatchNorm2d(8)
    with torch.no_grad():
        ref.weight.copy_(model[1].weight)
        ref.bias.copy_(model[1].bias)
    x = torch.randn(4, 3, 6, 6)
    assert_close(new.train()(x), torch.relu(ref.train()(model[0](x))), rtol=1e-5, atol=1e-5)
    assert_close(new[1].running_var, ref.running_var)
    # the rank seen by example_input decides the BatchNorm class
    gn1 = nn.Sequential(nn.Linear(3, 8), nn.GroupNorm(2, 8))
    assert type(normlab.convert(gn1, "bn", example_input=torch.randn(2, 3), report=True)[0][1]) is nl.BatchNorm1d


def test_ln_to_rms_on_transformer_block_matches_torch_rmsnorm():
    torch.manual_seed(4)
    model = _randomize_(Block())
    new, rep = normlab.convert(model, "rms", report=True)
    assert type(new.ln1) is nl.RMSNorm and new.ln1.eps == model.ln1.eps
    assert any("drops β" in m for _, m in rep.notes)
    ref = Block()
    ref.load_state_dict(model.state_dict())
    for n in ("ln1", "ln2", "final"):
        r = nn.RMSNorm(16, eps=1e-5)
        with torch.no_grad():
            r.weight.copy_(getattr(model, n).weight)
        setattr(ref, n, r)
    x = torch.randn(2, 5, 16)
    assert_close(new(x), ref(x), rtol=1e-5, atol=1e-5)
    back = normlab.convert(new, "ln")  # RMS → LN: γ kept, β starts at 0
    assert type(back.ln1) is nl.LayerNorm and torch.equal(back.ln1.bias, torch.zeros(16))


def test_bn_to_in_ln_ln2d_none_and_rms_on_a_cnn():
    torch.manual_seed(5)
    model = _randomize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    x = torch.randn(2, 3, 6, 6)
    h = model[0](x)
    w, b = model[1].weight, model[1].bias
    cases = {
        "in": nn.functional.instance_norm(h, weight=w, bias=b, eps=1e-5),
        "ln": nn.functional.group_norm(h, 1, w, b, 1e-5),
        "ln2d": nn.functional.layer_norm(h.permute(0, 2, 3, 1), (8,), w, b, 1e-5).permute(0, 3, 1, 2),
        "rms": nn.functional.rms_norm(h.permute(0, 2, 3, 1), (8,), w, 1e-5).permute(0, 3, 1, 2),
        "none": h,
    }
    for method, want in cases.items():
        new = normlab.convert(model, method, report=True)[0]
        assert_close(new(x), want, rtol=1e-5, atol=1e-5, msg=method)
    assert type(normlab.convert(model, "in")[1]) is nl.InstanceNorm2d
    assert type(normlab.convert(model, "none")[1]) is nn.Identity


def test_batchnormact_swaps_to_groupnormact_and_other_targets_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), TimmBatchNormAct2d(8))
    new = normlab.convert(model, "gn", groups=2)
    assert type(new[1]) is GroupNormAct and isinstance(new[1].act, nn.ReLU)
    new, rep = normlab.convert(model, "ln", report=True)
    assert type(new[1]) is TimmBatchNormAct2d and rep.left_alone[0][0] == "1"


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_layer_and_leave_the_model_unmodified():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match=r"^1: cannot swap BatchNorm1d to 'in'.*ambiguous"):
        normlab.convert(mlp, "in", inplace=True)
    assert type(mlp[1]) is nn.BatchNorm1d  # nothing modified
    with pytest.raises(ValueError, match=r"^1: cannot swap BatchNorm1d to 'in'.*\(N, C\) input \(after a Linear\)"):
        normlab.convert(mlp, "in", example_input=torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"^3: cannot swap LayerNorm to 'in'"):
        normlab.convert(nn.Sequential(nn.Linear(4, 8), nn.Identity(), nn.Linear(8, 8), nn.LayerNorm(8)), "in")
    with pytest.raises(ValueError, match=r"^ln1: cannot swap LayerNorm to 'bn'.*example_input"):
        normlab.convert(Block(), "bn")
    with pytest.raises(ValueError, match=r"^ln1: .*this layer sees 3-D input"):
        normlab.convert(Block(), "gn", example_input=torch.randn(2, 5, 16))
    # (N, C) LayerNorm → BatchNorm1d is the same axis: allowed when example_input shows it
    ln_mlp = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    with pytest.warns(UserWarning, match="running statistics start fresh"):
        assert type(normlab.convert(ln_mlp, "bn", example_input=torch.randn(3, 4))[1]) is nl.BatchNorm1d


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"^method: expected one of \[None, 'bn', 'gn'.*got 'xx'$"):
        normlab.convert(cnn(), "xx")
    with pytest.raises(ValueError, match="method: .*got 'gn:0'"):
        normlab.convert(cnn(), "gn:0")
    with pytest.raises(ValueError, match="groups: expected a positive int"):
        normlab.convert(cnn(), "gn", groups=0)
    with pytest.raises(TypeError, match="unexpected option 'group'"):
        normlab.convert(cnn(), "gn", group=4)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        normlab.convert("model")


def test_backend_option_and_report_str():
    new, rep = normlab.convert(cnn(), backend="reference", report=True)
    assert new[1].backend == "reference"
    text = str(rep)
    assert "1: torch.nn.BatchNorm2d -> normlab.BatchNorm2d" in text
