"""Utilities for normalization reparametrizations (weight normalization)."""

from normlab.nn.utils.weight_norm import (
    WeightNorm,
    init_weight_norm_,
    is_weight_normed,
    remove_weight_norm,
    weight_norm,
)

__all__ = ["WeightNorm", "init_weight_norm_", "is_weight_normed", "remove_weight_norm", "weight_norm"]
