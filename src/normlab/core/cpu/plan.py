"""Plans: how one op call maps onto a kernel family, built once per (op, shape, strides, options).

A plan knows the 2-D physical array its kernels take (``shape2``: x's memory as a C-contiguous
matrix), the affine parameter count, the shape of the statistics and whether x needs one
``.contiguous()`` copy first; its family subclass (``rows.RowsPlan``, ``planes.PlanesPlan``,
``channels_last.ChannelsLastPlan``) launches that family's forward and backward kernels.
:meth:`Plan.forward` and :meth:`Plan.backward` do the marshalling every family shares: physical
views of x and dy, output buffers laid out like x, γ/β views, statistic and dγ/dβ buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from normlab.core.cpu.params import NP_DTYPE, f64, grad_buffer, param
from normlab.core.cpu.pool import POOL_MIN_BYTES, pool
from normlab.core.cpu.threads import threads

__all__ = ["Plan", "cached", "is_channels_last", "view"]


def view(a: np.ndarray, shape) -> np.ndarray:
    """Reshape without copying (raises instead of silently copying an output buffer)."""
    v = a.view()
    v.shape = shape
    return v


def is_channels_last(x: Tensor) -> bool:
    """(N, C, *S) stored with channels innermost (and not plainly contiguous)."""
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


@dataclass(frozen=True)
class Plan:
    """The parts of a kernel plan every family shares (see the module docstring)."""

    shape2: tuple[int, int]  # the 2-D array the kernels take
    eps: float
    pcount: int  # number of affine parameters (γ/β length)
    stat_shape: tuple[int, ...]
    copy: bool = False  # x is neither contiguous nor channels-last: one .contiguous() copy
    channels_last: bool = False  # y/dx are channels-last views of the physical buffer
    train: bool = True  # statistics computed from x (else given: eval batch norm)

    @property
    def has_mean(self) -> bool:
        """The statistics include a mean (not RMS)."""
        return True

    # ---- the family's kernels -------------------------------------------------------------
    def fwd(self, xa, w, b, nt, ya, mean, var, rstd) -> None:
        """Launch the forward kernel: ya from xa; train: mean/var (flat float64) written."""
        raise NotImplementedError

    def bwd(self, xa, dya, w, mean, rstd, nt, dxa, dw, db) -> None:
        """Launch the backward kernel: dxa, and the float64 totals of dγ/dβ stored into dw/db."""
        raise NotImplementedError

    # ---- memory ----------------------------------------------------------------------------
    def to_phys(self, t: Tensor) -> np.ndarray:
        """x-shaped tensor -> its C-contiguous physical array, 2-D (no copy when laid out as x)."""
        if t.requires_grad:
            t = t.detach()
        if self.channels_last:
            t = t.movedim(1, -1)
        if not t.is_contiguous():
            t = t.contiguous()
        return t.numpy().reshape(self.shape2)

    def out(self, like: Tensor) -> tuple[np.ndarray, Tensor]:
        """(physical numpy array, tensor shaped and laid out like ``like``) sharing memory.

        The tensor is a base tensor, never a view: an operator must not return a view
        (in-place ops on it, e.g. ReLU(inplace=True), would be rejected by autograd). Small
        outputs are numpy allocations handed to torch (cheaper than torch.empty_strided plus
        .numpy()); large ones come from the buffer pool.
        """
        shape = tuple(like.shape)
        npd = NP_DTYPE[like.dtype]
        if self.channels_last:
            phys_nd = (shape[0],) + shape[2:] + (shape[1],)
            if like.numel() * like.element_size() < POOL_MIN_BYTES or pool.max_bytes <= 0:
                buf = np.empty(phys_nd, npd)
                perm = (0, len(shape) - 1) + tuple(range(1, len(shape) - 1))
                return buf.reshape(self.shape2), torch.from_numpy(buf.transpose(perm))
            st = [1] * len(phys_nd)
            for i in range(len(phys_nd) - 2, -1, -1):
                st[i] = st[i + 1] * phys_nd[i + 1]
            strides = (st[0], 1) + tuple(st[1:-1])
            t = pool.empty(shape, strides, like.dtype)
            return view(t.movedim(1, -1).numpy(), self.shape2), t
        if like.numel() * like.element_size() < POOL_MIN_BYTES or pool.max_bytes <= 0:
            buf = np.empty(shape, npd)
            return buf.reshape(self.shape2), torch.from_numpy(buf)
        st = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            st[i] = st[i + 1] * shape[i + 1]
        t = pool.empty(shape, tuple(st), like.dtype)
        return view(t.numpy(), self.shape2), t

    # ---- calls -----------------------------------------------------------------------------
    def forward(self, x: Tensor, weight, bias, mean_in=None, var_in=None):
        """y, mean64, var64, rstd64 (flat numpy float64 statistics of stat_shape's size)."""
        nt = threads(x.numel())
        xa = self.to_phys(x)
        ya, y = self.out(x)
        w = param(weight, self.pcount, x.dtype, 1.0)
        b = param(bias, self.pcount, x.dtype, 0.0)
        nstat = math.prod(self.stat_shape)
        if self.train:
            mean, var = np.empty(nstat), np.empty(nstat)
        else:
            mean = f64(mean_in)
            var = np.zeros(nstat) if var_in is None else f64(var_in)
        rstd = np.empty(nstat)
        self.fwd(xa, w, b, nt, ya, mean, var, rstd)
        return y, mean, var, rstd

    def backward(self, x: Tensor, dy: Tensor, weight, bias_meta, mean: np.ndarray,
                 rstd: np.ndarray, need_w: bool, need_b: bool):
        """dx, dγ, dβ as tensors (dγ/dβ None when not needed)."""
        nt = threads(x.numel())
        xa = self.to_phys(x)
        dya = self.to_phys(dy if dy.dtype == x.dtype else dy.to(x.dtype))
        dxa, dx = self.out(x)
        w = param(weight, self.pcount, x.dtype, 1.0)
        dw, gw = grad_buffer(None if weight is None else weight.shape,
                             None if weight is None else weight.dtype, need_w, self.pcount, x.dtype)
        db, gb = grad_buffer(*(bias_meta or (None, None)), need_b, self.pcount, x.dtype)
        self.bwd(xa, dya, w, mean, rstd, nt, dxa, dw, db)
        if need_w and gw is None:  # a parameter dtype the kernels do not write
            gw = torch.from_numpy(dw).reshape(weight.shape).to(weight.dtype)
        if need_b and gb is None:
            gb = torch.from_numpy(db).reshape(bias_meta[0]).to(bias_meta[1])
        return dx, gw, gb


_PLANS: dict[tuple, Plan] = {}


def cached(key: tuple, build) -> Plan:
    """The plan for ``key``, built by ``build()`` on first use (the cache is bounded)."""
    plan = _PLANS.get(key)
    if plan is None:
        plan = build()
        if len(_PLANS) >= 1024:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan
