"""Adapters that apply a layer made for one layout to another."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelsLast"]


class ChannelsLast(nn.Module):
    """Apply ``inner`` (which normalizes the last dim) to the channel dim of ``(N, C, *)``.

    ``y = inner(x.movedim(1, -1)).movedim(-1, 1)``: e.g. RMSNorm over the C channels at every
    position of a feature map. ``inner``'s parameters are under ``inner.`` in the state dict.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.movedim(1, -1)).movedim(-1, 1)
