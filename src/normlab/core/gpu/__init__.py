"""GPU backend: Triton kernels for the normlab operators (the optional extra ``normlab[gpu]``).

Ops: ``batch_norm`` (training, also mean-only), ``batch_norm_eval`` (+ its fused backward),
``group_norm`` (instance norm is G = C), ``layer_norm`` (also RMSNorm), ``layer_norm_channels``;
each forward returns the statistics of docs/CONTRACTS.md and each backward dx, dγ, dβ together.
The point-wise ``dynamic_tanh`` / ``dynamic_erf`` (DyT, Derf) have a forward kernel and a one-pass
backward; ``filter_response_norm`` (+ TLU) is instance norm's geometry in RMS mode (``frn``).

Support (``supports(op, x)``): CUDA tensors of dtype float32, bfloat16 or float16 with at least
one element (and at least 2 dims for the per-channel ops). Under the Triton interpreter
(``TRITON_INTERPRET=1``) the kernels also run on CPU tensors, but only when this backend is asked
for by name (``normlab.use_backend("gpu")`` or a layer's ``backend="gpu"``), so the CPU default
path never changes while tests drive the whole operator stack through the kernels.

Triton is imported lazily: importing this module only checks that triton is installed (an
ImportError otherwise: dispatch then treats the backend as missing), and the kernels are
compiled when a CUDA (or, interpreted, CPU) tensor first reaches them. Importing normlab, or
running it on CPU tensors, never imports triton.

Layout: the per-channel ops run NCHW and NHWC (channels_last, channels_last_3d, any tensor
whose ``x.movedim(1, -1)`` is contiguous) natively; other strides are copied once. Numerics,
kernel structure and the two-stage deterministic reductions: see ``kernels`` and ``geometry``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch
from torch import Tensor

from normlab.core import dispatch

if importlib.util.find_spec("triton") is None:  # pragma: no cover - depends on the environment
    raise ImportError("normlab.core.gpu needs triton: pip install 'normlab[gpu]'")

__all__ = [
    "OPS",
    "DTYPES",
    "supports",
    "wait_ready",
    "interpreted",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_eval_backward",
    "group_norm",
    "group_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "layer_norm_channels",
    "layer_norm_channels_backward",
    "dynamic_tanh",
    "dynamic_tanh_backward",
    "dynamic_erf",
    "dynamic_erf_backward",
    "filter_response_norm",
    "filter_response_norm_backward",
]

OPS = ("batch_norm", "batch_norm_eval", "group_norm", "layer_norm", "layer_norm_channels", "dynamic_tanh",
       "dynamic_erf", "filter_response_norm")
_ANY_RANK = ("layer_norm", "dynamic_tanh", "dynamic_erf")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NAME = "gpu"  # this backend's name in dispatch's registry


def interpreted() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``: CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _takes(op: str, x) -> bool:
    if op not in OPS or not isinstance(x, Tensor) or x.layout != torch.strided:
        return False
    if x.dtype not in DTYPES or x.numel() == 0 or x.is_conj() or x.is_neg():
        return False
    return x.dim() >= 1 if op in _ANY_RANK else x.dim() >= 2


def supports(op: str, x: Tensor) -> bool:
    """CUDA tensors the kernels take; CPU tensors too under the interpreter when forced."""
    if getattr(x, "is_cuda", False):
        return _takes(op, x)
    # (the CPU default path pays one attribute lookup here: nothing else is evaluated)
    return dispatch.current_backend() == NAME and x.device.type == "cpu" and interpreted() and _takes(op, x)


def wait_ready(op: str, x: Tensor) -> bool:
    """Asked for by name (use_backend or a layer's backend=): as supports, CPU tensors included
    under the interpreter. (Triton compiles on first launch; there is nothing to wait for.)"""
    return _takes(op, x) and (x.is_cuda or (x.device.type == "cpu" and interpreted()))


def _on_device(arg: int):
    """Run the wrapped op with x's CUDA device current: Triton launches on the current device,
    and a tensor on cuda:1 must not be read by a kernel launched on cuda:0."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            x = args[arg]
            guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
            with guard:
                return fn(*args, **kwargs)

        return run

    return wrap


def _norms():
    from normlab.core.gpu import norms  # imports triton: only once a tensor reaches a kernel

    return norms


@_on_device(0)
def batch_norm(x, weight, bias, eps, *, center_only=False):
    """Training batch norm: (y, mean, var, rstd), float32 statistics (C,); var/rstd None mean-only."""
    return _norms().batch_norm(x, weight, bias, eps, center_only=center_only)


@_on_device(1)
def batch_norm_backward(dy, x, weight, mean, rstd, eps, *, center_only=False, mask=(True, True, True)):
    """(dx, dγ, dβ) of training batch norm (None where not in ``mask``)."""
    return _norms().batch_norm_backward(dy, x, weight, mean, rstd, eps, center_only=center_only, mask=mask)


@_on_device(0)
def batch_norm_eval(x, mean, var, weight, bias, eps, *, center_only=False):
    """y = (x − μ)·rsqrt(σ² + ε)·γ + β with given (running) statistics (mean-only: y = x − μ + β)."""
    return _norms().batch_norm_eval(x, mean, var, weight, bias, eps, center_only=center_only)


@_on_device(1)
def batch_norm_eval_backward(dy, x, mean, var, weight, eps, *, center_only=False, mask=(True, True, True)):
    """(dx, dγ, dβ) with constant statistics: dx = γ·rstd·dy, dγ = Σ dy·x̂, dβ = Σ dy."""
    return _norms().batch_norm_eval_backward(dy, x, mean, var, weight, eps, center_only=center_only, mask=mask)


@_on_device(0)
def group_norm(x, num_groups, weight, bias, eps):
    """Group norm (instance norm: G = C): (y, mean, var, rstd), float32 statistics (N, G)."""
    return _norms().group_norm(x, num_groups, weight, bias, eps)


@_on_device(1)
def group_norm_backward(dy, x, weight, mean, rstd, num_groups, eps, *, mask=(True, True, True)):
    """(dx, dγ, dβ) of group norm."""
    return _norms().group_norm_backward(dy, x, weight, mean, rstd, num_groups, eps, mask=mask)


@_on_device(0)
def layer_norm(x, normalized_ndim, weight, bias, eps, *, rms=False):
    """Layer norm (RMS norm: mean None) over the trailing dims: float32 statistics of the lead dims."""
    return _norms().layer_norm(x, normalized_ndim, weight, bias, eps, rms=rms)


@_on_device(1)
def layer_norm_backward(dy, x, weight, mean, rstd, normalized_ndim, eps, *, rms=False, mask=(True, True, True)):
    """(dx, dγ, dβ) of layer norm / RMS norm."""
    return _norms().layer_norm_backward(dy, x, weight, mean, rstd, normalized_ndim, eps, rms=rms, mask=mask)


@_on_device(0)
def layer_norm_channels(x, weight, bias, eps):
    """Channels-first layer norm of (N, C, *): statistics over C, float32 (N, *S)."""
    return _norms().layer_norm_channels(x, weight, bias, eps)


@_on_device(1)
def layer_norm_channels_backward(dy, x, weight, mean, rstd, eps, *, mask=(True, True, True)):
    """(dx, dγ, dβ) of channels-first layer norm."""
    return _norms().layer_norm_channels_backward(dy, x, weight, mean, rstd, eps, mask=mask)


def _pointwise():
    from normlab.core.gpu import pointwise

    return pointwise


@_on_device(0)
def dynamic_tanh(x, alpha, weight, bias, *, channels_last=True):
    """y = γ·tanh(α·x) + β."""
    return _pointwise().forward(x, alpha, None, weight, bias, channels_last)


@_on_device(1)
def dynamic_tanh_backward(dy, x, alpha, weight, bias, *, channels_last=True, mask=(True,) * 4):
    """(dx, dα, dγ, dβ) of :func:`dynamic_tanh` (``bias`` only gives dβ's shape)."""
    dx, da, _, dw, db = _pointwise().backward(dy, x, alpha, None, weight, bias, channels_last,
                                              (mask[0], mask[1], False, mask[2], mask[3]))
    return dx, da, dw, db


@_on_device(0)
def dynamic_erf(x, alpha, shift, weight, bias, *, channels_last=True):
    """y = γ·erf(α·x + s) + β."""
    return _pointwise().forward(x, alpha, shift, weight, bias, channels_last)


@_on_device(1)
def dynamic_erf_backward(dy, x, alpha, shift, weight, bias, *, channels_last=True, mask=(True,) * 5):
    """(dx, dα, ds, dγ, dβ) of :func:`dynamic_erf`."""
    return _pointwise().backward(dy, x, alpha, shift, weight, bias, channels_last, tuple(mask))


def _frn():
    from normlab.core.gpu import frn

    return frn


@_on_device(0)
def filter_response_norm(x, weight, bias, tau, eps):
    """(y, rstd): y = max(γ·x·rstd + β, τ), rstd = 1/sqrt(mean over positions of x² + ε), (N, C)."""
    return _frn().forward(x, weight, bias, tau, eps)


@_on_device(1)
def filter_response_norm_backward(dy, x, weight, bias, tau, rstd, eps, *, mask=(True,) * 4):
    """(dx, dγ, dβ, dτ) of :func:`filter_response_norm`."""
    return _frn().backward(dy, x, weight, bias, tau, rstd, eps, tuple(mask))


# ---------------------------------------------------------------------- fused variants (fused.py)
# Signatures: docs/CONTRACTS.md "Fused variants"; ops.py dispatches them on their base op
# (layer_norm, group_norm, batch_norm, batch_norm_eval), so `supports` needs no entry for them.


def _fused():
    from normlab.core.gpu import fused  # imports triton: only once a tensor reaches a kernel

    return fused


@_on_device(0)
def add_layer_norm(x, residual, normalized_ndim, weight, bias, eps, *, rms=False):
    """s = x + residual and y = LN/RMS(s) in one pass: (y, s, mean, var, rstd)."""
    return _fused().add_layer_norm(x, residual, normalized_ndim, weight, bias, eps, rms=rms)


@_on_device(2)
def add_layer_norm_backward(dy, ds, s, weight, mean, rstd, normalized_ndim, eps, *, rms=False,
                            mask=(True, True, True)):
    """(dsum, dγ, dβ): dsum = ∂L/∂s through y plus ds, the gradient of x and of the residual."""
    return _fused().add_layer_norm_backward(dy, ds, s, weight, mean, rstd, normalized_ndim, eps, rms=rms,
                                            mask=mask)


@_on_device(0)
def group_norm_silu(x, num_groups, weight, bias, eps):
    """y = silu(GN(x)): (y, mean, var, rstd), float32 statistics (N, G)."""
    return _fused().group_norm_silu(x, num_groups, weight, bias, eps)


@_on_device(1)
def group_norm_silu_backward(dy, x, weight, bias, mean, rstd, num_groups, eps, *, mask=(True, True, True)):
    """(dx, dγ, dβ) of silu(GN(x)) (β is needed to recompute the pre-activation)."""
    return _fused().group_norm_silu_backward(dy, x, weight, bias, mean, rstd, num_groups, eps, mask=mask)


@_on_device(0)
def batch_norm_relu(x, weight, bias, eps):
    """y = relu(BN(x)) in training: (y, mean, var, rstd), float32 statistics (C,)."""
    return _fused().batch_norm_relu(x, weight, bias, eps)


@_on_device(2)
def batch_norm_relu_backward(dy, y, x, weight, mean, rstd, eps, *, mask=(True, True, True)):
    """(dx, dγ, dβ) of relu(BN(x)); the ReLU mask comes from the saved output y."""
    return _fused().batch_norm_relu_backward(dy, y, x, weight, mean, rstd, eps, mask=mask)


@_on_device(0)
def batch_norm_relu_eval(x, mean, var, weight, bias, eps):
    """y = relu(BN(x)) with given (running) statistics."""
    return _fused().batch_norm_relu_eval(x, mean, var, weight, bias, eps)


__all__ += ["add_layer_norm", "add_layer_norm_backward", "group_norm_silu", "group_norm_silu_backward",
            "batch_norm_relu", "batch_norm_relu_backward", "batch_norm_relu_eval"]
