"""Marshalling between torch and the kernels: γ/β as numpy arrays, dγ/dβ buffers, statistics.

Kernels take numpy arrays in x's dtype (float32 or float64; one compiled signature per dtype).
Making a numpy view of a tensor costs a few µs per call (detach + numpy), as much as a small
kernel, so the views of parameters are cached (see ``param``).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import Tensor

__all__ = ["NP_DTYPE", "param", "held_view", "grad_buffer", "f64"]

# The dtypes the kernels are compiled for.
NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}

_CONSTS: dict[tuple[int, np.dtype, float], np.ndarray] = {}


def _const(n: int, npd, value: float) -> np.ndarray:
    key = (n, np.dtype(npd), value)
    a = _CONSTS.get(key)
    if a is None:
        a = np.full(n, value, npd)  # kernels never write parameters
        if len(_CONSTS) > 256:
            _CONSTS.clear()
        _CONSTS[key] = a
    return a


# Numpy views of long-lived tensors (parameters, running-statistic buffers), keyed by the tensor
# object: a view shares the tensor's memory, so in-place updates (optimizer steps) show through; a
# new storage (``p.data = ...``) changes the data pointer and refreshes the entry; a dead tensor's
# entry goes with it.
_VIEWS: dict[int, tuple] = {}


def held_view(t: Tensor) -> np.ndarray:
    """The flat numpy view of a contiguous CPU tensor in a kernel dtype, cached per tensor."""
    entry = _VIEWS.get(id(t))
    if entry is not None and entry[0]() is t and entry[1] == t.data_ptr():
        return entry[2]
    arr = t.detach().numpy().reshape(-1)
    if len(_VIEWS) > 4096:
        _VIEWS.clear()
    key = id(t)
    _VIEWS[key] = (weakref.ref(t, lambda _, k=key: _VIEWS.pop(k, None)), t.data_ptr(), arr)
    return arr


def param(t: Tensor | None, n: int, dtype: torch.dtype, default: float) -> np.ndarray:
    """γ or β as a flat numpy array in x's dtype (constant ones/zeros when None)."""
    if t is None:
        return _const(n, NP_DTYPE[dtype], default)
    if isinstance(t, torch.nn.Parameter) and t.dtype == dtype and t.is_contiguous():
        return held_view(t)
    a = t.detach()
    if a.dtype != dtype:
        a = a.to(dtype)
    return a.contiguous().numpy().reshape(-1)


def grad_buffer(shape, dtype: torch.dtype, need: bool, n: int, x_dtype: torch.dtype):
    """Output array the backward kernel writes dγ (or dβ) into, and the tensor it backs.

    The kernels accumulate in float64 and store the total once, straight into the
    parameter's tensor when its dtype is x's (one compiled signature per x dtype); otherwise
    into a throwaway array in x's dtype (converted afterwards when needed).
    """
    if need and dtype == x_dtype:
        a = np.empty(n, NP_DTYPE[x_dtype])
        return a, torch.from_numpy(a.reshape(shape))
    return np.empty(n, NP_DTYPE[x_dtype]), None


def f64(t: Tensor) -> np.ndarray:
    """A statistic as a flat float64 numpy array (no copy for the float64 ones the ops return)."""
    if t.dtype == torch.float64 and not t.requires_grad and t.is_contiguous():
        return t.numpy().reshape(-1)
    return t.detach().to(torch.float64).contiguous().reshape(-1).numpy()
