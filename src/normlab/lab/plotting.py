"""What the studies' figures share: one colour and marker per norm, interval bars and bands, saving.

Every figure of the report draws a norm with the colour and marker of :data:`NORM_STYLE`, so that
BatchNorm is the same blue in every study. matplotlib is imported on first use (:func:`plt`),
with the Agg backend: studies are loaded by ``normlab studies`` and by sweep workers, which
draw nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab.stats import Interval, mean_ci
from normlab.lab.store import RunResult
from normlab.lab.studies import Figure

__all__ = [
    "NORM_STYLE",
    "band",
    "panels",
    "ci_yerr",
    "color",
    "finish",
    "marker",
    "mean_curve",
    "plain_log_yaxis",
    "plt",
    "save_png",
    "t_band",
]

#: Norm (or arm) name -> (matplotlib colour, marker), the same in every figure of the report.
NORM_STYLE: dict[str, tuple[str, str]] = {
    "none": ("gray", "x"),
    "bn": ("tab:blue", "o"),
    "gn": ("tab:red", "s"),
    "ln": ("tab:green", "^"),
    "in": ("tab:purple", "v"),
    "wn+mobn": ("tab:orange", "D"),
    "wn": ("tab:brown", "P"),
    "mobn": ("tab:cyan", "<"),
    "rms": ("tab:pink", ">"),
    "noisy-bn": ("tab:olive", "*"),
    "bn-shared": ("cornflowerblue", "o"),
    "own": ("black", "*"),
    "brn": ("steelblue", "d"),
    "gbn": ("lightskyblue", "h"),
    "ws+gn": ("darkred", "p"),
    "frn": ("goldenrod", "X"),
    "evonorm-s0": ("teal", "8"),
    "evonorm-b0": ("darkcyan", "H"),
    "dyt": ("darkgreen", "1"),
    "derf": ("olivedrab", "2"),
    # transformer arms (placement / QK-norm variants of LN)
    "post-ln": ("darkorange", "v"),
    "peri-ln": ("mediumseagreen", "D"),
    "ln+qk": ("limegreen", "*"),
}


def color(norm: str) -> str | None:
    """The colour of ``norm`` (``"gn:8"`` is GroupNorm's); ``None`` (matplotlib's cycle) if unknown."""
    style = NORM_STYLE.get(norm) or NORM_STYLE.get(norm.split(":")[0])
    return style[0] if style else None


def marker(norm: str) -> str:
    """The marker of ``norm`` (``"o"`` if unknown)."""
    style = NORM_STYLE.get(norm) or NORM_STYLE.get(norm.split(":")[0])
    return style[1] if style else "o"


def plt() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported here: drawing is the report's business)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def panels(rows: int, cols: int, panel: tuple[float, float], **kw: Any) -> tuple[Any, Any]:
    """A figure of ``rows × cols`` panels of ``panel = (width, height)`` inches each; ``axes`` is
    always 2-D (``axes[row][col]``); ``kw`` goes to ``plt.subplots`` (``sharex``, ``sharey``)."""
    w, h = panel
    return plt().subplots(rows, cols, figsize=(w * cols, h * rows), dpi=100, squeeze=False, **kw)


def save_png(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as PNG at ``path`` and free it (studies make many figures)."""
    fig.savefig(path)
    plt().close(fig)
    return Path(path)


def finish(fig: Any, path: Path, title: str, caption: str = "") -> Figure:
    """Lay out ``fig``, save it as PNG at ``path`` and return it as a report :class:`Figure`."""
    fig.tight_layout()
    return Figure(title, save_png(fig, path), caption)


def ci_yerr(iv: Interval, scale: float = 1.0) -> list[list[float]] | None:
    """``yerr`` (or ``xerr``) of one point for ``errorbar``: ``[[mean − lo], [hi − mean]]·scale``.

    ``None`` (no bar) when the interval carries no information (fewer than 2 values).
    """
    if iv.degenerate:
        return None
    return [[scale * (iv.mean - iv.lo)], [scale * (iv.hi - iv.mean)]]


def band(ax: Any, x: Any, lo: Any, hi: Any, color: str | None, alpha: float = 0.2) -> None:
    """A shaded band between ``lo`` and ``hi`` (a CI, a min–max or a percentile range)."""
    ax.fill_between(x, lo, hi, color=color, alpha=alpha)


def mean_curve(runs: Iterable[RunResult], metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-epoch mean of ``metric`` over ``runs`` (``None`` entries dropped, curves cut to the
    shortest), with epochs numbered from 1; ``None`` if no run has the curve."""
    curves = [[v for v in r.curve(metric) if v is not None] for r in runs]
    curves = [c for c in curves if c]
    if not curves:
        return None
    length = min(len(c) for c in curves)
    return np.arange(1, length + 1), np.mean([c[:length] for c in curves], axis=0)


def t_band(curves: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean and 95% t-band per position of curves cut to the shortest (no band for one curve)."""
    curves = [c for c in curves if c]
    if not curves:
        return None
    length = min(len(c) for c in curves)
    arr = np.asarray([c[:length] for c in curves], dtype=float)
    mean = arr.mean(axis=0)
    lo, hi = mean.copy(), mean.copy()
    if len(curves) >= 2:
        ivs = [mean_ci(arr[:, j]) for j in range(length)]
        lo = np.asarray([iv.lo for iv in ivs])
        hi = np.asarray([iv.hi for iv in ivs])
    return mean, lo, hi


def plain_log_yaxis(ax: Any) -> None:
    """Log-scale y axis with plain numbers (1, 2, 5, 10 … instead of 2×10⁰)."""
    from matplotlib.ticker import FuncFormatter, LogLocator  # with matplotlib itself: see plt()

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
