"""Which modules are normalization layers: the one answer every part of normlab uses.

normlab's BatchNorm, InstanceNorm, GroupNorm, LayerNorm and RMSNorm subclass their torch.nn twins,
so torch's base classes answer for torch's layers and normlab's alike (and for the subclasses other
libraries derive from them); only the layers with no torch twin are listed by name.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from normlab.nn._base import NormBase
from normlab.nn.dyt import DynamicErf, DynamicTanh
from normlab.nn.evonorm import EvoNormB0, EvoNormS0
from normlab.nn.frn import FilterResponseNorm2d

__all__ = ["BATCH_NORM_TYPES", "NORM_LAYER_TYPES", "is_batch_norm", "is_norm_layer"]

#: Batch normalization with running statistics: torch's and normlab's BatchNorm{1,2,3}d (and
#: their subclasses: SyncBatchNorm, Batch Renorm, Ghost BN, BatchNormAct2d) and MeanOnlyBatchNorm.
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, NormBase)

#: Every normalization layer: batch and instance norm (torch's ``_NormBase``), GroupNorm, LayerNorm
#: (LayerNorm2d included), RMSNorm, MeanOnlyBatchNorm, and the layers that normalize without a
#: torch twin: Filter Response Norm, EvoNorm-S0/B0, Dynamic Tanh/erf.
NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    _NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
    NormBase,
    FilterResponseNorm2d,
    EvoNormS0,
    EvoNormB0,
    DynamicTanh,
    DynamicErf,
)


def is_norm_layer(module: nn.Module) -> bool:
    """True for a normalization layer (see :data:`NORM_LAYER_TYPES`); False for a container or an
    adapter that holds one (``model.modules()`` reaches the layer itself)."""
    return isinstance(module, NORM_LAYER_TYPES)


def is_batch_norm(module: nn.Module) -> bool:
    """True for a batch normalization layer with (possibly disabled) running statistics."""
    return isinstance(module, BATCH_NORM_TYPES)
