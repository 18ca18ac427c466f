"""Size presets solved per backbone: pick depth and width so a parameter (or FLOPs) target is met.

Hand-tuned presets drift whenever a mixer changes; solving keeps comparisons matched
(docs/design.md, fairness rule 3). The count of every candidate is exact: blocks are built on
the meta device and their parameters summed, so the solver cannot disagree with
`LanguageModel.param_counts`.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from archbench.archs import registry
from archbench.archs.model import (
    Block,
    LanguageModel,
    arch_config,
    layer_plan,
    learned_position_rows,
)
from archbench.config import ConfigError, pattern_mixers, pattern_periods, pinned_layers

MAX_LAYERS = 96
MAX_WIDTH = 16384
# Shapes a family is actually trained at. Without them the solver meets a small target with
# shapes nobody would train (64 wide x 13 layers with one 64-dim head), and a comparison of
# those says little about the family.
MIN_HEADS = 2          # attention: at least two heads ...
MIN_HEAD_DIM = 32      # ... of at least 32 dimensions
# d_model / n_layers within [aspect / 8, aspect * 8] of the family's ratio: published small
# models span about 20 (Pythia-14M, 128 x 6) to 130 (Jamba, 4096 x 32), and a hybrid whose
# pattern repeats every 8 layers cannot be shallower than 8 at any size.
ASPECT_BAND = 8.0


@dataclass
class SizeFit:
    metric: str
    target: float
    achieved: float
    d_model: int
    n_layers: int
    solved: bool
    shape_note: str | None = None  # set when the target and the family's shape rules conflict

    @property
    def error(self) -> float:
        return self.achieved / self.target - 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error": self.error}


class _Attrs(dict):
    """A read-only attribute view of a plain config dict: counting builds thousands of blocks,
    and OmegaConf nodes are too slow to create for each."""

    def __getattr__(self, name: str) -> Any:
        try:
            value = self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc
        return _Attrs(value) if isinstance(value, dict) else value


_INIT_FUNCTIONS = ("normal_", "uniform_", "zeros_", "ones_", "constant_", "orthogonal_",
                   "trunc_normal_", "xavier_uniform_", "kaiming_uniform_")


@contextmanager
def _counting_only() -> Iterator[None]:
    """Build on the meta device with nn.init as no-ops: only shapes matter for counting."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


@lru_cache(maxsize=8192)
def _block_counts(arch_json: str, d_model: int, mixer: str, mlp: str, layer_idx: int,
                  context: int) -> tuple[int, int, float]:
    """(params, inactive params, extra forward FLOPs) of one block at width d_model.

    Callers pass the first layer index of each distinct (mixer, mlp, first-of-its-kind) block,
    so the cache stays small while layers that differ (RWKV-7's first layer has no value
    residual) are counted as built."""
    arch = _Attrs({**json.loads(arch_json), "d_model": d_model})
    with _counting_only():
        block = Block(arch, layer_idx, mixer, mlp)
    params = sum(p.numel() for p in block.parameters())
    subs = [block.mixer] + ([block.mlp] if block.mlp is not None else [])
    inactive = sum(s.inactive_params() for s in subs)
    flops = sum(s.flops_per_token(context) for s in subs)
    return params, int(inactive), float(flops)


def measure(arch: Any, d_model: int, n_layers: int, vocab_size: int, metric: str,
            context: int = 2048) -> float:
    """The size metric of a candidate shape, from per-block exact counts."""
    return _Measurer(arch, vocab_size, metric, context)(d_model, n_layers)


class _Measurer:
    """Sizes of candidate shapes of one arch; the expensive parts are cached across candidates."""

    def __init__(self, arch: Any, vocab_size: int, metric: str, context: int) -> None:
        if metric not in ("non_embedding", "active", "total", "flops"):
            raise ConfigError(
                f"size.metric={metric!r} is not one of non_embedding, active, total, flops"
            )
        plain = OmegaConf.to_container(arch, resolve=True)
        plain["n_layers"] = 1  # block parameter counts do not depend on depth
        self.arch_json = json.dumps(plain, sort_keys=True)
        self.cfg = OmegaConf.create(plain)
        # block counts do not depend on depth, but a pinned layer's place does: plan per depth
        self.pinned = bool(self.cfg.pattern.get("at"))
        self.period = [] if self.pinned else layer_plan(self.cfg, _depth_unit(self.cfg))
        self.vocab_size, self.metric, self.context = vocab_size, metric, context

    def __call__(self, d_model: int, n_layers: int) -> float:
        cfg = self.cfg
        params = inactive = 0
        flops = 0.0
        seen: set[str] = set()
        representative: dict[tuple[str, str, bool], int] = {}
        plan = layer_plan(self.cfg, n_layers) if self.pinned else None
        for i in range(n_layers):
            mixer, mlp = plan[i] if plan else self.period[i % len(self.period)]
            key = (mixer, mlp, mixer not in seen)
            seen.add(mixer)
            index = representative.setdefault(key, i)
            p, q, f = _block_counts(self.arch_json, d_model, mixer, mlp, index, self.context)
            params, inactive, flops = params + p, inactive + q, flops + f
        norms = (2 if cfg.embed_norm else 1) * d_model * (2 if cfg.norm == "layernorm" else 1)
        non_embedding = params + norms
        if self.metric == "non_embedding":
            return float(non_embedding)
        if self.metric == "active":
            return float(non_embedding - inactive)
        if self.metric == "flops":
            return 2.0 * (non_embedding - inactive + d_model * self.vocab_size) + flops
        embedding = self.vocab_size * d_model * (1 if cfg.tie_embeddings else 2)
        rows, _ = learned_position_rows(cfg, pattern_mixers(cfg))
        return float(non_embedding + embedding + rows * d_model)


def _depth_unit(arch: Any) -> int:
    mixers, mlps = (len(period) for period in pattern_periods(arch))
    return mixers * mlps // math.gcd(mixers, mlps)


def _depths(arch: Any, unit: int) -> list[int]:
    """Candidate depths: multiples of the period at which every pinned layer exists (the H3
    hybrid's layer 1 needs at least 2 layers) and no two pinned mixers share a layer."""
    out = []
    for n_layers in range(unit, MAX_LAYERS + 1, unit):
        try:
            pinned_layers(arch, n_layers)
        except ConfigError:
            continue
        out.append(n_layers)
    return out


def solve_size(arch: Any, size: Any, vocab_size: int) -> tuple[Any, SizeFit]:
    """Return the arch with d_model and n_layers filled in, and how close the target was met.

    An explicit arch.d_model and arch.n_layers win over the preset (the fit is still reported).
    Otherwise, for each depth (a multiple of the pattern's period) the width is found by bisection
    over multiples of arch.width_multiple; among shapes within size.tolerance the one nearest
    the backbone's preferred aspect ratio (d_model per layer) is taken.
    """
    arch = arch_config(arch)
    metric, target = size.metric, float(size.target)
    context = int(getattr(size, "flops_seq_len", 2048))
    if arch.d_model > 0 and arch.n_layers > 0:
        got = measure(arch, arch.d_model, arch.n_layers, vocab_size, metric, context)
        problems = shape_problems(arch, arch.d_model, arch.n_layers)
        note = ("set explicitly outside the family's shape range: " + "; ".join(problems)
                if problems else None)
        return arch, SizeFit(metric, target, got, arch.d_model, arch.n_layers, solved=False,
                             shape_note=note)
    size_of = _Measurer(arch, vocab_size, metric, context)
    tolerance, tolerance_key = float(size.tolerance), "size.tolerance"
    if arch.size_tolerance is not None and arch.size_tolerance < tolerance:
        tolerance, tolerance_key = float(arch.size_tolerance), "arch.size_tolerance"
    unit = _depth_unit(arch)
    depths = _depths(arch, unit)
    divisor = _width_divisor(arch)
    best: tuple[float, int, int, float] | None = None
    step = int(arch.width_multiple)
    sane = functools.partial(shape_problems, arch)
    while step >= max(8, divisor) and step % divisor == 0:
        found = _best_shape(size_of, target, tolerance, step, depths, arch.aspect, sane)
        if found is not None and (best is None or found[0] < best[0]):
            best = found
        if best is not None and best[0] <= math.log(2):  # within 2x of the preferred aspect
            break
        step //= 2  # finer widths only when the coarse grid cannot give a sensible shape
    if best is None:
        nearest = _nearest_sane(size_of, target, int(arch.width_multiple), divisor, depths, sane,
                                float(arch.aspect))
        # beyond 2x the target a "nearest" shape is another size altogether: refuse instead
        if nearest is not None and abs(math.log(nearest[2] / target)) <= math.log(2):
            width, depth, got = nearest
            arch.d_model, arch.n_layers = width, depth
            note = (f"no shape in the family's range meets size.target={target:g} ({metric}) "
                    f"within {tolerance_key}={tolerance:g}; nearest sane shape {width} x "
                    f"{depth} is {got / target - 1:+.1%} off")
            return arch, SizeFit(metric, target, got, width, depth, solved=True,
                                 shape_note=note)
        raise ConfigError(
            f"size.target={target:g} ({metric}) cannot be met within {tolerance_key}="
            f"{tolerance:g} for arch.name={arch.name!r} (widths in steps of "
            f"{arch.width_multiple} down to {max(8, divisor)}, depth in steps of {unit}); "
            f"loosen {tolerance_key} or set arch.d_model and arch.n_layers"
        )
    _, width, depth, got = best
    arch.d_model, arch.n_layers = width, depth
    return arch, SizeFit(metric, target, got, width, depth, solved=True)


def _width_divisor(arch: Any) -> int:
    """The smallest width step every component of the pattern accepts (whole heads), as each
    declares it in the registry."""
    _, mlps = pattern_periods(arch)
    divisor = 1
    for role, names in (("mixer", pattern_mixers(arch)), ("mlp", mlps)):
        for name in set(names) - {registry.NO_MLP}:
            comp = registry.get(role, name)
            if comp.width_divisor is not None:
                divisor = math.lcm(divisor, int(comp.width_divisor(arch)))
    return divisor


def shape_problems(arch: Any, d_model: int, n_layers: int) -> list[str]:
    """Why a shape is outside the family's usual range (empty: it is inside): attention with
    fewer than MIN_HEADS heads or heads under MIN_HEAD_DIM, or d_model / n_layers beyond
    ASPECT_BAND times the family's preferred ratio (`arch.aspect`)."""
    problems = []
    mixers = pattern_mixers(arch)
    att = getattr(arch, "attention", None)
    if att is not None and any("attention" in str(m) for m in mixers):
        head_dim = int(att.head_dim)
        heads = int(att.n_heads) if att.n_heads else d_model // head_dim
        if heads < MIN_HEADS or head_dim < MIN_HEAD_DIM:
            problems.append(f"attention has {heads} head(s) of {head_dim} dimensions (at least "
                            f"{MIN_HEADS} of {MIN_HEAD_DIM} wanted)")
    ratio, aspect = d_model / n_layers, float(arch.aspect)
    if not aspect / ASPECT_BAND <= ratio <= aspect * ASPECT_BAND:
        problems.append(f"d_model / n_layers = {ratio:.3g} is beyond {ASPECT_BAND:g}x the "
                        f"family's {aspect:g}")
    return problems


def _nearest_sane(size_of: Any, target: float, width_multiple: int, divisor: int, depths: list[int],
                  sane: Any, aspect: float) -> tuple[int, int, float] | None:
    """(width, depth, size) of the shape inside the family's range closest to the target (by
    log size), when none is within tolerance."""
    best: tuple[float, int, int, float] | None = None
    step = max(divisor, math.gcd(width_multiple, divisor) or divisor, 8)
    for n_layers in depths:
        for width in range(step, MAX_WIDTH + 1, step):
            if sane(width, n_layers):
                continue
            got = size_of(width, n_layers)
            # nearest the target first; between near-equal misses, nearest the family's ratio
            score = abs(math.log(got / target)) + 0.05 * abs(math.log(width / n_layers /
                                                                     aspect))
            if best is None or score < best[0]:
                best = (score, width, n_layers, got)
            if got > target:
                break  # wider only gets bigger
        if best is not None and size_of(step, n_layers) > target * 4:
            break
    return None if best is None else best[1:]


def _best_shape(size_of: Any, target: float, tolerance: float, step: int, depths: list[int],
                aspect: float, sane: Any = None) -> tuple[float, int, int, float] | None:
    """(aspect score, width, depth, size) of the in-tolerance shape nearest the aspect ratio,
    among shapes without shape problems (`sane(width, depth)` lists them)."""
    best = None
    for n_layers in depths:
        lo, hi = 1, MAX_WIDTH // step
        if size_of(lo * step, n_layers) > target * (1 + tolerance):
            break  # deeper models only get bigger
        while lo < hi:  # smallest width whose size reaches the target
            mid = (lo + hi) // 2
            if size_of(mid * step, n_layers) < target:
                lo = mid + 1
            else:
                hi = mid
        for width in {max(1, lo - 1) * step, lo * step}:
            got = size_of(width, n_layers)
            if abs(got / target - 1) <= tolerance and not (sane and sane(width, n_layers)):
                score = abs(math.log(width / n_layers / aspect))
                if best is None or score < best[0]:
                    best = (score, width, n_layers, got)
    return best


def build_model(arch: Any, size: Any, vocab_size: int) -> tuple[LanguageModel, SizeFit]:
    resolved, fit = solve_size(arch, size, vocab_size)
    return LanguageModel(resolved, vocab_size), fit
