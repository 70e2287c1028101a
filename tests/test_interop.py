"""normlab's layers where torch.nn's work (issue 8: the first table, §1, §3, §6).

Every comparison is against torch's own layers (the ``torch.nn`` twin with the same state) or a
float64 torch computation, never against normlab's own outputs. Compile/export/ONNX tests are
marked ``slow`` (seconds each on 2 cores).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normlab
from conftest import assert_close

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::FutureWarning")


# ----------------------------------------------------------------------------- torch twins


class TorchLayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d in torch ops: the twin of normlab.LayerNorm2d."""

    def __init__(self, c, eps=1e-6):
        super().__init__(c, eps=eps)

    def forward(self, x):
        return TF.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                             self.eps).permute(0, 3, 1, 2)


class TorchMeanOnly(nn.Module):
    """Mean-only batch norm in torch ops (float64 reference of normlab.MeanOnlyBatchNorm)."""

    def __init__(self, c, momentum=0.1):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0))
        self.momentum = momentum

    def forward(self, x):
        dims = [0] + list(range(2, x.dim()))
        view = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            mean = x.mean(dims)
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(mean.detach(), alpha=self.momentum)
                self.num_batches_tracked.add_(1)
        else:
            mean = self.running_mean
        return x - mean.view(view) + self.bias.view(view)


def cnn(lib):
    """Conv-BN-ReLU-Conv-GN-LN2d-Flatten-LN-Linear of ``lib``'s layers (normlab or torch)."""
    ln2d = normlab.LayerNorm2d(8) if lib is normlab else TorchLayerNorm2d(8)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), lib.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        lib.GroupNorm(2, 8), ln2d, nn.Flatten(), lib.LayerNorm(8 * 6 * 6), nn.Linear(8 * 6 * 6, 5))


class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm - attention (sdpa) - LayerNorm - MLP."""

    def __init__(self, lib, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.n1 = lib.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.n2 = lib.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = TF.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.mlp(self.n2(x))


def randomized(m, seed=0):
    """Non-trivial norm parameters (1-D weights ~ 1, biases ~ 0) and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return m


def pair(build, seed=0):
    """(normlab model, torch twin) with identical state."""
    torch.manual_seed(seed)
    m = randomized(build(normlab), seed)
    t = build(nn)
    t.load_state_dict(m.state_dict())
    return m, t


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


X_CNN = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
X_TR = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))


@pytest.fixture(autouse=True)
def _dynamo_reset():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------ 2. torch.compile


def _compare_training_step(run, m, t, x):
    """run(x) is the normlab model (eager, compiled, ...) of m; compare y, grads and buffers with t."""
    y = run(x)
    yt = t(x)
    assert_close(y, yt, msg="output")
    y.square().sum().backward()
    yt.square().sum().backward()
    gm, gt = grads(m), grads(t)
    assert gm.keys() == gt.keys()
    for k in gt:
        assert_close(gm[k], gt[k], msg=f"grad {k}")
    for (k, b), (_, bt) in zip(m.named_buffers(), t.named_buffers()):
        assert_close(b.float(), bt.float(), msg=f"buffer {k}")


@pytest.mark.slow
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("build", [cnn, Block], ids=["cnn", "transformer"])
def test_compile_fullgraph_first_call(build, train):
    """torch.compile(fullgraph=True) as the very first call of a fresh model; y, grads, stats = torch's."""
    m, t = pair(build)
    m.train(train)
    t.train(train)
    x = X_CNN if build is cnn else X_TR
    cm = torch.compile(m, fullgraph=True)
    _compare_training_step(cm, m, t, x)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("build", [cnn, Block], ids=["cnn", "transformer"])
def test_compile_zero_graph_breaks_explain(build):
    m, t = pair(build)
    x = X_CNN if build is cnn else X_TR
    ex = torch._dynamo.explain(m)(x)
    ext = torch._dynamo.explain(t)(x)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == ext.graph_count == 1


class Widths(nn.Module):
    def __init__(self, lib, widths=(8, 12, 16, 24)):
        super().__init__()
        layers = []
        for a, b in zip(widths, widths[1:] + widths[:1]):
            layers += [lib.LayerNorm(a), lib.RMSNorm(a), nn.Linear(a, b)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


@pytest.mark.slow
def test_compile_recompiles_do_not_multiply_with_widths_and_torch_twin_compiles_after():
    """Four LayerNorm/RMSNorm widths in one model: one graph, and no more frame compiles than torch's
    twin over three batch sizes; compiling the torch twin afterwards in the same process works."""
    m, t = pair(Widths)
    xs = [torch.randn(n, 8, generator=torch.Generator().manual_seed(n)) for n in (3, 5, 7)]
    cm = torch.compile(m)
    for x in xs:
        assert_close(cm(x), t(x))
    c = torch._dynamo.utils.counters
    normlab_graphs, normlab_frames = c["stats"]["unique_graphs"], c["frames"]["ok"]
    assert normlab_graphs <= 2 and not c["graph_break"]  # static first call + one dynamic recompile
    torch._dynamo.reset()
    c.clear()
    ct = torch.compile(t)  # the torch twin, compiled in the same process after normlab's
    for x in xs:
        assert_close(ct(x), t(x))
    assert normlab_graphs <= c["stats"]["unique_graphs"], (normlab_graphs, c["stats"]["unique_graphs"])
    assert normlab_frames <= c["frames"]["ok"]


# ------------------------------------------------------------------ 3. torch.export

NORM_ATEN = {"aten.batch_norm", "aten.group_norm", "aten.layer_norm", "aten._native_batch_norm_legit_functional",
             "aten.native_batch_norm", "aten.native_group_norm", "aten.native_layer_norm",
             "aten._native_batch_norm_legit_no_training", "aten.rms_norm", "aten._fused_rms_norm"}


def _targets(ep):
    return {str(n.target).rsplit(".", 1)[0] for n in ep.graph.nodes if n.op == "call_function"}


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("build", [cnn, Block], ids=["cnn", "transformer"])
def test_export(build, train):
    m, t = pair(build)
    m.train(train)
    t.train(train)
    x = X_CNN if build is cnn else X_TR
    ep = torch.export.export(m, (x,))
    targets = _targets(ep)
    assert not any("normlab" in s for s in targets), targets
    assert targets & NORM_ATEN, targets
    em = ep.module()
    y = em(x)
    assert_close(y, t(x), msg="exported output")
    if train and build is cnn:
        # as torch's own BN: the exported program updates the running statistics when it runs
        assert_close(em.get_buffer("1.running_mean"), t[1].running_mean)
        assert_close(em.get_buffer("1.running_var"), t[1].running_var)
        assert int(em.get_buffer("1.num_batches_tracked")) == int(t[1].num_batches_tracked) == 1
    # the same norm operators as torch's own twin exports to
    assert _targets(torch.export.export(t, (x,))) & NORM_ATEN == targets & NORM_ATEN


@pytest.mark.slow
def test_export_mean_only_train_updates_running_mean():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), normlab.MeanOnlyBatchNorm(4)).train()
    ref = nn.Sequential(nn.Conv2d(3, 4, 1), TorchMeanOnly(4)).train()
    ref.load_state_dict(m.state_dict())
    ep = torch.export.export(m, (X_CNN,))
    assert not any("normlab" in s for s in _targets(ep))
    em = ep.module()
    assert_close(em(X_CNN), ref(X_CNN))
    assert_close(em.get_buffer("1.running_mean"), ref[1].running_mean)


# ------------------------------------------------------------------ 4. ONNX

def _layers():
    """(name, normlab layer, torch twin or float64 reference, input)."""
    x4 = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(3))
    x3 = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(4))
    return [
        ("BatchNorm2d", lambda L: L.BatchNorm2d(8), x4),
        ("GroupNorm", lambda L: L.GroupNorm(2, 8), x4),
        ("InstanceNorm2d", lambda L: L.InstanceNorm2d(8, affine=True), x4),
        ("InstanceNorm2d_stats", lambda L: L.InstanceNorm2d(8, affine=True, track_running_stats=True), x4),
        ("LayerNorm", lambda L: L.LayerNorm(16), x3),
        ("RMSNorm", lambda L: L.RMSNorm(16), x3),
        ("LayerNorm2d", lambda L: normlab.LayerNorm2d(8) if L is normlab else TorchLayerNorm2d(8), x4),
        ("MeanOnlyBatchNorm", lambda L: normlab.MeanOnlyBatchNorm(8) if L is normlab else TorchMeanOnly(8), x4),
    ]


LAYERS = _layers()
ONNX_OPS = {  # what the graph must hold: the standard operator or (opset lacks it) its decomposition
    "BatchNorm2d": {"BatchNormalization"},
    "GroupNorm": {"InstanceNormalization", "GroupNormalization"},
    "InstanceNorm2d": {"InstanceNormalization"},
    "InstanceNorm2d_stats": {"BatchNormalization", "InstanceNormalization"},
    "LayerNorm": {"LayerNormalization"},
    "RMSNorm": {"RMSNormalization", "ReduceMean"},
    "LayerNorm2d": {"LayerNormalization", "ReduceMean"},
    "MeanOnlyBatchNorm": {"Sub"},  # eval: x - running_mean + bias
}


def _onnx_run(model, x, path, dynamo, opset=None):
    import onnx
    import onnxruntime as ort

    kw = {} if opset is None else {"opset_version": opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=dynamo, **kw)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return ops, torch.from_numpy(out)


def _prepared(build):
    m = randomized(build(normlab).eval())
    t = build(nn).eval()
    t.load_state_dict(m.state_dict())
    return m, t


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name,build,x", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_onnx_layer(name, build, x, dynamo, tmp_path):
    m, t = _prepared(build)
    try:
        _onnx_run(t, x, str(tmp_path / "torch.onnx"), dynamo)
    except Exception as e:  # torch's own layer does not export here (RMSNorm, TorchScript exporter)
        with pytest.raises(type(e)):
            _onnx_run(m, x, str(tmp_path / "normlab.onnx"), dynamo)
        return
    ops, y = _onnx_run(m, x, str(tmp_path / "normlab.onnx"), dynamo)
    assert ops & ONNX_OPS[name], ops
    assert not any("normlab" in o for o in ops)
    torch.testing.assert_close(y, t(x), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name,opset,op", [("GroupNorm", 21, "GroupNormalization"), ("RMSNorm", 23, "RMSNormalization")])
def test_onnx_newer_opsets_use_the_native_operator(name, opset, op, tmp_path):
    _, build, x = next(entry for entry in LAYERS if entry[0] == name)
    m, t = _prepared(build)
    ops, y = _onnx_run(m, x, str(tmp_path / "m.onnx"), True, opset)
    assert op in ops, ops
    torch.testing.assert_close(y, t(x), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_cnn(dynamo, tmp_path):
    m, t = _prepared(cnn)
    ops, y = _onnx_run(m, X_CNN, str(tmp_path / "cnn.onnx"), dynamo)
    ops_t, _ = _onnx_run(t, X_CNN, str(tmp_path / "torch.onnx"), dynamo)
    assert "LayerNormalization" in ops and ops & {"InstanceNormalization", "GroupNormalization"}, ops
    # eval-mode Conv+BN: the exporter folds BN into the conv for torch's model; it must do the same here
    assert ("BatchNormalization" in ops) == ("BatchNormalization" in ops_t), (ops, ops_t)
    torch.testing.assert_close(y, t(X_CNN), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ 5. jit.trace / fx


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_jit_trace_save_load(train, tmp_path):
    m, t = pair(cnn)
    m.train(train)
    t.train(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = torch.jit.trace(m, (X_CNN,), check_trace=False)
    path = str(tmp_path / "m.pt")
    torch.jit.save(tr, path)
    loaded = torch.jit.load(path)
    kinds = {n.kind() for n in tr.inlined_graph.nodes()}
    assert not any(k.startswith("normlab::") for k in kinds) and "aten::batch_norm" in kinds, kinds
    x2 = X_CNN * 1.5 + 0.2
    for run in (tr, loaded):
        t2 = cnn(nn).train(train)
        t2.load_state_dict(t.state_dict())
        assert_close(run(x2), t2(x2))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("which", ["cnn", "mean_only", "instance_norm", "instance_norm_unbatched"])
def test_fx_symbolic_trace(which, train):
    if which == "cnn":
        m, t = pair(cnn)
        x = X_CNN
    elif which == "mean_only":
        m = randomized(nn.Sequential(nn.Conv2d(3, 4, 1), normlab.MeanOnlyBatchNorm(4)))
        t = nn.Sequential(nn.Conv2d(3, 4, 1), TorchMeanOnly(4))
        t.load_state_dict(m.state_dict())
        x = X_CNN
    else:
        kw = dict(affine=True, track_running_stats=True)
        m = randomized(nn.Sequential(nn.Conv1d(3, 4, 1), normlab.InstanceNorm1d(4, **kw)))
        t = nn.Sequential(nn.Conv1d(3, 4, 1), nn.InstanceNorm1d(4, **kw))
        t.load_state_dict(m.state_dict())
        x = X_CNN[0].flatten(1) if which.endswith("unbatched") else X_CNN.flatten(2)
    m.train(train)
    t.train(train)
    gm = torch.fx.symbolic_trace(m)
    for _ in range(2):  # twice: running statistics are updated by the graph, each call
        assert_close(gm(x), t(x))
    for (k, b), (_, bt) in zip(gm.named_buffers(), t.named_buffers()):
        if not k.endswith("num_batches_tracked"):  # torch.fx runs `num_batches_tracked += 1` at trace time
            assert_close(b.float(), bt.float(), msg=k)


# ------------------------------------------------------------------ 6. meta / FakeTensor


META_CASES = [
    ("BatchNorm2d", lambda: normlab.BatchNorm2d(8), lambda: nn.BatchNorm2d(8)),
    ("GroupNorm", lambda: normlab.GroupNorm(2, 8), lambda: nn.GroupNorm(2, 8)),
    ("InstanceNorm2d", lambda: normlab.InstanceNorm2d(8, affine=True), lambda: nn.InstanceNorm2d(8, affine=True)),
    ("LayerNorm", lambda: normlab.LayerNorm(6), lambda: nn.LayerNorm(6)),
    ("RMSNorm", lambda: normlab.RMSNorm(6), lambda: nn.RMSNorm(6)),
    ("LayerNorm2d", lambda: normlab.LayerNorm2d(8), lambda: TorchLayerNorm2d(8)),
    ("MeanOnlyBatchNorm", lambda: normlab.MeanOnlyBatchNorm(8), lambda: TorchMeanOnly(8)),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,make,make_twin", META_CASES, ids=[c[0] for c in META_CASES])
def test_meta_and_fake(name, make, make_twin, dtype, fmt, train):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(4, 8, 5, 6, dtype=dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    m = make().to(dtype).train(train)
    real = m(x)  # the fake/meta result must be what the real one is: shape, dtype, strides
    twin = make_twin().to(dtype).train(train)
    yt = twin(x)
    assert real.shape == yt.shape and real.dtype == yt.dtype == dtype
    if fmt == "channels_last" and name not in ("LayerNorm", "RMSNorm"):
        assert real.is_contiguous(memory_format=torch.channels_last)  # channels_last preserved
    ym = make().to(dtype).train(train).to("meta")(x.to("meta"))
    assert ym.device.type == "meta"
    assert (ym.shape, ym.dtype, ym.stride()) == (real.shape, real.dtype, real.stride())
    layer = make().to(dtype).train(train)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yf = layer(mode.from_tensor(x))
    assert (yf.shape, yf.dtype, yf.stride()) == (real.shape, real.dtype, real.stride())


# ------------------------------------------------------------------ 7. functorch

FUNC_CASES = [
    # (name, normlab layer, torch twin (same state), input of one sample (vmap adds a batch dim))
    ("BatchNorm2d_eval", lambda L: L.BatchNorm2d(4).eval(), (3, 4, 5, 5)),
    ("BatchNorm2d_nostats", lambda L: L.BatchNorm2d(4, track_running_stats=False), (3, 4, 5, 5)),
    ("BatchNorm1d_eval", lambda L: L.BatchNorm1d(4).eval(), (3, 4)),
    ("GroupNorm", lambda L: L.GroupNorm(2, 4), (3, 4, 5, 5)),
    ("InstanceNorm2d", lambda L: L.InstanceNorm2d(4, affine=True), (3, 4, 5, 5)),
    ("InstanceNorm2d_eval_stats", lambda L: L.InstanceNorm2d(4, affine=True, track_running_stats=True).eval(), (3, 4, 5, 5)),
    ("LayerNorm", lambda L: L.LayerNorm(5), (3, 4, 5)),
    ("RMSNorm", lambda L: L.RMSNorm(5), (3, 4, 5)),
    ("LayerNorm2d", lambda L: normlab.LayerNorm2d(4) if L is normlab else TorchLayerNorm2d(4), (3, 4, 5, 5)),
    ("MeanOnlyBatchNorm_eval", lambda L: (normlab.MeanOnlyBatchNorm(4) if L is normlab else TorchMeanOnly(4)).eval(), (3, 4, 5, 5)),
]


def _func_pair(build):
    m = randomized(build(normlab).double())
    t = build(nn).double()
    t.load_state_dict(m.state_dict())
    return m, t


@pytest.mark.parametrize("transform", ["vmap", "jvp", "grad", "jacrev", "functional_call_grad"])
@pytest.mark.parametrize("name,build,shape", FUNC_CASES, ids=[c[0] for c in FUNC_CASES])
def test_functorch(name, build, shape, transform):
    from torch.func import functional_call, grad, jacrev, jvp, vmap

    m, t = _func_pair(build)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    v = torch.randn(shape, generator=g, dtype=torch.float64)

    def apply(mod):
        if transform == "vmap":
            return vmap(mod)(torch.stack([x, 2 * x + 1, v]))
        if transform == "jvp":
            return torch.cat([r.flatten() for r in jvp(mod, (x,), (v,))])
        if transform == "grad":
            return grad(lambda z: (mod(z) * v).sum())(x)
        if transform == "jacrev":
            return jacrev(mod)(x[:2])
        params = {k: p.detach() for k, p in mod.named_parameters()}
        gp = grad(lambda p: (functional_call(mod, p, (x,)) * v).sum())(params)
        return torch.cat([gp[k].flatten() for k in sorted(gp)]) if gp else torch.zeros(0, dtype=x.dtype)

    expected = apply(t)
    got = apply(m)
    assert_close(got, expected, torch.float64, msg=f"{name} {transform}")
    for (k, b), (_, bt) in zip(m.named_buffers(), t.named_buffers()):
        assert_close(b.double(), bt.double(), torch.float64, msg=k)


@pytest.mark.parametrize("transform", ["grad", "jvp"])
def test_functorch_instance_norm_training_with_running_stats(transform):
    """torch.func.grad/jvp of a training InstanceNorm with running statistics work in torch (the
    kernel updates the statistics with plain values); normlab's: same gradients and statistics."""
    from torch.func import grad, jvp

    m, t = _func_pair(lambda L: L.InstanceNorm2d(4, affine=True, track_running_stats=True))
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    if transform == "grad":
        res = [grad(lambda z, mod=mod: mod(z).square().sum())(x) for mod in (m, t)]
    else:
        res = [jvp(mod, (x,), (x.cos(),))[1] for mod in (m, t)]
    assert_close(res[0], res[1], torch.float64)
    assert_close(m.running_mean, t.running_mean, torch.float64)
    assert_close(m.running_var, t.running_var, torch.float64)


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_functorch_training_batch_norm_with_running_stats_refused_like_torch(transform):
    """torch refuses vmap/grad of a training BN that updates running statistics; so does normlab."""
    from torch.func import grad, vmap

    for lib in (nn, normlab):
        bn = lib.BatchNorm2d(4)
        x = torch.randn(2, 3, 4, 5, 5)
        with pytest.raises(RuntimeError):
            vmap(bn)(x) if transform == "vmap" else grad(lambda z, bn=bn: bn(z).sum())(x[0])


# ------------------------------------------------------------------ 8. §6 parity

INF = float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind", ["rms", "ln", "gn"])
def test_inf_input_matches_torch(kind, backend, dtype):
    x = torch.randn(4, 8, 3, dtype=dtype, generator=torch.Generator().manual_seed(7))
    x[0, 2, 1] = INF
    x[1, 0, 0] = -INF
    x[2, 3, 2] = float("nan")
    if kind == "rms":
        m, t, xx = normlab.RMSNorm(3), nn.RMSNorm(3), x
    elif kind == "ln":
        m, t, xx = normlab.LayerNorm(3), nn.LayerNorm(3), x
    else:
        m, t, xx = normlab.GroupNorm(2, 8), nn.GroupNorm(2, 8), x
    with normlab.use_backend(backend):
        y = m.to(dtype)(xx)
    yt = t.to(dtype)(xx)
    assert torch.equal(torch.isnan(y), torch.isnan(yt)), (y, yt)
    assert_close(y, yt)
    if kind == "rms":  # one Inf in a row: 0 elsewhere and NaN at the Inf, as torch
        assert torch.isnan(y[0, 2, 1]) and torch.equal(y[0, 2, [0, 2]].abs(), torch.zeros(2, dtype=dtype))


def _bn_inf_case(lib, dtype):
    x = torch.randn(4, 3, 2, 2, dtype=dtype, generator=torch.Generator().manual_seed(8))
    x[0, 0, 0, 0] = INF  # channel 0: +Inf only -> torch's running_mean becomes +Inf
    x[1, 1, 0, 0], x[2, 1, 1, 1] = INF, -INF  # channel 1: both -> NaN
    bn = lib.BatchNorm2d(3).to(dtype)
    y = bn(x)
    return y, bn.running_mean, bn.running_var


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_batch_norm_running_mean_with_inf_matches_torch(backend, dtype):
    with normlab.use_backend(backend):
        y, rm, rv = _bn_inf_case(normlab, dtype)
    yt, rmt, rvt = _bn_inf_case(nn, dtype)
    assert torch.equal(torch.isnan(rm), torch.isnan(rmt)) and torch.equal(torch.isinf(rm), torch.isinf(rmt)), (rm, rmt)
    assert_close(rm, rmt)
    assert torch.equal(torch.isnan(rv), torch.isnan(rvt)), (rv, rvt)
    assert torch.equal(torch.isnan(y), torch.isnan(yt))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_instance_norm_running_mean_with_inf_matches_torch(backend):
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(9))
    x[0, 0, 0, 0] = INF
    m, t = normlab.InstanceNorm2d(4, track_running_stats=True), nn.InstanceNorm2d(4, track_running_stats=True)
    with normlab.use_backend(backend):
        m(x)
    t(x)
    assert torch.equal(torch.isinf(m.running_mean), torch.isinf(t.running_mean)), (m.running_mean, t.running_mean)
    assert_close(m.running_mean, t.running_mean)


_THREADS_SCRIPT = textwrap.dedent("""
    import sys, threading, torch, normlab
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cases = [(normlab.LayerNorm(256), torch.nn.LayerNorm(256), torch.randn(256, 256)),
             (normlab.BatchNorm2d(16).eval(), torch.nn.BatchNorm2d(16).eval(), torch.randn(32, 16, 16, 16)),
             (normlab.GroupNorm(4, 16), torch.nn.GroupNorm(4, 16), torch.randn(32, 16, 16, 16)),
             (normlab.RMSNorm(256), torch.nn.RMSNorm(256), torch.randn(256, 256))]
    expected = [t(x).detach() for _, t, x in cases]
    errors = []
    def work():
        try:
            for _ in range(10):
                for (m, _, x), e in zip(cases, expected):
                    y = m(x.requires_grad_(False))
                    if not torch.allclose(y, e, rtol=1e-5, atol=1e-5):
                        errors.append(type(m).__name__)
        except Exception as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=work) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print("errors", errors[:3])
    sys.exit(1 if errors else 0)
""")


@pytest.mark.slow
@pytest.mark.parametrize("layer", [
    "default",
    "workqueue",  # aborted with exit 134 before kernel launches were serialized under it
])
def test_two_threads_never_abort(layer):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if layer != "default":
        env["NUMBA_THREADING_LAYER"] = layer
    r = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stdout[-500:], r.stderr[-1500:])
    assert "errors []" in r.stdout


def test_standardizer_at_top_level():
    from normlab import Standardizer  # noqa: F401
    from normlab.nn import Standardizer as S2

    assert normlab.Standardizer is S2 and "Standardizer" in normlab.__all__
