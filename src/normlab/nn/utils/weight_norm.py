r"""Weight normalization (Salimans & Kingma, 2016) as a ``torch.nn.utils.parametrize`` parametrization.

.. math::

    \mathbf{w} = g \, \frac{\mathbf{v}}{\lVert \mathbf{v} \rVert}

with the norm taken over every dimension of ``v`` except ``dim`` (one ``g`` per slice along ``dim``,
i.e. per output unit), or over the whole tensor when ``dim=None`` (scalar ``g``).

State-dict layout (identical to ``torch.nn.utils.parametrizations.weight_norm``, so checkpoints can
be exchanged for the same ``dim``): for ``weight_norm(module, "weight")``

- ``parametrizations.weight.original0`` is ``g``: the shape of ``weight`` with every dim but ``dim``
  set to 1 (e.g. ``(out, 1, 1, 1)`` for a Conv2d), or a 0-dim tensor for ``dim=None``;
- ``parametrizations.weight.original1`` is ``v``: the shape of ``weight``.

``module.weight`` becomes a property that recomputes ``g * v / ||v||`` on every access (inside
``torch.nn.utils.parametrize.cached()`` once per context).

Unlike the stock parametrized modules, a module weight-normalized here can also be pickled (whole)
and deep-copied after a forward pass, including ``nn.LSTM``/``nn.GRU`` (whose cached
``_flat_weights`` otherwise hold non-leaf tensors that ``copy.deepcopy`` refuses).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["WeightNorm", "weight_norm", "remove_weight_norm", "init_weight_norm_", "is_weight_normed"]

# Floor for ||v||: v = 0 gives w = 0 instead of 0/0 = NaN (same role and value as F.normalize's eps).
_NORM_EPS = 1e-12

_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_INIT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *_CONV_TRANSPOSE)


class WeightNorm(nn.Module):
    r"""The parametrization :math:`(g, v) \mapsto g \, v / \max(\lVert v \rVert, 10^{-12})`.

    ``forward(g, v)`` builds the weight; ``right_inverse(w)`` returns ``(g, v) = (||w||, w)`` so that
    registering it leaves the module's function unchanged (and so that assigning ``module.weight =
    w`` sets both ``g`` and ``v``). The norm is computed in at least float32 (half / bfloat16 weights
    are upcast for the reduction) and the weight is returned in ``v``'s dtype.

    Args:
        dim: the dim of ``v`` that is *not* reduced (one ``g`` per index along it), already
            normalized to be non-negative; ``None`` reduces over the whole tensor (scalar ``g``).
    """

    def __init__(self, dim: int | None = 0) -> None:
        super().__init__()
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 0):
            raise ValueError(f"dim: expected a non-negative int or None, got {dim!r}")
        self.dim = None if dim is None else int(dim)

    def _norm(self, v: Tensor) -> Tensor:
        compute = torch.promote_types(v.dtype, torch.float32)
        if self.dim is None:
            return torch.linalg.vector_norm(v, dtype=compute)
        if v.ndim == 1:
            # Nothing to reduce: every entry is its own unit, ||v_i|| = |v_i|.
            return v.abs().to(compute)
        dims = [d for d in range(v.ndim) if d != self.dim]
        return torch.linalg.vector_norm(v, dim=dims, keepdim=True, dtype=compute)

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        norm = self._norm(v).clamp_min(_NORM_EPS)
        compute = norm.dtype
        return (v.to(compute) * (g.to(compute) / norm)).to(v.dtype)

    def right_inverse(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return self._norm(w).to(w.dtype), w

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


# ---------------------------------------------------------------------------------------------------
# Pickling / deep-copying parametrized modules.
#
# register_parametrization swaps the module's class for a generated subclass (not importable, so
# pickle cannot name it) whose __getstate__ raises. We give that generated class a __reduce_ex__ that
# names the *original* class plus a rebuild function, which re-creates the generated class and the
# properties on load. copy.deepcopy goes through the same path. The two helpers used to re-create
# the class and the properties are private to torch.nn.utils.parametrize (stable since torch 1.9);
# re-registering through the public API instead would have to recompute (g, v) from w = g v/||v||,
# which loses ||v||.


def _base_class(module: nn.Module) -> type[nn.Module]:
    # The generated class derives from exactly the module's original class.
    return type(module).__bases__[0]


def _rebuild_parametrized(base_cls: type[nn.Module]) -> nn.Module:
    """Unpickling entry point: an empty instance whose class is a fresh parametrized subclass."""
    obj = base_cls.__new__(base_cls)
    parametrize._inject_new_class(obj)
    _patch_serialization(type(obj))
    return obj


def _parametrized_reduce_ex(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    base_cls = _base_class(self)
    state = dict(base_cls.__getstate__(self) or self.__dict__)
    if isinstance(self, nn.RNNBase):
        # The RNN caches the *computed* parametrized weights (non-leaf tensors of the autograd
        # graph, which deepcopy rejects); they are recomputed from g and v after loading.
        names = set(self.parametrizations.keys())  # type: ignore[union-attr]
        state["_flat_weights"] = [
            None if name in names else w for name, w in zip(self._flat_weights_names, state["_flat_weights"])
        ]
    return (_rebuild_parametrized, (base_cls,), state)


def _parametrized_setstate(self: nn.Module, state: dict[str, Any]) -> None:
    base_cls = _base_class(self)
    base_cls.__setstate__(self, state)  # type: ignore[arg-type]
    for tensor_name in self.parametrizations.keys():  # type: ignore[union-attr]
        if not isinstance(getattr(type(self), tensor_name, None), property):
            parametrize._inject_property(self, tensor_name)
    if isinstance(self, nn.RNNBase):
        self._init_flat_weights()


def _parametrized_getstate(self: nn.Module) -> dict[str, Any]:
    return _parametrized_reduce_ex(self, 2)[2]


def _patch_serialization(cls: type) -> None:
    cls.__reduce_ex__ = _parametrized_reduce_ex  # type: ignore[method-assign]
    cls.__setstate__ = _parametrized_setstate  # type: ignore[attr-defined]
    # deepcopy prefers __deepcopy__ (the generated class defines one that copies __dict__ and trips
    # over the RNN's cached non-leaf tensors); None makes it fall back to __reduce_ex__ above.
    cls.__deepcopy__ = None  # type: ignore[attr-defined]
    # pickle only consults __reduce_ex__, but keep a state accessor that works (the generated one
    # raises) for code that calls __getstate__ directly.
    cls.__getstate__ = _parametrized_getstate  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------------


def _weight_norm_of(module: nn.Module, name: str) -> WeightNorm | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:  # type: ignore[union-attr,index]
        if isinstance(p, WeightNorm):
            return p
    return None


def is_weight_normed(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is parametrized by this module's :class:`WeightNorm`."""
    return _weight_norm_of(module, name) is not None


def _default_dim(module: nn.Module) -> int:
    # ConvTranspose weights are (in, out / groups, *k): the output units are along dim 1.
    return 1 if isinstance(module, _CONV_TRANSPOSE) else 0


def weight_norm(
    module: nn.Module,
    name: str = "weight",
    dim: int | None | Literal["auto"] = "auto",
) -> nn.Module:
    r"""Reparametrize ``module.<name>`` as :math:`w = g \, v / \lVert v \rVert` (Salimans & Kingma, 2016).

    Registers a :class:`WeightNorm` parametrization with ``right_inverse`` so that the module's
    function is unchanged right after the call (``g = ||w||``, ``v = w``). ``g`` and ``v`` are
    new parameters: add them to the optimizer after calling this (as with any parametrization).

    Args:
        module: module owning the parameter (Linear, ConvNd, ConvTransposeNd, RNN/LSTM/GRU weights
            such as ``"weight_hh_l0"``, or any module with a floating Parameter ``name``).
        name: name of the parameter to reparametrize.
        dim: dim of the weight kept by the norm (one ``g`` per index along it). ``"auto"``
            (default) means the output-unit dim: 1 for ``ConvTranspose*d`` (weight ``(in, out, *k)``),
            0 otherwise (``(out, ...)``), like ``torch.nn.utils.spectral_norm``. Negative ints count
            from the end, as everywhere in torch (note ``torch.nn.utils.parametrizations.weight_norm``
            instead treats ``dim=-1`` as "whole tensor"). ``None``: norm of the whole tensor, scalar ``g``.

    Returns:
        ``module`` (modified in place).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, ``dim`` is not an int / None / "auto", or the
            parameter is not floating point.
        ValueError: ``name`` is not a Parameter of ``module``, ``dim`` is out of range, or
            ``module.<name>`` is already weight-normalized.

    State-dict keys: ``parametrizations.<name>.original0`` (g) and ``parametrizations.<name>.original1`` (v).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    if is_weight_normed(module, name):
        raise ValueError(
            f"module.{name} is already weight-normalized; call remove_weight_norm(module, {name!r}) first"
        )
    if parametrize.is_parametrized(module, name):
        # right_inverse returns (g, v), which torch only accepts from the first parametrization.
        raise ValueError(
            f"module.{name} already has a parametrization; weight_norm must be registered first "
            "(remove the others, apply weight_norm, then register them again)"
        )
    tensor = module._parameters.get(name)
    if tensor is None:
        params = [n for n, _ in module.named_parameters(recurse=False)]
        kind = "a buffer" if name in module._buffers else "not a parameter"
        raise ValueError(
            f"name={name!r} is {kind} of {type(module).__name__}; expected one of its "
            f"parameters: {params}"
        )
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"module.{name}: expected a floating-point parameter, got dtype {tensor.dtype}")

    if isinstance(dim, str):
        if dim != "auto":
            raise ValueError(f"dim: expected an int, None or 'auto', got {dim!r}")
        dim = _default_dim(module)
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"dim: expected an int, None or 'auto', got {type(dim).__name__}")
        ndim = max(tensor.ndim, 1)
        if not -ndim <= dim < ndim:
            raise ValueError(
                f"dim={dim} is out of range for module.{name} of shape {tuple(tensor.shape)} "
                f"(expected an int in [{-ndim}, {ndim - 1}] or None)"
            )
        dim = int(dim) % ndim
        if tensor.ndim == 0:
            dim = None

    parametrize.register_parametrization(module, name, WeightNorm(dim))
    _patch_serialization(type(module))
    return module


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Fold ``g * v / ||v||`` back into a plain Parameter ``module.<name>`` (same outputs).

    Args:
        module: a module on which :func:`weight_norm` was applied to ``name``.
        name: the parameter name given to :func:`weight_norm`.

    Returns:
        ``module`` (modified in place). The new Parameter is a new tensor: re-create the optimizer.

    Raises:
        ValueError: ``module.<name>`` is not weight-normalized, or carries other parametrizations
            as well (removing only the weight norm from a stack is ambiguous).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if not is_weight_normed(module, name):
        raise ValueError(
            f"module.{name} is not weight-normalized (no WeightNorm parametrization on {name!r})"
        )
    if len(module.parametrizations[name]) != 1:  # type: ignore[union-attr,index,arg-type]
        raise ValueError(
            f"module.{name} has other parametrizations besides WeightNorm; remove them with "
            "torch.nn.utils.parametrize.remove_parametrizations"
        )
    # Not under no_grad: remove_parametrizations takes requires_grad of the new Parameter from the
    # computed weight, which would then be False.
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return module


def _output_unit_dims(layer: nn.Module) -> tuple[int, int]:
    """(dim of the weight, dim of the output) that index the layer's output units."""
    if isinstance(layer, nn.Linear):
        return 0, -1
    if isinstance(layer, _CONV_TRANSPOSE):
        return 1, 1
    return 0, 1


def _check_initializable(layer: nn.Module, path: str) -> None:
    wn = _weight_norm_of(layer, "weight")
    assert wn is not None
    weight_dim, _ = _output_unit_dims(layer)
    if wn.dim != weight_dim:
        raise ValueError(
            f"init_weight_norm_: layer {path!r} ({type(layer).__name__}) is weight-normalized with "
            f"dim={wn.dim}, but the data-dependent init needs one g per output unit (dim={weight_dim})"
        )
    if isinstance(layer, _CONV_TRANSPOSE) and layer.groups != 1:
        raise ValueError(
            f"init_weight_norm_: layer {path!r} is a grouped {type(layer).__name__}; its g along "
            "dim 1 is shared by the groups, so per-output-channel init is not possible"
        )
    if len(layer.parametrizations["weight"]) != 1:  # type: ignore[union-attr,index,arg-type]
        raise ValueError(f"init_weight_norm_: layer {path!r} has other parametrizations on weight")


@torch.no_grad()
def init_weight_norm_(model: nn.Module, batch: Any, *, eps: float = 1e-6) -> nn.Module:
    r"""Data-dependent initialization of weight-normalized layers (Salimans & Kingma 2016, §3).

    For each weight-normalized ``Linear`` / ``Conv*d`` / ``ConvTranspose*d`` in ``model`` (weight
    normalized with one ``g`` per output unit), in the order they run, with
    :math:`t = (v / \lVert v \rVert) \cdot x` the layer's pre-activation before ``g`` and the bias,
    :math:`\mu` and :math:`\sigma` the per-unit mean and (biased) std of ``t`` over the batch (and
    spatial) dims:

    .. math::

        g \leftarrow \frac{1}{\sqrt{\sigma^2 + \epsilon}}, \qquad
        b \leftarrow -\frac{\mu}{\sqrt{\sigma^2 + \epsilon}}

    so that each unit's output has zero mean and unit variance on ``batch``. Runs one forward pass:
    a forward hook initializes each layer as it is reached and replaces its output with the
    re-initialized one, so later layers see inputs from the already-initialized earlier layers.
    A layer without bias gets only ``g`` (its outputs then have unit variance, not zero mean).
    A layer called several times per forward is initialized at its first call.

    The model's mode is left as is: run it in the mode you want the statistics in (dropout /
    BatchNorm in train mode act during the pass).

    Args:
        model: the model to initialize in place.
        batch: what to call the model with: a Tensor (``model(batch)``), a tuple / list
            (``model(*batch)``) or a mapping (``model(**batch)``).
        eps: added to :math:`\sigma^2` (guards units that are constant on the batch).

    Returns:
        ``model``.

    Raises:
        ValueError: ``model`` has no weight-normalized Linear/Conv layer, or one of them is not
            normalized per output unit.
        RuntimeError: some weight-normalized layer was not run by the forward pass.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a real number, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
    layers = {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, _INIT_TYPES) and is_weight_normed(m, "weight")
    }
    if not layers:
        raise ValueError(
            "init_weight_norm_: model has no weight-normalized Linear/Conv layer; apply "
            "weight_norm(layer) to the layers first"
        )
    for path, layer in layers.items():
        _check_initializable(layer, path)

    done: set[int] = set()

    def hook(
        layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor
    ) -> Tensor | None:
        if id(layer) in done:
            return None
        done.add(id(layer))
        g = layer.parametrizations.weight.original0  # type: ignore[union-attr]
        bias = layer.bias  # type: ignore[union-attr]
        # t = (v/||v||)·x: evaluate the layer itself with g = 1 and b = 0 (calling .forward skips the
        # hooks), so every layer option (padding mode, groups, output_padding, ...) is honoured.
        g.fill_(1.0)
        if bias is not None:
            bias.zero_()
        t = layer.forward(*args, **kwargs)
        _, out_dim = _output_unit_dims(layer)
        out_dim %= t.ndim
        reduce = [d for d in range(t.ndim) if d != out_dim]
        t64 = t.to(torch.float64)
        var, mean = torch.var_mean(t64, dim=reduce, correction=0)
        inv_std = (var + eps).rsqrt()
        g.copy_(inv_std.reshape(g.shape))
        if bias is not None:
            bias.copy_((-mean * inv_std).reshape(bias.shape))
        return layer.forward(*args, **kwargs)

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers.values()]
    try:
        if isinstance(batch, Tensor):
            model(batch)
        elif isinstance(batch, (tuple, list)):
            model(*batch)
        elif isinstance(batch, Mapping):
            model(**batch)
        else:
            raise TypeError(f"batch: expected a Tensor, tuple, list or mapping, got {type(batch).__name__}")
    finally:
        for h in handles:
            h.remove()
    missed = [path for path, layer in layers.items() if id(layer) not in done]
    if missed:
        raise RuntimeError(
            f"init_weight_norm_: the forward pass did not run the weight-normalized layers {missed}"
        )
    return model
