"""Learning-rate selection: pick the best of a log-spaced grid, and notice when the grid was wrong.

Why per backbone: families train best at different learning rates (the Mamba, RWKV and Jamba
papers each use their own), and at a short budget a fixed rate mostly measures how quickly each
family leaves the unigram plateau at that rate. A comparison that tunes every backbone on the
same short grid, then trains each at its own best rate, compares architectures instead.

Why the edge check: if the lowest validation loss is at the first or last point of the grid, the
optimum may lie outside it; the selection says which edge and proposes the next points beyond
it, with the grid's own spacing, so a caller can extend once and select again (or flag the run
as possibly under-tuned when it may not extend).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


class TuningError(ValueError):
    """The points cannot support a choice (no finite loss, a bad grid)."""


@dataclass(frozen=True)
class LrChoice:
    """The chosen learning rate and what the grid says about it."""

    lr: float
    loss: float
    grid: tuple[float, ...]            # every lr tried, ascending
    losses: tuple[float, ...]          # loss at each (inf: diverged or failed)
    edge: str | None = None            # "low" | "high" when the best is the grid's end
    extension: tuple[float, ...] = field(default=())  # proposed points beyond that edge

    @property
    def at_edge(self) -> bool:
        return self.edge is not None


def log_grid(low: float, high: float, points: int) -> list[float]:
    """`points` learning rates evenly spaced in log10 from `low` to `high`, rounded to 3
    significant digits so run folder names stay readable."""
    if not 0 < low < high:
        raise TuningError(f"lr grid: need 0 < low < high; got low={low}, high={high}")
    if points < 2:
        raise TuningError(f"lr grid: points={points} must be >= 2")
    step = (math.log10(high) - math.log10(low)) / (points - 1)
    return [float(f"{10 ** (math.log10(low) + i * step):.3g}") for i in range(points)]


def _clean(points: Iterable[tuple[float, float | None]]) -> tuple[list[float], list[float]]:
    """Sorted lrs and their losses; a missing or non-finite loss (divergence) becomes inf."""
    merged: dict[float, float] = {}
    for lr, loss in points:
        lr = float(lr)
        if not lr > 0:
            raise TuningError(f"lr grid: learning rate {lr} must be > 0")
        value = float(loss) if loss is not None and math.isfinite(float(loss)) else math.inf
        merged[lr] = min(value, merged.get(lr, math.inf))  # a repeated lr keeps its best run
    lrs = sorted(merged)
    return lrs, [merged[lr] for lr in lrs]


def select_lr(points: Iterable[tuple[float, float | None]], extend_by: int = 2) -> LrChoice:
    """The lr of lowest loss among (lr, loss) points; flags and extends an edge winner.

    A grid of one point cannot say anything about its edges and is treated as an edge on both
    sides (no extension proposed: the spacing is unknown).
    """
    lrs, losses = _clean(points)
    if not lrs:
        raise TuningError("lr grid: no points to choose from")
    if all(math.isinf(v) for v in losses):
        raise TuningError(f"lr grid: every run failed or diverged at lr {lrs}")
    best = min(range(len(lrs)), key=lambda i: (losses[i], lrs[i]))
    edge, extension = None, ()
    if len(lrs) == 1:
        edge = "low"
    elif best == 0:
        edge, extension = "low", _beyond(lrs[0], lrs[1] / lrs[0], -1, extend_by)
    elif best == len(lrs) - 1:
        edge, extension = "high", _beyond(lrs[-1], lrs[-1] / lrs[-2], +1, extend_by)
    return LrChoice(lrs[best], losses[best], tuple(lrs), tuple(losses), edge, extension)


def _beyond(start: float, ratio: float, direction: int, count: int) -> tuple[float, ...]:
    return tuple(float(f"{start * ratio ** (direction * k):.3g}") for k in range(1, count + 1))


def select_per_cell(rows: Sequence[dict], cell_keys: Sequence[str], metric: str = "loss",
                    lr_key: str = "lr") -> dict[tuple, LrChoice]:
    """Best lr per cell (e.g. per (backbone, seq_len, d_model)), as Zoology reports synthetic
    tasks: each row holds the cell's keys, the lr and the metric (lower is better)."""
    cells: dict[tuple, list[tuple[float, float | None]]] = {}
    for row in rows:
        key = tuple(row.get(k) for k in cell_keys)
        cells.setdefault(key, []).append((row[lr_key], row.get(metric)))
    return {key: select_lr(points) for key, points in cells.items()}
