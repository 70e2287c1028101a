"""normlab: normalization for deep learning, from the math up.

Layers mirror :mod:`torch.nn` (``normlab.BatchNorm2d`` is a drop-in for ``torch.nn.BatchNorm2d``);
functional forms live in :mod:`normlab.functional`; :func:`use_backend` forces a backend.
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

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "MeanOnlyBatchNorm",
    "RMSNorm",
    "Standardizer",
    "available_backends",
    "functional",
    "use_backend",
]
