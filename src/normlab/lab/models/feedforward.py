"""The feed-forward lab models: ``mlp``, ``cnn`` and ``resnet`` (registered here).

See :mod:`normlab.lab.models` for what each builds and its options. Every builder has the
registry's signature ``builder(spec, input_shape, num_classes, **options)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from normlab._checks import check_positive_int
from normlab.lab.models.registry import register_model
from normlab.lab.norms import NormSpec

__all__ = ["ACTIVATIONS", "CNN", "MLP", "BasicBlock", "ResNet", "SequenceToSignal"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def _out_features(num_classes: int) -> int:
    return num_classes if num_classes > 0 else 1  # one output for regression


def _conv_layout(input_shape: tuple[int, ...], model: str) -> tuple[int, str]:
    """(input channels, norm kind) for a conv net; sequences (T, F) become (F, T) signals."""
    if len(input_shape) == 3:
        return input_shape[0], "conv2d"
    if len(input_shape) == 2:
        return input_shape[1], "conv1d"
    raise ValueError(
        f"input_shape: model {model!r} needs images (C, H, W) or sequences (T, F), got "
        f"{input_shape}; use 'mlp' for tabular data"
    )


def _conv(kind: str, *args: Any, **kw: Any) -> nn.Module:
    return nn.Conv2d(*args, **kw) if kind == "conv2d" else nn.Conv1d(*args, **kw)


class SequenceToSignal(nn.Module):
    """``(N, T, F)`` sequence -> ``(N, F, T)`` signal, the layout conv1d expects."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Flatten, then ``Linear -> norm -> activation`` per hidden size, then a linear head."""

    def __init__(
        self,
        spec: NormSpec,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        hidden: Sequence[int] = (128, 128),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if not all(isinstance(h, int) and h >= 1 for h in hidden):
            raise ValueError(f"hidden: expected positive int sizes, got {hidden!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [
                nn.Linear(width, h, bias=not spec.has_shift),
                spec.make(h, "linear"),
                _activation(activation),
            ]
            width = h
        layers.append(nn.Linear(width, _out_features(num_classes)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------------------------
# CNN
# --------------------------------------------------------------------------------------------
class CNN(nn.Module):
    """Small CNN: ``conv -> norm -> relu`` blocks with max-pooling, then a linear head."""

    def __init__(
        self,
        spec: NormSpec,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        channels: Sequence[int] = (16, 32, 32),
        kernel_size: int = 3,
        head: str = "gap",
    ) -> None:
        super().__init__()
        if not channels or not all(isinstance(c, int) and c >= 1 for c in channels):
            raise ValueError(f"channels: expected positive int sizes, got {channels!r}")
        if head not in ("gap", "flatten"):
            raise ValueError(f"head: expected 'gap' or 'flatten', got {head!r}")
        in_ch, kind = _conv_layout(input_shape, "cnn")
        spatial = list(input_shape[1:] if kind == "conv2d" else input_shape[:1])
        layers: list[nn.Module] = [SequenceToSignal()] if kind == "conv1d" else []
        for i, out_ch in enumerate(channels):
            layers += [
                _conv(kind, in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=not spec.has_shift),
                spec.make(out_ch, kind),
                nn.ReLU(),
            ]
            # Pool after every block but the first while the map can still be halved.
            if i > 0 and min(spatial) >= 2:
                layers.append(nn.MaxPool2d(2) if kind == "conv2d" else nn.MaxPool1d(2))
                spatial = [s // 2 for s in spatial]
            in_ch = out_ch
        if head == "gap":
            layers += [nn.AdaptiveAvgPool2d(1) if kind == "conv2d" else nn.AdaptiveAvgPool1d(1), nn.Flatten()]
            features = in_ch
        else:
            layers.append(nn.Flatten())
            features = in_ch * math.prod(spatial)
        layers.append(nn.Linear(features, _out_features(num_classes)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """``conv-norm-relu-conv-norm`` plus the (projected) input, then relu."""

    def __init__(self, spec: NormSpec, kind: str, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        bias = not spec.has_shift
        self.conv1 = _conv(kind, in_ch, out_ch, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = spec.make(out_ch, kind)
        self.conv2 = _conv(kind, out_ch, out_ch, 3, padding=1, bias=bias)
        self.norm2 = spec.make(out_ch, kind)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                _conv(kind, in_ch, out_ch, 1, stride=stride, bias=bias), spec.make(out_ch, kind)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet of depth ``6n + 2`` (see the module docstring)."""

    def __init__(
        self,
        spec: NormSpec,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        depth: int = 20,
        width: int = 16,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth: expected 6n + 2 with n >= 1 (8, 14, 20, 32...), got {depth!r}")
        check_positive_int(width, "width")
        in_ch, kind = _conv_layout(input_shape, "resnet")
        n = (depth - 2) // 6
        bias = not spec.has_shift
        stem: list[nn.Module] = [SequenceToSignal()] if kind == "conv1d" else []
        stem += [_conv(kind, in_ch, width, 3, padding=1, bias=bias), spec.make(width, kind), nn.ReLU()]
        self.stem = nn.Sequential(*stem)
        blocks: list[nn.Module] = []
        ch = width
        for stage, out_ch in enumerate((width, 2 * width, 4 * width)):
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(BasicBlock(spec, kind, ch, out_ch, stride))
                ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1) if kind == "conv2d" else nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(ch, _out_features(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


register_model("mlp", MLP)
register_model("cnn", CNN)
register_model("resnet", ResNet)
