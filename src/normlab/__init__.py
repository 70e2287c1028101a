"""normlab: normalization for deep learning, from the math up.

Layers mirror :mod:`torch.nn` (``normlab.BatchNorm2d`` is a drop-in for ``torch.nn.BatchNorm2d``);
functional forms live in :mod:`normlab.functional`; :func:`use_backend` forces a backend.
:func:`convert` puts normlab's layers into any model (or swaps its normalization method);
:func:`fold_batchnorm`, :func:`freeze_batchnorm` and :func:`recalibrate_batchnorm` are the
BatchNorm tools.
"""

from normlab import functional
from normlab.core.dispatch import available_backends, use_backend
from normlab.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    LayerNorm2d,
    MeanOnlyBatchNorm,
    RMSNorm,
    Standardizer,
)
from normlab.nn import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    DynamicErf,
    DynamicTanh,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm2d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    StdConv2d,
)
from normlab.nn.syncbatchnorm import DistributedDataParallel, SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm  # noqa: E501
from normlab.nn.utils import (
    ConversionReport,
    convert,
    fold_batchnorm,
    freeze_batchnorm,
    recalibrate_batchnorm,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "ConversionReport",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "MeanOnlyBatchNorm",
    "RMSNorm",
    "Standardizer",
    "SyncBatchNorm", "DistributedDataParallel", "convert_sync_batchnorm", "revert_sync_batchnorm",
    "available_backends",
    "convert",
    "fold_batchnorm",
    "freeze_batchnorm",
    "functional",
    "recalibrate_batchnorm",
    "use_backend",
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
    "StdConv2d",
]
