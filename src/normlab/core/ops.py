"""The ``normlab::`` operators: one ``torch.library`` operator per normalization, for every backend.

Operators (``torch.ops.normlab.*``; outputs in brackets are statistics, shapes given per op)::

    batch_norm(x, weight?, bias?, eps, center_only, backend)        -> (y, [mean, var, rstd])  (C,)
    batch_norm_backward(dy, x, weight?, mean, rstd, eps, center_only, backend, mask) -> (dx, dγ, dβ)
    batch_norm_eval(x, mean, var?, weight?, bias?, eps, center_only, backend)         -> y
    ghost_batch_norm(x, weight?, bias?, virtual_batch_size, eps, backend) -> (y, [mean, var, rstd]) (N / g, C)
    ghost_batch_norm_backward(dy, x, weight?, mean, rstd, virtual_batch_size, eps, backend, mask) -> (dx, dγ, dβ)
    group_norm(x, weight?, bias?, num_groups, eps, backend)         -> (y, [mean, var, rstd])  (N, G)
    group_norm_backward(dy, x, weight?, mean, rstd, num_groups, eps, backend, mask)  -> (dx, dγ, dβ)
    layer_norm(x, weight?, bias?, normalized_ndim, eps, rms, backend) -> (y, [mean, var, rstd]) lead dims
    layer_norm_backward(dy, x, weight?, mean, rstd, normalized_ndim, eps, rms, backend, mask) -> (dx, dγ, dβ)
    layer_norm_channels(x, weight?, bias?, eps, backend)            -> (y, [mean, var, rstd])  (N, *S)
    layer_norm_channels_backward(dy, x, weight?, mean, rstd, eps, backend, mask)      -> (dx, dγ, dβ)

Fused variants (issue 13 §1; section "fused variants" below)::

    add_layer_norm(x, residual, weight?, bias?, normalized_ndim, eps, rms, backend)
                                                      -> (y, s, [mean, var, rstd])  lead dims
    add_layer_norm_backward(dy, ds?, s, weight?, mean, rstd, normalized_ndim, eps, rms, backend, mask)
                                                      -> (dsum, dγ, dβ)
    group_norm_silu(x, weight?, bias?, num_groups, eps, backend) -> (y, [mean, var, rstd])  (N, G)
    group_norm_silu_backward(dy, x, weight?, bias?, mean, rstd, num_groups, eps, backend, mask)
                                                      -> (dx, dγ, dβ)
    batch_norm_relu(x, weight?, bias?, eps, backend)  -> (y, [mean, var, rstd])  (C,)
    batch_norm_relu_backward(dy, y, x, weight?, mean, rstd, eps, backend, mask)    -> (dx, dγ, dβ)
    batch_norm_relu_eval(x, mean, var, weight?, bias?, eps, backend)              -> y

s = x + residual (returned: the next block's residual), y = LN/RMS(s); dsum = ∂L/∂s through y
plus ds is the gradient of both x and residual. y = silu(GN(x)) and y = relu(BN(x)) apply the
activation before the one rounding to x's dtype; relu's gradient comes from the saved y (0 where
y ≤ 0, as torch's threshold_backward). They dispatch on their base op and call the backend's
fused function, or :mod:`normlab.core.composed` where the backend has none (the CPU backend).

Each operator has a real implementation that picks a backend (:mod:`normlab.core.dispatch`: the
fused CPU kernels where they apply, the pure-torch reference elsewhere), a fake implementation
(shapes, dtypes and strides exactly as the real one, so FakeTensor, meta tensors, torch.compile and
torch.export see through it), and the forward operators have autograd registered whose backward
is the backward operator. With ``create_graph=True`` the backward differentiates the reference
composite instead, so gradients of gradients work.

Conventions every implementation follows (the fake one states them):

* y and dx have x's dtype and a canonical layout: channels-last-like (N, C, *) inputs give
  channels-last outputs for batch/group norm, 4-D/5-D ``channels_last`` inputs give
  ``channels_last`` outputs for layer norm, everything else is contiguous;
* statistics are float64 for float64 inputs and for float32 on the CPU (the fused kernels
  accumulate in float64), float32 otherwise; a statistic an op does not have (the variance of
  mean-only batch norm, the mean of RMS norm) is an empty tensor;
* the statistics of an empty input are zeros;
* ``mask`` says which of (dx, dγ, dβ) are wanted; the others come back empty.

:func:`call` is the entry the functional API uses: in eager mode it runs the same implementation
and autograd formula through a plain ``autograd.Function`` (the dispatcher's round trip costs
more than a small normalization), under torch.compile it calls the operator.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from normlab.core import composed, dispatch, reference

__all__ = ["stat_dtype", "batch_norm", "batch_norm_eval", "group_norm", "layer_norm", "layer_norm_channels",
           "dynamic_tanh", "dynamic_erf", "filter_response_norm", "add_layer_norm", "group_norm_silu",
           "batch_norm_relu", "batch_norm_relu_eval"]

stat_dtype = reference.stat_dtype


# ---------------------------------------------------------------------------------- layouts


def _channels_last_like(x: Tensor) -> bool:
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _row_format(x: Tensor):
    for fmt, nd in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == nd and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def _empty_out(x: Tensor, per_channel: bool) -> Tensor:
    """An uninitialised tensor shaped like x in the canonical output layout."""
    if per_channel and _channels_last_like(x):
        return torch.empty_like(x.movedim(1, -1), memory_format=torch.contiguous_format).movedim(-1, 1)
    return torch.empty_like(x, memory_format=_row_format(x) if not per_channel else torch.contiguous_format)


def _canonical(y: Tensor, x: Tensor, per_channel: bool) -> Tensor:
    """y in the canonical layout (no copy when it already is)."""
    if per_channel and _channels_last_like(x):
        ok = y.movedim(1, -1).is_contiguous()
    elif per_channel:
        ok = y.is_contiguous()
    else:
        ok = y.is_contiguous(memory_format=_row_format(x))
    return y if ok else _empty_out(x, per_channel).copy_(y)


def _stats(x: Tensor, *stats) -> tuple:
    """The returned statistics in stat_dtype(x) (backends give the op's shapes); missing: empty.

    Statistics of an empty reduction (batch norm of a 0-sample batch, group norm of 0 positions)
    are defined as 0 (torch returns uninitialised memory): deterministic, so eager and compiled
    runs agree (opcheck compares them without equal_nan); nothing consumes them.
    """
    sd = stat_dtype(x)
    if x.numel() == 0:
        return tuple(x.new_empty((0,), dtype=sd) if t is None else torch.zeros_like(t, dtype=sd) for t in stats)
    out = []
    for t in stats:
        if t is None:
            t = x.new_empty((0,), dtype=sd)
        elif t.dtype != sd:
            t = t.to(sd)
        out.append(t)
    return out


def _grad(t: Tensor | None, x: Tensor, shape, dtype) -> Tensor:
    return x.new_empty((0,), dtype=dtype) if t is None else t.reshape(shape).to(dtype)


def _backend(op: str, x: Tensor, backend: str):
    return dispatch.backend_module(op, x, backend or None)


# ------------------------------------------------------------------------------ real impls
# Each returns exactly what its fake twin below promises.


def _bn_shapes(x):
    return (x.shape[1],)


def _batch_norm_impl(x, weight, bias, eps, center_only, backend):
    y, mean, var, rstd = _backend("batch_norm", x, backend).batch_norm(x, weight, bias, eps, center_only=center_only)
    if center_only:
        var = rstd = None
    return _canonical(y, x, True), *_stats(x, mean, var, rstd)


def _param_meta(weight, x, shape):
    return shape, (x.dtype if weight is None else weight.dtype)


def _batch_norm_backward_impl(dy, x, weight, mean, rstd, eps, center_only, backend, mask):
    if rstd.numel() == 0:
        rstd = None
    dx, dw, db = _backend("batch_norm", x, backend).batch_norm_backward(
        dy, x, weight, mean, rstd, eps, center_only=center_only, mask=tuple(mask))
    shape, dt = _param_meta(weight, x, _bn_shapes(x))
    dx = _canonical(dx, x, True) if mask[0] else x.new_empty((0,))
    return dx, _grad(dw if mask[1] else None, x, shape, dt), _grad(db if mask[2] else None, x, shape, dt)


def _batch_norm_eval_impl(x, mean, var, weight, bias, eps, center_only, backend):
    y = _backend("batch_norm_eval", x, backend).batch_norm_eval(x, mean, var, weight, bias, eps,
                                                                center_only=center_only)
    return _canonical(y, x, True)


def _gn_shapes(x, g):
    return (x.shape[0], g)


def _group_norm_impl(x, weight, bias, num_groups, eps, backend):
    y, mean, var, rstd = _backend("group_norm", x, backend).group_norm(x, num_groups, weight, bias, eps)
    return _canonical(y, x, True), *_stats(x, mean, var, rstd)


def _group_norm_backward_impl(dy, x, weight, mean, rstd, num_groups, eps, backend, mask):
    dx, dw, db = _backend("group_norm", x, backend).group_norm_backward(
        dy, x, weight, mean, rstd, num_groups, eps, mask=tuple(mask))
    shape, dt = _param_meta(weight, x, (x.shape[1],))
    dx = _canonical(dx, x, True) if mask[0] else x.new_empty((0,))
    return dx, _grad(dw if mask[1] else None, x, shape, dt), _grad(db if mask[2] else None, x, shape, dt)


def _ln_shapes(x, k):
    return tuple(x.shape[: x.dim() - k]), tuple(x.shape[x.dim() - k:])


def _layer_norm_impl(x, weight, bias, normalized_ndim, eps, rms, backend):
    y, mean, var, rstd = _backend("layer_norm", x, backend).layer_norm(x, normalized_ndim, weight, bias, eps, rms=rms)
    lead, _ = _ln_shapes(x, normalized_ndim)
    return _canonical(y, x, False), *_stats(x, None if rms else mean, var, rstd)


def _layer_norm_backward_impl(dy, x, weight, mean, rstd, normalized_ndim, eps, rms, backend, mask):
    dx, dw, db = _backend("layer_norm", x, backend).layer_norm_backward(
        dy, x, weight, None if rms else mean, rstd, normalized_ndim, eps, rms=rms, mask=tuple(mask))
    shape, dt = _param_meta(weight, x, _ln_shapes(x, normalized_ndim)[1])
    dx = _canonical(dx, x, False) if mask[0] else x.new_empty((0,))
    return dx, _grad(dw if mask[1] else None, x, shape, dt), _grad(db if mask[2] else None, x, shape, dt)


def _lnc_shapes(x):
    return (x.shape[0],) + tuple(x.shape[2:])


def _layer_norm_channels_impl(x, weight, bias, eps, backend):
    y, mean, var, rstd = _backend("layer_norm_channels", x, backend).layer_norm_channels(x, weight, bias, eps)
    return _canonical(y, x, True), *_stats(x, mean, var, rstd)


def _layer_norm_channels_backward_impl(dy, x, weight, mean, rstd, eps, backend, mask):
    dx, dw, db = _backend("layer_norm_channels", x, backend).layer_norm_channels_backward(
        dy, x, weight, mean, rstd, eps, mask=tuple(mask))
    shape, dt = _param_meta(weight, x, (x.shape[1],))
    dx = _canonical(dx, x, True) if mask[0] else x.new_empty((0,))
    return dx, _grad(dw if mask[1] else None, x, shape, dt), _grad(db if mask[2] else None, x, shape, dt)


# ------------------------------------------------------------------------------ fake impls


def _fake_stats(x, shape, present=(True, True, True)):
    sd = stat_dtype(x)
    return tuple(x.new_empty(shape if p else (0,), dtype=sd) for p in present)


def _fake_grads(x, weight, shape, mask, per_channel):
    dt = x.dtype if weight is None else weight.dtype
    dx = _empty_out(x, per_channel) if mask[0] else x.new_empty((0,))
    return (dx, x.new_empty(shape if mask[1] else (0,), dtype=dt), x.new_empty(shape if mask[2] else (0,), dtype=dt))


def _batch_norm_fake(x, weight, bias, eps, center_only, backend):
    return (_empty_out(x, True), *_fake_stats(x, _bn_shapes(x), (True, not center_only, not center_only)))


def _batch_norm_backward_fake(dy, x, weight, mean, rstd, eps, center_only, backend, mask):
    return _fake_grads(x, weight, _bn_shapes(x), mask, True)


def _batch_norm_eval_fake(x, mean, var, weight, bias, eps, center_only, backend):
    return _empty_out(x, True)


def _group_norm_fake(x, weight, bias, num_groups, eps, backend):
    return (_empty_out(x, True), *_fake_stats(x, _gn_shapes(x, num_groups)))


def _group_norm_backward_fake(dy, x, weight, mean, rstd, num_groups, eps, backend, mask):
    return _fake_grads(x, weight, (x.shape[1],), mask, True)


def _layer_norm_fake(x, weight, bias, normalized_ndim, eps, rms, backend):
    lead, _ = _ln_shapes(x, normalized_ndim)
    return (_empty_out(x, False), *_fake_stats(x, lead, (not rms, True, True)))


def _layer_norm_backward_fake(dy, x, weight, mean, rstd, normalized_ndim, eps, rms, backend, mask):
    return _fake_grads(x, weight, _ln_shapes(x, normalized_ndim)[1], mask, False)


def _layer_norm_channels_fake(x, weight, bias, eps, backend):
    return (_empty_out(x, True), *_fake_stats(x, _lnc_shapes(x)))


def _layer_norm_channels_backward_fake(dy, x, weight, mean, rstd, eps, backend, mask):
    return _fake_grads(x, weight, (x.shape[1],), mask, True)


# ------------------------------------------------------------------------ operator library

_T = Tensor
_OT = Tensor | None
_STATS = tuple[Tensor, Tensor, Tensor, Tensor]
_GRADS = tuple[Tensor, Tensor, Tensor]


def _define(name: str, impl, fake, signature: dict):
    impl.__annotations__ = signature
    op = torch.library.custom_op(f"normlab::{name}", impl, mutates_args=())
    op.register_fake(fake)
    return op


_ops = {
    "batch_norm": _define("batch_norm", _batch_norm_impl, _batch_norm_fake, {
        "x": _T, "weight": _OT, "bias": _OT, "eps": float, "center_only": bool, "backend": str, "return": _STATS}),
    "batch_norm_backward": _define("batch_norm_backward", _batch_norm_backward_impl, _batch_norm_backward_fake, {
        "dy": _T, "x": _T, "weight": _OT, "mean": _T, "rstd": _T, "eps": float, "center_only": bool,
        "backend": str, "mask": Sequence[bool], "return": _GRADS}),
    "batch_norm_eval": _define("batch_norm_eval", _batch_norm_eval_impl, _batch_norm_eval_fake, {
        "x": _T, "mean": _T, "var": _OT, "weight": _OT, "bias": _OT, "eps": float, "center_only": bool,
        "backend": str, "return": _T}),
    "group_norm": _define("group_norm", _group_norm_impl, _group_norm_fake, {
        "x": _T, "weight": _OT, "bias": _OT, "num_groups": int, "eps": float, "backend": str, "return": _STATS}),
    "group_norm_backward": _define("group_norm_backward", _group_norm_backward_impl, _group_norm_backward_fake, {
        "dy": _T, "x": _T, "weight": _OT, "mean": _T, "rstd": _T, "num_groups": int, "eps": float,
        "backend": str, "mask": Sequence[bool], "return": _GRADS}),
    "layer_norm": _define("layer_norm", _layer_norm_impl, _layer_norm_fake, {
        "x": _T, "weight": _OT, "bias": _OT, "normalized_ndim": int, "eps": float, "rms": bool, "backend": str,
        "return": _STATS}),
    "layer_norm_backward": _define("layer_norm_backward", _layer_norm_backward_impl, _layer_norm_backward_fake, {
        "dy": _T, "x": _T, "weight": _OT, "mean": _T, "rstd": _T, "normalized_ndim": int, "eps": float,
        "rms": bool, "backend": str, "mask": Sequence[bool], "return": _GRADS}),
    "layer_norm_channels": _define("layer_norm_channels", _layer_norm_channels_impl, _layer_norm_channels_fake, {
        "x": _T, "weight": _OT, "bias": _OT, "eps": float, "backend": str, "return": _STATS}),
    "layer_norm_channels_backward": _define(
        "layer_norm_channels_backward", _layer_norm_channels_backward_impl, _layer_norm_channels_backward_fake, {
            "dy": _T, "x": _T, "weight": _OT, "mean": _T, "rstd": _T, "eps": float, "backend": str,
            "mask": Sequence[bool], "return": _GRADS}),
}


# -------------------------------------------------------------------------------- autograd
# One formula per forward operator; ``ctx.compiled`` says whether the backward operator is called
# through the dispatcher (torch.compile traces it) or directly (eager fast path).


def _run(name: str, compiled: bool):
    return _ops[name] if compiled else _IMPLS[name]


def _composite_grads(ctx, forward, x, weight, dy, bias_meta, extra=()):
    """create_graph=True: differentiate the reference composite of the same op on the saved x."""
    need = ctx.needs_input_grad[:3]
    bias = None
    if bias_meta is not None:
        bias = torch.zeros(bias_meta[0], dtype=bias_meta[1], device=x.device, requires_grad=need[2])
    inputs = (x, weight, bias) + tuple(extra)
    with torch.enable_grad():
        y = forward(*inputs)
        wrt = [t for t, n in zip(inputs, ctx.needs_input_grad) if n and t is not None]
        grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True, allow_unused=True))
    out = []
    for t, n in zip(inputs, ctx.needs_input_grad):
        g = next(grads) if (n and t is not None) else None
        out.append(torch.zeros_like(t) if (g is None and n and t is not None) else g)
    return out


def _op_composite_grads(ctx, name: str, x, weight, dy):
    """create_graph=True for forward operator ``name``: its reference composite (op arguments
    ``ctx.args`` after x, γ, β) differentiated on the saved x."""
    fwd = lambda x_, w_, b_: _COMPOSITE[name](x_, w_, b_, *ctx.args)[0]  # noqa: E731
    return _composite_grads(ctx, fwd, x, weight, dy, ctx.bias_meta)


def _finish(ctx, dx, dw, db, n_extra):
    need = ctx.needs_input_grad
    if need[2] and db.numel() and ctx.bias_meta is not None:
        db = db.to(ctx.bias_meta[1])
    return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None) + (None,) * n_extra


def _setup(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    ctx.save_for_backward(x, weight, output[1], output[3])
    ctx.args = inputs[3:]
    ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # the statistics get no gradient: don't allocate zeros for them


def _backward_of(name: str):
    """The autograd formula of forward operator ``name``: its backward operator, or with
    ``create_graph=True`` the reference composite differentiated on the saved input. The
    backward operator takes ``(dy, x, weight, mean, rstd, *ctx.args, mask)``."""

    def backward(ctx, dy, *_):
        none = (None,) * len(ctx.args)
        if dy is None:  # y itself unused (gradients are not materialized)
            return (None, None, None, *none)
        x, weight, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*_op_composite_grads(ctx, name, x, weight, dy), *none)
        mask = list(ctx.needs_input_grad[:3])
        grads = _run(f"{name}_backward", ctx.compiled)(dy, x, weight, mean, rstd, *ctx.args, mask)
        return _finish(ctx, *grads, len(none))

    return backward


_bn_backward = _backward_of("batch_norm")
_gn_backward = _backward_of("group_norm")
_ln_backward = _backward_of("layer_norm")
_lnc_backward = _backward_of("layer_norm_channels")


def _bn_eval_setup(ctx, inputs, output):  # noqa: ARG001 - output is y, not needed
    x, mean, var, weight, bias, eps, center_only, backend = inputs
    ctx.save_for_backward(x, mean, var, weight)
    ctx.args = (eps, center_only, backend)
    ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)


def _bn_eval_backward(ctx, dy):
    """y = a·x + b with a = γ·rsqrt(σ² + ε), b = β − a·μ: the gradients are torch ops, so they are
    themselves differentiable (double backward needs no composite here)."""
    return _bn_eval_grads(ctx, dy, *ctx.saved_tensors)


def _bn_eval_grads(ctx, dy, x, mean, var, weight):
    """The gradients of batch_norm_eval's inputs (x, mean, var, weight, bias, eps, center_only,
    backend) for the upstream gradient dy (shared with batch_norm_relu_eval)."""
    eps, center_only, backend = ctx.args
    need = ctx.needs_input_grad
    eager = getattr(ctx, "compiled", True) is False  # traced backwards must stay in torch ops
    fused = eager and getattr(_backend("batch_norm_eval", x, backend), "batch_norm_eval_backward", None)
    if fused and not torch.is_grad_enabled() and not (need[1] or need[2]):
        # the common case in eager mode (frozen statistics, first-order gradients): one fused pass
        dx, dw, db = fused(dy, x, mean, var, weight, eps, center_only=center_only, mask=(need[0], need[3], need[4]))
        if db is not None and ctx.bias_meta is not None:
            db = db.to(ctx.bias_meta[1])
        return dx, None, None, dw, db, None, None, None
    acc = reference.compute_dtype(x.dtype)
    view = (1, -1) + (1,) * (x.dim() - 2)
    rstd = torch.ones_like(mean, dtype=acc) if center_only else torch.rsqrt(var.to(acc) + eps)
    w = torch.ones_like(rstd) if weight is None else weight.to(acc)
    a = (rstd * w).view(view)
    dyc = dy.to(acc)
    red = [0] + list(range(2, x.dim()))
    dx = _canonical((dyc * a).to(x.dtype), x, True) if need[0] else None
    sum_dy = dyc.sum(red) if (need[1] or need[4]) else None
    sum_dy_xc = (dyc * (x.to(acc) - mean.to(acc).view(view))).sum(red) if (need[2] or need[3]) else None
    dmean = (-sum_dy * rstd * w).to(mean.dtype) if need[1] else None
    dvar = None
    if need[2] and var is not None:
        dvar = (-0.5 * sum_dy_xc * w * rstd**3).to(var.dtype)
    dw = (sum_dy_xc * rstd).to(weight.dtype) if need[3] else None
    db = sum_dy.to(ctx.bias_meta[1]) if need[4] else None
    return dx, dmean, dvar, dw, db, None, None, None


def _setup_op(ctx, inputs, output):
    _setup(ctx, inputs, output)
    ctx.compiled = True


_ops["batch_norm"].register_autograd(_bn_backward, setup_context=_setup_op)
_ops["group_norm"].register_autograd(_gn_backward, setup_context=_setup_op)
_ops["layer_norm"].register_autograd(_ln_backward, setup_context=_setup_op)
_ops["layer_norm_channels"].register_autograd(_lnc_backward, setup_context=_setup_op)
_ops["batch_norm_eval"].register_autograd(_bn_eval_backward, setup_context=_bn_eval_setup)


_IMPLS = {
    "batch_norm": _batch_norm_impl,
    "batch_norm_backward": _batch_norm_backward_impl,
    "batch_norm_eval": _batch_norm_eval_impl,
    "group_norm": _group_norm_impl,
    "group_norm_backward": _group_norm_backward_impl,
    "layer_norm": _layer_norm_impl,
    "layer_norm_backward": _layer_norm_backward_impl,
    "layer_norm_channels": _layer_norm_channels_impl,
    "layer_norm_channels_backward": _layer_norm_channels_backward_impl,
}


def _eager_function(name: str, backward, setup=_setup, n_out: int = 4):
    """The operator's implementation and autograd formula as a plain autograd.Function.

    Classic style (``forward(ctx, ...)``, no ``setup_context``): with a ``setup_context``,
    ``Function.apply`` binds the arguments through ``inspect.signature`` on every call, which
    costs more than a small normalization. functorch never sees this class (it gets the
    composite), so it does not need the functorch-style split.
    """

    def forward(ctx, *args):
        out = _IMPLS[name](*args)
        setup(ctx, args, out if n_out > 1 else (out,))
        ctx.compiled = False
        return out

    return type(f"_{name}", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })


_EAGER = {
    "batch_norm": _eager_function("batch_norm", _bn_backward),
    "group_norm": _eager_function("group_norm", _gn_backward),
    "layer_norm": _eager_function("layer_norm", _ln_backward),
    "layer_norm_channels": _eager_function("layer_norm_channels", _lnc_backward),
    "batch_norm_eval": _eager_function("batch_norm_eval", _bn_eval_backward, setup=_bn_eval_setup, n_out=1),
}


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# The composite of each forward operator (reference backend, plain differentiable torch ops),
# what functorch transforms differentiate and batch.
_COMPOSITE = {
    "batch_norm": lambda x, w, b, eps, center, _: reference.batch_norm(x, w, b, eps, center_only=center),
    "batch_norm_eval": lambda x, m, v, w, b, eps, center, _: reference.batch_norm_eval(
        x, m, v, w, b, eps, center_only=center),
    "group_norm": lambda x, w, b, g, eps, _: reference.group_norm(x, g, w, b, eps),
    "layer_norm": lambda x, w, b, k, eps, rms, _: reference.layer_norm(x, k, w, b, eps, rms=rms),
    "layer_norm_channels": lambda x, w, b, eps, _: reference.layer_norm_channels(x, w, b, eps),
}


# How many leading arguments of a forward operator may need a gradient (default 3: x, γ, β).
_N_DIFF = {"batch_norm_eval": 5}


def _functorch_active() -> bool:
    return torch._C._are_functorch_transforms_active()


class _Lane(torch.autograd.Function):
    """The eager fast lane: one forward op on a backend's cached plan, called directly both ways
    (``backend.lane``; the CPU backend has one for float32 batch, group and layer norm).

    Same kernels and autograd formula as the operator path (:func:`_backward_of`), without its
    per-call dispatch and output marshalling: on a small activation that Python was most of a
    normalization's cost. ``apply(x, weight, bias, *op_args, (backend, lane, op name))``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, *rest):
        *args, (backend, lane, name) = rest
        out, saved = backend.lane_forward(lane, x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.lane, ctx.saved, ctx.args, ctx.name = (backend, lane), saved, args, name
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        ctx.mark_non_differentiable(*out[1:])
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, dy, *_):
        none = (None,) * (len(ctx.args) + 1)
        if dy is None:
            return (None, None, None, *none)
        x, weight = ctx.saved_tensors
        backend, lane = ctx.lane
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite
            return (*_op_composite_grads(ctx, ctx.name, x, weight, dy), *none)
        grads = backend.lane_backward(lane, ctx.saved, dy, x, weight, ctx.needs_input_grad, ctx.bias_meta)
        return (*grads, *none)


_LANE_OPS = frozenset(("batch_norm", "group_norm", "layer_norm"))


def _lane(name: str, args: tuple):
    """(backend, lane, name) when the eager fast lane takes this call (the backend argument, the
    operator's last, is empty and none is forced), else None."""
    if args[-1] or not dispatch.lane_ok():
        return None
    backend = dispatch.load("cpu")
    lane = None if backend is None else backend.lane(name, args)
    return None if lane is None else (backend, lane, name)


def call(name: str, *args):
    """Run forward operator ``name``.

    Under torch.compile the operator itself (dynamo records one opaque node; inductor calls the
    kernel); under a functorch transform (vmap, grad, jvp, ...) the reference composite, which
    functorch decomposes; under a dispatch mode or for a tensor subclass the operator; otherwise the same implementation as the operator, called directly
    and through autograd only when a gradient can be needed.
    """
    if torch.compiler.is_compiling():
        return _ops[name](*args)
    if _functorch_active():
        return _COMPOSITE[name](*args)
    if torch._C._len_torch_dispatch_stack() or type(args[0]) is not Tensor:
        # A dispatch mode (FakeTensorMode, FlopCounterMode, ...) or a tensor subclass (FakeTensor,
        # ...): through the dispatcher, so that they see the operator (the fake impl for fakes).
        return _ops[name](*args)
    if name in _LANE_OPS:
        lane = _lane(name, args)
        if lane is not None:
            if _needs_grad(*args[:3]):
                return _Lane.apply(*args, lane)
            return lane[0].lane_forward(lane[1], *args[:3])[0]  # (y, mean, var, rstd)
    grad_args = args[:_N_DIFF.get(name, 3)]
    if _needs_grad(*grad_args):
        return _EAGER[name].apply(*args)
    return _IMPLS[name](*args)


def batch_norm(x, weight, bias, eps: float, center_only: bool = False, backend: str | None = None):
    """(y, mean, var, rstd) of training batch norm through the ``normlab::batch_norm`` operator."""
    return call("batch_norm", x, weight, bias, float(eps), center_only, backend or "")


def batch_norm_eval(x, mean, var, weight, bias, eps: float, center_only: bool = False, backend: str | None = None):
    """y of batch norm with given statistics through ``normlab::batch_norm_eval``."""
    return call("batch_norm_eval", x, mean, var, weight, bias, float(eps), center_only, backend or "")


def group_norm(x, num_groups: int, weight, bias, eps: float, backend: str | None = None):
    """(y, mean, var, rstd) through ``normlab::group_norm``."""
    return call("group_norm", x, weight, bias, int(num_groups), float(eps), backend or "")


def layer_norm(x, normalized_ndim: int, weight, bias, eps: float, rms: bool = False, backend: str | None = None):
    """(y, mean, var, rstd) through ``normlab::layer_norm``."""
    return call("layer_norm", x, weight, bias, int(normalized_ndim), float(eps), rms, backend or "")


def layer_norm_channels(x, weight, bias, eps: float, backend: str | None = None):
    """(y, mean, var, rstd) of channels-first layer norm through ``normlab::layer_norm_channels``."""
    return call("layer_norm_channels", x, weight, bias, float(eps), backend or "")


# ----------------------------------------------------------------------------- ghost batch norm
#     ghost_batch_norm(x, weight?, bias?, virtual_batch_size, eps, backend) -> (y, [mean, var, rstd]) (N / g, C)
#     ghost_batch_norm_backward(dy, x, weight?, mean, rstd, virtual_batch_size, eps, backend, mask)
#                                                                           -> (dx, dγ, dβ)
# Batch norm of each of the k = N / g virtual batches of g consecutive samples (Hoffer et al.
# 2017); γ, β (C,) shared by all; g must divide N. On the CPU the batch-norm kernels run on each
# virtual batch's memory in place (no rearranging copy).


def _check_virtual(x: Tensor, g: int) -> None:
    if g < 1 or x.shape[0] % g:
        raise ValueError(f"virtual_batch_size: expected a positive divisor of the batch size {x.shape[0]}, got {g}")


def _ghost_batch_norm_impl(x, weight, bias, virtual_batch_size, eps, backend):
    _check_virtual(x, virtual_batch_size)
    y, mean, var, rstd = _backend("ghost_batch_norm", x, backend).ghost_batch_norm(
        x, virtual_batch_size, weight, bias, eps)
    return _canonical(y, x, True), *_stats(x, mean, var, rstd)


def _ghost_batch_norm_backward_impl(dy, x, weight, mean, rstd, virtual_batch_size, eps, backend, mask):
    dx, dw, db = _backend("ghost_batch_norm", x, backend).ghost_batch_norm_backward(
        dy, x, weight, mean, rstd, virtual_batch_size, eps, mask=tuple(mask))
    shape, dt = _param_meta(weight, x, (x.shape[1],))
    dx = _canonical(dx, x, True) if mask[0] else x.new_empty((0,))
    return dx, _grad(dw if mask[1] else None, x, shape, dt), _grad(db if mask[2] else None, x, shape, dt)


def _ghost_batch_norm_fake(x, weight, bias, virtual_batch_size, eps, backend):
    _check_virtual(x, virtual_batch_size)
    return (_empty_out(x, True), *_fake_stats(x, (x.shape[0] // virtual_batch_size, x.shape[1])))


def _ghost_batch_norm_backward_fake(dy, x, weight, mean, rstd, virtual_batch_size, eps, backend, mask):
    return _fake_grads(x, weight, (x.shape[1],), mask, True)


_ops.update({
    "ghost_batch_norm": _define("ghost_batch_norm", _ghost_batch_norm_impl, _ghost_batch_norm_fake, {
        "x": _T, "weight": _OT, "bias": _OT, "virtual_batch_size": int, "eps": float, "backend": str,
        "return": _STATS}),
    "ghost_batch_norm_backward": _define(
        "ghost_batch_norm_backward", _ghost_batch_norm_backward_impl, _ghost_batch_norm_backward_fake, {
            "dy": _T, "x": _T, "weight": _OT, "mean": _T, "rstd": _T, "virtual_batch_size": int, "eps": float,
            "backend": str, "mask": Sequence[bool], "return": _GRADS}),
})
_IMPLS.update({"ghost_batch_norm": _ghost_batch_norm_impl,
               "ghost_batch_norm_backward": _ghost_batch_norm_backward_impl})
_COMPOSITE["ghost_batch_norm"] = lambda x, w, b, g, eps, _: reference.ghost_batch_norm(x, g, w, b, eps)
_gbn_backward = _backward_of("ghost_batch_norm")
_ops["ghost_batch_norm"].register_autograd(_gbn_backward, setup_context=_setup_op)
_EAGER["ghost_batch_norm"] = _eager_function("ghost_batch_norm", _gbn_backward)

__all__ += ["ghost_batch_norm"]


def ghost_batch_norm(x, weight, bias, virtual_batch_size: int, eps: float, backend: str | None = None):
    """(y, mean, var, rstd), statistics (N / g, C), through ``normlab::ghost_batch_norm``."""
    return call("ghost_batch_norm", x, weight, bias, int(virtual_batch_size), float(eps), backend or "")


# ------------------------------------------------------------------------ point-wise operators
# Dynamic Tanh and Dynamic erf: y = γ·f(α·x + s) + β, f = tanh (no s) or erf; α, s are scalar
# tensors, γ, β of the trailing dims (channels_last=True) or (C,) on dim 1 (channels_last=False).
#
#     dynamic_tanh(x, alpha, weight?, bias?, channels_last, backend)                   -> y
#     dynamic_tanh_backward(dy, x, alpha, weight?, bias?, channels_last, backend, mask) -> (dx, dα, dγ, dβ)
#     dynamic_erf(x, alpha, shift, weight?, bias?, channels_last, backend)             -> y
#     dynamic_erf_backward(dy, x, alpha, shift, weight?, bias?, channels_last, backend, mask)
#                                                                                     -> (dx, dα, ds, dγ, dβ)
#
# y and dx: x's dtype; layout channels-first: as the per-channel ops (channels-last-like in,
# channels-last out, else contiguous); channels-last: contiguous. Each parameter gradient has its
# parameter's shape and dtype (bias is passed to the backward for dβ's shape only); ``mask``
# says which of (x, α, [s,] γ, β) are wanted, the others come back empty. No statistics.


def _pw_out(x: Tensor, channels_last: bool) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format) if channels_last else _empty_out(x, True)


def _pw_canonical(y: Tensor, x: Tensor, channels_last: bool) -> Tensor:
    if channels_last:
        return y if y.is_contiguous() else y.contiguous()
    return _canonical(y, x, True)


def _pw_param_grads(x: Tensor, params, grads, mask) -> list:
    out = []
    for p, g, m in zip(params, grads, mask):
        if m and p is not None and g is not None:
            out.append(g.reshape(p.shape).to(p.dtype))
        else:
            out.append(x.new_empty((0,), dtype=x.dtype if p is None else p.dtype))
    return out


def _dynamic_tanh_impl(x, alpha, weight, bias, channels_last, backend):
    y = _backend("dynamic_tanh", x, backend).dynamic_tanh(x, alpha, weight, bias, channels_last=channels_last)
    return _pw_canonical(y, x, channels_last)


def _dynamic_tanh_backward_impl(dy, x, alpha, weight, bias, channels_last, backend, mask):
    dx, *grads = _backend("dynamic_tanh", x, backend).dynamic_tanh_backward(
        dy, x, alpha, weight, bias, channels_last=channels_last, mask=tuple(mask))
    dx = _pw_canonical(dx, x, channels_last) if mask[0] else x.new_empty((0,))
    return (dx, *_pw_param_grads(x, (alpha, weight, bias), grads, mask[1:]))


def _dynamic_erf_impl(x, alpha, shift, weight, bias, channels_last, backend):
    y = _backend("dynamic_erf", x, backend).dynamic_erf(x, alpha, shift, weight, bias, channels_last=channels_last)
    return _pw_canonical(y, x, channels_last)


def _dynamic_erf_backward_impl(dy, x, alpha, shift, weight, bias, channels_last, backend, mask):
    dx, *grads = _backend("dynamic_erf", x, backend).dynamic_erf_backward(
        dy, x, alpha, shift, weight, bias, channels_last=channels_last, mask=tuple(mask))
    dx = _pw_canonical(dx, x, channels_last) if mask[0] else x.new_empty((0,))
    return (dx, *_pw_param_grads(x, (alpha, shift, weight, bias), grads, mask[1:]))


def _pw_fake_grads(x, params, channels_last, mask):
    dx = _pw_out(x, channels_last) if mask[0] else x.new_empty((0,))
    rest = [p.new_empty(p.shape) if (m and p is not None) else x.new_empty((0,), dtype=x.dtype if p is None else p.dtype)
            for p, m in zip(params, mask[1:])]
    return (dx, *rest)


def _dynamic_tanh_fake(x, alpha, weight, bias, channels_last, backend):
    return _pw_out(x, channels_last)


def _dynamic_tanh_backward_fake(dy, x, alpha, weight, bias, channels_last, backend, mask):
    return _pw_fake_grads(x, (alpha, weight, bias), channels_last, mask)


def _dynamic_erf_fake(x, alpha, shift, weight, bias, channels_last, backend):
    return _pw_out(x, channels_last)


def _dynamic_erf_backward_fake(dy, x, alpha, shift, weight, bias, channels_last, backend, mask):
    return _pw_fake_grads(x, (alpha, shift, weight, bias), channels_last, mask)


_ops.update({
    "dynamic_tanh": _define("dynamic_tanh", _dynamic_tanh_impl, _dynamic_tanh_fake, {
        "x": _T, "alpha": _T, "weight": _OT, "bias": _OT, "channels_last": bool, "backend": str, "return": _T}),
    "dynamic_tanh_backward": _define("dynamic_tanh_backward", _dynamic_tanh_backward_impl,
                                     _dynamic_tanh_backward_fake, {
        "dy": _T, "x": _T, "alpha": _T, "weight": _OT, "bias": _OT, "channels_last": bool, "backend": str,
        "mask": Sequence[bool], "return": tuple[Tensor, Tensor, Tensor, Tensor]}),
    "dynamic_erf": _define("dynamic_erf", _dynamic_erf_impl, _dynamic_erf_fake, {
        "x": _T, "alpha": _T, "shift": _T, "weight": _OT, "bias": _OT, "channels_last": bool, "backend": str,
        "return": _T}),
    "dynamic_erf_backward": _define("dynamic_erf_backward", _dynamic_erf_backward_impl,
                                    _dynamic_erf_backward_fake, {
        "dy": _T, "x": _T, "alpha": _T, "shift": _T, "weight": _OT, "bias": _OT, "channels_last": bool,
        "backend": str, "mask": Sequence[bool], "return": tuple[Tensor, Tensor, Tensor, Tensor, Tensor]}),
})
_IMPLS.update({
    "dynamic_tanh": _dynamic_tanh_impl,
    "dynamic_tanh_backward": _dynamic_tanh_backward_impl,
    "dynamic_erf": _dynamic_erf_impl,
    "dynamic_erf_backward": _dynamic_erf_backward_impl,
})
_COMPOSITE.update({
    "dynamic_tanh": lambda x, a, w, b, cl, _: reference.dynamic_tanh(x, a, w, b, channels_last=cl),
    "dynamic_erf": lambda x, a, s, w, b, cl, _: reference.dynamic_erf(x, a, s, w, b, channels_last=cl),
})
_PW_PARAMS = {"dynamic_tanh": 3, "dynamic_erf": 4}  # tensor arguments after x (α, [s,] γ, β)
_N_DIFF.update({name: 1 + k for name, k in _PW_PARAMS.items()})


def _pw_setup(ctx, inputs, output):  # noqa: ARG001 - y is not needed (f(u) is recomputed from x)
    k = 1 + _PW_PARAMS[ctx.pw_name]
    ctx.save_for_backward(*inputs[:k])
    ctx.args = inputs[k:]  # (channels_last, backend)
    ctx.compiled = True
    ctx.set_materialize_grads(False)


def _pw_backward_of(name: str):
    """The autograd formula of point-wise operator ``name``: its backward operator (one fused
    pass), or with ``create_graph=True`` the reference composite differentiated on the saved
    inputs (so gradients of gradients work)."""
    n_in = 1 + _PW_PARAMS[name]

    def backward(ctx, dy):
        none = (None,) * len(ctx.args)
        if dy is None:
            return (None,) * n_in + none
        inputs = ctx.saved_tensors
        need = ctx.needs_input_grad[:n_in]
        if torch.is_grad_enabled():
            with torch.enable_grad():
                y = _COMPOSITE[name](*inputs, *ctx.args)
                wrt = [t for t, n in zip(inputs, need) if n and t is not None]
                grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True, allow_unused=True))
            out = []
            for t, n in zip(inputs, need):
                g = next(grads) if (n and t is not None) else None
                out.append(torch.zeros_like(t) if (g is None and n and t is not None) else g)
            return (*out, *none)
        grads = _run(f"{name}_backward", ctx.compiled)(dy, *inputs, *ctx.args, list(need))
        return (*(g if n else None for g, n in zip(grads, need)), *none)

    return backward


def _pw_setup_for(name: str):
    def setup(ctx, inputs, output):
        ctx.pw_name = name
        _pw_setup(ctx, inputs, output)

    return setup


for _name in _PW_PARAMS:
    _ops[_name].register_autograd(_pw_backward_of(_name), setup_context=_pw_setup_for(_name))
    _EAGER[_name] = _eager_function(_name, _pw_backward_of(_name), setup=_pw_setup_for(_name), n_out=1)
del _name


def dynamic_tanh(x, alpha: Tensor, weight, bias, channels_last: bool = True, backend: str | None = None):
    """y = γ·tanh(α·x) + β through ``normlab::dynamic_tanh`` (α a 1-element tensor)."""
    return call("dynamic_tanh", x, alpha, weight, bias, bool(channels_last), backend or "")


def dynamic_erf(x, alpha: Tensor, shift: Tensor, weight, bias, channels_last: bool = True,
                backend: str | None = None):
    """y = γ·erf(α·x + s) + β through ``normlab::dynamic_erf`` (α, s 1-element tensors)."""
    return call("dynamic_erf", x, alpha, shift, weight, bias, bool(channels_last), backend or "")


# ----------------------------------------------------------------- filter response norm + TLU
#     filter_response_norm(x, weight?, bias?, tau?, eps, backend)            -> (y, [rstd]) (N, C)
#     filter_response_norm_backward(dy, x, weight?, bias?, tau?, rstd, eps, backend, mask)
#                                                                            -> (dx, dγ, dβ, dτ)
# y = max(γ·x·rstd + β, τ), rstd = 1/sqrt(mean over positions of x² + ε); y/dx in the per-channel
# canonical layout; ``mask`` over (x, γ, β, τ); tau None: no threshold.


def _frn_impl(x, weight, bias, tau, eps, backend):
    y, rstd = _backend("filter_response_norm", x, backend).filter_response_norm(x, weight, bias, tau, eps)
    return _canonical(y, x, True), *_stats(x, rstd)


def _frn_backward_impl(dy, x, weight, bias, tau, rstd, eps, backend, mask):
    dx, *grads = _backend("filter_response_norm", x, backend).filter_response_norm_backward(
        dy, x, weight, bias, tau, rstd, eps, mask=tuple(mask))
    dx = _canonical(dx, x, True) if mask[0] else x.new_empty((0,))
    return (dx, *_pw_param_grads(x, (weight, bias, tau), grads, mask[1:]))


def _frn_fake(x, weight, bias, tau, eps, backend):
    return _empty_out(x, True), x.new_empty(tuple(x.shape[:2]), dtype=stat_dtype(x))


def _frn_backward_fake(dy, x, weight, bias, tau, rstd, eps, backend, mask):
    dx = _empty_out(x, True) if mask[0] else x.new_empty((0,))
    rest = [p.new_empty(p.shape) if (m and p is not None) else x.new_empty((0,), dtype=x.dtype if p is None else p.dtype)
            for p, m in zip((weight, bias, tau), mask[1:])]
    return (dx, *rest)


_ops.update({
    "filter_response_norm": _define("filter_response_norm", _frn_impl, _frn_fake, {
        "x": _T, "weight": _OT, "bias": _OT, "tau": _OT, "eps": float, "backend": str,
        "return": tuple[Tensor, Tensor]}),
    "filter_response_norm_backward": _define("filter_response_norm_backward", _frn_backward_impl,
                                             _frn_backward_fake, {
        "dy": _T, "x": _T, "weight": _OT, "bias": _OT, "tau": _OT, "rstd": _T, "eps": float, "backend": str,
        "mask": Sequence[bool], "return": tuple[Tensor, Tensor, Tensor, Tensor]}),
})
_IMPLS.update({"filter_response_norm": _frn_impl, "filter_response_norm_backward": _frn_backward_impl})
_COMPOSITE["filter_response_norm"] = lambda x, w, b, t, eps, _: reference.filter_response_norm(x, w, b, t, eps)
_N_DIFF["filter_response_norm"] = 4


def _frn_setup(ctx, inputs, output):
    x, weight, bias, tau, eps, backend = inputs
    ctx.save_for_backward(x, weight, bias, tau, output[1])
    ctx.args = (eps, backend)
    ctx.compiled = True
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _frn_backward(ctx, dy, *_):
    """The backward operator (one fused kernel on the CPU), or with ``create_graph=True`` the
    reference composite differentiated on the saved inputs."""
    if dy is None:
        return (None,) * 6
    x, weight, bias, tau, rstd = ctx.saved_tensors
    inputs = (x, weight, bias, tau)
    need = ctx.needs_input_grad[:4]
    if torch.is_grad_enabled():
        with torch.enable_grad():
            y = reference.filter_response_norm(*inputs, ctx.args[0])[0]
            wrt = [t for t, n in zip(inputs, need) if n and t is not None]
            grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True, allow_unused=True))
        out = []
        for t, n in zip(inputs, need):
            g = next(grads) if (n and t is not None) else None
            out.append(torch.zeros_like(t) if (g is None and n and t is not None) else g)
        return (*out, None, None)
    grads = _run("filter_response_norm_backward", ctx.compiled)(dy, *inputs, rstd, *ctx.args, list(need))
    return (*(g if n else None for g, n in zip(grads, need)), None, None)


_ops["filter_response_norm"].register_autograd(_frn_backward, setup_context=_frn_setup)
_EAGER["filter_response_norm"] = _eager_function("filter_response_norm", _frn_backward, setup=_frn_setup, n_out=2)


def filter_response_norm(x, weight, bias, tau, eps: float, backend: str | None = None):
    """(y, rstd) through ``normlab::filter_response_norm``."""
    return call("filter_response_norm", x, weight, bias, tau, float(eps), backend or "")


# ----------------------------------------------------------------------------------- EvoNorm-S0
#     evonorm_s0(x, weight?, bias?, v?, groups, eps, backend)                  -> (y, [mean, rstd]) (N, G)
#     evonorm_s0_backward(dy, x, weight?, bias?, v?, mean, rstd, groups, eps, backend, mask)
#                                                                              -> (dx, dγ, dβ, dv)
# y = γ·x·σ(v·x)·rstd + β, rstd = 1/sqrt(σ²_ng + ε) per (sample, group); v None: no gate (z = x).
# y/dx in the per-channel canonical layout; ``mask`` over (x, γ, β, v); bias is passed to the
# backward for dβ's shape and dtype only.


def _s0_impl(x, weight, bias, v, groups, eps, backend):
    out = _backend("evonorm_s0", x, backend).evonorm_s0(x, weight, bias, v, groups, eps)
    if out is None:  # the CPU kernels' float64 sums of squares overflowed (|x| ≳ 1e154)
        out = reference.evonorm_s0(x, weight, bias, v, groups, eps)
    y, mean, rstd = out
    return _canonical(y, x, True), *_stats(x, mean, rstd)


def _s0_backward_impl(dy, x, weight, bias, v, mean, rstd, groups, eps, backend, mask):
    dx, *grads = _backend("evonorm_s0", x, backend).evonorm_s0_backward(
        dy, x, weight, bias, v, mean, rstd, groups, eps, mask=tuple(mask))
    dx = _canonical(dx, x, True) if mask[0] else x.new_empty((0,))
    return (dx, *_pw_param_grads(x, (weight, bias, v), grads, mask[1:]))


def _s0_fake(x, weight, bias, v, groups, eps, backend):
    sd = stat_dtype(x)
    shape = (x.shape[0], groups)
    return _empty_out(x, True), x.new_empty(shape, dtype=sd), x.new_empty(shape, dtype=sd)


def _s0_backward_fake(dy, x, weight, bias, v, mean, rstd, groups, eps, backend, mask):
    dx = _empty_out(x, True) if mask[0] else x.new_empty((0,))
    rest = [p.new_empty(p.shape) if (m and p is not None) else x.new_empty((0,), dtype=x.dtype if p is None else p.dtype)
            for p, m in zip((weight, bias, v), mask[1:])]
    return (dx, *rest)


_ops.update({
    "evonorm_s0": _define("evonorm_s0", _s0_impl, _s0_fake, {
        "x": _T, "weight": _OT, "bias": _OT, "v": _OT, "groups": int, "eps": float, "backend": str,
        "return": tuple[Tensor, Tensor, Tensor]}),
    "evonorm_s0_backward": _define("evonorm_s0_backward", _s0_backward_impl, _s0_backward_fake, {
        "dy": _T, "x": _T, "weight": _OT, "bias": _OT, "v": _OT, "mean": _T, "rstd": _T, "groups": int,
        "eps": float, "backend": str, "mask": Sequence[bool], "return": tuple[Tensor, Tensor, Tensor, Tensor]}),
})
_IMPLS.update({"evonorm_s0": _s0_impl, "evonorm_s0_backward": _s0_backward_impl})
_COMPOSITE["evonorm_s0"] = lambda x, w, b, v, g, eps, _: reference.evonorm_s0(x, w, b, v, g, eps)
_N_DIFF["evonorm_s0"] = 4


def _s0_setup(ctx, inputs, output):
    x, weight, bias, v, groups, eps, backend = inputs
    ctx.save_for_backward(x, weight, bias, v, output[1], output[2])
    ctx.args = (groups, eps, backend)
    ctx.compiled = True
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _s0_backward(ctx, dy, *_):
    """The backward operator (one fused kernel on the CPU), or with ``create_graph=True`` the
    reference composite differentiated on the saved inputs."""
    if dy is None:
        return (None,) * 7
    x, weight, bias, v, mean, rstd = ctx.saved_tensors
    inputs = (x, weight, bias, v)
    need = ctx.needs_input_grad[:4]
    if torch.is_grad_enabled():
        with torch.enable_grad():
            y = reference.evonorm_s0(*inputs, *ctx.args[:2])[0]
            wrt = [t for t, n in zip(inputs, need) if n and t is not None]
            grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True, allow_unused=True))
        out = []
        for t, n in zip(inputs, need):
            g = next(grads) if (n and t is not None) else None
            out.append(torch.zeros_like(t) if (g is None and n and t is not None) else g)
        return (*out, None, None, None)
    grads = _run("evonorm_s0_backward", ctx.compiled)(dy, *inputs, mean, rstd, *ctx.args, list(need))
    return (*(g if n else None for g, n in zip(grads, need)), None, None, None)


_ops["evonorm_s0"].register_autograd(_s0_backward, setup_context=_s0_setup)
_EAGER["evonorm_s0"] = _eager_function("evonorm_s0", _s0_backward, setup=_s0_setup, n_out=3)


__all__ += ["evonorm_s0"]


def evonorm_s0(x, weight, bias, v, groups: int, eps: float, backend: str | None = None):
    """(y, mean, rstd) through ``normlab::evonorm_s0``."""
    return call("evonorm_s0", x, weight, bias, v, int(groups), float(eps), backend or "")


# ----------------------------------------------------------------------------------- EvoNorm-B0
#     evonorm_b0(x, weight?, bias?, v?, running_var?, eps, backend)
#                                           -> (y, [mean_b (C,), var_b (C,), mean_i (N, C), var_i (N, C)])
#     evonorm_b0_backward(dy, x, weight?, bias?, v?, mean_b, var_b, mean_i, var_i, batch, eps, backend, mask)
#                                           -> (dx, dγ, dβ, dv)
# y = γ·x / max(sqrt(σ²_b + ε), v·x + sqrt(σ²_i + ε)) + β; σ²_b the biased batch variance, or
# ``running_var`` when given (then mean_b is empty and σ²_b gets no gradient: batch=False).
# Variances, not rstd: the functional form updates running_var from var_b. ``mask`` over
# (x, γ, β, v).


def _b0_impl(x, weight, bias, v, running_var, eps, backend):
    out = _backend("evonorm_b0", x, backend).evonorm_b0(x, weight, bias, v, running_var, eps)
    if out is None:  # the CPU kernels' float64 sums of squares overflowed (|x| ≳ 1e154)
        out = reference.evonorm_b0(x, weight, bias, v, running_var, eps)
    y, mean_b, var_b, mean_i, var_i = out
    sd = stat_dtype(x)
    if running_var is not None:
        mean_b = x.new_empty((0,), dtype=sd)
    elif x.numel() == 0:
        mean_b = x.new_zeros((x.shape[1],), dtype=sd)
    else:
        mean_b = mean_b.to(sd)
    return _canonical(y, x, True), mean_b, *_stats(x, var_b, mean_i, var_i)


def _b0_backward_impl(dy, x, weight, bias, v, mean_b, var_b, mean_i, var_i, batch, eps, backend, mask):
    dx, *grads = _backend("evonorm_b0", x, backend).evonorm_b0_backward(
        dy, x, weight, bias, v, mean_b, var_b, mean_i, var_i, batch, eps, mask=tuple(mask))
    dx = _canonical(dx, x, True) if mask[0] else x.new_empty((0,))
    return (dx, *_pw_param_grads(x, (weight, bias, v), grads, mask[1:]))


def _b0_fake(x, weight, bias, v, running_var, eps, backend):
    sd = stat_dtype(x)
    n, c = x.shape[0], x.shape[1]
    return (_empty_out(x, True), x.new_empty((c,) if running_var is None else (0,), dtype=sd),
            x.new_empty((c,), dtype=sd), x.new_empty((n, c), dtype=sd), x.new_empty((n, c), dtype=sd))


def _b0_backward_fake(dy, x, weight, bias, v, mean_b, var_b, mean_i, var_i, batch, eps, backend, mask):
    return _s0_backward_fake(dy, x, weight, bias, v, None, None, 0, eps, backend, mask)


_ops.update({
    "evonorm_b0": _define("evonorm_b0", _b0_impl, _b0_fake, {
        "x": _T, "weight": _OT, "bias": _OT, "v": _OT, "running_var": _OT, "eps": float, "backend": str,
        "return": tuple[Tensor, Tensor, Tensor, Tensor, Tensor]}),
    "evonorm_b0_backward": _define("evonorm_b0_backward", _b0_backward_impl, _b0_backward_fake, {
        "dy": _T, "x": _T, "weight": _OT, "bias": _OT, "v": _OT, "mean_b": _T, "var_b": _T, "mean_i": _T,
        "var_i": _T, "batch": bool, "eps": float, "backend": str, "mask": Sequence[bool],
        "return": tuple[Tensor, Tensor, Tensor, Tensor]}),
})
_IMPLS.update({"evonorm_b0": _b0_impl, "evonorm_b0_backward": _b0_backward_impl})
_COMPOSITE["evonorm_b0"] = lambda x, w, b, v, rv, eps, _: reference.evonorm_b0(x, w, b, v, rv, eps)
_N_DIFF["evonorm_b0"] = 4  # running_var is a statistic, never differentiated


def _b0_setup(ctx, inputs, output):
    x, weight, bias, v, running_var, eps, backend = inputs
    ctx.save_for_backward(x, weight, bias, v, running_var, *output[1:])
    ctx.args = (eps, backend)
    ctx.compiled = True
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _b0_backward(ctx, dy, *_):
    """The backward operator (two fused passes on the CPU), or with ``create_graph=True`` the
    reference composite differentiated on the saved inputs."""
    if dy is None:
        return (None,) * 7
    x, weight, bias, v, running_var, mean_b, var_b, mean_i, var_i = ctx.saved_tensors
    inputs = (x, weight, bias, v)
    need = ctx.needs_input_grad[:4]
    if torch.is_grad_enabled():
        with torch.enable_grad():
            y = reference.evonorm_b0(*inputs, running_var, ctx.args[0])[0]
            wrt = [t for t, n in zip(inputs, need) if n and t is not None]
            grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True, allow_unused=True))
        out = []
        for t, n in zip(inputs, need):
            g = next(grads) if (n and t is not None) else None
            out.append(torch.zeros_like(t) if (g is None and n and t is not None) else g)
        return (*out, None, None, None)
    grads = _run("evonorm_b0_backward", ctx.compiled)(dy, *inputs, mean_b, var_b, mean_i, var_i,
                                                      running_var is None, *ctx.args, list(need))
    return (*(g if n else None for g, n in zip(grads, need)), None, None, None)


_ops["evonorm_b0"].register_autograd(_b0_backward, setup_context=_b0_setup)
_EAGER["evonorm_b0"] = _eager_function("evonorm_b0", _b0_backward, setup=_b0_setup, n_out=5)
__all__ += ["evonorm_b0"]


def evonorm_b0(x, weight, bias, v, running_var, eps: float, backend: str | None = None):
    """(y, mean_b, var_b, mean_i, var_i) through ``normlab::evonorm_b0`` (``running_var=None``:
    batch statistics)."""
    return call("evonorm_b0", x, weight, bias, v, running_var, float(eps), backend or "")

# ------------------------------------------------------------------------------ fused variants
#     add_layer_norm(x, residual, weight?, bias?, normalized_ndim, eps, rms, backend)
#                                                    -> (y, s, [mean, var, rstd]) lead dims
#     add_layer_norm_backward(dy, ds?, s, weight?, mean, rstd, normalized_ndim, eps, rms, backend, mask)
#                                                    -> (dsum, dγ, dβ)
#     group_norm_silu(x, weight?, bias?, num_groups, eps, backend) -> (y, [mean, var, rstd]) (N, G)
#     group_norm_silu_backward(dy, x, weight?, bias?, mean, rstd, num_groups, eps, backend, mask)
#                                                    -> (dx, dγ, dβ)
#     batch_norm_relu(x, weight?, bias?, eps, backend) -> (y, [mean, var, rstd]) (C,)
#     batch_norm_relu_backward(dy, y, x, weight?, mean, rstd, eps, backend, mask) -> (dx, dγ, dβ)
#     batch_norm_relu_eval(x, mean, var, weight?, bias?, eps, backend) -> y
#
# s = x + residual (x and residual of one shape and dtype) is returned — the next block's
# residual stream — and y = LN/RMS(s); both s and y are differentiable and dsum = ∂L/∂s (through
# y) + ds is the gradient of x and of the residual. y = silu(GN(x)), y = relu(BN(x)) with the
# activation applied before the single rounding to x's dtype. Layouts, statistics dtypes and
# ``mask`` as the unfused ops (s: layer norm's layout; GN/BN: the per-channel one). Each
# dispatches on its base op (layer_norm, group_norm, batch_norm, batch_norm_eval) and calls the
# backend's fused function or, where the backend has none, the composition of
# :mod:`normlab.core.composed` (the CPU backend: not fused).


def _fused_fn(op: str, base: str, x: Tensor, backend: str):
    return composed.resolve(_backend(base, x, backend), op)


def _add_layer_norm_impl(x, residual, weight, bias, normalized_ndim, eps, rms, backend):
    y, s, mean, var, rstd = _fused_fn("add_layer_norm", "layer_norm", x, backend)(
        x, residual, normalized_ndim, weight, bias, eps, rms=rms)
    return _canonical(y, x, False), _canonical(s, x, False), *_stats(x, None if rms else mean, var, rstd)


def _add_layer_norm_backward_impl(dy, ds, s, weight, mean, rstd, normalized_ndim, eps, rms, backend, mask):
    dsum, dw, db = _fused_fn("add_layer_norm_backward", "layer_norm", s, backend)(
        dy, ds, s, weight, None if rms else mean, rstd, normalized_ndim, eps, rms=rms, mask=tuple(mask))
    shape, dt = _param_meta(weight, s, _ln_shapes(s, normalized_ndim)[1])
    dsum = _canonical(dsum, s, False) if mask[0] else s.new_empty((0,))
    return dsum, _grad(dw if mask[1] else None, s, shape, dt), _grad(db if mask[2] else None, s, shape, dt)


def _group_norm_silu_impl(x, weight, bias, num_groups, eps, backend):
    y, mean, var, rstd = _fused_fn("group_norm_silu", "group_norm", x, backend)(x, num_groups, weight, bias, eps)
    return _canonical(y, x, True), *_stats(x, mean, var, rstd)


def _group_norm_silu_backward_impl(dy, x, weight, bias, mean, rstd, num_groups, eps, backend, mask):
    dx, dw, db = _fused_fn("group_norm_silu_backward", "group_norm", x, backend)(
        dy, x, weight, bias, mean, rstd, num_groups, eps, mask=tuple(mask))
    shape, dt = _param_meta(weight, x, (x.shape[1],))
    dx = _canonical(dx, x, True) if mask[0] else x.new_empty((0,))
    return dx, _grad(dw if mask[1] else None, x, shape, dt), _grad(db if mask[2] else None, x, shape, dt)


def _batch_norm_relu_impl(x, weight, bias, eps, backend):
    y, mean, var, rstd = _fused_fn("batch_norm_relu", "batch_norm", x, backend)(x, weight, bias, eps)
    return _canonical(y, x, True), *_stats(x, mean, var, rstd)


def _batch_norm_relu_backward_impl(dy, y, x, weight, mean, rstd, eps, backend, mask):
    dx, dw, db = _fused_fn("batch_norm_relu_backward", "batch_norm", x, backend)(
        dy, y, x, weight, mean, rstd, eps, mask=tuple(mask))
    shape, dt = _param_meta(weight, x, _bn_shapes(x))
    dx = _canonical(dx, x, True) if mask[0] else x.new_empty((0,))
    return dx, _grad(dw if mask[1] else None, x, shape, dt), _grad(db if mask[2] else None, x, shape, dt)


def _batch_norm_relu_eval_impl(x, mean, var, weight, bias, eps, backend):
    y = _fused_fn("batch_norm_relu_eval", "batch_norm_eval", x, backend)(x, mean, var, weight, bias, eps)
    return _canonical(y, x, True)


def _add_layer_norm_fake(x, residual, weight, bias, normalized_ndim, eps, rms, backend):
    lead, _ = _ln_shapes(x, normalized_ndim)
    return (_empty_out(x, False), _empty_out(x, False), *_fake_stats(x, lead, (not rms, True, True)))


def _add_layer_norm_backward_fake(dy, ds, s, weight, mean, rstd, normalized_ndim, eps, rms, backend, mask):
    return _fake_grads(s, weight, _ln_shapes(s, normalized_ndim)[1], mask, False)


def _group_norm_silu_backward_fake(dy, x, weight, bias, mean, rstd, num_groups, eps, backend, mask):
    return _fake_grads(x, weight, (x.shape[1],), mask, True)


def _batch_norm_relu_fake(x, weight, bias, eps, backend):
    return (_empty_out(x, True), *_fake_stats(x, _bn_shapes(x)))


def _batch_norm_relu_backward_fake(dy, y, x, weight, mean, rstd, eps, backend, mask):
    return _fake_grads(x, weight, _bn_shapes(x), mask, True)


_ops.update({
    "add_layer_norm": _define("add_layer_norm", _add_layer_norm_impl, _add_layer_norm_fake, {
        "x": _T, "residual": _T, "weight": _OT, "bias": _OT, "normalized_ndim": int, "eps": float, "rms": bool,
        "backend": str, "return": tuple[Tensor, Tensor, Tensor, Tensor, Tensor]}),
    "add_layer_norm_backward": _define("add_layer_norm_backward", _add_layer_norm_backward_impl,
                                       _add_layer_norm_backward_fake, {
        "dy": _T, "ds": _OT, "s": _T, "weight": _OT, "mean": _T, "rstd": _T, "normalized_ndim": int, "eps": float,
        "rms": bool, "backend": str, "mask": Sequence[bool], "return": _GRADS}),
    "group_norm_silu": _define("group_norm_silu", _group_norm_silu_impl, _group_norm_fake, {
        "x": _T, "weight": _OT, "bias": _OT, "num_groups": int, "eps": float, "backend": str, "return": _STATS}),
    "group_norm_silu_backward": _define("group_norm_silu_backward", _group_norm_silu_backward_impl,
                                        _group_norm_silu_backward_fake, {
        "dy": _T, "x": _T, "weight": _OT, "bias": _OT, "mean": _T, "rstd": _T, "num_groups": int, "eps": float,
        "backend": str, "mask": Sequence[bool], "return": _GRADS}),
    "batch_norm_relu": _define("batch_norm_relu", _batch_norm_relu_impl, _batch_norm_relu_fake, {
        "x": _T, "weight": _OT, "bias": _OT, "eps": float, "backend": str, "return": _STATS}),
    "batch_norm_relu_backward": _define("batch_norm_relu_backward", _batch_norm_relu_backward_impl,
                                        _batch_norm_relu_backward_fake, {
        "dy": _T, "y": _T, "x": _T, "weight": _OT, "mean": _T, "rstd": _T, "eps": float, "backend": str,
        "mask": Sequence[bool], "return": _GRADS}),
    "batch_norm_relu_eval": _define("batch_norm_relu_eval", _batch_norm_relu_eval_impl,
                                    lambda x, mean, var, weight, bias, eps, backend: _empty_out(x, True), {
        "x": _T, "mean": _T, "var": _T, "weight": _OT, "bias": _OT, "eps": float, "backend": str, "return": _T}),
})
_IMPLS.update({
    "add_layer_norm": _add_layer_norm_impl,
    "add_layer_norm_backward": _add_layer_norm_backward_impl,
    "group_norm_silu": _group_norm_silu_impl,
    "group_norm_silu_backward": _group_norm_silu_backward_impl,
    "batch_norm_relu": _batch_norm_relu_impl,
    "batch_norm_relu_backward": _batch_norm_relu_backward_impl,
    "batch_norm_relu_eval": _batch_norm_relu_eval_impl,
})
_COMPOSITE.update({
    "add_layer_norm": lambda x, r, w, b, k, eps, rms, _: reference.add_layer_norm(x, r, k, w, b, eps, rms=rms),
    "group_norm_silu": lambda x, w, b, g, eps, _: reference.group_norm_silu(x, g, w, b, eps),
    "batch_norm_relu": lambda x, w, b, eps, _: reference.batch_norm_relu(x, w, b, eps),
    "batch_norm_relu_eval": lambda x, m, v, w, b, eps, _: reference.batch_norm_relu_eval(x, m, v, w, b, eps),
})
_N_DIFF.update({"add_layer_norm": 4, "batch_norm_relu_eval": 5})


def _grads_of(outputs, grad_outputs, inputs, need) -> list:
    """create_graph=True gradients of ``outputs`` w.r.t. the ``inputs`` that ``need`` them (zeros
    for an input the outputs do not depend on, None for one not needed)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
    wrt = [t for t, n in zip(inputs, need) if n and t is not None]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], create_graph=True,
                                     allow_unused=True)) if wrt else iter(())
    out = []
    for t, n in zip(inputs, need):
        g = next(grads) if (n and t is not None) else None
        out.append(torch.zeros_like(t) if (g is None and n and t is not None) else g)
    return out


def _add_ln_setup(ctx, inputs, output):
    x, residual, weight, bias, k, eps, rms, backend = inputs
    ctx.save_for_backward(output[1], weight, output[2], output[4])  # s, γ, mean, rstd
    ctx.args = (k, eps, rms, backend)
    ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)
    ctx.compiled = True


def _add_ln_backward(ctx, dy, ds, *_):
    """dsum = ∂L/∂s through y (the backward operator: one pass) + ds, returned for x and residual.
    create_graph=True: the reference layer norm differentiated at the saved s, whose own graph
    (s = x + residual) carries the second order back to x and the residual."""
    none = (None,) * 4
    need = ctx.needs_input_grad[:4]
    s, weight, mean, rstd = ctx.saved_tensors
    if dy is None:  # only s is used: dsum = ds; γ, β get nothing
        return (ds if need[0] else None, ds if need[1] else None, None, None, *none)
    k, eps, rms, backend = ctx.args
    if torch.is_grad_enabled():
        bias = None
        if ctx.bias_meta is not None:
            bias = torch.zeros(ctx.bias_meta[0], dtype=ctx.bias_meta[1], device=s.device, requires_grad=need[3])
        with torch.enable_grad():
            y = reference.layer_norm(s, k, weight, bias, eps, rms=rms)[0]
            g_s, dw, db = _grads_of([y], [dy], (s, weight, bias), (need[0] or need[1], need[2], need[3]))
        dsum = None if g_s is None else (g_s if ds is None else g_s + ds)
    else:
        mask = [need[0] or need[1], need[2], need[3]]
        dsum, dw, db = _run("add_layer_norm_backward", ctx.compiled)(dy, ds, s, weight, mean, rstd, *ctx.args, mask)
        if need[3] and db.numel() and ctx.bias_meta is not None:
            db = db.to(ctx.bias_meta[1])
    return (dsum if need[0] else None, dsum if need[1] else None, dw if need[2] else None,
            db if need[3] else None, *none)


def _gn_silu_setup(ctx, inputs, output):
    x, weight, bias, num_groups, eps, backend = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[3])
    ctx.args = (num_groups, eps, backend)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.compiled = True


def _gn_silu_backward(ctx, dy, *_):
    """The backward operator (silu' folded into group norm's backward; β is needed for z), or
    with create_graph=True the reference composite differentiated on the saved inputs."""
    none = (None,) * 3
    if dy is None:
        return (None, None, None, *none)
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():
        with torch.enable_grad():
            y = reference.group_norm_silu(x, ctx.args[0], weight, bias, ctx.args[1])[0]
            return (*_grads_of([y], [dy], (x, weight, bias), need), *none)
    grads = _run("group_norm_silu_backward", ctx.compiled)(dy, x, weight, bias, mean, rstd, *ctx.args, list(need))
    return (*(g if n else None for g, n in zip(grads, need)), *none)


def _bn_relu_setup(ctx, inputs, output):
    x, weight, bias, eps, backend = inputs
    ctx.save_for_backward(x, weight, bias, output[0], output[1], output[3])  # x, γ, β, y, mean, rstd
    ctx.args = (eps, backend)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.compiled = True


def _bn_relu_backward(ctx, dy, *_):
    """The backward operator (relu's mask y > 0 folded into batch norm's backward), or with
    create_graph=True the reference composite differentiated on the saved inputs."""
    none = (None,) * 2
    if dy is None:
        return (None, None, None, *none)
    x, weight, bias, y, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():
        with torch.enable_grad():
            yr = reference.batch_norm_relu(x, weight, bias, ctx.args[0])[0]
            return (*_grads_of([yr], [dy], (x, weight, bias), need), *none)
    grads = _run("batch_norm_relu_backward", ctx.compiled)(dy, y, x, weight, mean, rstd, *ctx.args, list(need))
    return (*(g if n else None for g, n in zip(grads, need)), *none)


def _bn_relu_eval_setup(ctx, inputs, output):
    x, mean, var, weight, bias, eps, backend = inputs
    ctx.save_for_backward(x, mean, var, weight, output[0] if isinstance(output, tuple) else output)
    ctx.args = (eps, False, backend)
    ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)


def _bn_relu_eval_backward(ctx, dy):
    """relu's mask from the saved y (0 where y ≤ 0), then batch_norm_eval's formula (torch ops,
    so double backward needs no composite)."""
    x, mean, var, weight, y = ctx.saved_tensors
    grads = _bn_eval_grads(ctx, reference.relu_mask(dy, y), x, mean, var, weight)
    return (*grads[:7],)


_ops["add_layer_norm"].register_autograd(_add_ln_backward, setup_context=_add_ln_setup)
_ops["group_norm_silu"].register_autograd(_gn_silu_backward, setup_context=_gn_silu_setup)
_ops["batch_norm_relu"].register_autograd(_bn_relu_backward, setup_context=_bn_relu_setup)
_ops["batch_norm_relu_eval"].register_autograd(_bn_relu_eval_backward, setup_context=_bn_relu_eval_setup)
_EAGER.update({
    "add_layer_norm": _eager_function("add_layer_norm", _add_ln_backward, setup=_add_ln_setup, n_out=5),
    "group_norm_silu": _eager_function("group_norm_silu", _gn_silu_backward, setup=_gn_silu_setup),
    "batch_norm_relu": _eager_function("batch_norm_relu", _bn_relu_backward, setup=_bn_relu_setup),
    "batch_norm_relu_eval": _eager_function("batch_norm_relu_eval", _bn_relu_eval_backward,
                                            setup=_bn_relu_eval_setup, n_out=1),
})


def add_layer_norm(x, residual, normalized_ndim: int, weight, bias, eps: float, rms: bool = False,
                   backend: str | None = None):
    """(y, s, mean, var, rstd): s = x + residual, y = LN/RMS(s) through ``normlab::add_layer_norm``."""
    return call("add_layer_norm", x, residual, weight, bias, int(normalized_ndim), float(eps), rms, backend or "")


def group_norm_silu(x, num_groups: int, weight, bias, eps: float, backend: str | None = None):
    """(y, mean, var, rstd), y = silu(GN(x)), through ``normlab::group_norm_silu``."""
    return call("group_norm_silu", x, weight, bias, int(num_groups), float(eps), backend or "")


def batch_norm_relu(x, weight, bias, eps: float, backend: str | None = None):
    """(y, mean, var, rstd), y = relu(BN(x)) with batch statistics, through ``normlab::batch_norm_relu``."""
    return call("batch_norm_relu", x, weight, bias, float(eps), backend or "")


def batch_norm_relu_eval(x, mean, var, weight, bias, eps: float, backend: str | None = None):
    """y = relu(BN(x)) with given statistics through ``normlab::batch_norm_relu_eval``."""
    return call("batch_norm_relu_eval", x, mean, var, weight, bias, float(eps), backend or "")
