"""The fused operators on a backend that has no fused kernel for them: its unfused routines plus torch ops.

``normlab::add_layer_norm``, ``group_norm_silu`` and ``batch_norm_relu[_eval]`` dispatch on their
base op (``layer_norm``, ``group_norm``, ``batch_norm``, ``batch_norm_eval``), so they run on every
backend that runs it. A backend module that defines the fused function (the reference backend,
the Triton backend) is called directly; for one that does not (the CPU backend today) the
functions here compose its kernels with point-wise torch ops — correct, and still one operator
to torch.compile and export, but NOT fused: the activation/residual costs an extra pass over
the data. Each function takes the backend module first and otherwise the backend signature of
docs/CONTRACTS.md.
"""

from __future__ import annotations

from types import ModuleType

import torch
from normlab.core import reference

__all__ = ["resolve", "add_layer_norm", "add_layer_norm_backward", "group_norm_silu", "group_norm_silu_backward",
           "batch_norm_relu", "batch_norm_relu_backward", "batch_norm_relu_eval"]


def resolve(module: ModuleType, op: str):
    """``module.op`` when the backend has a fused kernel for ``op``, else the composition below."""
    fn = getattr(module, op, None)
    if fn is not None:
        return fn
    composed = globals()[op]
    return lambda *args, **kw: composed(module, *args, **kw)


def add_layer_norm(m, x, residual, normalized_ndim, weight, bias, eps, *, rms=False):
    s = x + residual
    y, mean, var, rstd = m.layer_norm(s, normalized_ndim, weight, bias, eps, rms=rms)
    return y, s, mean, var, rstd


def add_layer_norm_backward(m, dy, ds, s, weight, mean, rstd, normalized_ndim, eps, *, rms=False,
                            mask=(True, True, True)):
    dsum, dw, db = m.layer_norm_backward(dy, s, weight, mean, rstd, normalized_ndim, eps, rms=rms, mask=mask)
    if mask[0] and ds is not None:
        dsum = dsum.add_(ds)  # dsum is the backend's fresh output: no second buffer
    return dsum, dw, db


def group_norm_silu(m, x, num_groups, weight, bias, eps):
    z, mean, var, rstd = m.group_norm(x, num_groups, weight, bias, eps)
    return torch.nn.functional.silu(z), mean, var, rstd


def group_norm_silu_backward(m, dy, x, weight, bias, mean, rstd, num_groups, eps, *, mask=(True, True, True)):
    # z again from the backend's own forward kernel (one pass, its exact numerics) rather than
    # from the saved statistics in torch ops (float64 passes on the CPU), then aten's one-pass
    # silu_backward
    z = m.group_norm(x, num_groups, weight, bias, eps)[0]
    dz = torch.ops.aten.silu_backward(dy.to(z.dtype), z)
    return m.group_norm_backward(dz, x, weight, mean, rstd, num_groups, eps, mask=mask)


def batch_norm_relu(m, x, weight, bias, eps):
    z, mean, var, rstd = m.batch_norm(x, weight, bias, eps)
    return torch.relu_(z), mean, var, rstd


def batch_norm_relu_backward(m, dy, y, x, weight, mean, rstd, eps, *, mask=(True, True, True)):
    return m.batch_norm_backward(reference.relu_mask(dy, y), x, weight, mean, rstd, eps, mask=mask)


def batch_norm_relu_eval(m, x, mean, var, weight, bias, eps):
    return torch.relu_(m.batch_norm_eval(x, mean, var, weight, bias, eps))
