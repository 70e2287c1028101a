"""torch.nn-compatible normalization layers."""

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, MeanOnlyBatchNorm
from normlab.nn.groupnorm import GroupNorm
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.layernorm import LayerNorm, RMSNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "MeanOnlyBatchNorm",
    "RMSNorm",
]
