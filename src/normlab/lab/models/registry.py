"""The registry of lab models: ``build_model(name, norm=..., ...)`` and :func:`register_model`.

The model modules (:mod:`~normlab.lab.models.feedforward`, :mod:`~normlab.lab.models.recurrent`)
import this module and register their builders; this module imports none of them. Importing
:mod:`normlab.lab.models` (any part of it) registers every built-in model.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from normlab._checks import check_int
from normlab.lab.norms import get_norm
from normlab.lab.util import add_entry, import_object
from normlab.nn.utils import is_norm_layer, weight_norm, weight_standardization
from normlab.nn.utils.convert import METHODS, convert

__all__ = [
    "OWN",
    "ModelBuilder",
    "build_model",
    "count_parameters",
    "model_names",
    "needs_data_init",
    "norm_layers",
    "register_model",
]


ModelBuilder = Callable[..., nn.Module]
#: ``norm`` for a plain user model (a function without a ``norm`` parameter) left as written.
OWN = "own"
_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str, builder: ModelBuilder, *, overwrite: bool = False) -> None:
    """Register ``builder(spec: NormSpec, input_shape, num_classes, **options) -> nn.Module``.

    Models built this way get weight normalization applied by :func:`build_model` when the norm
    asks for it, like the built-in ones.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"name: expected a non-empty name without ':', got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder: expected a callable, got {type(builder).__name__}")
    add_entry(_REGISTRY, name, builder, kind="model", overwrite=overwrite)


def model_names() -> list[str]:
    """Names of the registered models."""
    return sorted(_REGISTRY)


def _apply_weight_norm(model: nn.Module) -> int:
    """Weight-normalize every conv/linear weight of ``model``; returns how many."""
    targets = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    for module in targets:
        weight_norm(module, name="weight", dim=0)
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
        name: a registered model (``mlp``, ``cnn``, ``resnet``, ``lstm``) or ``"package.module:function"``.
            A function with a ``norm`` parameter is called as ``function(norm=..., input_shape=...,
            num_classes=..., **options)`` and handles the norm itself. A function **without** one
            is a model written without normlab in mind: it is called with whichever of
            ``input_shape``/``num_classes`` it names (plus the options) and its normalization
            layers are swapped with :func:`normlab.convert` for ``norm``.
        norm: a norm name for :func:`normlab.lab.norms.get_norm` (``"bn"``, ``"gn:4"``...); for a
            function without a ``norm`` parameter, a method of :func:`normlab.convert`
            (``"gn"``, ``"ws+gn"``, ``"gn:8"``...) or :data:`OWN` for the model as written.
        input_shape: per-sample input shape (``DataBundle.input_shape``).
        num_classes: number of classes, 0 for regression (one output).
        **options: model options (see :mod:`normlab.lab.models`).

    Raises:
        ValueError: unknown model/norm/option, or a norm that does not fit the model.
        TypeError: a user function that does not return an ``nn.Module``.
    """
    if not isinstance(name, str):
        raise TypeError(f"model: expected a str, got {type(name).__name__}")
    shape = tuple(int(d) for d in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape: expected positive sizes, got {tuple(input_shape)}")
    check_int(num_classes, "num_classes", low=0)
    if name not in _REGISTRY and ":" in name:
        fn = import_object(name, "model")
        if not _takes(fn, "norm"):
            return _plain_model(fn, name, norm, shape, num_classes, options)
        get_norm(norm)
        model = fn(norm=norm, input_shape=shape, num_classes=num_classes, **options)
        _check_module(model, name)
        return model
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
            weight_standardization(module)
    if spec.weight_norm:
        _apply_weight_norm(model)
        model.needs_data_init = True
    return model


def _takes(fn: Callable[..., Any], name: str) -> bool:
    """Does ``fn`` accept a keyword ``name`` (by name, or through ``**kwargs``)?"""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read: assume the norm-taking protocol
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
    if not isinstance(norm, str) or (norm != OWN and norm.split(":", 1)[0] not in METHODS):
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers convert leaves alone are the report's business
        model, rep = convert(model, norm, inplace=True, report=True, example_input=torch.zeros(2, *shape))
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
    return [(n, m) for n, m in model.named_modules() if is_norm_layer(m)]
