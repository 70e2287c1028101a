"""Normalization + activation in one layer (timm's ``BatchNormAct2d`` / ``GroupNormAct``), on normlab.

timm fuses "norm, dropout, activation" into one module that *is* its norm (a ``BatchNorm2d`` or
``GroupNorm`` subclass with ``drop`` and ``act`` submodules), so that code which looks for norm
layers by isinstance still finds them. :func:`normlab.convert` turns such layers into these
classes, keeping the very ``drop`` and ``act`` modules (and so their state_dict keys).
"""

from __future__ import annotations

from torch import Tensor, nn

from normlab.nn.batchnorm import BatchNorm2d
from normlab.nn.groupnorm import GroupNorm

__all__ = ["BatchNormAct2d", "GroupNormAct"]


class _NormAct:
    """``act(drop(norm(x)))``; ``act``/``drop`` default to ``nn.Identity``."""

    def _set_act(self, act: nn.Module | None, drop: nn.Module | None) -> None:
        for name, mod in (("act", act), ("drop", drop)):
            if mod is not None and not isinstance(mod, nn.Module):
                raise TypeError(f"{name}: expected an nn.Module or None, got {type(mod).__name__}")
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


class BatchNormAct2d(_NormAct, BatchNorm2d):
    """normlab's BatchNorm2d followed by ``drop`` and ``act`` (as timm's ``BatchNormAct2d``).

    Example::

        >>> import torch
        >>> layer = BatchNormAct2d(8, act=torch.nn.ReLU())
        >>> layer(torch.randn(2, 8, 4, 4)).min() >= 0
        tensor(True)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, act: nn.Module | None = None,
                 drop: nn.Module | None = None, bias: bool = True, backend: str | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, backend=backend)
        self._set_act(act, drop)


class GroupNormAct(_NormAct, GroupNorm):
    """normlab's GroupNorm followed by ``drop`` and ``act`` (as timm's ``GroupNormAct``)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, *, act: nn.Module | None = None, drop: nn.Module | None = None, bias: bool = True,
                 backend: str | None = None) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias, backend=backend)
        self._set_act(act, drop)
