"""Tests of normlab.lab.norms (the registry of normalization choices) and normlab.lab.models."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

import normlab.nn as lnn
from normlab.lab.data import load_dataset
from normlab.lab.models import (
    build_model,
    count_parameters,
    model_names,
    needs_data_init,
    norm_layers,
    register_model,
)
from normlab.lab.norms import NormSpec, default_groups, get_norm, norm_names, register_norm
from normlab.nn.utils import init_weight_norm_, is_weight_normed


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster than two fighting over the shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------
# norms registry
# --------------------------------------------------------------------------------------------
def test_registered_names() -> None:
    assert {"none", "bn", "gn", "ln", "in", "rms", "mobn", "wn", "wn+mobn"} <= set(norm_names())


def test_unknown_norm_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown name 'batchnorm'.*'bn'.*'gn:G'"):
        get_norm("batchnorm")
    with pytest.raises(TypeError, match="norm"):
        get_norm(3)  # type: ignore[arg-type]
    for bad in ("gn:0", "gn:x", "gn:"):
        with pytest.raises(ValueError, match="gn:G"):
            get_norm(bad)
    with pytest.raises(ValueError, match="twice"):
        get_norm("wn+wn")


def test_layers_come_from_normlab() -> None:
    assert type(get_norm("bn").make(4, "conv2d")) is lnn.BatchNorm2d
    assert type(get_norm("mobn").make(4, "conv2d")) is lnn.MeanOnlyBatchNorm
    assert isinstance(get_norm("bn").make(4, "conv2d"), lnn.BatchNorm2d)


@pytest.mark.parametrize(("channels", "groups"), [(16, 8), (32, 8), (64, 8), (12, 6), (6, 3), (4, 2), (3, 1), (1, 1)])
def test_default_groups(channels: int, groups: int) -> None:
    assert default_groups(channels) == groups
    layer = get_norm("gn").make(channels, "conv2d")
    assert isinstance(layer, lnn.GroupNorm) and layer.num_groups == groups


def test_explicit_groups_layer_norm_and_instance_norm() -> None:
    gn4 = get_norm("gn:4").make(16, "conv2d")
    assert isinstance(gn4, lnn.GroupNorm) and gn4.num_groups == 4
    with pytest.raises(ValueError, match=r"num_channels \(16\) must be divisible by the number of groups \(3\)"):
        get_norm("gn:3").make(16, "conv2d")
    ln_conv = get_norm("ln").make(8, "conv2d")
    assert isinstance(ln_conv, lnn.GroupNorm) and ln_conv.num_groups == 1  # LN over (C, H, W)
    assert isinstance(get_norm("ln").make(8, "linear"), lnn.LayerNorm)
    inst = get_norm("in").make(8, "conv1d")
    assert isinstance(inst, lnn.InstanceNorm1d) and inst.affine
    for kind in ("linear", "sequence"):
        with pytest.raises(ValueError, match="norm 'in'.*use 'ln', 'gn' or 'bn'"):
            get_norm("in").make(8, kind)
    # GroupNorm on a linear layer's (N, C) output works.
    assert get_norm("gn").make(8, "linear")(torch.randn(3, 8)).shape == (3, 8)


def test_make_checks_arguments() -> None:
    spec = get_norm("bn")
    with pytest.raises(ValueError, match="kind"):
        spec.make(4, "conv3d")
    with pytest.raises(ValueError, match="num_channels"):
        spec.make(0, "linear")
    with pytest.raises(TypeError, match="num_channels"):
        spec.make(4.0, "linear")  # type: ignore[arg-type]


def test_weight_norm_specs() -> None:
    assert get_norm("wn").weight_norm and isinstance(get_norm("wn").make(4, "linear"), nn.Identity)
    wm = get_norm("wn+mobn")
    assert wm.weight_norm and wm.has_shift
    assert isinstance(wm.make(4, "conv2d"), lnn.MeanOnlyBatchNorm)
    wb = get_norm("wn+bn")
    assert wb.weight_norm and isinstance(wb.make(4, "conv2d"), lnn.BatchNorm2d)
    assert not get_norm("bn").weight_norm


def test_sequence_kind_normalizes_per_step() -> None:
    x = torch.randn(3, 5, 8) * 4 + 2
    ln = get_norm("ln").make(8, "sequence")
    y = ln(x)
    assert torch.allclose(y.mean(-1), torch.zeros(3, 5), atol=1e-5)
    gn = get_norm("gn:2").make(8, "sequence")
    expected = nn.functional.group_norm(x.reshape(15, 8), 2).reshape(3, 5, 8)
    assert torch.allclose(gn(x), expected, atol=1e-5)
    bn = get_norm("bn").make(8, "sequence")
    yb = bn(x)  # statistics over N and T per feature
    assert torch.allclose(yb.mean((0, 1)), torch.zeros(8), atol=1e-5)
    assert torch.allclose(yb.var((0, 1), unbiased=False), torch.ones(8), atol=1e-3)


def test_rms_on_conv_is_over_channels() -> None:
    x = torch.randn(2, 6, 3, 3) + 1
    y = get_norm("rms").make(6, "conv2d")(x)
    rms = y.pow(2).mean(1).sqrt()
    assert torch.allclose(rms, torch.ones(2, 3, 3), atol=1e-3)


def test_register_norm() -> None:
    name = f"test-{uuid.uuid4().hex[:6]}"
    register_norm(name, NormSpec(name, lambda c, kind: nn.Identity()))
    assert name in norm_names() and get_norm(name).name == name
    with pytest.raises(ValueError, match="already registered"):
        register_norm(name, NormSpec(name, lambda c, kind: nn.Identity()))
    with pytest.raises(ValueError, match="reserved"):
        register_norm("x:1", NormSpec("x", lambda c, kind: nn.Identity()))
    with pytest.raises(TypeError, match="spec"):
        register_norm(name + "b", "bn")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    b = load_dataset("digits", limit=16)
    return b.train.tensors


MODEL_NORMS = [
    (model, norm)
    for model in ("mlp", "cnn", "resnet")
    for norm in ("none", "bn", "gn", "ln", "in", "rms", "mobn", "wn", "wn+mobn")
    if not (model == "mlp" and norm == "in")
]


@pytest.mark.parametrize(("model", "norm"), MODEL_NORMS)
def test_forward_backward_on_digits(model: str, norm: str, digits_batch) -> None:
    x, y = digits_batch
    options = {"depth": 8, "width": 8} if model == "resnet" else {}
    net = build_model(model, norm=norm, input_shape=(1, 8, 8), num_classes=10, **options)
    if needs_data_init(net):
        init_weight_norm_(net, x)
    out = net(x)
    assert out.shape == (16, 10)
    nn.functional.cross_entropy(out, y).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    net.eval()
    assert net(x[:1]).shape == (1, 10)  # eval mode works on a single sample (BN uses running stats)


@pytest.mark.parametrize("model", ["cnn", "resnet"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (40, 2)])
def test_conv_models_on_larger_images_and_sequences(model: str, shape: tuple[int, ...]) -> None:
    options = {"depth": 8, "width": 4} if model == "resnet" else {"channels": (4, 8)}
    net = build_model(model, norm="gn", input_shape=shape, num_classes=3, **options)
    assert net(torch.randn(2, *shape)).shape == (2, 3)
    kinds = {type(m) for m in net.modules()}
    assert (nn.Conv2d in kinds) == (len(shape) == 3) and (nn.Conv1d in kinds) == (len(shape) == 2)


def test_cnn_head_and_pooling() -> None:
    net = build_model("cnn", norm="bn", input_shape=(1, 8, 8), num_classes=10, head="flatten")
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 2  # 8 -> 4 -> 2
    head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    assert head.in_features == 32 * 2 * 2


def test_mlp_options_and_regression_output() -> None:
    net = build_model("mlp", norm="ln", input_shape=(2,), num_classes=0, hidden=[5, 7], activation="sigmoid")
    assert net(torch.randn(4, 2)).shape == (4, 1)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [5, 7, 1]
    assert any(isinstance(m, nn.Sigmoid) for m in net.modules())
    with pytest.raises(ValueError, match="activation"):
        build_model("mlp", norm="ln", input_shape=(2,), num_classes=2, activation="swish")


@pytest.mark.parametrize(("norm", "bias"), [("bn", False), ("gn", False), ("ln", False), ("in", False),
                                            ("mobn", False), ("none", True), ("rms", True), ("wn", True)])
def test_conv_bias_only_without_shift(norm: str, bias: bool) -> None:
    net = build_model("cnn", norm=norm, input_shape=(1, 8, 8), num_classes=10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all((c.bias is not None) == bias for c in convs)


def test_weight_norm_models() -> None:
    net = build_model("cnn", norm="wn+mobn", input_shape=(1, 8, 8), num_classes=10)
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(is_weight_normed(m) for m in layers)
    assert needs_data_init(net)
    assert not needs_data_init(build_model("cnn", norm="bn", input_shape=(1, 8, 8), num_classes=10))


def test_resnet_depth() -> None:
    for depth, blocks in ((8, 3), (14, 6), (20, 9)):
        net = build_model("resnet", norm="bn", input_shape=(1, 8, 8), num_classes=10, depth=depth, width=4)
        assert len(net.blocks) == blocks
        convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs) + 1 == depth  # 3x3 convs + the linear head
    with pytest.raises(ValueError, match="depth: expected 6n \\+ 2"):
        build_model("resnet", norm="bn", input_shape=(1, 8, 8), num_classes=10, depth=10)


def test_model_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'vgg'.*'cnn'"):
        build_model("vgg", norm="bn", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ValueError, match="model options for 'cnn'.*width"):
        build_model("cnn", norm="bn", input_shape=(1, 8, 8), num_classes=10, width=3)
    with pytest.raises(ValueError, match="input_shape.*use 'mlp'"):
        build_model("cnn", norm="bn", input_shape=(5,), num_classes=10)
    with pytest.raises(ValueError, match="norm 'in'"):
        build_model("mlp", norm="in", input_shape=(5,), num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", norm="bn", input_shape=(5,), num_classes=-1)
    with pytest.raises(ValueError, match="unknown name"):
        build_model("mlp", norm="batch", input_shape=(5,), num_classes=2)


def test_count_parameters_and_norm_layers() -> None:
    net = build_model("mlp", norm="bn", input_shape=(4,), num_classes=3, hidden=[5])
    # Linear 4->5 without bias, BN(5) weight+bias, Linear 5->3 with bias.
    assert count_parameters(net) == 4 * 5 + 2 * 5 + 5 * 3 + 3
    net.net[2].weight.requires_grad_(False)
    assert count_parameters(net) == 4 * 5 + 2 * 5 + 5 * 3 + 3 - 5
    assert count_parameters(net, trainable_only=False) == 4 * 5 + 2 * 5 + 5 * 3 + 3
    names = [n for n, _ in norm_layers(build_model("cnn", norm="gn", input_shape=(1, 8, 8), num_classes=10))]
    assert len(names) == 3
    rms = norm_layers(build_model("cnn", norm="rms", input_shape=(1, 8, 8), num_classes=10))
    assert len(rms) == 3 and all(isinstance(m, lnn.RMSNorm) for _, m in rms)  # adapters not counted
    assert norm_layers(build_model("cnn", norm="none", input_shape=(1, 8, 8), num_classes=10)) == []


def test_register_model() -> None:
    name = f"tiny{uuid.uuid4().hex[:6]}"

    def tiny(spec: NormSpec, input_shape, num_classes, *, hidden: int = 3) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(4, hidden), spec.make(hidden, "linear"), nn.Linear(hidden, num_classes))

    register_model(name, tiny)
    assert name in model_names()
    net = build_model(name, norm="wn", input_shape=(4,), num_classes=2, hidden=6)
    assert needs_data_init(net) and is_weight_normed(net[1])
    with pytest.raises(ValueError, match="already registered"):
        register_model(name, tiny)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def write(source: str) -> str:
        name = f"user_model_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
        return name

    yield write
    for name in [m for m in sys.modules if m.startswith("user_model_")]:
        sys.modules.pop(name, None)


def test_user_model_function(user_module) -> None:
    name = user_module(
        """
        import math
        from torch import nn
        from normlab.lab.norms import get_norm

        def linear(*, norm, input_shape, num_classes, hidden=4):
            width = math.prod(input_shape)
            return nn.Sequential(
                nn.Flatten(), nn.Linear(width, hidden), get_norm(norm).make(hidden, "linear"),
                nn.Linear(hidden, num_classes),
            )

        def not_a_model(**kw):
            return "nope"
        """
    )
    net = build_model(f"{name}:linear", norm="ln", input_shape=(1, 8, 8), num_classes=10, hidden=6)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert isinstance(net[2], lnn.LayerNorm) and net[1].out_features == 6
    with pytest.raises(TypeError, match="returned str, expected an nn.Module"):
        build_model(f"{name}:not_a_model", norm="ln", input_shape=(4,), num_classes=2)
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        build_model(f"{name}:missing", norm="ln", input_shape=(4,), num_classes=2)
