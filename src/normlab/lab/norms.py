"""Normalization choices by name, so that every lab model takes ``norm="gn"`` (timm style).

A :class:`NormSpec` says two things about a choice: which layer follows a conv/linear layer
(``make(num_channels, kind)``) and whether the conv/linear weights themselves are reparametrized
by weight normalization (``weight_norm``). Names:

========== ===============================================================================
name       meaning
========== ===============================================================================
``none``   no normalization (``nn.Identity``)
``bn``     BatchNorm (statistics over the batch and every position, per channel)
``gn``     GroupNorm with the default number of groups (:func:`default_groups`)
``gn:G``   GroupNorm with ``G`` groups, e.g. ``gn:4``; ``C`` must be divisible by ``G``
``ln``     LayerNorm. After a conv: ``GroupNorm(1, C)``, i.e. statistics over (C, *), as in
           the Group Norm paper; after a linear layer: ``LayerNorm(C)``
``in``     InstanceNorm with ``affine=True`` (conv only: a linear output has no positions)
``rms``    RMSNorm over the channels. After a conv it is applied at each position over the
           ``C`` channels (the conv analogue of RMSNorm on a feature vector)
``mobn``   mean-only BatchNorm (subtract the batch mean, add a learned shift)
``wn``     weight normalization of every conv/linear weight, no normalization layer
``wn+mobn`` weight normalization + mean-only BatchNorm (Salimans & Kingma, 2016)
``wn+X``   weight normalization + any other registered name ``X`` (e.g. ``wn+bn``)
``brn``    Batch Renormalization (Ioffe 2017; r_max=3, d_max=5, no warm-up)
``gbn:G``  Ghost BatchNorm over virtual batches of ``G`` samples (``gbn`` = ``gbn:16``);
           the batch size must be a multiple of ``G``
``ws+gn``  Weight Standardization of every conv weight + GroupNorm (Qiao et al. 2019);
           ``ws+X`` combines WS with any registered ``X``
``frn``    Filter Response Norm + TLU (conv1d/conv2d; replaces norm *and* activation)
``evonorm-s0`` EvoNorm-S0 (groups as ``gn``; norm + activation, batch-independent)
``evonorm-b0`` EvoNorm-B0 (conv only; norm + activation, batch statistics)
``dyt``    Dynamic Tanh γ·tanh(αx)+β (per channel on dim 1 after a conv, last dim otherwise)
``derf``   Dynamic erf γ·erf(αx+s)+β (placed as ``dyt``)
========== ===============================================================================

Kinds of the tensor the layer receives (``kind`` argument of ``make``):

* ``"conv1d"``: ``(N, C, L)``; ``"conv2d"``: ``(N, C, H, W)``; ``"linear"``: ``(N, C)``;
* ``"sequence"``: ``(N, T, C)``, batch first, features last (the output of a recurrent or
  per-step linear layer). Every time step is treated as a row of a ``"linear"`` input: LN, GN
  and RMS normalize each step's feature vector on its own (so they stay causal), BN and mean-only
  BN pool their statistics over ``N`` and ``T`` ("sequence-wise" BN). InstanceNorm is
  rejected, as for ``"linear"``.

Layers come from :mod:`normlab.nn` (which norm layers a model holds:
:func:`normlab.nn.utils.is_norm_layer`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import normlab.nn as nl
from normlab.lab.util import add_entry
from normlab.nn.utils import ChannelsLast

__all__ = [
    "KINDS",
    "NormSpec",
    "default_groups",
    "get_norm",
    "norm_names",
    "register_norm",
]

KINDS: tuple[str, ...] = ("conv1d", "conv2d", "linear", "sequence")


# --------------------------------------------------------------------------------------------
# Adapter: apply a layer made for (rows, C) to a (N, T, C) sequence (ChannelsLast: normlab.nn.utils).
# --------------------------------------------------------------------------------------------
class RowWise(nn.Module):
    """Apply ``inner`` (made for ``(rows, C)``) to a ``(N, T, C)`` sequence, one row per step.

    The reshape makes BN's statistics pool over ``N·T`` and LN/GN/RMS act on each step alone.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(
                f"x: expected a (N, T, C) sequence for a 'sequence' norm, got shape {tuple(x.shape)}"
            )
        return self.inner(x.reshape(-1, x.shape[-1])).reshape(x.shape)


# --------------------------------------------------------------------------------------------
# The registry.
# --------------------------------------------------------------------------------------------
LayerFactory = Callable[[int, str], nn.Module]


@dataclass(frozen=True)
class NormSpec:
    """One normalization choice.

    Attributes:
        name: registry name (``"bn"``, ``"gn:4"``, ...).
        factory: ``factory(num_channels, kind) -> nn.Module``; called by :meth:`make` after the
            arguments were checked. May raise ``ValueError`` for a kind it does not support.
        weight_norm: reparametrize the weights of the conv/linear layers (Salimans & Kingma).
        weight_standardization: standardize every conv filter (Qiao et al. 2019), for ``ws+X``.
        has_shift: the layer adds a learned per-channel shift after removing the mean, which
            makes a bias in the preceding conv/linear layer redundant (models then drop it).
        description: one line for listings.
    """

    name: str
    factory: LayerFactory
    weight_norm: bool = False
    has_shift: bool = False
    description: str = ""
    weight_standardization: bool = False

    def make(self, num_channels: int, kind: str) -> nn.Module:
        """Build the normalization layer for ``num_channels`` channels of a ``kind`` tensor.

        Args:
            num_channels: number of channels/features ``C`` (positive int).
            kind: one of :data:`KINDS`.

        Raises:
            TypeError: ``num_channels`` is not an int.
            ValueError: ``num_channels`` < 1, unknown ``kind``, or a combination that makes no
                sense (e.g. InstanceNorm on a linear layer, ``gn:G`` with ``C % G != 0``).
        """
        if isinstance(num_channels, bool) or not isinstance(num_channels, int):
            raise TypeError(
                f"num_channels: expected an int, got {type(num_channels).__name__}"
            )
        if num_channels < 1:
            raise ValueError(f"num_channels: expected >= 1, got {num_channels}")
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
        return self.factory(num_channels, kind)


def default_groups(num_channels: int) -> int:
    """Default number of GroupNorm groups for ``num_channels`` channels.

    The largest divisor ``G`` of ``C`` with ``G <= 8`` and at least two channels per group
    (``G <= C / 2``), or 1 when there is none. E.g. C=16, 32, 64 -> 8; C=12 -> 6; C=4 -> 2;
    C=3 -> 1. Eight groups is what the pilots used; the "two channels per group" rule keeps the
    default from silently turning GroupNorm into InstanceNorm (G = C) for narrow layers.
    """
    for g in range(min(8, num_channels // 2), 1, -1):
        if num_channels % g == 0:
            return g
    return 1


def _for_kind(
    kind: str,
    num_channels: int,
    per_channel: Callable[[int], nn.Module],
) -> nn.Module:
    """Wrap a layer built for ``(N, C, *)``/``(N, C)`` input so that it fits ``kind``."""
    layer = per_channel(num_channels)
    return RowWise(layer) if kind == "sequence" else layer


def _make_none(c: int, kind: str) -> nn.Module:
    return nn.Identity()


def _make_bn(c: int, kind: str) -> nn.Module:
    if kind == "conv2d":
        return nl.BatchNorm2d(c)
    return _for_kind(kind, c, nl.BatchNorm1d)


def _make_gn(groups: int | None) -> LayerFactory:
    def make(c: int, kind: str) -> nn.Module:
        g = default_groups(c) if groups is None else groups
        if c % g != 0:
            raise ValueError(
                f"norm 'gn:{g}': num_channels ({c}) must be divisible by the number of groups ({g})"
            )
        # GroupNorm accepts (N, C) and (N, C, *) alike.
        return _for_kind(kind, c, lambda ch: nl.GroupNorm(g, ch))

    return make


def _make_ln(c: int, kind: str) -> nn.Module:
    if kind in ("conv1d", "conv2d"):
        # LN for conv nets as in the Group Norm paper: one (mean, var) per sample over (C, *).
        return nl.GroupNorm(1, c)
    return nl.LayerNorm(c)  # (N, C) and (N, T, C) alike: over the last dim


def _make_in(c: int, kind: str) -> nn.Module:
    if kind == "conv1d":
        return nl.InstanceNorm1d(c, affine=True)
    if kind == "conv2d":
        return nl.InstanceNorm2d(c, affine=True)
    raise ValueError(
        f"norm 'in': InstanceNorm normalizes each channel over its positions, and a {kind!r} "
        f"layer's features have none (one value per channel per sample); use 'ln', 'gn' or 'bn'"
    )


def _make_rms(c: int, kind: str) -> nn.Module:
    if kind in ("conv1d", "conv2d"):
        return ChannelsLast(nl.RMSNorm(c))
    return nl.RMSNorm(c)  # over the last dim, per row (or per time step)


def _make_mobn(c: int, kind: str) -> nn.Module:
    return _for_kind(kind, c, nl.MeanOnlyBatchNorm)


def _make_brn(c: int, kind: str) -> nn.Module:
    if kind == "conv2d":
        return nl.BatchRenorm2d(c)
    return _for_kind(kind, c, nl.BatchRenorm1d)


def _make_gbn(g: int) -> LayerFactory:
    def make(c: int, kind: str) -> nn.Module:
        if kind == "conv2d":
            return nl.GhostBatchNorm2d(c, virtual_batch_size=g)
        return _for_kind(kind, c, lambda ch: nl.GhostBatchNorm1d(ch, virtual_batch_size=g))

    return make


class SignalAs2d(nn.Module):
    """Apply ``inner`` (made for ``(N, C, H, W)``) to a ``(N, C, L)`` signal as ``(N, C, L, 1)``.

    For FRN on a 1-D conv: ν² over the ``L`` positions of a channel is the same mean of squares
    as over an ``L × 1`` image.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x: expected a (N, C, L) signal, got shape {tuple(x.shape)}")
        return self.inner(x.unsqueeze(-1)).squeeze(-1)


def _make_frn(c: int, kind: str) -> nn.Module:
    if kind == "conv1d":
        return SignalAs2d(nl.FilterResponseNorm2d(c))
    if kind != "conv2d":
        # One value per channel: nu^2 = x^2, so x / sqrt(nu^2 + eps) is sign(x) (FRN paper, sec. 3.1).
        raise ValueError(
            f"norm 'frn': FilterResponseNorm normalizes each channel over its positions (conv1d or "
            f"conv2d input), got a {kind!r} layer, whose single value per channel it would turn into its sign"
        )
    return nl.FilterResponseNorm2d(c)


def _make_evonorm_s0(c: int, kind: str) -> nn.Module:
    return _for_kind(kind, c, lambda ch: nl.EvoNormS0(ch, groups=default_groups(ch)))


def _make_evonorm_b0(c: int, kind: str) -> nn.Module:
    if kind not in ("conv1d", "conv2d"):
        raise ValueError(f"norm 'evonorm-b0': needs positions (a conv layer's output), got a {kind!r} layer")
    return nl.EvoNormB0(c)


def _make_pointwise(cls_name: str) -> LayerFactory:
    def make(c: int, kind: str) -> nn.Module:
        cls = getattr(nl, cls_name)
        if kind in ("conv1d", "conv2d"):
            return cls(c, channels_last=False)
        return cls(c)  # (N, C) and (N, T, C): the last dim

    return make


_REGISTRY: dict[str, NormSpec] = {}


def register_norm(name: str, spec: NormSpec, *, overwrite: bool = False) -> None:
    """Register ``spec`` under ``name`` so that models accept ``norm=name``.

    Raises:
        TypeError: ``spec`` is not a :class:`NormSpec`.
        ValueError: empty name, a name with ``:`` (reserved for parameters such as ``gn:4``),
            or an existing name without ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty str, got {name!r}")
    if ":" in name:
        raise ValueError(f"name: ':' is reserved for parameters (as in 'gn:4'), got {name!r}")
    if not isinstance(spec, NormSpec):
        raise TypeError(f"spec: expected a NormSpec, got {type(spec).__name__}")
    add_entry(_REGISTRY, name, spec, kind="norm", overwrite=overwrite)


def norm_names() -> list[str]:
    """Registered names (the parametrized forms ``gn:G`` and ``wn+X`` are accepted as well)."""
    return sorted(_REGISTRY)


def get_norm(name: str) -> NormSpec:
    """Return the :class:`NormSpec` for ``name`` (a registered name, ``gn:G`` or ``wn+X``).

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: unknown name (the message lists the valid ones) or a bad ``gn:G``.
    """
    if not isinstance(name, str):
        raise TypeError(f"norm: expected a str such as 'bn', got {type(name).__name__}")
    key = name.strip()
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key.startswith("gn:"):
        text = key[3:]
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"norm: 'gn:G' needs a positive integer G, got {name!r}")
        g = int(text)
        return NormSpec(key, _make_gn(g), has_shift=True, description=f"GroupNorm, {g} groups")
    if key.startswith("gbn:"):
        text = key[4:]
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"norm: 'gbn:G' needs a positive integer virtual batch size G, got {name!r}")
        g = int(text)
        return NormSpec(key, _make_gbn(g), has_shift=True, description=f"Ghost BatchNorm, virtual batch {g}")
    if key.startswith("ws+"):
        inner = get_norm(key[3:])
        if inner.weight_standardization:
            raise ValueError(f"norm: {name!r} applies weight standardization twice")
        return NormSpec(key, inner.factory, weight_norm=inner.weight_norm, has_shift=inner.has_shift,
                        description=f"weight standardization + {inner.description or inner.name}",
                        weight_standardization=True)
    if key.startswith("wn+"):
        inner = get_norm(key[3:])
        if inner.weight_norm:
            raise ValueError(f"norm: {name!r} applies weight normalization twice")
        return NormSpec(
            key,
            inner.factory,
            weight_norm=True,
            has_shift=inner.has_shift,
            description=f"weight norm + {inner.description or inner.name}",
        )
    raise ValueError(
        f"norm: unknown name {name!r}; expected one of {norm_names()}, 'gn:G' (e.g. 'gn:4') "
        f"'gbn:G', 'wn+NAME' or 'ws+NAME'"
    )


for _spec in (
    NormSpec("none", _make_none, description="no normalization"),
    NormSpec("bn", _make_bn, has_shift=True, description="BatchNorm"),
    NormSpec("gn", _make_gn(None), has_shift=True, description="GroupNorm, default groups"),
    NormSpec("ln", _make_ln, has_shift=True, description="LayerNorm (GroupNorm(1, C) for convs)"),
    NormSpec("in", _make_in, has_shift=True, description="InstanceNorm (affine)"),
    NormSpec("rms", _make_rms, description="RMSNorm over channels"),
    NormSpec("mobn", _make_mobn, has_shift=True, description="mean-only BatchNorm"),
    NormSpec("wn", _make_none, weight_norm=True, description="weight norm, no layer"),
    NormSpec(
        "wn+mobn",
        _make_mobn,
        weight_norm=True,
        has_shift=True,
        description="weight norm + mean-only BatchNorm",
    ),
    NormSpec("brn", _make_brn, has_shift=True, description="Batch Renormalization"),
    NormSpec("gbn", _make_gbn(16), has_shift=True, description="Ghost BatchNorm, virtual batch 16"),
    NormSpec("ws+gn", _make_gn(None), has_shift=True, weight_standardization=True,
             description="weight standardization + GroupNorm"),
    NormSpec("frn", _make_frn, description="Filter Response Norm + TLU"),
    NormSpec("evonorm-s0", _make_evonorm_s0, description="EvoNorm-S0 (norm + activation)"),
    NormSpec("evonorm-b0", _make_evonorm_b0, description="EvoNorm-B0 (norm + activation)"),
    NormSpec("dyt", _make_pointwise("DynamicTanh"), description="Dynamic Tanh"),
    NormSpec("derf", _make_pointwise("DynamicErf"), description="Dynamic erf"),
):
    register_norm(_spec.name, _spec)
del _spec
