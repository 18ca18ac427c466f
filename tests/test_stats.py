"""Paired bootstrap, Wilson intervals and ratio intervals (evaluate/stats.py) on simulated data
whose true answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from archbench.evaluate.stats import (
    BETTER,
    WITHIN_NOISE,
    WORSE,
    paired_bootstrap,
    ratio_interval,
    spread,
    wilson,
)


def _simulated_pair(rng: np.random.Generator, delta: float, n_windows: int = 64
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-window losses of a reference and a backbone worse by `delta` on average; windows
    differ a lot in difficulty (shared by both), the per-window gap is noisy."""
    difficulty = rng.gamma(2.0, 1.0, size=n_windows)
    reference = difficulty + rng.normal(0, 0.2, size=n_windows)
    backbone = difficulty + delta + rng.normal(0, 0.3, size=n_windows)
    return backbone, reference


def test_paired_bootstrap_covers_true_difference_at_stated_rate() -> None:
    # the true mean difference is delta; windows are drawn afresh each simulation
    rng = np.random.default_rng(123)
    delta, sims = 0.05, 200
    covered = 0
    for s in range(sims):
        backbone, reference = _simulated_pair(rng, delta)
        cmp = paired_bootstrap(backbone, reference, n_boot=1000, seed=s)
        covered += cmp.interval.covers(delta)
    assert 0.90 <= covered / sims <= 0.99, covered / sims


def test_paired_bootstrap_verdicts() -> None:
    rng = np.random.default_rng(0)
    worse, ref = _simulated_pair(rng, 0.5)
    assert paired_bootstrap(worse, ref).verdict == WORSE
    assert paired_bootstrap(ref, worse).verdict == BETTER
    # accuracies: higher is better, so the same sign reads the other way
    assert paired_bootstrap(worse, ref, lower_is_better=False).verdict == BETTER
    same, ref = _simulated_pair(rng, 0.0)
    same_cmp = paired_bootstrap(same, ref)
    assert same_cmp.interval.low < 0 < same_cmp.interval.high
    assert same_cmp.verdict == WITHIN_NOISE


def test_pairing_is_what_makes_a_small_gap_visible() -> None:
    # the same data with the window pairing destroyed: the interval gets much wider
    rng = np.random.default_rng(1)
    backbone, reference = _simulated_pair(rng, 0.1, n_windows=128)
    paired = paired_bootstrap(backbone, reference).interval
    shuffled = paired_bootstrap(rng.permutation(backbone), reference).interval
    assert (paired.high - paired.low) * 3 < shuffled.high - shuffled.low


def test_seed_noise_widens_the_interval() -> None:
    # two seeds that disagree by far more than the window noise: the interval must show it
    rng = np.random.default_rng(2)
    backbone, reference = _simulated_pair(rng, 0.0)
    seeds = np.stack([backbone - 0.3, backbone + 0.3])
    one = paired_bootstrap(backbone, reference).interval
    two = paired_bootstrap(seeds, reference).interval
    assert two.high - two.low > 2 * (one.high - one.low)
    assert paired_bootstrap(seeds, reference).n_seeds == (2, 1)


def test_paired_bootstrap_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same windows"):
        paired_bootstrap([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0], level=1.5)


def test_wilson_interval() -> None:
    # a textbook value: 8 of 10 at 95% is about [0.490, 0.943]
    iv = wilson(8, 10)
    assert iv.estimate == pytest.approx(0.8)
    assert iv.low == pytest.approx(0.4902, abs=1e-3)
    assert iv.high == pytest.approx(0.9433, abs=1e-3)
    zero = wilson(0, 32)
    assert zero.low == 0.0 and 0.05 < zero.high < 0.15   # not a zero-width interval
    with pytest.raises(ValueError, match="successes"):
        wilson(5, 4)


def test_wilson_coverage() -> None:
    rng = np.random.default_rng(3)
    p, n, sims = 0.3, 50, 400
    hits = sum(wilson(int(rng.binomial(n, p)), n).covers(p) for _ in range(sims))
    assert 0.90 <= hits / sims <= 0.99


def test_ratio_interval_and_spread() -> None:
    fast = [200.0, 210.0, 190.0, 205.0, 195.0]
    slow = [100.0, 104.0, 96.0, 101.0, 99.0]
    iv = ratio_interval(fast, slow)
    assert iv.estimate == pytest.approx(2.0, rel=0.02)
    assert iv.low < 2.0 < iv.high and iv.high - iv.low < 0.4
    assert spread([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2)), 2)
    assert spread([5.0])[1] == 0.0
