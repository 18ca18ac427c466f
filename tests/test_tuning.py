"""Learning-rate selection (archbench/tuning.py) on a synthetic convex problem with a known
optimum."""

from __future__ import annotations

import math

import pytest

from archbench.tuning import TuningError, log_grid, select_lr, select_per_cell


def _loss(lr: float, optimum: float) -> float:
    """Convex in log10(lr), minimal at `optimum`: how a short run's loss behaves near its best."""
    return 2.0 + (math.log10(lr) - math.log10(optimum)) ** 2


def test_log_grid() -> None:
    grid = log_grid(1e-4, 1e-2, 5)
    assert grid == pytest.approx([1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2])
    with pytest.raises(TuningError, match="low < high"):
        log_grid(1e-2, 1e-4, 3)


def test_picks_the_known_optimum_inside_the_grid() -> None:
    grid = log_grid(1e-4, 1e-1, 7)
    for optimum in (3e-4, 2e-3, 4e-2):
        choice = select_lr((lr, _loss(lr, optimum)) for lr in grid)
        nearest = min(grid, key=lambda lr: abs(math.log10(lr) - math.log10(optimum)))
        assert choice.lr == nearest
        assert not choice.at_edge and choice.extension == ()


def test_edge_winner_is_flagged_and_the_extension_finds_the_optimum() -> None:
    grid = log_grid(1e-4, 1e-2, 5)
    optimum = 0.05  # beyond the high end
    choice = select_lr((lr, _loss(lr, optimum)) for lr in grid)
    assert choice.edge == "high" and choice.lr == grid[-1]
    assert all(x > grid[-1] for x in choice.extension)
    extended = [(lr, _loss(lr, optimum)) for lr in (*grid, *choice.extension)]
    again = select_lr(extended)
    assert again.lr == pytest.approx(0.0316, rel=0.02) and not again.at_edge

    low = select_lr((lr, _loss(lr, 1e-6)) for lr in grid)
    assert low.edge == "low" and all(x < grid[0] for x in low.extension)


def test_diverged_runs_never_win_and_all_failed_is_an_error() -> None:
    grid = [1e-3, 3e-3, 1e-2]
    choice = select_lr([(1e-3, 3.0), (3e-3, float("nan")), (1e-2, None)])
    assert choice.lr == 1e-3 and choice.losses[1] == math.inf
    assert choice.edge == "low"
    with pytest.raises(TuningError, match="diverged"):
        select_lr((lr, float("inf")) for lr in grid)


def test_best_lr_per_cell() -> None:
    rows = [{"arch": a, "pairs": p, "lr": lr, "loss": _loss(lr, opt)}
            for a, opt in (("transformer", 3e-3), ("mamba", 1e-3))
            for p in (4, 8) for lr in (3e-4, 1e-3, 3e-3, 1e-2)]
    best = select_per_cell(rows, ["arch", "pairs"])
    assert best[("transformer", 4)].lr == 3e-3
    assert best[("mamba", 8)].lr == 1e-3
