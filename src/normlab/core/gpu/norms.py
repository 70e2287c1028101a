"""Launching the kernels: the forward and backward of every statistics-based op of the backend.

Inputs reach the kernels in a canonical memory layout: per-channel ops (batch/group/instance
norm, channels-first layer norm) take NCHW-contiguous or NHWC (channels-last-like, including
channels_last / channels_last_3d) memory natively and produce y/dx with x's strides; anything
else is copied once with ``.contiguous()``; layer norm works on contiguous rows. Statistics and
parameter gradients come back as float32 (the operators cast them, see core/ops.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normlab.core.gpu import geometry
from normlab.core.gpu import kernels as K
from normlab.core.gpu.geometry import Geo

FINAL_BLOCK = 256  # groups per program of the finalize kernels
ROWS_MAX = 8192  # layer norm rows up to this length run the one-program-per-row kernels
ROW_PROGRAMS = 528  # programs of the rows backward (each walks row blocks; 4 per SM of an H100)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def channels_last_like(x: Tensor) -> bool:
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def canonical(x: Tensor) -> tuple[Tensor, bool]:
    """(x in NCHW or NHWC memory, is NHWC): one copy only for other strides."""
    if x.is_contiguous():
        return x, False
    if channels_last_like(x):
        return x, True
    return x.contiguous(), False


def same_layout(t: Tensor, channels_last: bool) -> Tensor:
    """t (an upstream gradient) in the memory layout chosen for x (a copy only if it differs)."""
    if channels_last:
        return t if t.movedim(1, -1).is_contiguous() else t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


def _f32(t: Tensor | None, n: int, like: Tensor, fill: float = 0.0) -> Tensor:
    if t is None or t.numel() == 0:
        return torch.full((n,), fill, dtype=torch.float32, device=like.device)
    return t.detach().reshape(-1).to(torch.float32).contiguous()


def _param(t: Tensor | None, x: Tensor) -> Tensor:
    """A parameter as a flat contiguous tensor (x as a never-read placeholder when absent)."""
    return x if t is None else t.detach().reshape(-1).contiguous()


def forward(x: Tensor, geo: Geo, weight, bias, eps: float, mode: int):
    """(y, mean, var, rstd), statistics (T,) float32; y with x's strides."""
    T, R = geo.T, geo.R
    bg, br = geo.tile()
    chunks, ch = geo.split(bg, br)
    f32 = dict(dtype=torch.float32, device=x.device)
    pm, ps, pl, pq = (torch.empty((chunks, T), **f32) for _ in range(4))
    K.stats_partial[(_cdiv(T, bg), chunks)](x, pm, ps, pl, pq, T, R, ch, *geo.addr, MODE=mode, BG=bg, BR=br)
    shift, corr, mean, var, rstd = (torch.empty(T, **f32) for _ in range(5))
    K.stats_finalize[(_cdiv(T, FINAL_BLOCK),)](pm, ps, pl, pq, shift, corr, mean, var, rstd, T, R, ch, chunks,
                                               float(eps), MODE=mode, BLOCK=FINAL_BLOCK)
    y = torch.empty_like(x)
    K.normalize[(_cdiv(T, bg), _cdiv(R, br))](x, y, shift, corr, rstd, _param(weight, x), _param(bias, x), T, R,
                                             *geo.addr, *geo.aux, HAS_W=weight is not None,
                                             HAS_B=bias is not None, BG=bg, BR=br)
    return y, mean, var, rstd


def affine(x: Tensor, geo: Geo, mean: Tensor, rstd: Tensor, weight, bias) -> Tensor:
    """y = (x − mean)·rstd·γ + β with given per-group statistics (batch norm in eval mode)."""
    T, R = geo.T, geo.R
    bg, br = geo.tile()
    y = torch.empty_like(x)
    zero = torch.zeros(T, dtype=torch.float32, device=x.device)
    K.normalize[(_cdiv(T, bg), _cdiv(R, br))](x, y, mean, zero, rstd, _param(weight, x), _param(bias, x), T, R,
                                             *geo.addr, *geo.aux, HAS_W=weight is not None,
                                             HAS_B=bias is not None, BG=bg, BR=br)
    return y


def backward(dy: Tensor, x: Tensor, stat: Geo, param: Geo, weight, mean: Tensor, rstd: Tensor, mode: int,
             mask, *, given_stats: bool = False):
    """(dx, dγ, dβ) (None where not in ``mask``; dγ None without γ); ``mean``/``rstd`` float32
    (T,). ``given_stats``: the statistics are constants (eval-mode batch norm): dx = γ·rstd·dy."""
    T, R = stat.T, stat.R
    f32 = dict(dtype=torch.float32, device=x.device)
    w = _param(weight, x)
    has_w = weight is not None
    want_dw, want_db = bool(mask[1]) and has_w, bool(mask[2])
    if not (mask[0] or want_dw or want_db):
        return None, None, None
    bg, br = stat.tile()
    corr, ca, cb = (torch.zeros(T, **f32) for _ in range(3))
    if not given_stats:
        chunks, ch = stat.split(bg, br)
        pd, pg, pgd = (torch.empty((chunks, T), **f32) for _ in range(3))
        K.backward_partial[(_cdiv(T, bg), chunks)](x, dy, mean, w, pd, pg, pgd, T, R, ch, *stat.addr, *stat.aux,
                                                   HAS_W=has_w, BG=bg, BR=br)
        K.backward_finalize[(_cdiv(T, FINAL_BLOCK),)](pd, pg, pgd, rstd, corr, ca, cb, T, R, chunks,
                                                      MODE=mode, BLOCK=FINAL_BLOCK)
    dx = None
    if mask[0]:
        dx = torch.empty_like(x)
        K.input_grad[(_cdiv(T, bg), _cdiv(R, br))](x, dy, dx, mean, corr, rstd, ca, cb, w, T, R, *stat.addr,
                                                  *stat.aux, HAS_W=has_w, BG=bg, BR=br)
    dw = db = None
    if want_dw or want_db:
        P = param.T
        pbg, pbr = param.tile()
        chunks, ch = param.split(pbg, pbr)
        pw, pb = (torch.empty((chunks, P), **f32) for _ in range(2))
        K.param_partial[(_cdiv(P, pbg), chunks)](x, dy, mean, corr, rstd, pw, pb, P, param.R, ch, *param.addr,
                                                 *param.aux, BG=pbg, BR=pbr)
        outs = []
        for part, want in ((pw, want_dw), (pb, want_db)):
            out = None
            if want:
                out = torch.empty(P, **f32)
                K.sum_partials[(_cdiv(P, FINAL_BLOCK),)](part, out, P, chunks, BLOCK=FINAL_BLOCK)
            outs.append(out)
        dw, db = outs
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# the ops (shapes as docs/CONTRACTS.md)
# --------------------------------------------------------------------------------------------


def _ncs(x: Tensor) -> tuple[int, int, int]:
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])


def batch_norm(x, weight, bias, eps, *, center_only=False):
    x, cl = canonical(x)
    n, c, s = _ncs(x)
    stat, _ = geometry.batch_norm(n, c, s, cl)
    y, mean, var, rstd = forward(x, stat, weight, bias, eps, K.CENTER if center_only else K.STANDARD)
    return y, mean, (None if center_only else var), (None if center_only else rstd)


def batch_norm_backward(dy, x, weight, mean, rstd, eps, *, center_only=False, mask=(True, True, True)):
    x, cl = canonical(x)
    n, c, s = _ncs(x)
    stat, param = geometry.batch_norm(n, c, s, cl)
    rstd = _f32(None if center_only else rstd, c, x, 1.0)
    return backward(same_layout(dy, cl), x, stat, param, weight, _f32(mean, c, x), rstd,
                    K.CENTER if center_only else K.STANDARD, mask)


def _eval_stats(x, mean, var, eps, center_only):
    c = x.shape[1]
    m = _f32(mean, c, x)
    rstd = _f32(None, c, x, 1.0) if center_only else torch.rsqrt(_f32(var, c, x) + eps)
    return m, rstd


def batch_norm_eval(x, mean, var, weight, bias, eps, *, center_only=False):
    x, cl = canonical(x)
    n, c, s = _ncs(x)
    stat, _ = geometry.batch_norm(n, c, s, cl)
    m, rstd = _eval_stats(x, mean, var, eps, center_only)
    return affine(x, stat, m, rstd, None if center_only else weight, bias)


def batch_norm_eval_backward(dy, x, mean, var, weight, eps, *, center_only=False, mask=(True, True, True)):
    x, cl = canonical(x)
    n, c, s = _ncs(x)
    stat, param = geometry.batch_norm(n, c, s, cl)
    m, rstd = _eval_stats(x, mean, var, eps, center_only)
    return backward(same_layout(dy, cl), x, stat, param, None if center_only else weight, m, rstd,
                    K.STANDARD, mask, given_stats=True)


def group_norm(x, num_groups, weight, bias, eps):
    x, cl = canonical(x)
    n, c, s = _ncs(x)
    stat, _ = geometry.group_norm(n, c, s, num_groups, cl)
    y, mean, var, rstd = forward(x, stat, weight, bias, eps, K.STANDARD)
    shape = (n, num_groups)
    return y, mean.view(shape), var.view(shape), rstd.view(shape)


def group_norm_backward(dy, x, weight, mean, rstd, num_groups, eps, *, mask=(True, True, True)):
    x, cl = canonical(x)
    n, c, s = _ncs(x)
    stat, param = geometry.group_norm(n, c, s, num_groups, cl)
    t = n * num_groups
    return backward(same_layout(dy, cl), x, stat, param, weight, _f32(mean, t, x), _f32(rstd, t, x, 1.0),
                    K.STANDARD, mask)


def _rows_of(x: Tensor, k: int) -> tuple[Tensor, int, int]:
    cols = math.prod(x.shape[x.dim() - k:])
    xr = x.contiguous()
    return xr, xr.numel() // cols, cols


def _row_tile(cols: int) -> tuple[int, int, int]:
    """(rows per program, block ≥ cols, warps) of the whole-row kernels."""
    bk = geometry._pow2(cols)
    return max(1, geometry.TILE // bk), bk, (4 if bk <= 2048 else 8 if bk <= 8192 else 16)


def _rows_forward(xr, rows_, cols, weight, bias, eps, mode):
    bg, bk, warps = _row_tile(cols)
    y = torch.empty_like(xr)
    mean, var, rstd = (torch.empty(rows_, dtype=torch.float32, device=xr.device) for _ in range(3))
    K.rows_forward[(_cdiv(rows_, bg),)](xr, y, _param(weight, xr), _param(bias, xr), mean, var, rstd, rows_, cols,
                                        float(eps), MODE=mode, HAS_W=weight is not None, HAS_B=bias is not None,
                                        BG=bg, BK=bk, num_warps=warps)
    return y, mean, var, rstd


def _rows_backward(dy, xr, rows_, cols, weight, mean, rstd, mode, mask):
    bg, bk, warps = _row_tile(cols)
    want_dw, want_db = bool(mask[1]) and weight is not None, bool(mask[2])
    need_p = want_dw or want_db
    progs = max(1, min(_cdiv(rows_, bg), ROW_PROGRAMS))
    f32 = dict(dtype=torch.float32, device=xr.device)
    dx = torch.empty_like(xr) if mask[0] else xr
    pw, pb = ((torch.empty((progs, cols), **f32) for _ in range(2)) if need_p else (xr, xr))
    K.rows_backward[(progs,)](xr, dy, dx, _param(weight, xr), mean, rstd, pw, pb, rows_, cols, MODE=mode,
                              HAS_W=weight is not None, NEED_DX=bool(mask[0]), NEED_P=need_p, BG=bg, BK=bk,
                              num_warps=warps)
    outs = []
    for part, want in ((pw, want_dw), (pb, want_db)):
        out = None
        if want:
            out = torch.empty(cols, **f32)
            K.sum_partials[(_cdiv(cols, FINAL_BLOCK),)](part, out, cols, progs, BLOCK=FINAL_BLOCK)
        outs.append(out)
    return (dx if mask[0] else None), outs[0], outs[1]


def layer_norm(x, normalized_ndim, weight, bias, eps, *, rms=False):
    xr, rows_, cols = _rows_of(x, normalized_ndim)
    mode = K.RMS if rms else K.STANDARD
    if cols <= ROWS_MAX:
        y, mean, var, rstd = _rows_forward(xr, rows_, cols, weight, bias, eps, mode)
    else:
        y, mean, var, rstd = forward(xr, geometry.rows(rows_, cols)[0], weight, bias, eps, mode)
    lead = tuple(x.shape[: x.dim() - normalized_ndim])
    return y, (None if rms else mean.view(lead)), var.view(lead), rstd.view(lead)


def layer_norm_backward(dy, x, weight, mean, rstd, normalized_ndim, eps, *, rms=False, mask=(True, True, True)):
    xr, rows_, cols = _rows_of(x, normalized_ndim)
    stat, param = geometry.rows(rows_, cols)
    mean = _f32(None if rms else mean, rows_, xr)
    mode = K.RMS if rms else K.STANDARD
    if cols <= ROWS_MAX:
        return _rows_backward(dy.contiguous(), xr, rows_, cols, weight, mean, _f32(rstd, rows_, xr, 1.0), mode, mask)
    return backward(dy.contiguous(), xr, stat, param, weight, mean, _f32(rstd, rows_, xr, 1.0), mode, mask)


def layer_norm_channels(x, weight, bias, eps):
    if x.dim() == 2 or channels_last_like(x):  # C innermost: a row layer norm of x.movedim(1, -1)
        y, mean, var, rstd = layer_norm(x.movedim(1, -1), 1, weight, bias, eps)
        return y.movedim(-1, 1), mean, var, rstd
    x = x.contiguous()
    n, c, s = _ncs(x)
    stat, _ = geometry.channels_first(n, c, s)
    y, mean, var, rstd = forward(x, stat, weight, bias, eps, K.STANDARD)
    lead = (n,) + tuple(x.shape[2:])
    return y, mean.view(lead), var.view(lead), rstd.view(lead)


def layer_norm_channels_backward(dy, x, weight, mean, rstd, eps, *, mask=(True, True, True)):
    if x.dim() == 2 or channels_last_like(x):
        dx, dw, db = layer_norm_backward(dy.movedim(1, -1), x.movedim(1, -1), weight, mean, rstd, 1, eps, mask=mask)
        return (None if dx is None else dx.movedim(-1, 1)), dw, db
    x = x.contiguous()
    n, c, s = _ncs(x)
    stat, param = geometry.channels_first(n, c, s)
    t = n * s
    return backward(dy.contiguous(), x, stat, param, weight, _f32(mean, t, x), _f32(rstd, t, x, 1.0),
                    K.STANDARD, mask)
