"""Verdicts of `archbench validate`: each reproduction's measurement, read from the records its
runs wrote, turned into "reproduced" / "not reproduced" / "not run here" by a stated rule.

Why the rules are checks with evidence: a verdict is only as good as what it tested, so every
rule is a list of checks (what, passed or not, the numbers), all of which must pass; the report
prints them, and a "not reproduced" names the check that failed. Accuracies carry Wilson
intervals over the scored answers; "A is below B" means A's interval lies entirely below B's.
Memory is measured bytes (deterministic allocations: no sampling interval). Losses carry a
bootstrap interval over validation windows.

Each metric function takes the records of one reproduction (a reporting Collection) and its
`validate.params`, and returns an Outcome; METRICS maps the `validate.metric` names to them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from archbench.evaluate.stats import Interval, wilson

REPRODUCED, NOT_REPRODUCED, NOT_RUN = "reproduced", "not reproduced", "not run here"


@dataclass
class Check:
    what: str
    passed: bool
    evidence: str


@dataclass
class Outcome:
    """What one reproduction showed: the headline measurement (`ours`), the verdict, and why."""

    verdict: str
    ours: str
    checks: list[Check] = field(default_factory=list)
    why: str = ""
    details: list[str] = field(default_factory=list)  # Markdown lines (a table of the cells)
    series: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)
    axes: tuple[str, str] = ("", "")  # plot labels of `series` (x, y)

    @staticmethod
    def not_run(why: str) -> Outcome:
        return Outcome(NOT_RUN, "-", why=why)


def decide(checks: list[Check]) -> tuple[str, str]:
    """(verdict, why): reproduced only when every check passed; else the failed ones, named."""
    failed = [c for c in checks if not c.passed]
    if not checks:
        return NOT_RUN, "nothing was measured"
    if not failed:
        return REPRODUCED, ""
    return NOT_REPRODUCED, "; ".join(f"{c.what}: {c.evidence}" for c in failed)


def _interval(iv: Interval, digits: int = 2) -> str:
    return f"{iv.estimate:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def below(a: Interval, b: Interval) -> bool:
    """a is below b beyond the noise: a's whole interval under b's."""
    return a.high < b.low


# ---- reading accuracies ----------------------------------------------------------------------

def accuracies(records: list[dict[str, Any]], task: str, key: Callable[[dict[str, Any]], Any],
               select: Callable[[dict[str, Any]], Any] | None = None
               ) -> dict[Any, Interval]:
    """Accuracy with a Wilson interval per `key(record)` of the task's accuracy records. Several
    records in one cell (learning rates, seeds) are reduced by `select`: the records that share a
    `select` value (a learning rate) are pooled, and the pool of best accuracy is the cell's (the
    best learning rate per cell, as Zoology reports it)."""
    pools: dict[Any, dict[Any, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for rec in records:
        if (rec.get("kind") != "eval" or rec.get("eval") != task
                or rec.get("metric") != "accuracy" or rec.get("value") is None
                or not rec.get("n")):
            continue
        n = int(rec["n"])
        pool = pools[key(rec)][select(rec) if select else None]
        pool[0] += round(float(rec["value"]) * n)
        pool[1] += n
    out = {}
    for cell, by_choice in pools.items():
        hits, n = max(by_choice.values(), key=lambda p: p[0] / p[1])
        out[cell] = wilson(hits, n)
    return out


def _train(rec: dict[str, Any], name: str) -> Any:
    return (rec.get("train") or {}).get(name)


def _series(cells: dict[tuple[str, float], Interval]) -> dict[str, list[tuple[float, ...]]]:
    out: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    for (arch, x), iv in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out[arch].append((float(x), iv.estimate, iv.low, iv.high))
    return dict(out)


def _cell_table(cells: dict[tuple[str, float], Interval], xname: str) -> list[str]:
    xs = sorted({x for _, x in cells})
    archs = sorted({a for a, _ in cells})
    lines = [f"| backbone | {' | '.join(f'{xname} {x:g}' for x in xs)} |",
             "|---|" + "---|" * len(xs)]
    for a in archs:
        row = [_interval(cells[(a, x)]) if (a, x) in cells else "-" for x in xs]
        lines.append(f"| {a} | {' | '.join(row)} |")
    return lines


# ---- the metrics -----------------------------------------------------------------------------

def mqar_width(records: list[dict[str, Any]], runs: list[Any], params: dict[str, Any]
               ) -> Outcome:
    """Zoology figure 2: accuracy per (backbone, width), best learning rate per cell."""
    cells = accuracies(records, "mqar", lambda r: (r.get("arch"), float(_train(r, "d_model"))),
                       select=lambda r: _train(r, "lr"))
    if not cells:
        return Outcome.not_run("no MQAR accuracy records (training or evaluation did not finish)")
    solve = float(params.get("solve", 0.9))
    widths = sorted({w for _, w in cells})
    small, large = widths[0], widths[-1]
    checks = []
    for att in params["attention"]:
        accs = [cells.get((att, w)) for w in widths]
        ok = all(a is not None and a.estimate >= solve for a in accs)
        checks.append(Check(f"{att} >= {solve:g} at every width", ok, ", ".join(
            f"{w:g}: {'-' if a is None else f'{a.estimate:.2f}'}" for w, a in zip(widths, accs))))
    att_small = [cells[(a, small)] for a in params["attention"] if (a, small) in cells]
    for g in params["gated"]:
        gs, gl = cells.get((g, small)), cells.get((g, large))
        if gs is None or gl is None or not att_small:
            checks.append(Check(f"{g} measured at widths {small:g} and {large:g}", False,
                                "missing"))
            continue
        checks.append(Check(f"{g} below attention at width {small:g}",
                            all(below(gs, a) for a in att_small),
                            f"{_interval(gs)} vs {', '.join(_interval(a) for a in att_small)}"))
        checks.append(Check(f"{g} improves with width ({small:g} -> {large:g})", below(gs, gl),
                            f"{_interval(gs)} -> {_interval(gl)}"))
    checks += _not_below_gated(cells, params, small)
    verdict, why = decide(checks)
    ours = "; ".join(f"{a} {cells[(a, small)].estimate:.2f} -> {cells[(a, large)].estimate:.2f}"
                     for a in sorted({a for a, _ in cells})
                     if (a, small) in cells and (a, large) in cells)
    return Outcome(verdict, f"accuracy at width {small:g} -> {large:g}: {ours}", checks, why,
                   _cell_table(cells, "width"), _series(cells), ("model width", "MQAR accuracy"))


def _not_below_gated(cells: dict[tuple[str, float], Interval], params: dict[str, Any],
                     small: float) -> list[Check]:
    """The recurrent backbones (Mamba, RWKV) at the smallest width, where the gated convolutions
    have not the width they need: not below the best of them (intervals). Zoology's upper side
    of "in between" (below attention) is not tested: RWKV-7's delta-rule state postdates Zoology
    and is built for recall, so matching attention is what it should do."""
    gated = [cells[(g, small)] for g in params["gated"] if (g, small) in cells]
    best = max(gated, key=lambda iv: iv.estimate, default=None)
    out = []
    for b in params["between"]:
        iv = cells.get((b, small))
        ok = iv is not None and best is not None and not below(iv, best)
        out.append(Check(f"{b} not below the gated convolutions at width {small:g}", ok,
                         f"{'-' if iv is None else _interval(iv)} vs best gated "
                         f"{'-' if best is None else _interval(best)}"))
    return out


def task_pair(records: list[dict[str, Any]], runs: list[Any], params: dict[str, Any]
              ) -> Outcome:
    """H3 table of synthetic tasks: the solver solves every task, the other backbone does not."""
    solver, other = params["solver"], params["other"]
    solve = float(params.get("solve", 0.9))
    checks, rows, ours = [], [], []
    for task in params["tasks"]:
        cells = accuracies(records, task, lambda r: r.get("arch"),
                           select=lambda r: _train(r, "lr"))
        s, o = cells.get(solver), cells.get(other)
        s_text = "-" if s is None else _interval(s)
        o_text = "-" if o is None else _interval(o)
        rows.append(f"| {task} | {s_text} | {o_text} |")
        ours.append(f"{task}: {solver} {s_text}, {other} {o_text}")
        if s is None or o is None:
            checks.append(Check(f"{task}: both measured", False, f"{solver} {s_text}, "
                                f"{other} {o_text}"))
            continue
        checks.append(Check(f"{task}: {solver} >= {solve:g}", s.estimate >= solve, s_text))
        checks.append(Check(f"{task}: {other} below {solve:g} and below {solver}",
                            o.estimate < solve and below(o, s), f"{o_text} vs {s_text}"))
    verdict, why = decide(checks)
    details = [f"| task | {solver} | {other} |", "|---|---|---|", *rows]
    return Outcome(verdict, "; ".join(ours), checks, why, details)


def length_extrapolation(records: list[dict[str, Any]], runs: list[Any], params: dict[str, Any]
                         ) -> Outcome:
    """Mamba table 2: accuracy against test length / training length. The solver keeps solving
    to `multiple` x; each attention backbone solves at its training length and fails beyond it
    (a length its positions cannot read counts as a failure, with the reason)."""
    solve, fail = float(params.get("solve", 0.9)), float(params.get("fail_below", 0.5))
    multiple = float(params.get("multiple", 16))

    def ratio(r: dict[str, Any]) -> float:
        return float((r.get("params") or {}).get("seq_len")) / float(_train(r, "seq_len"))

    cells = accuracies(records, "induction", lambda r: (r.get("arch"), ratio(r)),
                       select=lambda r: _train(r, "lr"))
    unreadable = {(r.get("arch"), ratio(r)): r.get("reason") for r in records
                  if r.get("eval") == "induction" and r.get("status") == "not_supported"}
    if not cells:
        return Outcome.not_run("no induction accuracy records (training or evaluation did not "
                               "finish)")
    solver = params["solver"]
    checks = []
    top = max(x for _, x in cells)
    sol = [(x, cells[(solver, x)]) for x in sorted({x for _, x in cells}) if (solver, x) in cells]
    checks.append(Check(f"{solver} >= {solve:g} at every length up to {multiple:g}x",
                        bool(sol) and top >= multiple and all(iv.estimate >= solve
                                                              for _, iv in sol),
                        ", ".join(f"{x:g}x: {iv.estimate:.2f}" for x, iv in sol)))
    for att in params["fails"]:
        at1 = cells.get((att, 1.0))
        checks.append(Check(f"{att} solves at its training length", at1 is not None
                            and at1.estimate >= solve, "-" if at1 is None else _interval(at1)))
        far = cells.get((att, multiple))
        if far is None and (att, multiple) in unreadable:
            checks.append(Check(f"{att} fails at {multiple:g}x", True,
                                f"cannot read it: {unreadable[(att, multiple)]}"))
            continue
        ref = cells.get((solver, multiple))
        ok = far is not None and far.estimate < fail and (ref is None or below(far, ref))
        checks.append(Check(f"{att} fails at {multiple:g}x (< {fail:g}, below {solver})", ok,
                            "-" if far is None else _interval(far)))
    verdict, why = decide(checks)

    def acc(a: str, x: float) -> str:
        return f"{cells[(a, x)].estimate:.2f}" if (a, x) in cells else "n/a"

    ours = "; ".join(f"{a} {acc(a, 1.0)} / {acc(a, multiple)}"
                     for a in sorted({a for a, _ in cells}))
    return Outcome(verdict, f"accuracy at 1x / {multiple:g}x the training length: {ours}", checks,
                   why, _cell_table(cells, "x train length"), _series(cells),
                   ("test length / training length", "induction accuracy"))


def _pattern_fraction(config: dict[str, Any] | None, mixer: str) -> float | None:
    """The share of layers whose mixer is `mixer`, from a saved config's pattern."""
    from archbench.config import expand_period

    pattern = ((config or {}).get("arch") or {}).get("pattern") or {}
    try:
        mixers = expand_period(pattern.get("mixers"), "arch.pattern.mixers",
                               tuple({m.split("*")[0] for m in pattern.get("mixers")}))
    except Exception:  # a config without a readable pattern gives no expectation
        return None
    return sum(m == mixer for m in mixers) / len(mixers) if mixers else None


def decoding_memory(records: list[dict[str, Any]], runs: list[Any], params: dict[str, Any]
                    ) -> Outcome:
    """Measured decoding-state bytes against context: linear (KV cache, Hyena's history), flat
    (recurrent states), and the hybrid's share of the Transformer's."""
    bytes_at: dict[tuple[str, float], float] = {}
    configs: dict[str, Any] = {}
    for r in records:
        if (r.get("kind") == "bench" and r.get("mode") == "memory"
                and r.get("state_bytes_measured") and r.get("status", "ok") == "ok"):
            bytes_at[(r["arch"], float(r["context"]))] = float(r["state_bytes_measured"])
            configs[r["arch"]] = r.get("config")
    if not bytes_at:
        return Outcome.not_run("no memory benchmark records with measured state bytes")
    contexts = sorted({c for _, c in bytes_at})
    lo, hi = contexts[0], contexts[-1]
    span = hi / lo
    tol = float(params.get("tolerance", 0.15))
    checks, growth = [], {}
    for arch in sorted({a for a, _ in bytes_at}):
        if (arch, lo) in bytes_at and (arch, hi) in bytes_at:
            growth[arch] = bytes_at[(arch, hi)] / bytes_at[(arch, lo)]
    for kind, expect in (("linear", span), ("flat", 1.0)):
        for arch in params[kind]:
            g = growth.get(arch)
            checks.append(Check(f"{arch} state {kind} in context ({lo:g} -> {hi:g} tokens: "
                                f"x{expect:g})", g is not None and abs(g / expect - 1) <= tol,
                                "not measured" if g is None else f"x{g:.3g}"))
    hybrid, ref = params["hybrid"], params["reference"]
    share = _pattern_fraction(configs.get(hybrid), "attention")
    measured = (bytes_at.get((hybrid, hi), math.nan) / bytes_at.get((ref, hi), math.nan))
    checks.append(Check(f"{hybrid} / {ref} state at {hi:g} tokens ~ attention layers / all layers",
                        share is not None and abs(measured / share - 1) <= tol,
                        f"{measured:.3f} measured vs {share if share is None else round(share, 3)}"
                        " expected"))
    verdict, why = decide(checks)
    ours = (", ".join(f"{a} x{g:.3g}" for a, g in growth.items())
            + f" over x{span:g} context; {hybrid}/{ref} = {measured:.3f}")
    series = {a: [(c, bytes_at[(a, c)], bytes_at[(a, c)], bytes_at[(a, c)])
                  for c in contexts if (a, c) in bytes_at] for a in growth}
    details = ["| backbone | " + " | ".join(f"{c:g} tokens" for c in contexts) + " |",
               "|---|" + "---|" * len(contexts)]
    for a in growth:
        details.append(f"| {a} | " + " | ".join(
            f"{bytes_at[(a, c)] / 2**20:.3g} MiB" if (a, c) in bytes_at else "-"
            for c in contexts) + " |")
    return Outcome(verdict, f"state growth {ours} (measured bytes, exact)", checks, why, details,
                   series, ("context (tokens)", "decoding state (bytes)"))


def window_loss(rec: dict[str, Any], n_boot: int = 2000, seed: int = 0) -> Interval:
    """Validation loss (nats per token) with a bootstrap interval over its windows."""
    w = rec["windows"]
    nats, tokens = np.asarray(w["nats"], float), np.asarray(w["tokens"], float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(nats), (n_boot, len(nats)))
    reps = nats[idx].sum(1) / tokens[idx].sum(1)
    return Interval(float(nats.sum() / tokens.sum()), float(np.quantile(reps, 0.025)),
                    float(np.quantile(reps, 0.975)))


def loss_target(records: list[dict[str, Any]], runs: list[Any], params: dict[str, Any]
                ) -> Outcome:
    """A published validation loss: ours (bootstrap over windows) within `tolerance` of it."""
    arch, target = params["arch"], float(params["target"])
    tol = float(params.get("tolerance", 0.1))
    failed = [r for r in runs if r.arch == arch and not r.finished]
    recs = [r for r in records if r.get("eval") == "bpb" and r.get("metric") == "bpb"
            and r.get("arch") == arch and r.get("windows")]
    if not recs:
        error = next((str(r.summary.get("error", "")).splitlines()[0] for r in failed
                      if r.summary.get("error")), "")
        return Outcome.not_run("no evaluation of the run" + (f": training failed ({error})"
                                                                if error else ""))
    iv = window_loss(recs[-1])
    ok = abs(iv.estimate - target) <= tol
    check = Check(f"validation loss within {tol:g} of {target:g}", ok,
                  f"{_interval(iv, 3)} nats/token")
    verdict, why = decide([check])
    return Outcome(verdict, f"{arch} validation loss {_interval(iv, 3)} (target {target:g})",
                   [check], why)


def scaling_fit(records: list[dict[str, Any]], runs: list[Any], params: dict[str, Any]
                ) -> Outcome:
    """Loss falls as a power of parameters: alpha's interval above zero for every backbone."""
    from archbench.evaluate.reporting.scaling import (
        ALPHA_RANGE,
        compute_ratio,
        fit_backbones,
        points_from,
    )

    points = points_from([r for r in runs if r.finished and r.task is None], records)
    fits = fit_backbones(points, "params")
    if not fits:
        return Outcome.not_run("fewer than 3 finished sizes per backbone")
    checks = [Check(f"{a}: alpha > 0 (loss falls as a power of N)",
                    f.falls and f.alpha is not None and f.alpha.low > 2 * ALPHA_RANGE[0],
                    ("no interval" if f.alpha is None else f.alpha.text(3))
                    + ("" if f.falls else f"; no falling power law fits (a = {f.law.a:.3g}): "
                       "losses " + ", ".join(f"{y:.3f}" for _, y in f.points)))
              for a, f in fits.items()]
    checks += [Check(f"{a}: finished runs at >= 3 sizes", False, "fewer: no fit")
               for a in params.get("backbones", []) if a not in fits]
    ours = "; ".join(f"{a} alpha {f.alpha.text(2) if f.alpha else round(f.law.alpha, 2)}"
                     for a, f in fits.items())
    flops = fit_backbones(points, "flops")
    ref = params.get("reference")
    extra = []
    for a in flops:
        ratio = compute_ratio(flops, points, a, ref) if a != ref else None
        if ratio is not None:
            extra.append(f"{a} reaches {ref}'s final loss with {ratio.estimate:.2g}x the FLOPs "
                         f"[{ratio.low:.2g}, {ratio.high:.2g}]")
    verdict, why = decide(checks)
    series = {a: [(x, y, y, y) for x, y in f.points] for a, f in fits.items()}
    return Outcome(verdict, ours, checks, why, [f"- {e}" for e in extra], series,
                   ("non-embedding parameters", "final validation loss (nats/token)"))


METRICS: dict[str, Callable[[list[dict[str, Any]], list[Any], dict[str, Any]], Outcome]] = {
    "mqar_width": mqar_width,
    "task_pair": task_pair,
    "length_extrapolation": length_extrapolation,
    "decoding_memory": decoding_memory,
    "loss_target": loss_target,
    "scaling_fit": scaling_fit,
}


def plot_outcome(outcome: Outcome, path: Path, title: str) -> Path | None:
    """The measured series (with interval bars where they are intervals), log-x."""
    if not outcome.series:
        return None
    from archbench.evaluate.reporting import plots

    fig, axes = plots.new_figure()
    ax = axes[0]
    styles = plots.Styles((name, name) for name in outcome.series)  # each backbone's colour
    xs_all, ys_all = [], []
    for name, pts in outcome.series.items():
        x = [p[0] for p in pts]
        y = [p[1] for p in pts]
        # Wilson bounds may sit a rounding error inside the estimate at 0 or 1
        err = np.clip(np.array([[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]), 0,
                      None)
        style = styles(name)
        ax.errorbar(x, y, yerr=err if err.any() else None, marker=style["marker"], markersize=4,
                    capsize=2, label=name, color=style["color"])
        xs_all += x
        ys_all += y
    ybytes = "bytes" in outcome.axes[1]
    plots.label_axes(ax, outcome.axes[0], outcome.axes[1], xs=xs_all, ys=ys_all, logx=True,
                     ybytes=ybytes, logy=True if ybytes else None)
    plots.legend(ax)
    return plots.finish(fig, path, title)


# ---- the report ------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def write_report(rows: list[dict[str, Any]], out: Path, header: dict[str, Any]) -> Path:
    """report.md (the table first, then one section per reproduction with its rule, checks,
    cells and plot) and validation.json (the rows) in `out`."""
    import json

    from archbench.io import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in (REPRODUCED, NOT_REPRODUCED,
                                                                 NOT_RUN)}
    lines = [
        "# Known results, reproduced (`archbench validate`)", "",
        f"{counts[REPRODUCED]} reproduced, {counts[NOT_REPRODUCED]} not reproduced, "
        f"{counts[NOT_RUN]} not run here, of {len(rows)} claims.", "",
        "| claim | source | ours (95% interval) | verdict |", "|---|---|---|---|",
    ]
    for r in rows:
        verdict = f"**{r['verdict']}**" + (f": {r['why']}" if r["why"] else "")
        lines.append(f"| {_cell(r['claim'])} | {_cell(r['source'])} | {_cell(r['ours'])} | "
                     f"{_cell(verdict)} |")
    load = header.get("load") or (math.nan, math.nan)
    total_cpu = sum(float((r.get("first_run") or {}).get("cpu_seconds") or 0) for r in rows)
    lines += [
        "", "## How this report was made", "",
        f"Command: `{header['command']}` (preset {header['preset']}; ran or resumed: "
        f"{', '.join(header['ran']) or 'none'}).", "",
        f"Machine: {header['machine']}; load average {load[0]:.1f} at the start (other "
        f"processes), {load[1]:.1f} at the end.", "",
        f"Wall time: {header['seconds']:.0f} s for this invocation (a reproduction whose "
        "stages were done already takes seconds). The invocation that did each one's work "
        "(wall s / CPU s of its stage processes / load average then): "
        + ", ".join(_cost(r) for r in rows) + f"; CPU in all: {total_cpu:.0f} s.", "",
        "Verdicts: **reproduced** when every check of the rule passes; **not reproduced** "
        "names the checks that failed; **not run here** says why (a GPU-only setting, missing "
        "data, a failed stage). Accuracy intervals are Wilson 95% over the scored answers; "
        "losses are bootstrapped over validation windows; memory is measured bytes.", "",
    ]
    for r in rows:
        lines += _section(r, out)
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
    write_text_atomic(out / "validation.json", json.dumps(rows, default=str, indent=1))
    return path


def _cost(r: dict[str, Any]) -> str:
    first = r.get("first_run") or {}
    if not first:
        return f"{r['name']} not recorded"
    return (f"{r['name']} {first['seconds']:.0f} / {first['cpu_seconds']:.0f} / "
            f"{first.get('load', math.nan):.0f}")


def _section(r: dict[str, Any], out: Path) -> list[str]:
    lines = [f"## {r['name']}: {r['verdict']}", "",
             f"Claim: {r['claim']}", "", f"Source: {r['source']}", "",
             f"Here: {r['scaling']}", "", f"Rule: {r['rule']}", "",
             f"Runs and records: `{r['sweep']}`.", ""]
    if r["why"] and r["verdict"] == NOT_RUN:
        lines += [f"Not run here: {r['why']}", ""]
    if r["checks"]:
        lines += [f"- [{'x' if c['passed'] else ' '}] {c['what']}: {c['evidence']}"
                  for c in r["checks"]] + [""]
    lines += list(r["details"]) + ([""] if r["details"] else [])
    outcome = Outcome(r["verdict"], r["ours"], series={k: [tuple(p) for p in v]
                                                       for k, v in r["series"].items()},
                      axes=tuple(r["axes"]))
    fig = plot_outcome(outcome, out / f"{r['name']}.png", r["name"])
    if fig is not None:
        lines += [f"![{r['name']}]({fig.name})", ""]
    return lines
