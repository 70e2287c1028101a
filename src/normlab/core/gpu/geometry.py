"""How each normalization maps onto the kernels' (group, position) geometry (see ``kernels``).

A :class:`Geo` names the groups a reduction runs over (``T`` of them, two coordinates of sizes
(T // G2, G2)) and the positions inside a group (``R``, coordinates (R // R2, R2)), each
coordinate with its memory stride and its coefficient in the auxiliary index (the parameter of
an element in a statistics geometry, the statistic group in a parameter geometry). Every op has
two: ``stat`` (groups = statistic groups) and ``param`` (groups = entries of γ/β).

Pure Python (no triton import): the tests check the mapping on CPU without kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TILE = 4096  # elements per program tile
TARGET_PROGRAMS = 512  # reductions split their positions into chunks until about this many programs


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class Coord:
    size: int
    stride: int
    aux: int = 0


def _pair(outer: Coord, inner: Coord) -> tuple[int, int, int, int, int]:
    """(size2, stride1, stride2, aux1, aux2) of the flattened index outer·size2 + inner, merging
    the two coordinates into one when that keeps addresses and aux linear (no // % in the kernel)."""
    if inner.size == 1:
        return 1, outer.stride, 0, outer.aux, 0
    if outer.size == 1:
        return 1, inner.stride, 0, inner.aux, 0
    if outer.stride == inner.size * inner.stride and outer.aux == inner.size * inner.aux:
        return 1, inner.stride, 0, inner.aux, 0
    return inner.size, outer.stride, inner.stride, outer.aux, inner.aux


@dataclass(frozen=True)
class Geo:
    T: int
    R: int
    G2: int
    sg1: int
    sg2: int
    R2: int
    sr1: int
    sr2: int
    ag1: int
    ag2: int
    ar1: int
    ar2: int

    @classmethod
    def of(cls, g_outer: Coord, g_inner: Coord, r_outer: Coord, r_inner: Coord) -> "Geo":
        G2, sg1, sg2, ag1, ag2 = _pair(g_outer, g_inner)
        R2, sr1, sr2, ar1, ar2 = _pair(r_outer, r_inner)
        return cls(g_outer.size * g_inner.size, r_outer.size * r_inner.size,
                   G2, sg1, sg2, R2, sr1, sr2, ag1, ag2, ar1, ar2)

    @property
    def addr(self) -> tuple[int, ...]:
        return (self.G2, self.sg1, self.sg2, self.R2, self.sr1, self.sr2)

    @property
    def aux(self) -> tuple[int, ...]:
        return (self.ag1, self.ag2, self.ar1, self.ar2)

    def tile(self) -> tuple[int, int]:
        """(BG, BR): wide along the groups when they are contiguous in memory (NHWC channels),
        else along the positions."""
        inner_stride = self.sg2 if self.G2 > 1 else self.sg1
        if self.T > 1 and inner_stride == 1:
            bg = min(_pow2(self.T), 64)
            return bg, min(_pow2(self.R), max(1, TILE // bg))
        br = min(_pow2(self.R), TILE)
        return min(_pow2(self.T), max(1, TILE // br)), br

    def split(self, bg: int, br: int) -> tuple[int, int]:
        """(chunks, chunk length): the positions of a group are split over programs so that the
        reduction has about TARGET_PROGRAMS programs (a long row is split across programs)."""
        tiles = math.ceil(self.T / bg)
        most = math.ceil(self.R / br)
        chunks = min(most, max(1, math.ceil(TARGET_PROGRAMS / tiles)))
        ch = math.ceil(math.ceil(self.R / chunks) / br) * br
        return math.ceil(self.R / ch), ch


def nc_strides(n: int, c: int, s: int, channels_last: bool) -> tuple[int, int, int]:
    """Strides (n, c, position) of an (N, C, S) tensor stored NCHW or NHWC."""
    return (s * c, 1, c) if channels_last else (c * s, s, 1)


def batch_norm(n: int, c: int, s: int, channels_last: bool) -> tuple[Geo, Geo]:
    """Statistics and parameters both per channel, over (n, position)."""
    sn, sc, ss = nc_strides(n, c, s, channels_last)
    geo = Geo.of(Coord(c, sc, 1), Coord(1, 0), Coord(n, sn), Coord(s, ss))
    return geo, geo


def group_norm(n: int, c: int, s: int, groups: int, channels_last: bool) -> tuple[Geo, Geo]:
    """Statistics per (n, g) over (channel j of the group, position); parameters per (g, j) over
    (n, position), the statistic of an element being n·G + g."""
    sn, sc, ss = nc_strides(n, c, s, channels_last)
    cg = c // groups
    j, pos = Coord(cg, sc, 1), Coord(s, ss)
    # the inner position coordinate is the one contiguous in memory
    inner = (j, pos) if not channels_last else (pos, j)
    stat = Geo.of(Coord(n, sn), Coord(groups, cg * sc, cg), *inner)
    param = Geo.of(Coord(groups, cg * sc, 1), Coord(cg, sc), Coord(n, sn, groups), Coord(s, ss))
    return stat, param


def rows(rows_: int, k: int) -> tuple[Geo, Geo]:
    """Layer norm of contiguous (rows, K): statistics per row; parameters per column."""
    stat = Geo.of(Coord(rows_, k), Coord(1, 0), Coord(k, 1, 1), Coord(1, 0))
    param = Geo.of(Coord(k, 1), Coord(1, 0), Coord(rows_, k, 1), Coord(1, 0))
    return stat, param


def channels_first(n: int, c: int, s: int) -> tuple[Geo, Geo]:
    """Layer norm over C of contiguous (N, C, S): statistics per (n, position) over c;
    parameters per c over (n, position), the statistic of an element being n·S + position."""
    stat = Geo.of(Coord(n, c * s), Coord(s, 1), Coord(c, s, 1), Coord(1, 0))
    param = Geo.of(Coord(c, s), Coord(1, 0), Coord(n, c * s, s), Coord(s, 1, 1))
    return stat, param
