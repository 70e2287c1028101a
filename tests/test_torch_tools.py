"""torch's (and timm's, Lightning's) isinstance-based tools on normlab layers do what they do on torch's;
normlab's own BatchNorm tools: stats_mode, freeze_batchnorm, recalibrate_batchnorm, fold_batchnorm.

Each tool runs on a model of torch layers and on the same model converted to normlab's layers
(same state); the results are compared with each other / with hand-computed references.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.testing import assert_close

import normlab
import normlab.nn as nl


def bn_net(double=False):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                        nn.Linear(6 * 4 * 4, 8), nn.BatchNorm1d(8))
    with torch.no_grad():
        for m in (net[1], net[5]):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2)
    return net.double() if double else net


def pair(double=False):
    t = bn_net(double)
    return t, normlab.convert(t)


def buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def assert_same_state(a, b, **tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert_close(sb[k], sa[k], msg=k, **tol)


X = torch.randn(8, 3, 6, 6)


# ----------------------------------------------------------------------------- isinstance-based torch tools


def test_normlab_layers_are_torch_batchnorms():
    t, n = pair()
    assert [type(m).__name__ for m in n.modules() if isinstance(m, _BatchNorm)] == ["BatchNorm2d", "BatchNorm1d"]
    assert isinstance(n[1], nn.BatchNorm2d) and type(n[1]) is nl.BatchNorm2d


def test_swa_update_bn_same_on_normlab_and_torch_layers():
    t, n = pair(double=True)
    loader = [(torch.randn(8, 3, 6, 6, dtype=torch.float64), 0) for _ in range(3)]
    torch.optim.swa_utils.update_bn(loader, t)
    torch.optim.swa_utils.update_bn(loader, n)
    assert_same_state(t, n, rtol=1e-10, atol=1e-12)
    assert int(n[1].num_batches_tracked) == 3 and n[1].momentum == 0.1


def test_convert_sync_batchnorm_converts_normlab_layers_with_their_state():
    # Only the conversion: a SyncBatchNorm forward needs a process group (not run on CPU).
    t, n = pair()
    n[1].num_batches_tracked.fill_(5)
    t[1].num_batches_tracked.fill_(5)
    st, sn = nn.SyncBatchNorm.convert_sync_batchnorm(t), nn.SyncBatchNorm.convert_sync_batchnorm(n)
    assert type(st[1]) is type(sn[1]) is nn.SyncBatchNorm and type(sn[5]) is nn.SyncBatchNorm
    assert_same_state(st, sn, rtol=0, atol=0)
    assert sn[1].momentum == n[1].momentum and sn[1].eps == n[1].eps and sn[1].training == n[1].training


@pytest.mark.parametrize("with_relu", [False, True])
def test_fuse_modules_eval_same_on_normlab_and_torch_layers(with_relu):
    from torch.ao.quantization import fuse_modules

    names = [["0", "1", "2"]] if with_relu else [["0", "1"]]
    t, n = pair()
    ft, fn = fuse_modules(t.eval(), names), fuse_modules(n.eval(), names)
    assert type(fn[0]) is type(ft[0]) and type(fn[1]) is nn.Identity
    assert_same_state(ft, fn, rtol=0, atol=0)
    assert_close(fn(X), t(X), rtol=1e-5, atol=1e-5)
    # linear + BatchNorm1d as well
    ft, fn = fuse_modules(t, [["4", "5"]]), fuse_modules(n, [["4", "5"]])
    assert_same_state(ft, fn, rtol=0, atol=0)


def test_fuse_modules_qat_gives_torch_intrinsic_modules():
    from torch.ao.nn.intrinsic import ConvBn2d
    from torch.ao.quantization import fuse_modules_qat

    t, n = pair()
    ft, fn = fuse_modules_qat(t.train(), [["0", "1"]]), fuse_modules_qat(n.train(), [["0", "1"]])
    assert type(fn[0]) is type(ft[0]) is ConvBn2d and type(fn[0][1]) is nn.BatchNorm2d
    assert_same_state(ft, fn, rtol=0, atol=0)


def test_fuse_conv_bn_eval_same_on_normlab_and_torch_layers():
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    t, n = pair()
    ct, cn = fuse_conv_bn_eval(t[0].eval(), t[1].eval()), fuse_conv_bn_eval(n[0].eval(), n[1].eval())
    assert_close(cn.weight, ct.weight, rtol=0, atol=0)
    assert_close(cn.bias, ct.bias, rtol=0, atol=0)


class FrozenBatchNorm2d(nn.Module):
    """torchvision/timm's FrozenBatchNorm2d: fixed statistics and affine, buffers only."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, init in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                           ("running_var", torch.ones)):
            self.register_buffer(name, init(n))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale.reshape(1, -1, 1, 1) + (self.bias - self.running_mean * scale).reshape(1, -1, 1, 1)


def timm_freeze_batch_norm_2d(module):
    """timm.layers.norm.freeze_batch_norm_2d's logic (timm cannot be imported here)."""
    res = module
    if isinstance(module, (torch.nn.modules.batchnorm.BatchNorm2d, torch.nn.modules.batchnorm.SyncBatchNorm)):
        res = FrozenBatchNorm2d(module.num_features)
        res.num_features = module.num_features
        res.affine = module.affine
        if module.affine:
            res.weight.data = module.weight.data.clone().detach()
            res.bias.data = module.bias.data.clone().detach()
        res.running_mean.data = module.running_mean.data
        res.running_var.data = module.running_var.data
        res.eps = module.eps
    else:
        for name, child in module.named_children():
            new_child = timm_freeze_batch_norm_2d(child)
            if new_child is not child:
                res.add_module(name, new_child)
    return res


def test_timm_style_freeze_same_on_normlab_and_torch_layers():
    t, n = pair()
    ft, fn = timm_freeze_batch_norm_2d(t), timm_freeze_batch_norm_2d(n)
    assert type(fn[1]) is FrozenBatchNorm2d and type(fn[5]) is nl.BatchNorm1d  # 2-D BN only, as timm
    before = buffers(fn)
    assert_close(fn.train()(X), ft.train()(X), rtol=1e-6, atol=1e-6)
    after = buffers(fn)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("1."))


def test_lightning_style_batchnorm_checks_same_on_normlab_and_torch_layers():
    """Lightning's BaseFinetuning.freeze(train_bn=False): isinstance(_BatchNorm) → track_running_stats=False."""

    def freeze(model):
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.track_running_stats = False
            for p in m.parameters(recurse=False):
                p.requires_grad = False

    t, n = pair(double=True)
    freeze(t)
    freeze(n)
    x = X.double()
    before = buffers(n)
    assert_close(n.train()(x), t.train()(x), rtol=1e-10, atol=1e-10)  # batch statistics, no update
    assert all(torch.equal(before[k], v) for k, v in buffers(n).items())
    assert_close(n.eval()(x), t.eval()(x), rtol=1e-10, atol=1e-10)
    assert not any(p.requires_grad for p in n.parameters())


# ----------------------------------------------------------------------------- stats_mode


def test_stats_mode_running_uses_running_stats_in_training_without_updating():
    bn = nl.BatchNorm2d(6)
    ref = nn.BatchNorm2d(6)
    with torch.no_grad():
        for m in (bn, ref):
            m.running_mean.copy_(torch.linspace(-1, 1, 6))
            m.running_var.copy_(torch.linspace(0.5, 2, 6))
            m.weight.copy_(torch.linspace(0.5, 1.5, 6))
    bn.stats_mode = "running"
    bn.train()
    x = torch.randn(4, 6, 3, 3, requires_grad=True)
    before = buffers(bn)
    y = bn(x)
    y_ref = nn.functional.batch_norm(x, ref.running_mean, ref.running_var, ref.weight, ref.bias, False, 0.1, 1e-5)
    assert_close(y, y_ref)
    assert all(torch.equal(before[k], v) for k, v in buffers(bn).items())  # num_batches_tracked too
    g, g_ref = torch.autograd.grad(y.sum() + (y ** 2).sum(), (x, bn.weight)), torch.autograd.grad(
        y_ref.sum() + (y_ref ** 2).sum(), (x, ref.weight))
    assert_close(g[0], g_ref[0])
    assert_close(g[1], g_ref[1])


def test_stats_mode_batch_in_eval_and_frozen_and_none():
    bn = nl.BatchNorm1d(5)
    x = torch.randn(16, 5) * 2 + 1
    bn.eval()
    bn.stats_mode = "batch"
    before = buffers(bn)
    assert_close(bn(x), nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.1, 1e-5))
    assert all(torch.equal(before[k], v) for k, v in buffers(bn).items())  # eval: nothing updated
    bn.train()
    bn(x)
    assert int(bn.num_batches_tracked) == 1  # "batch" in training: as torch's training
    bn.stats_mode = "frozen"
    assert not bn.weight.requires_grad and not bn.bias.requires_grad
    before = buffers(bn)
    bn.train()(x)
    assert all(torch.equal(before[k], v) for k, v in buffers(bn).items())
    bn.stats_mode = None
    assert bn.weight.requires_grad and bn.stats_mode is None
    assert "stats_mode" not in "".join(bn.state_dict())


def test_stats_mode_errors():
    bn = nl.BatchNorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="stats_mode: 'running' needs running statistics"):
        bn.stats_mode = "running"
    with pytest.raises(ValueError, match=r"stats_mode: expected one of \[None, 'batch', 'running', 'frozen'\], got 'eval'"):
        bn.stats_mode = "eval"


def test_stats_mode_survives_tracing():
    bn = nl.BatchNorm2d(3).train()
    bn.stats_mode = "running"
    gm = torch.fx.symbolic_trace(bn)
    x = torch.randn(2, 3, 4, 4)
    assert_close(gm(x), nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))


# ----------------------------------------------------------------------------- freeze_batchnorm


@pytest.mark.parametrize("layers", ["torch", "normlab"])
def test_freeze_batchnorm_train_mode_forward_changes_no_buffer(layers):
    t = bn_net()
    model = t if layers == "torch" else normlab.convert(t)
    w = model[1].weight
    ref = copy.deepcopy(t).eval()
    out = normlab.freeze_batchnorm(model)
    assert out is model and type(model[1]) is nl.BatchNorm2d and model[1].weight is w
    assert model[1].stats_mode == "frozen" and not w.requires_grad and model[0].weight.requires_grad
    model.train()
    before = buffers(model)
    assert_close(model(X), ref(X))
    assert all(torch.equal(before[k], v) for k, v in buffers(model).items())
    assert model.state_dict().keys() == t.state_dict().keys()


def test_freeze_batchnorm_fallback_for_layers_without_a_normlab_twin():
    class Odd(nn.BatchNorm2d):  # math convert cannot verify
        def forward(self, x):
            return super().forward(x) + 1

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Odd(4), nl.MeanOnlyBatchNorm(4))
    normlab.freeze_batchnorm(model)
    model.train()
    before = buffers(model)
    model(X)
    assert all(torch.equal(before[k], v) for k, v in buffers(model).items())
    assert not model[1].weight.requires_grad and type(model[1]) is Odd
    with pytest.raises(ValueError, match="1: BatchNorm2d has no running statistics"):
        normlab.freeze_batchnorm(nn.Sequential(nn.Identity(), nn.BatchNorm2d(3, track_running_stats=False)))


# ----------------------------------------------------------------------------- recalibrate_batchnorm


def _loader(sizes=(5, 7, 4), dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, 4, 4, generator=g, dtype=dtype) * 2 + 0.5, torch.zeros(n)) for n in sizes]


@pytest.mark.parametrize("layers", ["torch", "normlab"])
def test_recalibrate_equals_population_statistics_by_hand(layers):
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Dropout(0.5)).double()
    model = model if layers == "torch" else normlab.convert(model)
    model.eval()
    loader = _loader()
    normlab.recalibrate_batchnorm(model, loader)
    allx = torch.cat([x for x, _ in loader]).transpose(0, 1).reshape(3, -1)
    assert_close(model[0].running_mean, allx.mean(1), rtol=1e-12, atol=1e-12)
    assert_close(model[0].running_var, allx.var(1, unbiased=True), rtol=1e-12, atol=1e-12)
    assert int(model[0].num_batches_tracked) == 3 and model[0].momentum == 0.1
    assert not model.training and not model[0].training


@pytest.mark.parametrize("layers", ["torch", "normlab"])
def test_recalibrate_cumulative_equals_swa_update_bn(layers):
    t = bn_net(double=True)
    model = t if layers == "torch" else normlab.convert(t)
    ref = copy.deepcopy(t)
    loader = [(torch.randn(8, 3, 6, 6, dtype=torch.float64), 1) for _ in range(3)]
    torch.optim.swa_utils.update_bn(loader, ref)
    model.train()
    normlab.recalibrate_batchnorm(model, loader, exact=False)
    assert_same_state(ref, model, rtol=1e-10, atol=1e-12)
    assert model.training
    # the default (exact) mean equals update_bn's for equal batch sizes; one batch: everything equal
    exact = normlab.recalibrate_batchnorm(copy.deepcopy(model), loader[:1])
    torch.optim.swa_utils.update_bn(loader[:1], ref)
    assert_same_state(ref, exact, rtol=1e-10, atol=1e-12)


def test_recalibrate_forward_fn_num_batches_and_restores_modes():
    model = normlab.convert(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.3)))
    model[1].stats_mode = "frozen"
    batches = [{"x": torch.randn(10, 4)} for _ in range(5)]
    normlab.recalibrate_batchnorm(model, batches, lambda m, b: m(b["x"]), num_batches=2)
    assert int(model[1].num_batches_tracked) == 2 and model[1].momentum == 0.3
    assert model[1].stats_mode == "frozen" and not model[1].weight.requires_grad
    h = torch.cat([model[0](b["x"]) for b in batches[:2]]).detach()
    assert_close(model[1].running_mean, h.mean(0))
    assert_close(model[1].running_var, h.var(0))


def test_recalibrate_restores_statistics_when_the_forward_fails():
    model = nn.Sequential(nn.BatchNorm1d(3))
    with torch.no_grad():
        model[0].running_mean.fill_(2)

    def boom(m, b):
        m(b)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        normlab.recalibrate_batchnorm(model, [torch.randn(4, 3)], boom)
    assert torch.equal(model[0].running_mean, torch.full((3,), 2.0)) and model[0].momentum == 0.1


# ----------------------------------------------------------------------------- fold_batchnorm


def test_fold_batchnorm_is_fold_batch_norm_and_matches_torch_fusion():
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    assert normlab.fold_batchnorm is nl.utils.fold_batch_norm
    t, n = pair()
    folded = normlab.fold_batchnorm(n)
    assert type(folded[1]) is nn.Identity and type(folded[5]) is nn.Identity
    ref = fuse_conv_bn_eval(t[0].eval(), t[1].eval())
    assert_close(folded[0].weight, ref.weight, rtol=1e-6, atol=1e-7)
    assert_close(folded(X), t.eval()(X), rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_keeps_a_batch_stats_mode_layer():
    n = pair()[1]
    n[1].stats_mode = "batch"
    folded = normlab.fold_batchnorm(n)
    assert type(folded[1]) is nl.BatchNorm2d and type(folded[5]) is nn.Identity
