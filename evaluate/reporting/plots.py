"""Figures of the report: one colour per backbone everywhere, labelled axes, log scales on demand.

A reader compares backbones across a dozen plots at a glance only if a backbone keeps its colour
in every one of them, so colours come from one `Styles` object built from every label of the
report. Figures are drawn with the Agg backend (no display needed) and closed after saving.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

# Fixed colours for the first backbones (colour-blind-friendly where possible), so the same
# backbone looks the same in every report, not only within one. Any other backbone (a new
# conf/arch file) needs no entry: it gets a spare colour chosen from its name (_spare_colour).
KNOWN_COLOURS = {
    "transformer": "#1f77b4",
    "gpt2": "#17becf",
    "mamba": "#d62728",
    "mamba2": "#ff7f0e",
    "rwkv7": "#2ca02c",
    "jamba": "#9467bd",
}
SPARE_COLOURS = ["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#393b79", "#637939", "#843c39",
                 "#7b4173", "#3182bd", "#e6550d"]
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]
DPI = 110


class Styles:
    """Colour (by backbone) and line style (by variant of a backbone, e.g. its size) per label."""

    def __init__(self, labels: Iterable[tuple[str, str]]) -> None:
        """`labels`: (label, backbone) pairs; labels of one backbone share its colour."""
        self._style: dict[str, dict[str, Any]] = {}
        backbone_colour: dict[str, str] = {}
        variants: dict[str, int] = {}
        for label, backbone in sorted(set(labels)):
            if backbone not in backbone_colour:
                backbone_colour[backbone] = KNOWN_COLOURS.get(backbone) or _spare_colour(
                    backbone, set(backbone_colour.values()))
            k = variants.get(backbone, 0)
            variants[backbone] = k + 1
            self._style[label] = {"color": backbone_colour[backbone],
                                  "linestyle": LINESTYLES[k % len(LINESTYLES)],
                                  "marker": MARKERS[k % len(MARKERS)]}

    def __call__(self, label: str) -> dict[str, Any]:
        if label not in self._style:  # a label first seen late still gets a stable colour
            self._style[label] = {"color": KNOWN_COLOURS.get(label, _hashed_colour(label)),
                                  "linestyle": "-", "marker": "o"}
        return dict(self._style[label])

    def colour(self, label: str) -> str:
        return self(label)["color"]


def _hashed_colour(name: str) -> str:
    return "#" + hashlib.sha1(name.encode()).hexdigest()[:6]


def _spare_colour(name: str, taken: set[str]) -> str:
    """The spare colour picked by the name's hash, so a backbone keeps it from report to report;
    the next free spare when another backbone of this report has it already; a colour hashed from
    the name when all spares are taken."""
    start = int(hashlib.sha1(name.encode()).hexdigest(), 16) % len(SPARE_COLOURS)
    for k in range(len(SPARE_COLOURS)):
        colour = SPARE_COLOURS[(start + k) % len(SPARE_COLOURS)]
        if colour not in taken:
            return colour
    return _hashed_colour(name)


def spans_decades(values: Iterable[float], ratio: float = 20.0) -> bool:
    """Log scale when the positive data spans more than `ratio` (about a decade and more)."""
    vals = [float(v) for v in values if v is not None and np.isfinite(v) and v > 0]
    return len(vals) > 1 and max(vals) / min(vals) >= ratio


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.2,
               extra_width: float = 0.0) -> tuple[plt.Figure, np.ndarray]:
    """Panels of a fixed size; constrained layout keeps labels, legends and colour bars inside."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols + extra_width, height * nrows),
                             squeeze=False, layout="constrained")
    return fig, axes.ravel()


def finish(fig: plt.Figure, path: Path, title: str | None = None) -> Path:
    if title:
        fig.suptitle(title, fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def human_tick(value: float, _pos: Any = None) -> str:
    """Tick labels people read: 512, 2K, 1.5M (not 2^9 or 5x10^2)."""
    if value == 0:
        return "0"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def context_tick(value: float, _pos: Any = None) -> str:
    """Contexts in tokens: 512, 2K, 128K (powers of two read as such, not as 2.05K)."""
    if value >= 1024 and float(value) % 1024 == 0:
        return f"{int(value) // 1024}K"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


def bytes_tick(value: float, _pos: Any = None) -> str:
    for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value:.3g} B"


def label_axes(ax: plt.Axes, xlabel: str, ylabel: str, title: str | None = None,
               xs: Iterable[float] = (), ys: Iterable[float] = (), logx: bool | None = None,
               logy: bool | None = None, ybytes: bool = False) -> None:
    """Axis labels (with units, by the caller), a light grid, log scales where data spans
    decades (or where forced), and plain-number ticks on log axes."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    xs = list(xs)
    if logx if logx is not None else spans_decades(xs):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    if xs and max(abs(float(x)) for x in xs) >= 1e4:  # 200K, 1.5G: no "1e11" offset to decode
        ax.xaxis.set_major_formatter(FuncFormatter(human_tick))
    ys = list(ys)
    fmt = FuncFormatter(bytes_tick if ybytes else human_tick)
    if logy if logy is not None else spans_decades(ys):
        ax.set_yscale("log")
        # Under a decade of range a log axis has no major tick inside: label the minor ones.
        ax.yaxis.set_minor_formatter(NullFormatter() if spans_decades(ys, 10.0) else fmt)
        ax.yaxis.set_major_formatter(fmt)
        if ybytes and spans_decades(ys, 2.0):  # 128 KiB, 256 KiB, ... rather than 195 KiB
            ax.yaxis.set_major_locator(LogLocator(base=2))
            ax.yaxis.set_minor_formatter(NullFormatter())
    elif ybytes:
        ax.yaxis.set_major_formatter(fmt)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)


def context_axis(ax: plt.Axes, contexts: Iterable[float]) -> None:
    """Contexts are powers of two or near: a log-2 axis with a tick at every measured value."""
    values = sorted({float(c) for c in contexts if c})
    if not values:
        return
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [context_tick(v) for v in values])
    ax.xaxis.set_minor_formatter(NullFormatter())


def legend(ax: plt.Axes) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, framealpha=0.8)


def band_line(ax: plt.Axes, styles: Styles, label: str, x: Sequence[float],
              curves: Sequence[Sequence[float]], markers: bool = False) -> None:
    """Mean of several runs (seeds) as a line and their min..max as a shaded band."""
    arr = np.asarray(curves, dtype=float)
    style = styles(label)
    mean = np.nanmean(arr, axis=0)
    n = arr.shape[0]
    name = label if n == 1 else f"{label} (n={n})"
    ax.plot(x, mean, color=style["color"], linestyle=style["linestyle"], label=name,
            marker=style["marker"] if markers else None, markersize=4)
    if n > 1:
        ax.fill_between(x, np.nanmin(arr, axis=0), np.nanmax(arr, axis=0), color=style["color"],
                        alpha=0.2, linewidth=0)


def points_line(ax: plt.Axes, styles: Styles, label: str, x: Sequence[float],
                y: Sequence[float],
                yerr: Sequence[float | tuple[float, float] | None] | None = None) -> None:
    """A measured series (sorted by x) with markers, and error bars where known: a number is a
    symmetric half-width, a pair (below, above) an asymmetric interval such as Wilson's."""
    order = np.argsort(np.asarray(x, dtype=float))
    xs = np.asarray(x, dtype=float)[order]
    ys = np.asarray(y, dtype=float)[order]
    style = styles(label)
    if yerr is not None and any(e is not None for e in yerr):
        pairs = [(np.nan, np.nan) if e is None else (e if isinstance(e, tuple) else (e, e))
                 for e in yerr]
        err = np.asarray(pairs, dtype=float)[order].T
        ax.errorbar(xs, ys, yerr=err, color=style["color"], linestyle=style["linestyle"],
                    marker=style["marker"], markersize=4, capsize=2, label=label)
    else:
        ax.plot(xs, ys, color=style["color"], linestyle=style["linestyle"],
                marker=style["marker"], markersize=4, label=label)


def bars(ax: plt.Axes, styles: Styles, labels: Sequence[str], values: Sequence[float],
         fmt: str = "{:.3g}") -> None:
    """One bar per backbone in its colour, the value written on the bar."""
    xs = np.arange(len(labels))
    ax.bar(xs, values, color=[styles.colour(lb) for lb in labels])
    ax.set_xticks(xs, labels, rotation=20, ha="right")
    for x, v in zip(xs, values, strict=True):
        ax.annotate(fmt.format(v), (x, v), ha="center", va="bottom", fontsize=8)


def heatmap(ax: plt.Axes, grid: np.ndarray, xticks: Sequence[Any], yticks: Sequence[Any],
            xlabel: str, ylabel: str, title: str, vmin: float = 0.0,
            vmax: float = 1.0) -> Any:
    """A value grid (rows = y, columns = x) with every cell's value written in it; empty cells
    (NaN: not measured) stay white so they cannot be read as zero."""
    masked = np.ma.masked_invalid(grid)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    image = ax.imshow(masked, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto", origin="lower")
    ax.set_xticks(range(len(xticks)), [str(t) for t in xticks])
    ax.set_yticks(range(len(yticks)), [str(t) for t in yticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < (vmin + vmax) / 2 else "black")
    return image
