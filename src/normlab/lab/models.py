"""Lab models that take the normalization by name: ``build_model("cnn", norm="gn", ...)``.

Models (see :func:`model_names`; more with :func:`register_model`):

* ``mlp``: ``Linear -> norm -> activation`` per hidden layer, then a linear head. Options:
  ``hidden`` (sizes, default ``(128, 128)``), ``activation`` (``relu``, ``sigmoid``, ``tanh``,
  ``gelu``, ``identity``). Any input shape is flattened.
* ``cnn``: ``conv -> norm -> relu`` blocks (default ``channels=(16, 32, 32)``, kernel 3,
  "same" padding); a 2×2 (or 2) max-pool after every block but the first while the map is at least
  2 wide, so 8×8 digits go 8 -> 4 -> 2 and 32×32 images 32 -> 16 -> 8. Head: global average pool
  + linear (``head="gap"``) or flatten + linear (``head="flatten"``). Images ``(C, H, W)`` use
  conv2d; sequences ``(T, F)`` use conv1d over time with ``F`` input channels.
* ``resnet``: CIFAR-style ResNet (He et al. 2016, section 4.2): depth ``6n + 2`` (option ``depth``,
  default 20), a 3×3 stem of ``width`` channels (default 16), three stages of ``n`` basic blocks
  with ``width``, ``2·width``, ``4·width`` channels (stride 2 at the start of stages 2 and 3,
  1×1 conv + norm shortcut), global average pool, linear head. Works on 8×8 (8 -> 4 -> 2) and
  32×32 images, and on ``(T, F)`` sequences with conv1d.
* ``package.module:function``: ``function(norm=..., input_shape=..., num_classes=..., **options)``
  must return an ``nn.Module``. It is responsible for its normalization (use
  :func:`normlab.lab.norms.get_norm`); set ``model.needs_data_init = True`` if it needs
  weight norm's data-dependent init.
  A function **without** a ``norm`` parameter is a model written without normlab in mind: it is
  called with whichever of ``input_shape``/``num_classes`` it names (plus the options) and its
  normalization layers are swapped with :func:`normlab.convert` for ``norm`` — a method name of
  :data:`normlab.nn.utils.convert.METHODS` (``"gn"``, ``"ws+gn"``, ``"gn:8"``...), or
  :data:`OWN` for the model exactly as written (what ``normlab advise`` compares against).

Conventions of the built-in models: outputs are ``(N, num_classes)`` logits, or ``(N, 1)`` for
regression (``num_classes == 0``). A conv/linear layer followed by a norm with a learned shift
(bn, gn, ln, in, mobn) has no bias: the norm would remove it. With a weight-norm choice (``wn``,
``wn+mobn``, ``wn+X``) every conv/linear weight, the head's included, is reparametrized by
weight normalization and :func:`needs_data_init` is true: the trainer then runs the
data-dependent init on a batch before training.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from normlab.lab import norms
from normlab.lab.data import import_object
from normlab.lab.norms import NormSpec, get_norm

__all__ = [
    "OWN",
    "build_model",
    "count_parameters",
    "model_names",
    "needs_data_init",
    "norm_layers",
    "register_model",
]

#: ``norm`` for a plain user model (a function without a ``norm`` parameter) left as written.
OWN = "own"

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
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width: expected a positive int, got {width!r}")
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


# --------------------------------------------------------------------------------------------
# Registry and helpers
# --------------------------------------------------------------------------------------------
ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {"mlp": MLP, "cnn": CNN, "resnet": ResNet}


def register_model(name: str, builder: ModelBuilder, *, overwrite: bool = False) -> None:
    """Register ``builder(spec: NormSpec, input_shape, num_classes, **options) -> nn.Module``.

    Models built this way get weight normalization applied by :func:`build_model` when the norm
    asks for it, like the built-in ones.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"name: expected a non-empty name without ':', got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder: expected a callable, got {type(builder).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"name: model {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = builder


def model_names() -> list[str]:
    """Names of the registered models."""
    return sorted(_REGISTRY)


def _apply_weight_norm(model: nn.Module) -> int:
    """Weight-normalize every conv/linear weight of ``model``; returns how many."""
    targets = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    for module in targets:
        norms.layers.weight_norm(module, name="weight", dim=0)
    return len(targets)


def build_model(
    name: str,
    *,
    norm: str,
    input_shape: Sequence[int],
    num_classes: int,
    **options: Any,
) -> nn.Module:
    """Build model ``name`` with normalization ``norm`` for the given data.

    Args:
        name: a registered model (``mlp``, ``cnn``, ``resnet``) or ``"package.module:function"``.
        norm: a norm name for :func:`normlab.lab.norms.get_norm` (``"bn"``, ``"gn:4"``...).
        input_shape: per-sample input shape (``DataBundle.input_shape``).
        num_classes: number of classes, 0 for regression (one output).
        **options: model options (see the module docstring).

    Raises:
        ValueError: unknown model/norm/option, or a norm that does not fit the model.
        TypeError: a user function that does not return an ``nn.Module``.
    """
    if not isinstance(name, str):
        raise TypeError(f"model: expected a str, got {type(name).__name__}")
    shape = tuple(int(d) for d in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape: expected positive sizes, got {tuple(input_shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes: expected an int >= 0, got {num_classes!r}")
    if name not in _REGISTRY and ":" in name:
        fn = import_object(name, "model")
        if _takes(fn, "norm"):
            get_norm(norm)
            model = fn(norm=norm, input_shape=shape, num_classes=num_classes, **options)
            _check_module(model, name)
            return model
        return _plain_model(fn, name, norm, shape, num_classes, options)
    spec = get_norm(norm)
    if name not in _REGISTRY:
        raise ValueError(
            f"model: unknown model {name!r}; expected one of {model_names()} or "
            "'package.module:function'"
        )
    try:
        model = _REGISTRY[name](spec, shape, num_classes, **options)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise ValueError(f"model options for {name!r}: {exc}") from exc
        raise
    if spec.weight_standardization:
        for module in [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]:
            norms.layers.weight_standardization(module)
    if spec.weight_norm:
        _apply_weight_norm(model)
        model.needs_data_init = True
    return model


def _takes(fn: Callable[..., Any], name: str) -> bool:
    """Does ``fn`` accept a keyword ``name`` (by name, or through ``**kwargs``)?"""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume the old protocol
        return True
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _check_module(model: Any, name: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: {name!r} returned {type(model).__name__}, expected an nn.Module")


def _plain_model(
    fn: Callable[..., Any], name: str, norm: str, shape: tuple[int, ...], num_classes: int,
    options: dict[str, Any],
) -> nn.Module:
    """A model written without normlab, its normalization swapped to ``norm`` by ``convert``."""
    from normlab.nn.utils.convert import METHODS, convert

    base = norm.split(":", 1)[0]
    if norm != OWN and base not in METHODS:
        raise ValueError(
            f"norm: expected {OWN!r} or a method of normlab.convert ({', '.join(METHODS)}, "
            f"'gn:G'), got {norm!r} (the model {name!r} has no norm parameter)"
        )
    given = {"input_shape": shape, "num_classes": num_classes}
    kwargs = {k: v for k, v in given.items() if k not in options and _takes(fn, k)}
    model = fn(**kwargs, **options)
    _check_module(model, name)
    if norm == OWN:
        return model
    example = torch.zeros(2, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers convert leaves alone are the report's business
        model, rep = convert(model, norm, inplace=True, report=True, example_input=example)
    if not rep.converted:
        raise ValueError(f"norm {norm!r}: model {name!r} has no normalization layer to swap")
    return model


def needs_data_init(model: nn.Module) -> bool:
    """True when ``model`` wants weight norm's data-dependent init before training."""
    return bool(getattr(model, "needs_data_init", False))


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter values in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` for every normalization layer of ``model``, in order."""
    return [(n, m) for n, m in model.named_modules() if norms.is_norm_layer(m)]


# The recurrent models live in their own module (they need normlab.nn.rnn); importing it here
# registers "lstm" wherever the registry is used, e.g. `normlab study ... --model lstm`.
from normlab.lab import rnn_models as _rnn_models  # noqa: E402,F401  (registers "lstm")
