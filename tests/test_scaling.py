"""Scaling-law fits recover known exponents from synthetic runs, within their bootstrap interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from archbench.evaluate.reporting.scaling import (
    PowerLaw,
    ScalingPoint,
    compute_ratio,
    fit_backbones,
    fit_power_law,
)


def test_exact_points_give_the_exponent_back() -> None:
    law = PowerLaw(a=2.0, alpha=0.35, c=1.2, x0=1e5)
    xs = np.geomspace(1e5, 1e8, 5)
    fit = fit_power_law(xs, law(xs))
    assert fit.alpha == pytest.approx(0.35, rel=1e-3)
    assert fit.c == pytest.approx(1.2, rel=1e-3)
    assert fit.x_at(float(law(3e6))) == pytest.approx(3e6, rel=1e-3)


def test_too_few_sizes_is_an_error() -> None:
    with pytest.raises(ValueError, match=">= 3 distinct"):
        fit_power_law([1e5, 1e6, 1e6], [3.0, 2.0, 2.1])


def _runs(arch: str, law: PowerLaw, sizes: np.ndarray, flops_per_param: float,
          hardness: np.ndarray, rng: np.random.Generator) -> list[ScalingPoint]:
    """One run per size: per-window losses = the law's loss x a window's hardness (shared by
    every run, as the same validation windows are) + a little independent noise."""
    out = []
    for n in sizes:
        tokens = np.full(len(hardness), 256.0)
        loss = float(law(n)) * hardness + rng.normal(0, 0.01, len(hardness))
        out.append(ScalingPoint(arch, float(n), float(n) * flops_per_param,
                                float(np.sum(loss * tokens) / tokens.sum()), 0, loss * tokens,
                                tokens))
    return out


def test_bootstrap_interval_covers_the_true_exponent_and_not_a_wrong_one() -> None:
    rng = np.random.default_rng(3)
    hardness = rng.lognormal(0, 0.15, 64)
    hardness /= hardness.mean()
    sizes = np.geomspace(2e5, 2e7, 4)
    ref = PowerLaw(a=1.5, alpha=0.3, c=1.0, x0=2e5)
    other = PowerLaw(a=1.5, alpha=0.45, c=1.0, x0=2e5)
    points = (_runs("transformer", ref, sizes, 6 * 1e5, hardness, rng)
              + _runs("mamba", other, sizes, 6 * 1e5, hardness, rng))
    fits = fit_backbones(points, "params", n_boot=300)
    t, m = fits["transformer"].alpha, fits["mamba"].alpha
    assert t is not None and m is not None
    assert t.covers(0.3) and not t.covers(0.45)
    assert m.covers(0.45) and not m.covers(0.3)
    # mamba falls faster: it reaches the transformer's final loss with less compute
    flops = fit_backbones(points, "flops", n_boot=300)
    ratio = compute_ratio(flops, points, "mamba", "transformer")
    assert ratio is not None
    # truth: x at which other's loss equals ref's loss at the top size, over that top size
    truth = other.x_at(float(ref(sizes[-1]))) / sizes[-1]
    assert ratio.low <= truth <= ratio.high
    assert ratio.high < 1.0


def test_no_interval_without_windows_or_seeds() -> None:
    law = PowerLaw(a=1.0, alpha=0.2, c=2.0, x0=1.0)
    points = [ScalingPoint("gpt2", n, n * 10, float(law(n))) for n in (1e5, 1e6, 1e7)]
    fits = fit_backbones(points, "params")
    assert fits["gpt2"].alpha is None
    assert fits["gpt2"].law.alpha == pytest.approx(0.2, rel=1e-2)
    assert math.isinf(fits["gpt2"].law.x_at(1.5))  # below the asymptote: never reached


def test_report_section_fits_runs_and_states_the_compute_ratio(tmp_path) -> None:
    """The report's section from run summaries and their bpb records' windows."""
    from archbench.evaluate.reporting.data import Collection, Labels, Report, Run
    from archbench.evaluate.reporting.scaling import section_scaling

    rng = np.random.default_rng(0)
    hardness = rng.lognormal(0, 0.1, 32)
    col = Collection()
    for arch, alpha in (("transformer", 0.3), ("mamba", 0.4)):
        law = PowerLaw(2.0, alpha, 1.0, 1e5)
        for n in (1e5, 3e5, 1e6):
            path = tmp_path / f"{arch}{n:g}"
            loss = float(law(n)) * hardness
            col.runs.append(Run(path, {
                "arch": arch, "size": f"{n:g}", "status": "finished", "seed": 0,
                "param_counts": {"active_non_embedding": n}, "tokens_seen": 1e6,
                "flops_per_token": {"train": 6 * n}, "final": {"loss": float(loss.mean())},
                "config": {"data": {"source": "stdlib"}}}))
            col.records.append({"kind": "eval", "eval": "bpb", "metric": "bpb", "arch": arch,
                                "ckpt": str(path), "value": 1.0,
                                "windows": {"nats": list(loss * 100), "tokens": [100] * 32}})
    rep = Report(col, tmp_path / "out", Labels(col))
    assert section_scaling(rep)
    text = "\n".join(rep.lines)
    assert "## Scaling laws" in text and "| mamba | 3 |" in text
    assert "mamba reaches transformer's final loss with" in text
    assert (tmp_path / "out" / "scaling_params.png").is_file()
    assert (tmp_path / "out" / "scaling_flops.png").is_file()
