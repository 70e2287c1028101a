"""Utilities: weight normalization (a reparametrization) and batch-norm folding for inference."""

from normlab.nn.utils.fold import fold_batch_norm, foldable_pairs
from normlab.nn.utils.weight_norm import (
    WeightNorm,
    init_weight_norm_,
    is_weight_normed,
    remove_weight_norm,
    weight_norm,
)

__all__ = [
    "WeightNorm",
    "fold_batch_norm",
    "foldable_pairs",
    "init_weight_norm_",
    "is_weight_normed",
    "remove_weight_norm",
    "weight_norm",
]
