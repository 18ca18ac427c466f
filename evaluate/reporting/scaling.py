"""Scaling laws from runs of one backbone at several sizes: loss = a * x^(-alpha) + c, with x the
non-embedding parameters N or the training FLOPs C, and bootstrap intervals on the exponent.

Why a bootstrap over validation windows: every run of a comparison is evaluated on the same
first validation windows (fairness rule 2), so one replicate draws one set of window indices and
recomputes every run's loss on it; runs of one size with several seeds also have their seeds
resampled. The spread of the refitted exponents is then the uncertainty that the evaluation set
and the seeds put on it. Three runs fit three parameters exactly, so without per-window losses
(or seeds) there is no interval to give, and the section says so instead of inventing one.

Why variable projection: for a fixed alpha the model is linear in (a, c), solved exactly by least
squares; the fit then searches alpha alone (a log grid, refined by golden section), which never
needs a starting guess and cannot wander into a negative exponent.

"Reaches the reference's loss with r x the FLOPs": the reference backbone's final loss (its run
of most compute) is read off the other backbone's loss-vs-FLOPs fit; r is that compute over the
reference's. In every bootstrap replicate both the target loss and the fit move together.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from archbench.evaluate.stats import Interval

ALPHA_RANGE = (1e-3, 3.0)  # exponents searched; published LM exponents are 0.05 .. 0.5
MIN_POINTS = 3
AXES = {"params": "non-embedding parameters N", "flops": "training FLOPs C"}


@dataclass(frozen=True)
class PowerLaw:
    """loss(x) = a * (x / x0)^(-alpha) + c; x0 (the smallest x fitted) keeps a well scaled."""

    a: float
    alpha: float
    c: float
    x0: float

    def __call__(self, x: np.ndarray | float) -> np.ndarray | float:
        return self.a * (np.asarray(x, dtype=np.float64) / self.x0) ** (-self.alpha) + self.c

    def x_at(self, loss: float) -> float:
        """The x at which the curve reaches `loss`; inf when `loss` is at or below the asymptote
        c (more of x never gets there)."""
        if self.a <= 0 or loss <= self.c:
            return math.inf
        return self.x0 * ((loss - self.c) / self.a) ** (-1.0 / self.alpha)


def _solve_linear(xs: np.ndarray, ys: np.ndarray, alphas: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, c, squared error) of the least-squares fit at each fixed alpha: a simple linear
    regression of y on z = x^(-alpha), in closed form, for all alphas at once."""
    z = xs[None, :] ** (-alphas[:, None])
    zc = z - z.mean(axis=1, keepdims=True)
    yc = ys - ys.mean()
    a = (zc @ yc) / np.maximum((zc * zc).sum(axis=1), 1e-300)
    c = ys.mean() - a * z.mean(axis=1)
    err = ((a[:, None] * z + c[:, None] - ys[None, :]) ** 2).sum(axis=1)
    return a, c, err


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """Least-squares fit of y = a * (x/x0)^(-alpha) + c over alpha in ALPHA_RANGE."""
    xs_raw = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs_raw.shape != ys.shape or len(np.unique(xs_raw)) < MIN_POINTS:
        raise ValueError(f"a power law with an offset needs >= {MIN_POINTS} distinct x values; "
                         f"got {len(np.unique(xs_raw))}")
    if np.any(xs_raw <= 0) or not np.all(np.isfinite(ys)):
        raise ValueError("power-law fit: x must be > 0 and y finite")
    x0 = float(xs_raw.min())
    xs = xs_raw / x0
    grid = np.geomspace(*ALPHA_RANGE, 240)
    best = int(np.argmin(_solve_linear(xs, ys, grid)[2]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(50):  # golden section on the bracket around the best grid point
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        err = _solve_linear(xs, ys, np.array([m1, m2]))[2]
        if err[0] < err[1]:
            hi = m2
        else:
            lo = m1
    alpha = (lo + hi) / 2
    a, c, _ = _solve_linear(xs, ys, np.array([alpha]))
    return PowerLaw(float(a[0]), float(alpha), float(c[0]), x0)


# ---- the runs --------------------------------------------------------------------------------

@dataclass
class ScalingPoint:
    """One training run: its size, compute and validation loss, per window where known."""

    arch: str
    params: float
    flops: float
    loss: float
    seed: Any = None
    nats: np.ndarray | None = None    # per validation window (the same windows for every run)
    tokens: np.ndarray | None = None

    def x(self, axis: str) -> float:
        return self.params if axis == "params" else self.flops


@dataclass
class ScalingFit:
    arch: str
    axis: str
    law: PowerLaw
    alpha: Interval | None  # None: no per-window losses or seeds to resample
    replicates: list[PowerLaw] = field(default_factory=list)
    points: list[tuple[float, float]] = field(default_factory=list)  # (x, mean loss per size)
    replicate_losses: list[list[float]] = field(default_factory=list)  # per replicate, per size

    @property
    def falls(self) -> bool:
        """A decreasing power law fits: a > 0 and alpha off the floor of the search (at the
        floor, the best 'power law' is a flat line: the loss does not fall with x)."""
        return self.law.a > 0 and self.law.alpha > 2 * ALPHA_RANGE[0]


def _sizes(points: list[ScalingPoint]) -> dict[float, list[ScalingPoint]]:
    """Runs of one backbone grouped by size (their seeds together)."""
    out: dict[float, list[ScalingPoint]] = defaultdict(list)
    for p in points:
        out[p.params].append(p)
    return dict(sorted(out.items()))


def _resampled_loss(runs: list[ScalingPoint], windows: np.ndarray | None,
                    rng: np.random.Generator | None) -> float:
    """A size's loss: the mean over its seeds (resampled when `rng`) of each run's loss on the
    windows `windows` (all windows when None)."""
    picked = runs if rng is None or len(runs) < 2 else [runs[i] for i in
                                                         rng.integers(0, len(runs), len(runs))]
    losses = []
    for run in picked:
        if windows is None or run.nats is None or run.tokens is None:
            losses.append(run.loss)
        else:
            losses.append(float(run.nats[windows].sum() / run.tokens[windows].sum()))
    return float(np.mean(losses))


def _window_count(points: list[ScalingPoint]) -> int | None:
    """The number of shared validation windows, or None when some run lacks them."""
    counts = {len(p.nats) for p in points if p.nats is not None}
    if len(counts) != 1 or any(p.nats is None for p in points):
        return None
    return counts.pop()


def _curve(runs_by_size: dict[float, list[ScalingPoint]], axis: str,
           windows: np.ndarray | None, rng: np.random.Generator | None
           ) -> tuple[list[float], list[float]]:
    xs = [float(np.mean([r.x(axis) for r in runs])) for runs in runs_by_size.values()]
    ys = [_resampled_loss(runs, windows, rng) for runs in runs_by_size.values()]
    return xs, ys


def fit_backbones(points: list[ScalingPoint], axis: str, n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, ScalingFit]:
    """A fit per backbone with >= 3 sizes; bootstrap replicates share their window draws across
    backbones (replicate b of every backbone used the same windows), so they can be paired."""
    if axis not in AXES:
        raise ValueError(f"axis={axis!r}: choose one of {sorted(AXES)}")
    by_arch: dict[str, dict[float, list[ScalingPoint]]] = {}
    for arch in sorted({p.arch for p in points}):
        sizes = _sizes([p for p in points if p.arch == arch])
        if len(sizes) >= MIN_POINTS:
            by_arch[arch] = sizes
    if not by_arch:
        return {}
    n_windows = _window_count([p for s in by_arch.values() for r in s.values() for p in r])
    multi_seed = any(len(r) > 1 for s in by_arch.values() for r in s.values())
    fits = {}
    for arch, sizes in by_arch.items():
        xs, ys = _curve(sizes, axis, None, None)
        fits[arch] = ScalingFit(arch, axis, fit_power_law(xs, ys), None, [], list(zip(xs, ys)))
    if n_windows is None and not multi_seed:
        return fits
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        windows = None if n_windows is None else rng.integers(0, n_windows, n_windows)
        for arch, sizes in by_arch.items():
            xs, ys = _curve(sizes, axis, windows, rng)
            fits[arch].replicates.append(fit_power_law(xs, ys))
            fits[arch].replicate_losses.append(ys)
    tail = (1 - level) / 2
    for fit in fits.values():
        alphas = np.array([r.alpha for r in fit.replicates])
        fit.alpha = Interval(fit.law.alpha, float(np.quantile(alphas, tail)),
                             float(np.quantile(alphas, 1 - tail)), level)
    return fits


def compute_ratio(fits: dict[str, ScalingFit], points: list[ScalingPoint], arch: str,
                  reference: str, level: float = 0.95) -> Interval | None:
    """The FLOPs `arch` needs (by its loss-vs-FLOPs fit) to reach the reference's final loss
    (its run of most compute), over the reference's FLOPs; None without both fits. A replicate
    whose fit never reaches that loss counts as inf, so an interval may be open above."""
    if arch not in fits or reference not in fits or fits[arch].axis != "flops":
        return None
    ref = fits[reference]
    top_index = int(np.argmax([x for x, _ in ref.points]))
    top, target = ref.points[top_index]
    estimate = fits[arch].law.x_at(target) / top
    reps_a = fits[arch].replicates
    if not reps_a or len(reps_a) != len(ref.replicate_losses):
        return Interval(estimate, math.nan, math.nan, level)
    # the reference's final loss in each replicate: its largest run on the replicate's windows
    ratios = np.array([ra.x_at(losses[top_index]) / top
                       for ra, losses in zip(reps_a, ref.replicate_losses, strict=True)])
    tail = (1 - level) / 2
    return Interval(estimate, float(np.quantile(ratios, tail)),
                    float(np.quantile(ratios, 1 - tail)), level)


# ---- from the report's records ---------------------------------------------------------------

def _key(path: Any) -> str:
    """A run folder as one string, written relative or absolute, or as a checkpoint inside it
    (an eval record's `ckpt` names the step folder it loaded)."""
    from pathlib import Path

    parts = Path(str(path)).resolve().parts
    if "checkpoints" in parts:
        parts = parts[:parts.index("checkpoints")]
    return str(Path(*parts))


def points_from(runs: list[Any], records: list[dict[str, Any]]) -> list[ScalingPoint]:
    """One point per finished language-model run: non-embedding parameters (active), training
    FLOPs (tokens seen x train FLOPs per token), final validation loss, and the per-window nats of
    its `bpb` evaluation record when there is one (the paired windows of the bootstrap)."""
    windows: dict[str, dict[str, Any]] = {}
    for rec in records:
        if (rec.get("kind") == "eval" and rec.get("eval") == "bpb" and rec.get("metric") == "bpb"
                and rec.get("windows") and rec.get("ckpt")):
            windows[_key(rec["ckpt"])] = rec["windows"]
    out = []
    for run in runs:
        s = run.summary
        counts = s.get("param_counts") or {}
        params = counts.get("active_non_embedding") or counts.get("non_embedding")
        per_token = (s.get("flops_per_token") or {}).get("train")
        loss = (s.get("final") or {}).get("loss")
        if not params or not per_token or loss is None or not s.get("tokens_seen"):
            continue
        point = ScalingPoint(run.arch, float(params), float(s["tokens_seen"]) * float(per_token),
                             float(loss), run.seed)
        win = windows.get(_key(run.path))
        if win:
            point.nats = np.asarray(win["nats"], dtype=np.float64)
            point.tokens = np.asarray(win["tokens"], dtype=np.float64)
            point.loss = float(point.nats.sum() / point.tokens.sum())
        out.append(point)
    return out


def _alpha_text(fit: ScalingFit) -> str:
    if not fit.falls:
        return f"none: the loss does not fall with x (a = {fit.law.a:.3g})"
    if fit.alpha is None:
        return f"{fit.law.alpha:.3f} (no interval: one seed and no per-window losses)"
    return fit.alpha.text(3)


def _ratio_text(ratio: Interval) -> str:
    def one(v: float) -> str:
        return "never" if math.isinf(v) else "?" if math.isnan(v) else f"{v:.2g}x"

    return f"{one(ratio.estimate)} the FLOPs [{one(ratio.low)}, {one(ratio.high)}]"


def _plot(rep: Any, fits: dict[str, ScalingFit], axis: str) -> None:
    from archbench.evaluate.reporting import plots

    fig, axes = plots.new_figure()
    ax = axes[0]
    xs_all, ys_all = [], []
    for arch, fit in fits.items():
        style = rep.styles(arch)
        xs = np.array([p[0] for p in fit.points])
        ys = np.array([p[1] for p in fit.points])
        grid = np.geomspace(xs.min() / 1.5, xs.max() * 1.5, 100)
        ax.plot(xs, ys, linestyle="none", marker=style["marker"], color=style["color"],
                label=f"{arch}: alpha {fit.law.alpha:.2f}")
        ax.plot(grid, fit.law(grid), color=style["color"], linestyle="--", linewidth=1)
        xs_all += list(grid)
        ys_all += list(ys)
    plots.label_axes(ax, AXES[axis], "final validation loss (nats/token)",
                     xs=xs_all, ys=ys_all, logx=True)
    plots.legend(ax)
    rep.figure(fig, f"scaling_{axis}.png", f"loss = a * x^-alpha + c against {AXES[axis]}")


def section_scaling(rep: Any, reference: str | None = None) -> bool:
    """Scaling laws of every backbone with language-model runs at >= 3 sizes: the fits against
    parameters and FLOPs, the exponent's interval, plots, and the compute at which each backbone
    reaches the reference's final loss."""
    from archbench.evaluate.reporting.data import md_table

    runs = [r for r in rep.col.runs if r.task is None and r.finished]
    points = points_from(runs, rep.col.records)
    fits = {axis: fit_backbones(points, axis) for axis in AXES}
    if not fits["params"]:
        return False
    rep.lines += ["## Scaling laws", "",
                  "loss = a * x^(-alpha) + c fitted per backbone over its runs at different "
                  "sizes (x: non-embedding parameters, or training FLOPs); alpha with a 95% "
                  "bootstrap interval over the shared validation windows and the seeds "
                  "(evaluate/reporting/scaling.py).", ""]
    rows = []
    for arch, fit in fits["params"].items():
        ff = fits["flops"].get(arch)
        rows.append([arch, len(fit.points), _alpha_text(fit), f"{fit.law.c:.3f}",
                     _alpha_text(ff) if ff else "-"])
    rep.lines += md_table(["backbone", "sizes", "alpha vs N [95%]", "c (loss at infinite N)",
                           "alpha vs FLOPs [95%]"], rows)
    rep.lines.append("")
    ref = reference if reference in fits["flops"] else (
        "transformer" if "transformer" in fits["flops"] else next(iter(fits["flops"]), None))
    for arch in fits["flops"]:
        if ref is None or arch == ref:
            continue
        ratio = compute_ratio(fits["flops"], points, arch, ref)
        if ratio is not None:
            rep.lines += [f"- {arch} reaches {ref}'s final loss with {_ratio_text(ratio)} "
                          f"of {ref}'s largest run.", ""]
    for axis in AXES:
        if fits[axis]:
            _plot(rep, fits[axis], axis)
    return True
