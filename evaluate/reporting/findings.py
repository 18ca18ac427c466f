"""The report's answer first: what makes the comparison unfair, what it shows, and how the
learning rates were chosen.

Why a separate section: a table of numbers invites the reader to rank backbones by the last
digit. Here every claimed difference has passed a 95% test first: quality differences are paired
bootstrap intervals over the same validation windows (and the seeds, evaluate/stats.py) against a
reference backbone; synthetic-task accuracies carry Wilson intervals and are compared example by
example; speed ratios are claimed only when the whole range of the timed repeats lies on one
side of 1. Everything else is said to be within noise, never ranked.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from archbench.evaluate import stats
from archbench.evaluate.reporting import plots
from archbench.evaluate.reporting.data import Report, md_table
from archbench.evaluate.reporting.systems import kernel_flags
from archbench.tuning import TuningError, select_lr

LEVEL = 0.95


# ---- what the comparison planned -------------------------------------------------------------

def plan(rep: Report) -> dict[str, Any]:
    """The `compare` record (reference, seeds, tuning grid); {} for a plain `archbench report`."""
    recs = rep.col.of_kind("compare")
    return recs[-1] if recs else {}


def reference_label(rep: Report, candidates: list[str]) -> str | None:
    """The backbone every other is compared with: the comparison's, else transformer, else the
    first in the canonical order."""
    wanted = plan(rep).get("reference")
    for name in (wanted, "transformer"):
        if name and name in candidates:
            return name
    ordered = rep.labels.ordered(candidates)
    return ordered[0] if ordered else None


# ---- quality: paired over windows and seeds --------------------------------------------------

@dataclass
class Claim:
    """One backbone against the reference on one measure."""

    measure: str       # e.g. "validation bits per byte"
    label: str
    reference: str
    value: stats.Interval            # the backbone's own value
    reference_value: stats.Interval
    diff: stats.Comparison
    unit: str = ""

    @property
    def verdict(self) -> str:
        return self.diff.verdict


def _bpb_matrix(recs: list[dict[str, Any]]) -> tuple[np.ndarray, tuple[Any, ...]] | None:
    """(seeds, windows) per-window bits per byte of one backbone's bpb records, and the key that
    must match for pairing (context, corpus, tokenizer, window count)."""
    rows, key = [], None
    for r in sorted(recs, key=lambda r: (r.get("train") or {}).get("seed") or 0):
        w = r.get("windows") or {}
        nats, n_bytes = w.get("nats"), w.get("bytes")
        if not nats or not n_bytes or len(nats) != len(n_bytes):
            return None
        this = ((r.get("params") or {}).get("context"), (r.get("params") or {}).get("corpus"),
                r.get("tokenizer"), len(nats))
        if key is not None and this != key:
            return None
        key = this
        # each window's share of the mean: the mean over windows is the record's bits per byte
        rows.append(np.asarray(nats) / math.log(2) / (sum(n_bytes) / len(n_bytes)))
    return (np.stack(rows), key) if rows else None


def lm_claims(rep: Report) -> tuple[list[Claim], list[str]]:
    """Each backbone's validation bits per byte against the reference's, paired."""
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rep.col.evals("bpb", "bpb"):
        if not (r.get("train") or {}).get("task"):
            by_label[rep.labels.of(r)].append(r)
    notes: list[str] = []
    mats = {}
    for label, recs in by_label.items():
        got = _bpb_matrix(recs)
        if got is None:
            notes.append(f"{label}: its bits-per-byte records have no per-window sums or differ "
                         "in setting; not compared")
        else:
            mats[label] = got
    ref = reference_label(rep, list(mats))
    if ref is None:
        return [], notes
    claims = []
    for label in rep.labels.ordered(mats):
        if label == ref:
            continue
        (mat, key), (ref_mat, ref_key) = mats[label], mats[ref]
        if key != ref_key:
            notes.append(f"{label}: scored on other windows than {ref} (context, corpus, "
                         "tokenizer or window count differ); not compared")
            continue
        diff = stats.paired_bootstrap(mat, ref_mat, LEVEL, lower_is_better=True)
        claims.append(Claim("validation bits per byte", label, ref, _mean_interval(mat),
                            _mean_interval(ref_mat), diff))
    return claims, notes


def _mean_interval(mat: np.ndarray) -> stats.Interval:
    """A backbone's own mean with a bootstrap interval over windows and seeds (for the tables)."""
    rng = np.random.default_rng(0)
    n_seeds, n_win = mat.shape
    reps = []
    for _ in range(1000):
        s = rng.integers(0, n_seeds, size=n_seeds)
        w = rng.integers(0, n_win, size=n_win)
        reps.append(mat[s][:, w].mean())
    low, high = np.quantile(reps, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return stats.Interval(float(mat.mean()), float(low), float(high), LEVEL)


# ---- synthetic tasks: best lr per cell, Wilson, paired per example ---------------------------

def mqar_cells(rep: Report, task: str = "mqar"
               ) -> dict[tuple[Any, ...], dict[str, list[dict[str, Any]]]]:
    """cell (seq_len, num_kv_pairs tested, d_model) -> backbone -> accuracy records of its best
    learning rate (highest mean accuracy over seeds, as Zoology picks per cell)."""
    grouped: dict[tuple[Any, ...], dict[str, dict[Any, list[dict[str, Any]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for r in rep.col.evals(task, "accuracy"):
        p, t = r.get("params") or {}, r.get("train") or {}
        cell = (p.get("seq_len"), p.get("num_kv_pairs"), t.get("d_model"))
        grouped[cell][rep.labels.of(r)][t.get("lr")].append(r)
    out: dict[tuple[Any, ...], dict[str, list[dict[str, Any]]]] = {}
    for cell, per_label in grouped.items():
        out[cell] = {}
        for label, per_lr in per_label.items():
            best = max(per_lr.values(), key=lambda rs: float(np.mean([r["value"] for r in rs])))
            out[cell][label] = best
    return out


def task_lr_text(rep: Report, task: str = "mqar") -> str:
    """How the synthetic-task runs' learning rates were set, as the records show it: chosen per
    cell only when some backbone was trained at more than one rate."""
    lrs: dict[str, set[Any]] = defaultdict(set)
    for r in rep.col.evals(task, "accuracy"):
        lrs[rep.labels.of(r)].add((r.get("train") or {}).get("lr"))
    if any(len(v) > 1 for v in lrs.values()):
        return "the best learning rate per (backbone, cell) among those trained"
    rates = sorted({x for v in lrs.values() for x in v if x is not None})
    if len(rates) == 1:
        return f"one learning rate ({rates[0]:g}) for every backbone and cell, not tuned per cell"
    return ("one learning rate per backbone (" + (", ".join(
        f"{lb} {next(iter(v)):g}" for lb, v in lrs.items() if None not in v) or "as configured")
        + "), not tuned per cell")


def _correct_matrix(recs: list[dict[str, Any]], pairs: int) -> np.ndarray | None:
    rows = [np.asarray(r["correct"], dtype=float) / pairs for r in
            sorted(recs, key=lambda r: (r.get("train") or {}).get("seed") or 0) if r.get("correct")]
    if not rows or len({len(x) for x in rows}) != 1:
        return None
    return np.stack(rows)


def wilson_of(recs: list[dict[str, Any]]) -> stats.Interval | None:
    """Accuracy pooled over seeds (all scored answers) with its Wilson interval."""
    n = sum(int(r.get("n") or 0) for r in recs)
    if n == 0:
        return None
    hits = sum(round(float(r["value"]) * int(r.get("n") or 0)) for r in recs)
    return stats.wilson(int(hits), n, LEVEL)


def task_claims(rep: Report, task: str = "mqar") -> tuple[list[Claim], list[str]]:
    claims: list[Claim] = []
    notes: list[str] = []
    for cell, per_label in sorted(mqar_cells(rep, task).items(), key=lambda kv: str(kv[0])):
        seq_len, pairs, width = cell
        ref = reference_label(rep, list(per_label))
        if ref is None or not pairs:
            continue
        ref_mat = _correct_matrix(per_label[ref], int(pairs))
        for label in rep.labels.ordered(per_label):
            if label == ref:
                continue
            mat = _correct_matrix(per_label[label], int(pairs))
            own, ref_own = wilson_of(per_label[label]), wilson_of(per_label[ref])
            if mat is None or ref_mat is None or mat.shape[1] != ref_mat.shape[1] \
                    or own is None or ref_own is None:
                notes.append(f"{task} at {pairs} pairs: {label} has no per-example results "
                             f"paired with {ref}; not compared")
                continue
            diff = stats.paired_bootstrap(mat, ref_mat, LEVEL, lower_is_better=False)
            measure = f"{task.upper()} accuracy at {pairs} pairs (length {seq_len})"
            claims.append(Claim(measure, label, ref, own, ref_own, diff))
    return claims, notes


# ---- speed: ratio with the spread of the repeats ---------------------------------------------

def speed_claims(rep: Report, mode: str) -> list[tuple[str, str, float, float, float, Any]]:
    """(label, reference, ratio of median tokens/s, low, high, context) at the longest context
    both measured at batch 1; low/high from the extremes of the timed repeats (min/max time)."""
    recs = [r for r in rep.col.bench(mode) if r.get("batch") == 1 and r.get("median_s")]
    by: dict[str, dict[Any, dict[str, Any]]] = defaultdict(dict)
    for r in recs:
        by[rep.labels.of(r)][r.get("context")] = r
    ref = reference_label(rep, list(by))
    out = []
    if ref is None:
        return out
    for label in rep.labels.ordered(by):
        common = set(by[label]) & set(by[ref]) if label != ref else set()
        if not common:
            continue
        ctx = max(common)
        a, b = by[label][ctx], by[ref][ctx]
        sa, sb = a.get("spread") or {}, b.get("spread") or {}
        ratio = float(b["median_s"]) / float(a["median_s"])  # tokens/s ratio: time ratio inverted
        low = float(sb.get("min", b["median_s"])) / float(sa.get("max", a["median_s"]))
        high = float(sb.get("max", b["median_s"])) / float(sa.get("min", a["median_s"]))
        out.append((label, ref, ratio, low, high, ctx))
    return out


def between_record_drift(rep: Report) -> float | None:
    """How far apart separate measurements of the same work land on the machine that made these
    records, from the records themselves: a decode record with `growth` timed its context and
    the reference context in alternation in one process; the separately measured record at the
    reference context gives the same ratio from two processes. The largest disagreement (a
    factor >= 1) bounds the drift between separate records; None without such a pair."""
    recs = rep.col.bench("decode")
    by = {(rep.labels.of(r), r.get("batch"), r.get("context")): r for r in recs}
    worst: float | None = None
    for r in recs:
        growth = r.get("growth")
        if not isinstance(growth, dict) or not r.get("tokens_per_s") or not growth.get("ratio"):
            continue
        ref = by.get((rep.labels.of(r), r.get("batch"), growth.get("reference_context")))
        if ref is None or not ref.get("tokens_per_s"):
            continue
        separate = float(r["tokens_per_s"]) / float(ref["tokens_per_s"])
        factor = separate / float(growth["ratio"])
        worst = max(worst or 1.0, factor, 1.0 / factor)
    return worst


# ---- the section -----------------------------------------------------------------------------

def _fmt(iv: stats.Interval, digits: int = 3) -> str:
    return f"{iv.estimate:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def _diff_text(c: Claim, digits: int = 3) -> str:
    iv = c.diff.interval
    return f"{iv.estimate:+.{digits}f} [{iv.low:+.{digits}f}, {iv.high:+.{digits}f}]"


def _claim_sentences(claims: list[Claim], what: str, lower_better: bool) -> list[str]:
    if not claims:
        return []
    ref = claims[0].reference
    better = [c for c in claims if c.verdict == stats.BETTER]
    worse = [c for c in claims if c.verdict == stats.WORSE]
    noise = [c for c in claims if c.verdict == stats.WITHIN_NOISE]
    direction = "lower" if lower_better else "higher"
    out = []
    for group, word in ((better, "better"), (worse, "worse")):
        if group:
            parts = [f"**{c.label}** {_fmt(c.value)} ({_diff_text(c)})" for c in group]
            out.append(f"{what}: {', '.join(parts)} {'is' if len(group) == 1 else 'are'} "
                       f"**{word}** than {ref} {_fmt(claims[0].reference_value)} "
                       f"({direction} is better; difference to {ref} with its 95% interval).")
    if noise:
        out.append(f"{what}: {', '.join(c.label for c in noise)} cannot be told apart from "
                   f"{ref} at 95% (intervals on the difference: "
                   + "; ".join(f"{c.label} {_diff_text(c)}" for c in noise) + ").")
    return out


def section_findings(rep: Report) -> bool:
    """"What this comparison shows": generated from the intervals, nothing else."""
    lm, lm_notes = lm_claims(rep)
    task, task_notes = task_claims(rep)
    speed = [(mode, s) for mode in ("decode", "prefill", "train") for s in speed_claims(rep, mode)]
    drift = between_record_drift(rep) or 1.0
    if not (lm or task or speed or lm_notes or task_notes):
        return False
    rep.lines += ["## What this comparison shows", ""]
    seeds = plan(rep).get("seeds")
    rep.lines += [
        "Only differences whose 95% interval excludes zero are called better or worse; the "
        "rest are within noise. Quality: paired bootstrap over the same validation windows"
        + (f" and over the seeds ({len(seeds)} per backbone)" if seeds else " and seeds")
        + ", each backbone against the reference. Synthetic tasks: " + task_lr_text(rep)
        + ", accuracy pooled over seeds with a Wilson interval, the difference "
        "paired per example. Speed: a ratio is claimed only when it holds from the slowest to "
        "the fastest timed repeat" + (
            f" and exceeds the drift between separate measurements seen in these records "
            f"(x{drift:.2f}: a decode step timed in its own process against its timing in "
            "alternation with another context in one process; the records' `growth`). Ratios "
            "timed in alternation in one process (peers, growth) are not subject to it."
            if drift > 1 else "; separate measurements can also drift apart with the "
            "machine's load, which these records do not measure (`bench.growth_reference` "
            "does)."), ""]
    sentences = _claim_sentences(lm, "Validation bits per byte", lower_better=True)
    by_measure: dict[str, list[Claim]] = defaultdict(list)
    for c in task:
        by_measure[c.measure].append(c)
    for measure, cs in by_measure.items():
        sentences += _claim_sentences(cs, measure, lower_better=False)
    for mode, (label, ref, ratio, low, high, ctx) in speed:
        word = speed_verdict(low, high, drift)
        if word in ("faster", "slower"):
            sentences.append(f"{mode.capitalize()} at {plots.context_tick(float(ctx))} tokens "
                             f"(batch 1): **{label}** is {word} than {ref}, {ratio:.2f}x its "
                             f"tokens/s (range over repeats {low:.2f}-{high:.2f}x).")
    rep.lines += [f"- {s}" for s in sentences] + [""]
    for note in lm_notes + task_notes:
        rep.note(note)
    _interval_tables(rep, lm, task)
    _speed_table(rep, speed, drift)
    return True


def speed_verdict(low: float, high: float, drift: float = 1.0) -> str:
    """Faster / slower when the whole range of repeats clears `drift` (a factor >= 1 that two
    separate measurements of the same work can differ by), else why not."""
    if low > drift:
        return "faster"
    if high < 1.0 / drift:
        return "slower"
    if low > 1 or high < 1:
        return f"within the drift between measurements (x{drift:.2f})"
    return "within the spread of repeats"


def _speed_table(rep: Report, speed: list[tuple[str, tuple[Any, ...]]],
                 drift: float = 1.0) -> None:
    """Every speed ratio to the reference, claimed or not, with the range of its repeats."""
    rows = [[f"**{label}**", mode, plots.context_tick(float(ctx)), ref, f"{ratio:.2f}x",
             f"{low:.2f}-{high:.2f}x", speed_verdict(low, high, drift)]
            for mode, (label, ref, ratio, low, high, ctx) in speed]
    if rows:
        rep.lines += md_table(["backbone", "mode", "context", "reference", "tokens/s ratio",
                               "range over repeats", "verdict"], rows)
        rep.lines += ["Ratio of median tokens/s (batch 1, the longest context both measured); "
                      "range: from the reference's fastest over this backbone's slowest repeat "
                      "to its slowest over this one's fastest.", ""]


def _interval_tables(rep: Report, lm: list[Claim], task: list[Claim]) -> None:
    rows = [[f"**{c.label}**", c.measure, _fmt(c.value), f"{c.reference} {_fmt(c.reference_value)}",
             _diff_text(c), c.verdict, f"{c.diff.n_windows} × {c.diff.n_seeds[0]}"]
            for c in [*lm, *task]]
    if rows:
        rep.lines += md_table(["backbone", "measure", "value [95%]", "reference [95%]",
                               "difference [95%]", "verdict", "windows or examples × seeds"],
                              rows)


# ---- what makes the comparison unfair --------------------------------------------------------

def unfair_settings(rep: Report) -> list[str]:
    """Settings that differ across the backbones of one study, or that a reader must weigh."""
    out: list[str] = []
    lm = [r for r in rep.col.runs if r.task is None and r.finished]
    tokenizers = {str(r.summary.get("tokenizer")) for r in lm}
    if len(tokenizers) > 1:
        out.append(f"different tokenizers ({', '.join(sorted(tokenizers))}): bits per byte are "
                   "comparable, losses per token are not")
    dtypes = {str(r.summary.get("dtype")) for r in rep.col.runs if r.finished}
    if len(dtypes) > 1:
        out.append(f"different precisions across runs: {', '.join(sorted(dtypes))}")
    out += kernel_flags(rep)
    budgets = {r.label: r.summary.get("tokens_budget") for r in lm}
    if len(set(budgets.values())) > 1:
        out.append("different training budgets: " + ", ".join(
            f"{k} {v}" for k, v in sorted(budgets.items())))
    out += _short_budget(lm)
    fits = [(r.label, (r.summary.get("size_fit") or {}).get("error")) for r in lm]
    off = [f"{lb} {e:+.0%}" for lb, e in fits if e is not None and abs(e) > 0.05]
    if off:
        out.append("sizes not matched within 5%: " + ", ".join(sorted(set(off))))
    shapes = [f"{r.label}: {(r.summary.get('size_fit') or {}).get('shape_note')}" for r in lm
              if (r.summary.get("size_fit") or {}).get("shape_note")]
    out += sorted(set(shapes))
    out += _lr_fairness(rep, lm)
    out += stop_rules(rep)
    load, cpus = plan(rep).get("load_average"), plan(rep).get("cpu_count")
    if load is not None and cpus and float(load) > float(cpus):
        out.append(f"the machine was shared: load average {float(load):.1f} on {cpus} cores when "
                   "the comparison started, so speeds and wall times are below an idle "
                   "machine's and speed ratios less certain than their ranges say")
    seeds = {r.label: {r.seed for r in lm if r.label == lb} for lb in {r.label for r in lm}
             for r in lm}
    if lm and all(len(s) < 2 for s in seeds.values()):
        out.append("one seed per backbone: the intervals hold the noise of the validation "
                   "windows only, not of training")
    return out


def _tokens_text(value: Any) -> str:
    return f"{float(value) / 1e6:.2g}M" if float(value) >= 1e5 else f"{int(value):,}"


def stop_rules(rep: Report) -> list[str]:
    """Runs trained under train.stop_when: the rule, which runs met it (at how many tokens) and
    which trained their whole budget, so a reader knows the budgets differ, and why."""
    rules: dict[str, list[Any]] = defaultdict(list)
    for run in rep.col.runs:
        stop = ((run.summary.get("config") or {}).get("train") or {}).get("stop_when") or {}
        if run.finished and stop.get("metric"):
            bound = "at_least" if stop.get("at_least") is not None else "at_most"
            sign = ">=" if bound == "at_least" else "<="
            study = run.task or "language modelling"
            rules[f"{study}: stop at the first evaluation with {stop['metric']} {sign} "
                  f"{stop[bound]:g}"].append(run)
    out = []
    for rule, runs in rules.items():
        stopped = sorted((r for r in runs if r.summary.get("stopped_early")),
                         key=lambda r: (rep.labels.rank(r.label), str(r.seed)))
        whole = sorted({r.label for r in runs if not r.summary.get("stopped_early")},
                       key=rep.labels.rank)
        parts = [f"{r.label} seed {r.seed} at {_tokens_text(r.summary['stopped_early']['tokens'])}"
                 f" of {_tokens_text(r.summary['stopped_early']['budget_tokens'])} tokens "
                 f"(at {r.summary['stopped_early']['value']:.3f})" for r in stopped]
        out.append(f"training stopped once solved ({rule} on held-out data; train.stop_when): "
                   + (f"stopped: {', '.join(parts)}" if parts else "no run met it")
                   + (f"; the whole budget: {', '.join(whole)}" if whole else "")
                   + ". A run that never met the rule trained its whole budget, so which "
                   "backbones solve the task within that budget is as the full budget shows; "
                   "the tested accuracies of a stopped run are those at its stop")
    return out


def _short_budget(lm_runs: list[Any]) -> list[str]:
    """Far below 20 tokens per parameter (compute-optimal, Hoffmann et al. 2022), quality
    measures how fast each family learns early on, not what it converges to."""
    ratios = []
    for r in lm_runs:
        tokens = r.summary.get("tokens_seen") or r.summary.get("tokens_budget")
        params = (r.summary.get("param_counts") or {}).get("active")
        if tokens and params:
            ratios.append(float(tokens) / float(params))
    if ratios and max(ratios) < 2:
        return [f"short training: at most {max(ratios):.2g} tokens per parameter (compute-optimal "
                "is about 20): the quality numbers compare early training, not trained models"]
    return []


def _lr_fairness(rep: Report, lm_runs: list[Any]) -> list[str]:
    tuned = rep.col.of_kind("lr_tune") or sweep_tuning(rep)
    out = []
    if not tuned:
        lrs = {((r.summary.get("config") or {}).get("train") or {}).get("lr") for r in lm_runs}
        if lm_runs:
            out.append(f"learning rate not tuned per backbone (language-model runs at "
                       f"{', '.join(f'{x:g}' for x in sorted(v for v in lrs if v))}): a gap may "
                       "reflect each family's preferred rate rather than the architecture")
        return out
    for r in tuned:
        if r.get("edge"):
            out.append(f"{r['arch']} ({r['study']}): best learning rate {r['chosen_lr']:g} is at "
                       f"the {r['edge']} edge of its grid {r['lrs']}"
                       + (" even after extending it" if r.get("extended") else "")
                       + "; it may be under-tuned")
    return out


def section_fairness(rep: Report) -> bool:
    notes = unfair_settings(rep)
    if not notes:
        return False
    rep.lines += ["## Read this first: what differs between the backbones", ""]
    rep.lines += [f"- {n}" for n in notes] + [""]
    return True


# ---- learning rates --------------------------------------------------------------------------

def sweep_tuning(rep: Report) -> list[dict[str, Any]]:
    """lr_tune records derived from any sweep over train.lr (`archbench train ... train.lr=
    1e-3,3e-3,1e-2 -m`, then `archbench report`): per backbone and training budget with at least
    two rates, the best final validation loss (mean over seeds) and its edge, as the tuning
    stage of `archbench compare` writes them."""
    groups: dict[tuple[str, Any, Any], dict[float, list[float]]] = defaultdict(
        lambda: defaultdict(list))
    for run in rep.col.runs:
        train = (run.summary.get("config") or {}).get("train") or {}
        loss = (run.summary.get("final") or {}).get("loss")
        if not run.finished or train.get("lr") is None:
            continue
        # the backbone, not its label: a label may carry the swept rate itself
        key = (run.arch, run.task or "lm", run.summary.get("tokens_budget"))
        groups[key][float(train["lr"])].append(float("inf") if loss is None else float(loss))
    out = []
    for (label, study, tokens), by_lr in groups.items():
        if len(by_lr) < 2:
            continue
        try:
            c = select_lr([(lr, float(np.mean(v))) for lr, v in by_lr.items()])
        except TuningError:
            continue
        out.append({"kind": "lr_tune", "study": study, "arch": label, "metric": "val_loss",
                    "tokens": float(tokens or 0), "grid": list(c.grid), "lrs": list(c.grid),
                    "losses": [None if math.isinf(v) else v for v in c.losses],
                    "chosen_lr": c.lr, "chosen_loss": c.loss, "edge": c.edge,
                    "extended": False})
    return out


def section_tuning(rep: Report) -> bool:
    """Loss against learning rate per backbone, and the rate each main run used (or would:
    for a plain sweep over train.lr, the best of the sweep)."""
    recs = rep.col.of_kind("lr_tune") or sweep_tuning(rep)
    if not recs:
        return False
    rep.lines += ["## Learning rates", ""]
    rows = []
    for r in sorted(recs, key=lambda r: (r["study"], rep.labels.rank(r["arch"]))):
        points = ", ".join(f"{lr:g}: {'diverged' if v is None else f'{v:.3f}'}"
                           for lr, v in zip(r["lrs"], r["losses"], strict=True))
        flag = f"at the {r['edge']} edge" if r.get("edge") else "inside the grid"
        rows.append([f"**{r['arch']}**", r["study"], f"{r['tokens']:g}", points,
                     f"{r['chosen_lr']:g}", flag + (" (extended once)" if r.get("extended")
                                                    else "")])
    rep.lines += md_table(["backbone", "study", "tuning tokens", "lr: final val loss",
                           "chosen lr", "best"], rows)
    rep.lines += ["Each backbone trained the tuning budget at every rate of the grid from the "
                  "same start; the rate of lowest final validation loss trained its main runs.",
                  ""]
    for study in sorted({r["study"] for r in recs}):
        fig, axes = plots.new_figure()
        ax = axes[0]
        for r in (x for x in recs if x["study"] == study):
            label = rep.labels(r["arch"])
            xs = [lr for lr, v in zip(r["lrs"], r["losses"], strict=True) if v is not None]
            ys = [v for v in r["losses"] if v is not None]
            plots.points_line(ax, rep.styles, label, xs, ys)
            ax.plot([r["chosen_lr"]], [r["chosen_loss"]], marker="o", markersize=10,
                    markerfacecolor="none", color=rep.styles.colour(label))
        ax.set_xscale("log")
        plots.label_axes(ax, "learning rate", "final validation loss (nats/token)")
        plots.legend(ax)
        rep.figure(fig, f"lr_tuning_{study}.png",
                   f"Validation loss against learning rate, study {study} (circled: chosen)")
    return True
