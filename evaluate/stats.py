"""Uncertainty for comparisons: paired bootstrap intervals, binomial (Wilson) intervals, ratios.

Why these: two backbones evaluated on the *same* validation windows share most of their noise
(a hard window is hard for both), so the difference is estimated far more precisely from the
per-window differences than from two separate means; resampling windows (the same indices for
both) keeps that pairing. Seeds are a second source of noise that windows do not show: when a
backbone has several seeds, each bootstrap replicate also resamples its seeds, so a gap that one
lucky seed produced does not pass as a finding. Accuracies on n scored answers are binomial; the
Wilson interval stays inside [0, 1] and is honest at 0 or n successes, where the normal
approximation collapses to a zero-width interval.

Everything here is plain numpy (no torch), deterministic given `seed`, and used by the report
builder and the tuning stage alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

BETTER, WORSE, WITHIN_NOISE = "better", "worse", "within noise"


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval at `level`."""

    estimate: float
    low: float
    high: float
    level: float = 0.95

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high

    def text(self, digits: int = 3) -> str:
        return (f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]")


@dataclass(frozen=True)
class Comparison:
    """A backbone against the reference: the interval on (backbone - reference) and its verdict."""

    interval: Interval
    verdict: str          # BETTER | WORSE | WITHIN_NOISE
    n_windows: int
    n_seeds: tuple[int, int]  # (backbone, reference)


def _as_runs(values: np.ndarray | Sequence[Sequence[float]] | Sequence[float],
             name: str) -> np.ndarray:
    """(seeds, windows) float array; a 1-D input is one seed."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 2:
        raise ValueError(f"{name}: need per-window values as (windows,) or (seeds, windows) with "
                         f"at least 2 windows; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: per-window values hold NaN or inf (a diverged run?)")
    return arr


def paired_bootstrap(values: np.ndarray | Sequence[Sequence[float]] | Sequence[float],
                     reference: np.ndarray | Sequence[Sequence[float]] | Sequence[float],
                     level: float = 0.95, n_boot: int = 2000, seed: int = 0,
                     lower_is_better: bool = True) -> Comparison:
    """Interval on mean(values) - mean(reference) over the same windows, with a verdict.

    `values` and `reference` are per-window metrics (loss per window, or 0/1 correctness per
    scored answer), as (windows,) or (seeds, windows); column j must be the same window for both.
    Each replicate draws windows with replacement (shared by both sides) and, per side, seeds with
    replacement; the percentile interval of the replicated differences is returned. The verdict
    is BETTER or WORSE only when the whole interval lies on one side of zero.
    """
    if not 0.5 < level < 1:
        raise ValueError(f"level={level} must be in (0.5, 1)")
    a, b = _as_runs(values, "values"), _as_runs(reference, "reference")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired bootstrap needs the same windows on both sides; got "
                         f"{a.shape[1]} and {b.shape[1]} windows")
    rng = np.random.default_rng(seed)
    n_win = a.shape[1]
    windows = rng.integers(0, n_win, size=(n_boot, n_win))
    diffs = _replicate_means(a, windows, rng) - _replicate_means(b, windows, rng)
    alpha = (1 - level) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha])
    estimate = float(a.mean() - b.mean())
    interval = Interval(estimate, float(low), float(high), level)
    return Comparison(interval, verdict_of(interval, lower_is_better), n_win,
                      (a.shape[0], b.shape[0]))


def _replicate_means(runs: np.ndarray, windows: np.ndarray, rng: np.random.Generator
                     ) -> np.ndarray:
    """Mean over resampled seeds and the given resampled windows, one value per replicate."""
    n_boot = windows.shape[0]
    n_seeds = runs.shape[0]
    if n_seeds == 1:
        return runs[0][windows].mean(axis=1)
    picks = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    # mean over the drawn seeds of each window, then over the drawn windows
    per_window = np.stack([runs[picks[:, s]] for s in range(n_seeds)]).mean(axis=0)
    return np.take_along_axis(per_window, windows, axis=1).mean(axis=1)


def verdict_of(interval: Interval, lower_is_better: bool = True) -> str:
    """BETTER / WORSE when the interval on (backbone - reference) excludes zero, else noise."""
    if interval.high < 0:
        return BETTER if lower_is_better else WORSE
    if interval.low > 0:
        return WORSE if lower_is_better else BETTER
    return WITHIN_NOISE


def wilson(successes: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval for a binomial proportion (successes out of n)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson: need 0 <= successes <= n and n > 0; got {successes}/{n}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, float(centre - half)), min(1.0, float(centre + half)), level)


def spread(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation, count); the deviation is 0 for a single value."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan"), 0
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std, int(arr.size)


def ratio_interval(numerator: Sequence[float], denominator: Sequence[float],
                   level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval:
    """Ratio of medians of two sets of timed repeats (e.g. tokens/s of A over B), with a
    bootstrap interval from resampling each side's repeats; one repeat per side gives a
    zero-width interval (the spread is unknown, not zero: the caller says how many repeats)."""
    a = np.asarray(numerator, dtype=np.float64)
    b = np.asarray(denominator, dtype=np.float64)
    if a.size == 0 or b.size == 0 or np.any(b <= 0) or np.any(a < 0):
        raise ValueError("ratio_interval: need non-empty repeats, positive denominators")
    rng = np.random.default_rng(seed)
    ra = np.median(a[rng.integers(0, a.size, size=(n_boot, a.size))], axis=1)
    rb = np.median(b[rng.integers(0, b.size, size=(n_boot, b.size))], axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(ra / rb, [alpha, 1 - alpha])
    return Interval(float(np.median(a) / np.median(b)), float(low), float(high), level)
