r"""Fold inference-mode BatchNorm into the convolution or linear layer that feeds it.

In eval mode a BatchNorm layer is a fixed per-channel affine map,

.. math:: y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta = a \odot x + c,

with the running statistics :math:`\mu, \sigma^2`. When ``x`` is the output of a convolution
(or linear layer) ``x = W * u + b`` used by nothing but the BatchNorm, the two compose into one
convolution with weight :math:`a \odot W` (output channel ``k`` scaled by :math:`a_k`) and bias
:math:`a \odot b + c`, and the BatchNorm disappears: one op less per layer at inference, same
outputs (up to float rounding). Mean-only BatchNorm (:math:`y = x - \mu + \beta`) folds the
same way with :math:`a = 1`.

Pairs are found by tracing the model with :mod:`torch.fx` (normalization, convolution and linear
layers kept as leaves), so a conv whose output is also used elsewhere (e.g. by a skip
connection) is left alone. Models that cannot be traced fall back to pairs of neighbours in
``nn.Sequential`` containers, where the conv's output goes only to the next module.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from normlab.nn.batchnorm import MeanOnlyBatchNorm
from normlab.nn.utils.layer_types import is_batch_norm

__all__ = ["fold_batch_norm", "fold_batchnorm", "foldable_pairs"]

_LINEAR_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _is_mean_only(bn: nn.Module) -> bool:
    return isinstance(bn, MeanOnlyBatchNorm)


def _foldable_bn(bn: nn.Module) -> bool:
    # Without running statistics, BatchNorm uses the batch's statistics even in eval mode:
    # it is not a fixed affine map and cannot be folded. Nor can a normlab BatchNorm whose
    # stats_mode is "batch" (batch statistics in eval too).
    if getattr(bn, "stats_mode", None) == "batch":
        return False
    return bn.running_mean is not None and (_is_mean_only(bn) or bn.running_var is not None)


class _LeafTracer(torch.fx.Tracer):
    """Tracer that keeps conv/linear and normlab layers as opaque calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # normlab's own layers validate their input (shape checks a Proxy cannot pass): opaque.
        if isinstance(m, _LINEAR_TYPES) or is_batch_norm(m) or type(m).__module__.startswith("normlab.nn"):
            return True
        return super().is_leaf_module(m, qualname)


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not is_batch_norm(modules[node.target]):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        if not isinstance(modules[src.target], _LINEAR_TYPES):
            continue
        # The conv's output must feed only this BN, and neither module may be called twice.
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        pairs.append((src.target, node.target))
    return pairs


def _pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for prefix, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        children = list(mod.named_children())
        for (n1, m1), (n2, m2) in zip(children, children[1:]):
            if isinstance(m1, _LINEAR_TYPES) and is_batch_norm(m2):
                join = (prefix + ".") if prefix else ""
                pairs.append((join + n1, join + n2))
    return pairs


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, batchnorm name)`` for every BatchNorm that :func:`fold_batch_norm` would fold."""
    try:
        pairs = _pairs_fx(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: use the safe fallback
        warnings.warn(
            f"fold_batch_norm: could not trace the model ({type(exc).__name__}: {exc}); "
            "folding only conv/linear + BatchNorm neighbours inside nn.Sequential",
            stacklevel=3,
        )
        pairs = _pairs_sequential(model)
    modules = dict(model.named_modules())
    out = []
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        out_channels = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
        if bn.num_features != out_channels or not _foldable_bn(bn):
            continue
        out.append((conv_name, bn_name))
    return out


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def _fold_pair(conv: nn.Module, bn: nn.Module) -> None:
    if parametrize.is_parametrized(conv, "weight"):
        # Weight norm (or another parametrization): bake the current weight in first.
        parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
    w = conv.weight.detach().double()
    out_ch = w.shape[0]
    mean = bn.running_mean.detach().double()
    if _is_mean_only(bn):
        scale = torch.ones(out_ch, dtype=torch.float64)
    else:
        scale = (bn.running_var.detach().double() + bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.detach().double()
    shift = bn.bias.detach().double() if bn.bias is not None else torch.zeros(out_ch, dtype=torch.float64)
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(out_ch, dtype=torch.float64)
    new_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    new_b = (b - mean) * scale + shift
    dtype, device = conv.weight.dtype, conv.weight.device
    conv.weight = nn.Parameter(new_w.to(dtype=dtype, device=device))
    conv.bias = nn.Parameter(new_b.to(dtype=dtype, device=device))


def fold_batch_norm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """An inference copy of ``model`` with BatchNorm folded into the preceding conv/linear layers.

    Every BatchNorm (``normlab.nn`` or ``torch.nn`` BatchNorm1d/2d/3d, and normlab's
    MeanOnlyBatchNorm) whose input is the output of a ``Conv1d/2d/3d`` or ``Linear`` used by
    nothing else is merged into that layer (see the module docstring) and replaced by
    ``nn.Identity``. A weight-normalized conv gets its current weight baked in. BatchNorm without
    running statistics, or after any other layer, is kept. A ``Linear`` + BatchNorm pair is
    assumed to see ``(N, C)`` features (BatchNorm1d normalizes dim 1, the Linear's features are
    its last dim: the two coincide only for 2-D outputs, the usual MLP case).

    Args:
        model: the trained model (not modified unless ``inplace=True``).
        inplace: fold into ``model`` itself instead of a deep copy.

    Returns:
        The folded model, in eval mode. It computes what ``model.eval()`` computes (up to float
        rounding); it is meant for inference only (``.train()`` would not bring BatchNorm back).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    folded = model if inplace else copy.deepcopy(model)
    folded.eval()
    modules = dict(folded.named_modules())
    for conv_name, bn_name in foldable_pairs(folded):
        conv, bn = modules[conv_name], modules[bn_name]
        _fold_pair(conv, bn)
        _set_submodule(folded, bn_name, nn.Identity())
    return folded


#: ``normlab.fold_batchnorm``: the same function under the name of its siblings
#: (``freeze_batchnorm``, ``recalibrate_batchnorm``); ``fold_batch_norm`` stays for existing code.
fold_batchnorm = fold_batch_norm
