"""Report sections on cost and origin: the at-a-glance summary, efficiency (throughput, memory,
max context, peers) and provenance (commands, code, devices, kernel paths, everything flagged).

Bench records are documented in evaluate/bench/runner.py; every speed here is a median of timed
repeats taken by that runner, shown with the range of those repeats (the runner keeps their
median, quartiles and extremes, not their mean): a table must say how much a number moved.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from archbench.archs import registry
from archbench.evaluate.reporting import plots
from archbench.evaluate.reporting.data import (
    Report,
    context,
    human,
    human_bytes,
    matmul_of,
    md_table,
    mean_spread,
    params_key,
)

REFERENCE_PREFIXES = ("torch", "sdpa:math")


# ---- summary ----------------------------------------------------------------------------------

def section_summary(rep: Report) -> bool:
    """One row per backbone with the headline number of every section that has data."""
    col = rep.col
    labels = rep.labels.ordered(
        [r.label for r in col.runs if r.task is None and r.finished]
        + [rep.labels.of(r) for r in col.bench()])
    if not labels:
        return False
    columns: list[tuple[str, dict[str, str]]] = []
    runs = rep.runs()
    if runs:
        columns.append(("val bits/byte ↓", {
            lb: mean_spread([(r.summary.get("final") or {}).get("bpb") for r in rs], 3)
            for lb, rs in runs.items()}))
    for mode, head in (("train", "train tok/s ↑"), ("prefill", "prefill tok/s ↑"),
                       ("decode", "decode tok/s ↑")):
        ctx, at = _at_longest(rep, col.bench(mode, ok_only=False), "tokens_per_s")
        if at:
            ranges = speed_ranges(rep, [r for r in col.bench(mode) if r.get("context") == ctx])
            columns.append((f"{head} @{context(ctx)}", {
                lb: speed_text(ranges[lb]) if lb in ranges else human(v) for lb, v in at.items()}))
    ctx, state = _at_longest(rep, _state_records(rep, ok_only=False), "state_bytes_measured")
    if state:
        columns.append((f"cache/state bytes @{context(ctx)} ↓",
                        {lb: human_bytes(v) for lb, v in state.items()}))
    for name, head in (("passkey", "passkey (mean) ↑"), ("mqar", "MQAR (mean) ↑")):
        recs = [r for r in col.evals(name) if r.get("primary")]
        if recs:
            vals: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
            for r in recs:  # each seed's mean over the tested settings, then mean ± sd
                vals[rep.labels.of(r)][(r.get("train") or {}).get("seed")].append(r["value"])
            columns.append((head, {lb: mean_spread([np.mean(v) for v in by_seed.values()], 2,
                                                   fmt=lambda x: f"{x:.2f}")
                                   for lb, by_seed in vals.items()}))
    if not columns:
        return False
    rep.lines += ["## Summary", ""]
    rows = [[f"**{lb}**", *(cells.get(lb, "–") for _, cells in columns)] for lb in labels]
    rep.lines += md_table(["backbone", *(head for head, _ in columns)], rows)
    rep.lines += ["Throughput and state at the longest context of the benchmark, smallest batch; "
                  "– where a backbone has no result there (see Flagged). Bits per byte and task "
                  "accuracy: mean ± standard deviation over seeds; tokens/s: median of the timed "
                  "repeats [slowest–fastest repeat]. Details and settings below. ↑ higher is "
                  "better, ↓ lower.", ""]
    return True


def _at_longest(rep: Report, recs: list[dict[str, Any]], key: str
                ) -> tuple[float | None, dict[str, float]]:
    """The longest context measured (at the smallest batch) and each backbone's median value
    there; a backbone that failed there (OOM, error) has no value, not one from a shorter
    context."""
    recs, _ = _one_batch([r for r in recs if r.get("context") is not None and (
        r.get(key) is not None or r.get("status", "ok") != "ok")])
    if not recs:
        return None, {}
    longest = max(float(r["context"]) for r in recs)
    at = [r for r in recs if float(r["context"]) == longest and r.get("status", "ok") == "ok"]
    return longest, {lb: pts[-1][1] for lb, pts in _series(rep, at, key).items() if pts}


# ---- efficiency -------------------------------------------------------------------------------

def _one_batch(recs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    """Curves against context are drawn at one batch size (the smallest measured)."""
    batches = sorted({r.get("batch") for r in recs if r.get("batch") is not None})
    if not batches:
        return recs, None
    return [r for r in recs if r.get("batch") == batches[0]], batches[0]


def _series(rep: Report, recs: list[dict[str, Any]], y: str,
            transform: Any = None) -> dict[str, list[tuple[float, float]]]:
    """label -> sorted [(context, median of y)]."""
    out: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        value = transform(r) if transform else r.get(y)
        if value is not None and r.get("context") is not None:
            out[rep.labels.of(r)][float(r["context"])].append(float(value))
    return {lb: sorted((c, float(np.median(v))) for c, v in out[lb].items())
            for lb in rep.labels.ordered(out)}


def _draw(ax: Any, rep: Report, series: dict[str, list[tuple[float, float]]], ylabel: str,
          title: str, ybytes: bool = False, logy: bool | None = None,
          linestyle: str | None = None) -> None:
    for label, pts in series.items():
        style = rep.styles(label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=style["color"],
                linestyle=linestyle or style["linestyle"], marker=style["marker"], markersize=4,
                label=label)
    plots.label_axes(ax, "context (tokens)", ylabel, title,
                     ys=[p[1] for pts in series.values() for p in pts], logx=False, logy=logy,
                     ybytes=ybytes)
    plots.context_axis(ax, [p[0] for pts in series.values() for p in pts])
    plots.legend(ax)


def section_efficiency(rep: Report) -> bool:
    bench = rep.col.of_kind("bench")
    runs = rep.runs()
    if not bench and not runs:
        return False
    rep.lines += ["## Efficiency", ""]
    if runs:
        rows = [[f"**{label}**", mean_spread([r.summary.get("tokens_per_s") for r in rs],
                                             fmt=human),
                 mean_spread([r.summary.get("wall_time_s") for r in rs], 3)]
                for label, rs in runs.items()]
        rep.lines += ["Training runs, wall clock of the whole run (its evaluations included):", ""]
        rep.lines += md_table(["backbone", "train tokens/s", "train wall time (s)"], rows)
    if not bench:
        rep.note("Benchmarks: no `archbench bench` records in the input.")
        return True
    _throughput(rep)
    _memory(rep)
    _max_context(rep)
    _peers(rep)
    _rivals(rep)
    _growth(rep)
    return True


def _throughput(rep: Report) -> None:
    modes = [m for m in ("train", "prefill", "decode") if rep.col.bench(m)]
    if not modes:
        rep.note("Throughput: no train / prefill / decode benchmark records.")
        return
    fig, axes = plots.new_figure(ncols=len(modes), width=4.6)
    rows = []
    contexts: set[float] = set()
    tables: list[tuple[str, str, Any, dict[float, float]]] = []
    ranges: dict[tuple[str, str], dict[float, SpeedRange]] = {}
    for ax, mode in zip(axes, modes, strict=True):
        recs, batch = _one_batch(rep.col.bench(mode))
        series = _series(rep, recs, "tokens_per_s")
        for label, by_ctx in speed_ranges_by_context(rep, recs).items():
            ranges[(label, mode)] = by_ctx
        what = {"train": "fwd + bwd + AdamW step", "prefill": "the whole prompt",
                "decode": "new tokens after the prompt"}[mode]
        _draw(ax, rep, series, f"{mode} tokens/s", f"{mode}: {what}, batch {batch}")
        for label, pts in series.items():
            tables.append((label, mode, batch, dict(pts)))
            contexts |= {c for c, _ in pts}
    rep.figure(fig, "throughput.png", "Throughput against context (median of timed repeats)")
    ctx = sorted(contexts)
    for label, mode, batch, pts in sorted(tables, key=lambda t: (modes.index(t[1]),
                                                                 rep.labels.rank(t[0]))):
        own = ranges.get((label, mode), {})
        rows.append([f"**{label}**", mode, batch,
                     *(speed_text(own[c]) if c in own else human(pts.get(c)) for c in ctx)])
    rep.lines += md_table(["backbone", "mode", "batch", *(f"tok/s @{context(c)}" for c in ctx)],
                          rows)
    counts = sorted({r.n for by_ctx in ranges.values() for r in by_ctx.values()})
    repeats = "" if not counts else f"; {counts[0]}" + (
        f"-{counts[-1]}" if counts[-1] != counts[0] else "") + " timed repeats per cell"
    rep.lines += [f"Median tokens/s of the timed repeats [slowest–fastest repeat]{repeats}.", ""]


@dataclass(frozen=True)
class SpeedRange:
    """A speed with the range of its timed repeats: tokens/s at the median, slowest and fastest
    repeat (the runner's median time and its extremes turned into rates)."""

    median: float
    slowest: float
    fastest: float
    n: int


def _range_of(recs: list[dict[str, Any]]) -> SpeedRange | None:
    """One cell's speed; several records of a cell (repeated benchmarks) pool their extremes."""
    meds, lows, highs, n = [], [], [], 0
    for r in recs:
        tps, med = r.get("tokens_per_s"), r.get("median_s")
        spread = r.get("spread") or {}
        if tps is None or not med:
            continue
        work = float(tps) * float(med)  # tokens per timed unit
        meds.append(float(tps))
        lows.append(work / float(spread.get("max") or med))
        highs.append(work / float(spread.get("min") or med))
        n += int(spread.get("n") or 1)
    if not meds:
        return None
    return SpeedRange(float(np.median(meds)), min(lows), max(highs), n)


def speed_ranges_by_context(rep: Report, recs: list[dict[str, Any]]
                            ) -> dict[str, dict[float, SpeedRange]]:
    """label -> context -> speed with the range of its repeats."""
    cells: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        if r.get("context") is not None:
            cells[rep.labels.of(r)][float(r["context"])].append(r)
    out: dict[str, dict[float, SpeedRange]] = {}
    for label, by_ctx in cells.items():
        ranges = {c: rng for c, rs in by_ctx.items() if (rng := _range_of(rs)) is not None}
        if ranges:
            out[label] = ranges
    return out


def speed_ranges(rep: Report, recs: list[dict[str, Any]]) -> dict[str, SpeedRange]:
    """label -> speed with the range of its repeats, over records of one cell per label (the
    smallest batch)."""
    recs, _ = _one_batch(recs)
    out: dict[str, SpeedRange] = {}
    for label, by_ctx in speed_ranges_by_context(rep, recs).items():
        out[label] = by_ctx[max(by_ctx)]
    return out


def speed_text(r: SpeedRange) -> str:
    """'6.27K [5.9K–6.41K]': median tokens/s [slowest–fastest repeat]."""
    if r.n <= 1 or r.slowest == r.fastest:
        return human(r.median)
    return f"{human(r.median)} [{human(r.slowest)}–{human(r.fastest)}]"


def _state_records(rep: Report, ok_only: bool = True) -> list[dict[str, Any]]:
    """Records whose cache/state bytes describe a cache of exactly `context` tokens: the memory
    mode's (decode preallocates context + new tokens), else prefill's."""
    for mode in ("memory", "prefill"):
        recs = [r for r in rep.col.bench(mode, ok_only=ok_only)
                if r.get("status", "ok") != "ok" or r.get("state_bytes_measured") is not None
                or r.get("state_bytes_analytic") is not None]
        if recs:
            return recs
    return []


def _peak_above_baseline(r: dict[str, Any]) -> float | None:
    """The measurement's own memory: peak minus what the process held before the model."""
    if r.get("peak_bytes") is None:
        return None
    return max(float(r["peak_bytes"]) - float(r.get("baseline_bytes") or 0), 1.0)


def _memory(rep: Report) -> None:
    bench = rep.col.bench()
    mode = next((m for m in ("memory", "prefill", "train")
                 if any(r.get("mode") == m and r.get("peak_bytes") for r in bench)), None)
    state = _state_records(rep)
    if mode is None and not state:
        rep.note("Memory: no benchmark records with peak or state bytes.")
        return
    fig, axes = plots.new_figure(ncols=2)
    if mode is not None:
        recs, batch = _one_batch([r for r in bench if r.get("mode") == mode])
        kinds = sorted({str(r.get("peak_kind")) for r in recs})
        _draw(axes[0], rep, _series(rep, recs, "peak_bytes", _peak_above_baseline),
              "peak memory above the process baseline", f"peak memory, {mode} (batch {batch}; "
              f"{', '.join(kinds)})", ybytes=True, logy=True)
        if not all(r.get("isolated") for r in recs):
            rep.lines += ["Peak memory was measured without process isolation "
                          "(bench.isolate=false): a process's peak only grows, so later points "
                          "may carry earlier ones.", ""]
    else:
        axes[0].set_axis_off()
    if state:
        recs, batch = _one_batch(state)
        _draw(axes[1], rep, _series(rep, recs, "state_bytes_measured"), "cache / state bytes",
              f"decoding cache or state (batch {batch}; dashed: analytic)", ybytes=True,
              logy=True)
        for label, pts in _series(rep, recs, "state_bytes_analytic").items():
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts],
                         color=rep.styles.colour(label), linestyle="--", linewidth=1)
    else:
        axes[1].set_axis_off()
    rep.figure(fig, "memory.png", "Memory against context (log-log)")


def _max_context(rep: Report) -> None:
    recs = rep.col.bench("max_context", ok_only=False)
    if not recs:
        rep.note("Max context: not measured (bench.max_context=false).")
        return
    rows = []
    for r in sorted(recs, key=lambda r: (rep.labels.rank(rep.labels.of(r)),
                                         str(r.get("probe")), r.get("batch") or 0)):
        bound = " (the search limit)" if r.get("context") and r.get("context") == r.get(
            "limit") else ""
        rows.append([f"**{rep.labels.of(r)}**", r.get("probe") or "–", r.get("batch", "–"),
                     (context(r["context"]) + bound) if r.get("context") else "–",
                     context(r.get("first_failed_context")), r.get("status")])
    rep.lines += ["### Max context", ""]
    rep.lines += md_table(["backbone", "probe", "batch", "largest that fit (tokens)",
                           "first that did not", "status"], rows)


def _peers(rep: Report) -> None:
    recs = [r for r in rep.col.bench() if isinstance(r.get("peer"), dict)]
    if not recs:
        return
    rows = []
    for r in sorted(recs, key=lambda r: (rep.labels.rank(rep.labels.of(r)), str(r.get("mode")),
                                         r.get("context") or 0)):
        peer = r["peer"]
        ratio = peer.get("ratio")
        rows.append([f"**{rep.labels.of(r)}**", r.get("mode"), context(r.get("context")),
                     r.get("batch"), human(r.get("tokens_per_s")), peer.get("name", "peer"),
                     human(peer.get("tokens_per_s")) if peer.get("status") == "ok"
                     else peer.get("status"),
                     f"{ratio:.2f}×" if ratio else "–", _ratio_spread(peer),
                     f"{r['compile_s']:.0f}" if r.get("compile_s") is not None else "–",
                     peer.get("ratio_basis") or "–"])
    rep.lines += ["### Against peer implementations (same config, same run)", ""]
    rep.lines += md_table(["backbone", "mode", "context", "batch", "ours tok/s", "peer",
                           "peer tok/s", "ours / peer", "spread (q1–q3, min–max)",
                           "compile s", "basis"], rows)
    rep.lines += ["A ratio above 1 means ours is faster. The peer runs eager; rows marked "
                  "compiled time our torch.compile'd step (compile seconds apart, not in the "
                  "ratio). Spread: quartiles and extremes of the per-pair ratios when ours and "
                  "the peer were timed call by call in alternation (basis interleaved).", ""]


GROWTH_FLAT = 0.10  # a decode step "flat" in the context: speed within 10% of the reference's


def pairs_verdict(pairs: dict[str, Any], even: str = "flat") -> str:
    """A speed ratio of interleaved pairs in words: `even` when the median is within 10% of 1;
    slower / faster only when every pair sits on one side of 1. Quartiles were not enough: with
    the 3-6 pairs a slow step gets, they called S4D's recurrent step 20% faster at 4096 than at
    128 (pairs 0.99-1.32), which no work in that step can explain."""
    change = pairs["ratio"] - 1.0
    if abs(change) <= GROWTH_FLAT:
        return f"{even} (within {GROWTH_FLAT:.0%})"
    if pairs.get("max", pairs["ratio"]) < 1.0:
        return f"slower by {-change:.0%}"
    if pairs.get("min", pairs["ratio"]) > 1.0:
        return f"faster by {change:.0%}"
    return "not resolved (the pairs span 1)"


def growth_verdict(growth: dict[str, Any]) -> str:
    """A decode step's speed at a long context against the reference context's."""
    return pairs_verdict(growth, "flat")


def _rivals(rep: Report) -> None:
    rows = []
    for r in sorted(rep.col.bench(), key=lambda r: (rep.labels.rank(rep.labels.of(r)),
                                                    str(r.get("mode")), r.get("batch") or 0,
                                                    r.get("context") or 0)):
        for name, pair in sorted((r.get("rivals") or {}).items()):
            if pair.get("status") != "ok":
                rows.append([f"**{rep.labels.of(r)}**", r.get("mode"), context(r.get("context")),
                             r.get("batch"), name, pair.get("status"), "–", "–",
                             str(pair.get("error") or "")[:80]])
                continue
            rows.append([f"**{rep.labels.of(r)}**", r.get("mode"), context(r.get("context")),
                         r.get("batch"), name, f"{pair['ratio']:.2f}",
                         f"{pair['q1']:.2f}–{pair['q3']:.2f}",
                         f"{pair['min']:.2f}–{pair['max']:.2f} (n={pair['n']})",
                         pairs_verdict(pair, "even")])
    if not rows:
        return
    rep.lines += ["### Against other backbones (bench.rivals, interleaved in one process)", ""]
    rep.lines += md_table(["backbone", "mode", "context", "batch", "rival",
                           "our speed / rival's", "q1–q3", "min–max", "verdict"], rows)
    rep.lines += ["Each row times the backbone and the rival (its conf/arch defaults, solved to "
                  "the same size) with the same unit, call by call in alternation, in one "
                  "process (the record's `rivals`); above 1 the backbone is faster. Verdict as "
                  "for the context: even within 10%; faster / slower only when every pair "
                  "says so.", ""]


def _growth(rep: Report) -> None:
    recs = [r for r in rep.col.bench("decode") if isinstance(r.get("growth"), dict)]
    if not recs:
        return
    rows = []
    for r in sorted(recs, key=lambda r: (rep.labels.rank(rep.labels.of(r)), r.get("batch") or 0,
                                         r.get("context") or 0)):
        g = r["growth"]
        rows.append([f"**{rep.labels.of(r)}**", r.get("batch"),
                     f"{context(g['reference_context'])} → {context(r.get('context'))}",
                     f"{g['ratio']:.2f}", f"{g['q1']:.2f}–{g['q3']:.2f}",
                     f"{g['min']:.2f}–{g['max']:.2f} (n={g['n']})", growth_verdict(g)])
    rep.lines += ["### Decoding cost against the context (interleaved in one process)", ""]
    rep.lines += md_table(["backbone", "batch", "context", "speed / speed at reference",
                           "q1–q3", "min–max", "verdict"], rows)
    rep.lines += ["Each row times the same decode unit at the record's context and at the "
                  "reference context in alternation, in one process (the record's `growth`), so "
                  "the machine's drifting load cancels; 1 means the same speed. A recurrent step "
                  "does no work that depends on the context and should be flat; attention and "
                  "Hyena read a history that grows with it. Verdict: flat when the median is "
                  "within 10% of 1; slower / faster only when every pair is on one side of 1; "
                  "else not resolved (more pairs needed: raise bench.min_seconds).", ""]


def _ratio_spread(peer: dict[str, Any]) -> str:
    pairs = peer.get("interleaved") or {}
    if not pairs:
        return "–"
    return (f"{pairs['q1']:.2f}–{pairs['q3']:.2f}, {pairs['min']:.2f}–{pairs['max']:.2f} "
            f"(n={pairs['n']})")


# ---- provenance -------------------------------------------------------------------------------

def _prov_row(label: str, where: str, prov: dict[str, Any], kernels: Any) -> list[Any]:
    git = prov.get("git") or {}
    dev = prov.get("device") or {}
    ver = prov.get("versions") or {}
    commit = (git.get("commit") or "?")[:10] + (" (dirty)" if git.get("dirty") else "")
    device = f"{dev.get('type', '?')}: {dev.get('name', '?')}"
    if dev.get("type") == "cpu" and dev.get("cpu_threads"):
        device += f", {dev['cpu_threads']} threads"
    kern = ", ".join(f"{k}={v}" for k, v in sorted((kernels or {}).items())) or "–"
    return [f"**{label}**", where, commit, device, f"torch {ver.get('torch', '?')}", kern]


def section_provenance(rep: Report) -> bool:
    rep.lines += ["## Provenance", ""]
    rows = []
    for run in sorted(rep.col.runs, key=lambda r: (str(r.task), r.label, str(r.path))):
        stage = "train" + (f" ({run.task})" if run.task else "")
        rows.append(_prov_row(run.label, f"{stage} `{run.path}`",
                              run.summary.get("provenance") or {},
                              run.summary.get("kernel_paths")))
    seen = set()
    for r in rep.col.records:
        if r.get("kind") not in ("eval", "bench"):
            continue
        key = (r["kind"], rep.labels.of(r), r.get("_source"))
        if key in seen:
            continue
        seen.add(key)
        rows.append(_prov_row(rep.labels.of(r), f"{r['kind']} `{r.get('_source')}`",
                              r.get("provenance") or {}, r.get("kernel_paths")))
    if rows:
        rep.lines += md_table(["backbone", "stage and source", "commit", "device", "versions",
                               "kernel paths"], rows)
    commands = sorted(({(r.get("provenance") or {}).get("command") for r in rep.col.records}
                       | {(run.summary.get("provenance") or {}).get("command")
                          for run in rep.col.runs}) - {None})
    if commands:
        rep.lines += ["Commands that produced these records:", "", "```", *commands, "```", ""]
    _stages(rep)
    flags = flagged(rep)
    rep.lines += ["### Flagged", ""]
    rep.lines += [f"- {f}" for f in flags] if flags else [
        "Nothing flagged: every run finished, every measurement has status ok, every backbone "
        "ran the same class of kernels."]
    rep.lines.append("")
    return True


def _stages(rep: Report) -> None:
    recs = rep.col.of_kind("stage")
    if not recs:
        return
    rows = [[r.get("stage"), r.get("what", "–"), r.get("status"),
             f"{r['seconds']:.0f}" if r.get("seconds") is not None else "–",
             r.get("reason") or (f"`{r['log']}`" if r.get("log") else "–")] for r in recs]
    rep.lines += ["Stages of `archbench compare` (seconds of a shared multirun are split evenly "
                  "between its jobs):", ""]
    rep.lines += md_table(["stage", "what", "status", "seconds", "reason or log"], rows)


def flagged(rep: Report) -> list[str]:
    """Everything a reader must know before trusting a number: unreadable inputs, runs that did
    not finish, measurements that are not "ok" (OOM, unsupported, errors), failed stages, and
    kernel classes that differ across backbones."""
    flags = list(rep.col.problems)
    for run in rep.col.runs:
        status = run.summary.get("status")
        if status != "finished":
            flags.append(f"training `{run.path}` ({run.label}): **{status}**"
                         + (f" — {run.summary['error']}" if run.summary.get("error") else ""))
    for r in rep.col.records:
        status = r.get("status", "ok")
        if r.get("kind") == "eval" and status != "ok":
            flags.append(f"eval {r.get('eval')}/{r.get('metric')} of {rep.labels.of(r)} "
                         f"[{params_key(r.get('params'))}]: **{status}** ({r.get('reason')})")
        elif r.get("kind") == "bench" and status != "ok":
            flags.append(f"bench {r.get('mode')} of {rep.labels.of(r)} at context "
                         f"{r.get('context')}, batch {r.get('batch')}: **{status}** "
                         f"({r.get('error')})")
        elif r.get("kind") == "stage" and status not in ("ok", "skipped"):
            flags.append(f"compare stage {r.get('stage')} {r.get('what', '')}: **{status}** "
                         f"(exit code {r.get('returncode')}; log `{r.get('log')}`)")
        elif r.get("kind") == "stage" and r.get("stage") == "check":
            flags.append(f"backbone {r.get('what')} left out: {r.get('reason')}")
    return flags + kernel_flags(rep)


def kernel_class(path: str, device_type: str | None) -> str:
    """Reference (pure PyTorch) or fast (fused / custom kernels). On a CPU every path is PyTorch
    code; on CUDA, SDPA picks fused kernels."""
    if str(path).startswith(REFERENCE_PREFIXES) or device_type == "cpu":
        return "reference"
    return "fast"


def _no_kernel_choice(sublayer: str) -> bool:
    """An MLP kind that declares no `kernels` choice runs plain matmuls on every device."""
    kind = sublayer.removeprefix("mlp:").split(",")[0]
    comp = registry.components("mlp").get(kind) if sublayer.startswith("mlp:") else None
    return comp is not None and not comp.kernels


def kernel_flags(rep: Report) -> list[str]:
    """Fairness rule 5: the same class of kernels across backbones, or the report says so; and
    which GEMM the projections ran on (arch.matmul), which moves every backbone's speed."""
    classes: dict[str, set[str]] = defaultdict(set)
    for run in rep.col.runs:
        device = ((run.summary.get("provenance") or {}).get("device") or {}).get("type")
        for sub, path in (run.summary.get("kernel_paths") or {}).items():
            if sub == "matmul" or _no_kernel_choice(sub):
                continue  # plain matmuls everywhere (dense MLPs, RWKV's channel mix)
            classes[kernel_class(path, device)].add(f"{run.label} {sub}={path}")
    out = []
    if len(classes) > 1:
        out.append("kernel classes differ across backbones (fairness rule 5): reference "
                   + ", ".join(sorted(classes["reference"])) + "; fast "
                   + ", ".join(sorted(classes["fast"])))
    return out + matmul_flags(rep)


def matmul_flags(rep: Report) -> list[str]:
    """Runs and benchmark records whose projections ran on different GEMMs are not comparable
    in speed; oneDNN's projections beside aten's products inside the mixers favour backbones
    whose time is in projections wherever the two libraries differ in speed; a compiled decode
    step with frozen weights picks its own GEMMs."""
    labels: dict[str, set[str]] = defaultdict(set)
    sources = [(run.label, run.summary) for run in rep.col.runs]
    sources += [(rep.labels.of(r), r) for r in rep.col.records
                if r.get("kind") == "bench" and r.get("status") == "ok"]
    for label, source in sources:
        labels[matmul_of(source)].add(label)
    labels.pop("?", None)  # made before arch.matmul existed: the record cannot say
    out = []
    if len(labels) > 1:
        out.append("the projections ran on different GEMMs (arch.matmul): " + "; ".join(
            f"{path}: {', '.join(sorted(names))}" for path, names in sorted(labels.items()))
            + ". Speeds across these groups compare GEMM libraries as much as backbones")
    if "onednn" in labels:
        out.append("projections and the LM head ran on oneDNN's GEMM (arch.matmul), the products "
                   "inside the mixers (attention scores, chunked scans) on aten's (MKL): where "
                   "the two differ in speed (oneDNN ~2x MKL on the AMD EPYC of reports/cpu-"
                   "speed) backbones whose time is in projections gain most")
    frozen = sorted({rep.labels.of(r) for r in rep.col.records
                     if (r.get("kernel_paths") or {}).get("decode_graph")})
    if frozen:
        out.append("compiled decoding ran with the weights frozen into the graph and its GEMMs "
                   "autotuned (inductor's C++ template or aten's, whichever was faster at "
                   "compile time; archs/compiling.py): " + ", ".join(frozen) + ". The peers "
                   "decode eagerly")
    return out
