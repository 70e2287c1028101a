"""torch.nn-compatible normalization layers."""

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, MeanOnlyBatchNorm
from normlab.nn.groupnorm import GroupNorm
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.layernorm import LayerNorm, LayerNorm2d, RMSNorm
from normlab.nn.rnn import BatchNormLSTM, LayerNormLSTM, NormLSTM, WeightNormLSTM
from normlab.nn.standardizer import Standardizer
from normlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, Ramp
from normlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from normlab.nn.stdconv import StdConv2d
from normlab.nn.frn import FilterResponseNorm2d
from normlab.nn.evonorm import EvoNormB0, EvoNormS0
from normlab.nn.dyt import DynamicErf, DynamicTanh
from normlab.nn.fused import (AddLayerNorm, AddRMSNorm, BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d,
                              GroupNormSiLU)
from normlab.nn.syncbatchnorm import DistributedDataParallel, SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm  # noqa: E501

__all__ = [
    "AddLayerNorm",
    "AddRMSNorm",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "GroupNormSiLU",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormLSTM",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "LayerNormLSTM",
    "MeanOnlyBatchNorm",
    "NormLSTM",
    "RMSNorm",
    "Standardizer",
    "SyncBatchNorm", "DistributedDataParallel", "convert_sync_batchnorm", "revert_sync_batchnorm",
    "WeightNormLSTM",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "DynamicErf",
    "DynamicTanh",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm2d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "Ramp",
    "StdConv2d",
]
