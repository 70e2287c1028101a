"""torch.nn-compatible normalization layers."""

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, MeanOnlyBatchNorm
from normlab.nn.groupnorm import GroupNorm
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.layernorm import LayerNorm, LayerNorm2d, RMSNorm
from normlab.nn.rnn import BatchNormLSTM, LayerNormLSTM, NormLSTM, WeightNormLSTM
from normlab.nn.standardizer import Standardizer
from normlab.nn.syncbatchnorm import DistributedDataParallel, SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm  # noqa: E501

__all__ = [
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
]
