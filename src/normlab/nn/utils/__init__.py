"""Utilities: model conversion, BatchNorm tools (fold, freeze, recalibrate), weight normalization,
which modules are norm layers (:func:`is_norm_layer`).

Importing this package registers normlab's BatchNorm classes with torch's eager-mode fuser
(``torch.ao.quantization.fuse_modules``), see :mod:`normlab.nn.utils.fuser`.
"""

from normlab.nn.utils.adapters import ChannelsLast
from normlab.nn.utils.convert import METHODS, ConversionReport, convert
from normlab.nn.utils.fold import fold_batch_norm, fold_batchnorm, foldable_pairs
from normlab.nn.utils.freeze import freeze_batchnorm
from normlab.nn.utils.fuser import register_fuser_methods
from normlab.nn.utils.layer_types import BATCH_NORM_TYPES, NORM_LAYER_TYPES, is_batch_norm, is_norm_layer
from normlab.nn.utils.norm_act import BatchNormAct2d, GroupNormAct
from normlab.nn.utils.recalibrate import recalibrate_batchnorm
from normlab.nn.utils.weight_norm import (
    WeightNorm,
    init_weight_norm_,
    is_weight_normed,
    remove_weight_norm,
    weight_norm,
)
from normlab.nn.utils.weight_standardization import (
    WeightStandardization,
    is_weight_standardized,
    remove_weight_standardization,
    weight_standardization,
)

register_fuser_methods()

__all__ = [
    "BATCH_NORM_TYPES",
    "METHODS",
    "NORM_LAYER_TYPES",
    "ChannelsLast",
    "BatchNormAct2d",
    "ConversionReport",
    "GroupNormAct",
    "WeightNorm",
    "convert",
    "fold_batch_norm",
    "fold_batchnorm",
    "foldable_pairs",
    "freeze_batchnorm",
    "init_weight_norm_",
    "is_batch_norm",
    "is_norm_layer",
    "is_weight_normed",
    "recalibrate_batchnorm",
    "register_fuser_methods",
    "remove_weight_norm",
    "weight_norm",
    "WeightStandardization",
    "is_weight_standardized",
    "remove_weight_standardization",
    "weight_standardization",
]
