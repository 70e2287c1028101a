"""Argument validation shared by the functional API, the layers, the lab and the CLI.

Every check raises a one-line ``ValueError`` (a bad value) or ``TypeError`` (a bad type) worded
``"name: expected …, got …"``: the argument's name, what it must be, and what it was. A bool is
never taken for a number (``True`` is an ``int`` to Python, not a size or an ε to a user).

This module imports nothing of normlab, so every layer of the package can use it.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from torch import Tensor

__all__ = [
    "check_channels",
    "check_dims",
    "check_divisor",
    "check_eps",
    "check_input",
    "check_int",
    "check_limit",
    "check_momentum",
    "check_param",
    "check_positive_int",
    "check_scalar",
    "check_trailing",
    "check_normalized_shape",
]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- numbers


def check_int(value: object, name: str, *, low: int) -> None:
    """An int ``>= low`` (``low=1``: see :func:`check_positive_int`)."""
    if not _is_int(value) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


def check_positive_int(value: object, name: str, *, allow_none: bool = False) -> None:
    """An int ``>= 1`` (or ``None`` where ``allow_none``): sizes, counts, steps."""
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 1:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def check_divisor(value: object, total: int, name: str, of: str) -> None:
    """A positive int that divides ``total``; ``of`` names ``total`` in the message."""
    if not _is_int(value) or value <= 0 or total % value:
        raise ValueError(f"{name}: expected a positive divisor of {of}, got {value!r}")


def check_eps(eps: float) -> None:
    """ε ≥ 0 (0 is allowed, as in torch: a constant group then gives NaN, not an error)."""
    if not (_is_number(eps) and eps >= 0):
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")


def check_momentum(momentum: float | None, *, allow_none: bool = False) -> None:
    """Momentum of the running averages: a number in [0, 1] (None = cumulative, modules only)."""
    if momentum is None and allow_none:
        return
    if not (_is_number(momentum) and 0.0 <= momentum <= 1.0):
        expected = "a number in [0, 1] or None" if allow_none else "a number in [0, 1]"
        raise ValueError(f"momentum: expected {expected}, got {momentum!r}")


def check_limit(value: object, name: str, low: float, *, schedule: bool = False) -> None:
    """A number limit (r_max ≥ 1, d_max ≥ 0). With ``schedule`` (a layer's argument) a callable
    of the step passes too; without (a functional's argument) a tensor, a schedule's value, passes
    uninspected."""
    if schedule:
        if callable(value) and not _is_number(value):
            return
    elif isinstance(value, Tensor):
        return
    if not _is_number(value) or not value >= low:
        expected = f"a number >= {low:g} or a callable schedule" if schedule else f"a number >= {low:g}"
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def check_scalar(t: object, name: str) -> None:
    """A number or a 1-element tensor."""
    if isinstance(t, Tensor):
        if t.numel() != 1:
            raise ValueError(f"{name}: expected a scalar (1-element tensor), got shape {tuple(t.shape)}")
    elif not _is_number(t):
        raise TypeError(f"{name}: expected a number or a 1-element tensor, got {type(t).__name__}")


# ----------------------------------------------------------------------------- shapes


def check_normalized_shape(value: int | Sequence[int]) -> tuple[int, ...]:
    """``normalized_shape`` as a tuple: an int or a non-empty sequence of positive ints."""
    shape = (value,) if isinstance(value, int) else tuple(value)
    if not shape or any((not isinstance(s, int)) or s <= 0 for s in shape):
        raise ValueError(f"normalized_shape: expected a non-empty sequence of positive ints, got {value!r}")
    return shape


def check_param(t: Tensor | None, shape: tuple[int, ...], name: str) -> None:
    """A parameter/statistics tensor of exactly ``shape`` (``None`` passes: it is optional)."""
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


# ----------------------------------------------------------------------------- inputs


def check_input(x: Tensor, name: str = "input", *, min_dim: int = 1) -> None:
    """Tensor of a floating dtype with at least ``min_dim`` dims (empty tensors are valid)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32, float64), "
            f"got dtype {x.dtype}; convert with .float()"
        )
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim}-D input, got {x.dim()}-D of shape {tuple(x.shape)}")


def check_dims(input: Tensor, allowed: tuple[int, ...], layer: str) -> None:
    """A clear error when the input's rank is not one a layer accepts."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
    if input.dim() not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        raise ValueError(f"input: {layer} expected {want} input, got {input.dim()}-D input of shape {tuple(input.shape)}")


def check_channels(x: Tensor, num_channels: int, name: str = "input") -> None:
    """(N, C, \\*) input with ``C = num_channels``."""
    if x.dim() < 2:
        raise ValueError(f"{name}: expected (N, C, *) input with C = {num_channels}, got shape {tuple(x.shape)}")
    if x.shape[1] != num_channels:
        raise ValueError(
            f"{name}: expected {num_channels} channels (dim 1), got {x.shape[1]} in shape {tuple(x.shape)}"
        )


def check_trailing(input: Tensor, shape: tuple[int, ...]) -> None:
    """The input's trailing dims equal ``normalized_shape``."""
    if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise ValueError(
            f"normalized_shape: expected the input's trailing dims to be {list(shape)}, "
            f"got input of shape {list(input.shape)}"
        )
