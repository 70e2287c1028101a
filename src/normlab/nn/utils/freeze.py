"""``normlab.freeze_batchnorm``: BatchNorm as a fixed affine map, whatever ``model.train()`` says.

Fine-tuning with small batches, detection backbones and transfer learning freeze BatchNorm: the
running statistics normalize (no batch statistics, no running-average updates) and γ, β stop
training. Calling ``model.eval()`` on the BN layers is not enough (the next ``model.train()``
undoes it), which is why timm's ``freeze_batch_norm_2d`` swaps torch's BatchNorm2d for a
``FrozenBatchNorm2d``. Here:

* normlab BatchNorm layers (and those :func:`normlab.convert` turns into normlab layers: torch's
  BatchNorm1d/2d/3d, timm-style ``BatchNormAct2d``) get ``stats_mode = "frozen"``: running
  statistics in train and eval, nothing updated, ``requires_grad=False`` on γ and β. A torch
  layer is replaced by its normlab twin holding the *same* Parameter and buffer tensors, so state
  dicts keep their keys (``num_batches_tracked`` included, unlike FrozenBatchNorm2d), isinstance
  checks against ``torch.nn.BatchNorm2d`` still hold, and an optimizer built on the parameters
  keeps working.
* Any other BatchNorm (``SyncBatchNorm``, a subclass whose math convert cannot verify, normlab's
  ``MeanOnlyBatchNorm``) is put in eval mode, γ/β get ``requires_grad=False``, and a forward
  pre-hook puts it back in eval mode at every call, so ``model.train()`` cannot unfreeze it.
  (The hook is not saved in a state_dict; re-freeze after loading a pickled model from another
  library.)

Undo: ``layer.stats_mode = None`` on normlab layers (restores requires_grad).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from normlab.nn.batchnorm import _BatchNorm
from normlab.nn.utils.layer_types import is_batch_norm

__all__ = ["freeze_batchnorm"]


def _keep_eval(module: nn.Module, args) -> None:
    module.training = False


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Freeze every BatchNorm layer of ``model`` in place (see the module docstring).

    Args:
        model: any ``nn.Module``; BatchNorm layers without running statistics
            (``track_running_stats=False``) cannot be frozen and raise.

    Returns:
        ``model`` (or, when ``model`` itself is a torch BatchNorm, its frozen normlab twin).

    Example::

        >>> import torch, normlab
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> net = normlab.freeze_batchnorm(net)
        >>> net[1].stats_mode, net[1].weight.requires_grad
        ('frozen', False)
    """
    from normlab.nn.utils.convert import _Leave, _to_normlab

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")

    def freeze(m: nn.Module, path: str) -> nn.Module:
        if getattr(m, "running_mean", None) is None:
            raise ValueError(f"{path or '<model>'}: {type(m).__name__} has no running statistics to freeze")
        if not isinstance(m, _BatchNorm) and isinstance(m, _TorchBatchNorm):
            try:
                m = _to_normlab(m)
            except _Leave:
                pass
        if isinstance(m, _BatchNorm):
            m.stats_mode = "frozen"
            return m
        m.eval()
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
        if _keep_eval not in m._forward_pre_hooks.values():
            m.register_forward_pre_hook(_keep_eval)
        return m

    def visit(m: nn.Module, path: str) -> nn.Module:
        if is_batch_norm(m):
            return freeze(m, path)
        for name, child in list(m._modules.items()):
            if child is not None:
                new = visit(child, f"{path}.{name}" if path else name)
                if new is not child:
                    m._modules[name] = new
        return m

    with torch.no_grad():
        return visit(model, "")
