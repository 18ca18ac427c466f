"""`archbench report PATH... [-o DIR]`: one Markdown report (tables + PNG plots) and one CSV of
every record, from any mix of run directories, sweep folders and record files.

The builder only reads what the stages wrote: `summary.json` + `metrics.jsonl` of training runs,
`records.jsonl` of runs (train and eval records, evaluate/records.py) and the JSONL files of the
benchmarks (evaluate/bench/runner.py). A section is written only where the records hold its data;
otherwise the report says so in one line, so a partial sweep still gives a useful report. A file
that cannot be read is named in the report and skipped; the others are still reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from archbench.evaluate import plots
from archbench.io import read_jsonl, write_text_atomic

DEFAULT_OUT = Path("reports/latest")
RUN_FILES = ("summary.json", "metrics.jsonl")
SYNTHETIC_PLOTTED = ("mqar", "passkey", "induction")
TEXT_EVALS = ("bpb", "extrapolation")


# ---- loading ---------------------------------------------------------------------------------

def arch_name(value: Any) -> str | None:
    """The backbone name of an `arch` field: a name, or a resolved arch config holding one."""
    if isinstance(value, dict):
        return value.get("name")
    return None if value is None else str(value)


@dataclass
class Run:
    """A training run directory: its summary and its logged curve."""

    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""

    @property
    def arch(self) -> str:
        return arch_name(self.summary.get("arch")) or "?"

    @property
    def size(self) -> str | None:
        return self.summary.get("size")

    @property
    def seed(self) -> Any:
        return self.summary.get("seed")

    @property
    def key(self) -> tuple[Any, ...]:
        """What a train record of the same run carries, to avoid counting a run twice."""
        prov = self.summary.get("provenance") or {}
        return (self.summary.get("run"), self.arch, prov.get("time"))


@dataclass
class Collection:
    runs: list[Run] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    files: int = 0
    _seen_files: set[Path] = field(default_factory=set)
    _seen_runs: set[Path] = field(default_factory=set)
    _seen_records: set[str] = field(default_factory=set)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]

    def evals(self, name: str | None = None, metric: str | None = None,
              ok_only: bool = True) -> list[dict[str, Any]]:
        return [r for r in self.of_kind("eval")
                if (name is None or r.get("eval") == name)
                and (metric is None or r.get("metric") == metric)
                and (not ok_only or (r.get("status", "ok") == "ok" and r.get("value") is not None))]


def _discover(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    found = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).parts
        if any(part.startswith(".") for part in rel) or "checkpoints" in rel[:-1]:
            continue  # hydra's .hydra/, atomic-write temporaries, checkpoint folders
        if f.is_file() and (f.name in RUN_FILES or f.suffix == ".jsonl"):
            found.append(f)
    return found


def load(paths: Iterable[str | Path]) -> Collection:
    """Every run and record under `paths`, each file read once even when paths overlap."""
    col = Collection()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            col.problems.append(f"`{path}`: no such file or folder (skipped)")
            continue
        explicit = path.is_file()
        for f in _discover(path):
            resolved = f.resolve()
            if resolved in col._seen_files:
                continue
            col._seen_files.add(resolved)
            col.files += 1
            if f.name in RUN_FILES:
                _load_run(col, f.parent)
            else:
                _load_records(col, f, explicit)
    _drop_train_records_of_runs(col)
    return col


def _load_run(col: Collection, run_dir: Path) -> None:
    resolved = run_dir.resolve()
    if resolved in col._seen_runs:
        return
    col._seen_runs.add(resolved)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        col.problems.append(f"`{run_dir}`: metrics.jsonl but no summary.json (still running or "
                            "killed before the end; skipped)")
        return
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as exc:
        col.problems.append(f"`{summary_path}`: unreadable ({exc}); run skipped")
        return
    metrics: list[dict[str, Any]] = []
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        try:
            metrics = [m for m in read_jsonl(metrics_path) if isinstance(m, dict)]
        except (ValueError, OSError) as exc:
            col.problems.append(f"`{metrics_path}`: {exc}; curves of this run skipped")
    col.runs.append(Run(run_dir, summary, metrics))


def _load_records(col: Collection, path: Path, explicit: bool) -> None:
    try:
        lines = read_jsonl(path)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        col.problems.append(f"`{path}`: corrupt record file ({exc}); skipped")
        return
    kept = 0
    for rec in lines:
        if not isinstance(rec, dict) or "kind" not in rec:
            continue
        key = json.dumps(rec, sort_keys=True, default=str)
        if key in col._seen_records:  # the same record reached through two paths or copies
            continue
        col._seen_records.add(key)
        col.records.append({**rec, "_source": str(path)})
        kept += 1
    if not kept and explicit:
        col.problems.append(f"`{path}`: no archbench records in it (skipped)")


def _drop_train_records_of_runs(col: Collection) -> None:
    """Train records whose run directory was read are kept for the CSV; the tables take the
    summary. Train records without a summary (a records file alone) become runs without curves.
    """
    keys = {run.key for run in col.runs}
    for rec in col.of_kind("train"):
        key = (rec.get("run"), arch_name(rec.get("arch")),
               (rec.get("provenance") or {}).get("time"))
        if key in keys or rec.get("status") in ("failed", "diverged") and any(
                r.summary.get("run") == rec.get("run") for r in col.runs):
            continue
        summary = {k: v for k, v in rec.items() if not k.startswith("_")}
        summary["final"] = {"loss": rec.get("val_loss"), "bpb": rec.get("val_bpb")}
        col.runs.append(Run(Path(rec["_source"]).parent, summary))
        keys.add(key)


# ---- labels, formatting ----------------------------------------------------------------------

def record_size(rec: dict[str, Any]) -> str | None:
    return rec.get("size") or (rec.get("train") or {}).get("size")


class Labels:
    """One label per backbone; the size joins it only where a backbone comes in several sizes."""

    def __init__(self, col: Collection) -> None:
        self.sizes: dict[str, set[str]] = defaultdict(set)
        for run in col.runs:
            self.sizes[run.arch].add(str(run.size))
        for rec in col.records:
            arch = arch_name(rec.get("arch"))
            if arch and rec.get("kind") != "stage":
                self.sizes[arch].add(str(record_size(rec)))
        for run in col.runs:
            run.label = self(run.arch, run.size)
        pairs = [(self(a, s), a) for a, sizes in self.sizes.items() for s in sizes]
        self.styles = plots.Styles(pairs)

    def __call__(self, arch: str | None, size: Any = None) -> str:
        arch = arch or "?"
        sizes = self.sizes.get(arch, set()) - {"None"}
        return f"{arch}/{size}" if len(sizes) > 1 and size is not None else arch

    def of(self, rec: dict[str, Any]) -> str:
        return self(arch_name(rec.get("arch")), record_size(rec))

    def ordered(self, labels: Iterable[str]) -> list[str]:
        """Known backbones in the canonical order, then the rest alphabetically."""
        order = list(plots.KNOWN_COLOURS)

        def key(label: str) -> tuple[int, str]:
            base = label.split("/")[0]
            return (order.index(base) if base in order else len(order), label)

        return sorted(set(labels), key=key)


def human(value: Any, unit: str = "") -> str:
    """3 significant digits with K/M/G/T, so a table reads at a glance."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    value = float(value)
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}{unit}"
    return f"{value:.3g}{unit}"


def human_bytes(value: Any) -> str:
    if value is None:
        return "–"
    value = float(value)
    for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value:.0f} B"


def mean_spread(values: list[float], digits: int = 4) -> str:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}g}"
    return f"{np.mean(vals):.{digits}g} ± {np.std(vals, ddof=1):.2g}"


def md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


def layer_pattern(plan: list[list[str]] | None) -> str:
    """'8 layers: mamba x7, attention x1 | MLP dense x4, moe x4' from a layer plan."""
    if not plan:
        return "–"
    mixers: dict[str, int] = {}
    mlps: dict[str, int] = {}
    for mixer, mlp in plan:
        mixers[mixer] = mixers.get(mixer, 0) + 1
        if mlp != "none":
            mlps[mlp] = mlps.get(mlp, 0) + 1
    text = f"{len(plan)} layers: " + ", ".join(f"{k} ×{v}" for k, v in mixers.items())
    if mlps:
        text += " · MLP " + ", ".join(f"{k} ×{v}" for k, v in mlps.items())
    return text


def params_key(params: dict[str, Any] | None, skip: Iterable[str] = ()) -> str:
    skip = set(skip)
    return ", ".join(f"{k}={v}" for k, v in sorted((params or {}).items()) if k not in skip)


# ---- the report ------------------------------------------------------------------------------

@dataclass
class Report:
    col: Collection
    out: Path
    labels: Labels
    lines: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def styles(self) -> plots.Styles:
        return self.labels.styles

    def figure(self, fig: Any, name: str, title: str | None = None) -> None:
        path = plots.finish(fig, self.out / name, title)
        self.figures.append(path)
        self.lines += [f"![{title or name}]({name})", ""]

    def note(self, text: str) -> None:
        """A part with no data: one line, no heading, never an error."""
        self.lines += [f"*{text}*", ""]


def runs_by_label(rep: Report, finished_only: bool = True) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = defaultdict(list)
    for run in rep.col.runs:
        if not finished_only or run.summary.get("status") == "finished":
            out[run.label].append(run)
    return {k: out[k] for k in rep.labels.ordered(out)}


def section_lineup(rep: Report) -> bool:
    groups = runs_by_label(rep)
    if not groups:
        return False
    rep.lines += ["## Line-up", ""]
    rows = []
    for label, runs in groups.items():
        s = runs[0].summary
        counts = s.get("param_counts") or {}
        arch = s.get("arch") if isinstance(s.get("arch"), dict) else {}
        fit = s.get("size_fit") or {}
        seq_len = ((s.get("config") or {}).get("train") or {}).get("seq_len")
        flops = (s.get("flops_per_token") or {}).get("train")
        tokens = sorted({r.summary.get("tokens_seen") for r in runs} - {None})
        seeds = sorted({str(r.seed) for r in runs})
        shape = (f"{arch.get('d_model')} × {arch.get('n_layers')}" if arch.get("d_model")
                 else f"{fit.get('d_model', '–')} × {fit.get('n_layers', '–')}")
        err = fit.get("error")
        rows.append([
            f"**{label}**", layer_pattern(s.get("layer_plan")), shape,
            human(counts.get("total")), human(counts.get("active")),
            human(counts.get("non_embedding")),
            f"{fit.get('metric', '')} {err * 100:+.1f}%" if err is not None else "–",
            f"{human(flops)} (T={seq_len})" if flops else "–",
            " / ".join(human(t) for t in tokens) or "–", ", ".join(seeds),
        ])
    rep.lines += md_table(["backbone", "layer pattern", "d_model × layers", "params total",
                           "active", "non-embedding", "size fit", "train FLOPs/token",
                           "tokens trained", "seeds"], rows)
    rep.lines += ["FLOPs per token are analytic (forward + backward, active parameters, at the "
                  "training context T); the size fit is the matched quantity's distance from the "
                  "preset's target.", ""]
    return True


def _curves(run: Run, y_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, flops, y) of one run's logged points that carry `y_key`."""
    fpt = (run.summary.get("flops_per_token") or {}).get("train")
    pts = [m for m in run.metrics if m.get(y_key) is not None and m.get("tokens") is not None]
    tokens = np.array([m["tokens"] for m in pts], dtype=float)
    flops = np.array([m.get("flops") or (fpt * m["tokens"] if fpt else np.nan) for m in pts],
                     dtype=float)
    return tokens, flops, np.array([m[y_key] for m in pts], dtype=float)


def _plot_group(ax: Any, rep: Report, label: str, runs: list[Run], y_key: str,
                by_flops: bool) -> list[float]:
    """Seeds of one backbone as a mean line and a min..max band, on their common x points."""
    series = [_curves(r, y_key) for r in runs]
    series = [s for s in series if len(s[0])]
    if not series:
        return []
    xi = 1 if by_flops else 0
    common = set(series[0][0].tolist())
    for s in series[1:]:
        common &= set(s[0].tolist())
    if len(series) > 1 and len(common) >= 2:
        tok = np.array(sorted(common))
        ys = [np.interp(tok, s[0], s[2]) for s in series]
        xs = np.interp(tok, series[0][0], series[0][xi]) if by_flops else tok
        plots.band_line(ax, rep.styles, label, xs, ys)
        return xs.tolist()
    out: list[float] = []
    for i, s in enumerate(series):  # no common grid: each run drawn alone
        style = rep.styles(label)
        ax.plot(s[xi], s[2], color=style["color"], linestyle=style["linestyle"],
                label=label if i == 0 else None, alpha=0.9 if i == 0 else 0.5)
        out += s[xi].tolist()
    return out


def section_quality(rep: Report) -> bool:
    groups = runs_by_label(rep)
    text_evals = rep.col.evals("bpb") + rep.col.evals("extrapolation")
    if not groups and not text_evals:
        return False
    rep.lines += ["## Quality", ""]
    if groups:
        rows = []
        eval_bpb = defaultdict(list)
        for rec in rep.col.evals("bpb", "bpb"):
            eval_bpb[rep.labels.of(rec)].append(rec["value"])
        for label, runs in groups.items():
            finals = [r.summary.get("final") or {} for r in runs]
            last_train = [next((m["loss"] for m in reversed(r.metrics) if "loss" in m), None)
                          for r in runs]
            rows.append([f"**{label}**", len(runs),
                         mean_spread([f.get("bpb") for f in finals]),
                         mean_spread([f.get("loss") for f in finals]),
                         mean_spread(last_train),
                         mean_spread(eval_bpb.get(label, [])),
                         mean_spread([r.summary.get("wall_time_s") for r in runs], 3)])
        rep.lines += md_table(["backbone", "runs", "val bits/byte", "val loss (nats/token)",
                               "last train loss", "eval bits/byte (archbench eval)",
                               "train wall time (s)"], rows)
        rep.lines += ["Validation at the end of training on the held-out split; mean ± standard "
                      "deviation over seeds where there are several. Lower is better.", ""]
        _quality_curves(rep, groups)
    else:
        rep.note("Training curves: no training runs (summary.json) in the input.")
    _loss_by_position(rep)
    _extrapolation(rep)
    return True


def _quality_curves(rep: Report, groups: dict[str, list[Run]]) -> None:
    panels = [("val_bpb", "validation bits per byte"), ("loss", "training loss (nats/token)")]
    if not any(_curves(r, "val_bpb")[0].size for runs in groups.values() for r in runs):
        rep.note("Curves: the runs logged no metrics.")
        return
    for by_flops, name, xlabel in ((False, "quality_vs_tokens.png", "training tokens"),
                                   (True, "quality_vs_flops.png", "training FLOPs (analytic)")):
        fig, axes = plots.new_figure(ncols=2)
        for ax, (key, ylabel) in zip(axes, panels, strict=True):
            xs: list[float] = []
            ys: list[float] = []
            for label, runs in groups.items():
                xs += _plot_group(ax, rep, label, runs, key, by_flops)
                ys += [v for r in runs for v in _curves(r, key)[2].tolist()]
            plots.label_axes(ax, xlabel, ylabel, xs=xs, ys=ys)
            plots.legend(ax)
        what = "FLOPs" if by_flops else "tokens"
        rep.figure(fig, name, f"Quality against training {what} (bands: min..max over seeds)")


def _loss_by_position(rep: Report) -> None:
    recs = rep.col.evals("bpb", "loss_bucket")
    if not recs:
        rep.note("Loss by context position: no `bpb` evaluation records with position buckets.")
        return
    fig, axes = plots.new_figure()
    ax = axes[0]
    grouped: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        p = r.get("params") or {}
        grouped[rep.labels.of(r)][(p.get("start", 0) + p.get("end", 0)) / 2].append(r["value"])
    for label in rep.labels.ordered(grouped):
        pts = sorted(grouped[label].items())
        plots.band_line(ax, rep.styles, label, [x for x, _ in pts],
                        _as_columns([v for _, v in pts]), markers=True)
    plots.label_axes(ax, "position in the context (tokens, bucket centre)",
                     "loss (nats/token)", "Loss by context position (validation split)")
    plots.legend(ax)
    rep.figure(fig, "loss_by_position.png")


def _as_columns(values: list[list[float]]) -> list[list[float]]:
    """Per-x lists of replicate values -> replicate rows (NaN-padded), for band_line."""
    n = max(len(v) for v in values)
    return [[v[i] if i < len(v) else np.nan for v in values] for i in range(n)]


def _extrapolation(rep: Report) -> None:
    metric = "bpb" if rep.col.evals("extrapolation", "bpb") else "loss"
    recs = rep.col.evals("extrapolation", metric)
    if not recs:
        rep.note("Length extrapolation: no `extrapolation` evaluation records.")
        return
    fig, axes = plots.new_figure()
    ax = axes[0]
    grouped: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    train_ctx = set()
    for r in recs:
        p = r.get("params") or {}
        grouped[rep.labels.of(r)][int(p["context"])].append(r["value"])
        if p.get("train_context"):
            train_ctx.add(int(p["train_context"]))
    for label in rep.labels.ordered(grouped):
        pts = sorted(grouped[label].items())
        plots.band_line(ax, rep.styles, label, [x for x, _ in pts],
                        _as_columns([v for _, v in pts]), markers=True)
    for t in sorted(train_ctx):
        ax.axvline(t, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    unit = "bits per byte" if metric == "bpb" else "loss (nats/token)"
    plots.label_axes(ax, "evaluation context (tokens; dotted: training context)", unit,
                     "Length extrapolation", logx=False)
    plots.legend(ax)
    rep.figure(fig, "extrapolation.png")
    unsupported = [r for r in rep.col.evals("extrapolation", metric, ok_only=False)
                   if r.get("status") != "ok"]
    for r in unsupported:
        rep.lines.append(f"- {rep.labels.of(r)} at context {(r.get('params') or {}).get('context')}"
                         f": {r.get('status')} ({r.get('reason')})")
    if unsupported:
        rep.lines.append("")


# ---- synthetic tasks ----------------------------------------------------------------------------

def _synthetic_metric(rep: Report, name: str) -> tuple[str, list[dict[str, Any]]]:
    """The task's primary metric (the records say which), else accuracy."""
    recs = rep.col.evals(name)
    primary = next((r["metric"] for r in recs if r.get("primary")), "accuracy")
    return primary, [r for r in recs if r["metric"] == primary]


def section_synthetic(rep: Report) -> bool:
    names = {r.get("eval") for r in rep.col.evals()} - set(TEXT_EVALS) - {"lm_eval"}
    if not names:
        return False
    rep.lines += ["## Synthetic tasks", ""]
    for name, fn in (("mqar", _mqar), ("passkey", _passkey), ("induction", _induction)):
        if name in names:
            fn(rep)
        else:
            rep.note(f"{name}: no records.")
    others = sorted(names - set(SYNTHETIC_PLOTTED))
    if others:
        _synthetic_table(rep, others)
    return True


def _best(recs: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]
          ) -> dict[Any, dict[str, Any]]:
    """Best value per key (Zoology's "best learning rate per cell")."""
    best: dict[Any, dict[str, Any]] = {}
    for r in recs:
        k = key(r)
        if k not in best or r["value"] > best[k]["value"]:
            best[k] = r
    return best


def _mqar(rep: Report) -> None:
    metric, recs = _synthetic_metric(rep, "mqar")
    if not recs:
        rep.note("MQAR: no successful records.")
        return

    def width(r: dict[str, Any]) -> Any:
        return (r.get("train") or {}).get("d_model")

    cells = sorted({((r["params"]).get("seq_len"), r["params"].get("num_kv_pairs"))
                    for r in recs}, key=lambda c: (c[0] or 0, c[1] or 0))
    best = _best(recs, lambda r: (rep.labels.of(r), r["params"].get("seq_len"),
                                  r["params"].get("num_kv_pairs"), width(r)))
    cells = cells[:6]
    fig, axes = plots.new_figure(ncols=len(cells), width=4.2)
    for ax, (seq_len, pairs) in zip(axes, cells, strict=True):
        by_label: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for (label, sl, kv, d), r in best.items():
            if (sl, kv) == (seq_len, pairs) and d is not None:
                by_label[label].append((d, r["value"]))
        for label in rep.labels.ordered(by_label):
            pts = sorted(by_label[label])
            plots.points_line(ax, rep.styles, label, [p[0] for p in pts], [p[1] for p in pts])
        ax.set_ylim(-0.02, 1.02)
        plots.label_axes(ax, "model width d_model", f"MQAR {metric}",
                         f"seq_len {seq_len}, {pairs} pairs",
                         xs=[w for v in by_label.values() for w, _ in v])
        plots.legend(ax)
    rep.figure(fig, "mqar_vs_width.png", "MQAR accuracy against model width (best per cell)")

    by_pairs = _best(recs, lambda r: (rep.labels.of(r), r["params"].get("num_kv_pairs")))
    fig, axes = plots.new_figure()
    series: dict[str, list[tuple[float, float, Any]]] = defaultdict(list)
    for (label, pairs), r in by_pairs.items():
        series[label].append((pairs, r["value"], r.get("stderr")))
    for label in rep.labels.ordered(series):
        pts = sorted(series[label])
        plots.points_line(axes[0], rep.styles, label, [p[0] for p in pts],
                          [p[1] for p in pts], [p[2] for p in pts])
    axes[0].set_ylim(-0.02, 1.02)
    plots.label_axes(axes[0], "number of key-value pairs", f"MQAR {metric}",
                     "MQAR against number of pairs (best over widths and runs)",
                     xs=[p for v in series.values() for p, _, _ in v])
    plots.legend(axes[0])
    rep.figure(fig, "mqar_vs_pairs.png")
    rows = [[f"**{label}**", d, sl, kv, f"{r['value']:.3f}", r.get("n", "–")]
            for (label, sl, kv, d), r in sorted(best.items(), key=lambda kv: str(kv[0]))]
    rep.lines += md_table(["backbone", "d_model", "seq_len", "pairs", metric, "n"], rows)


def _passkey(rep: Report) -> None:
    metric, recs = _synthetic_metric(rep, "passkey")
    if not recs:
        rep.note("Passkey: no successful records.")
        return
    cells: dict[str, dict[tuple[int, float], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        p = r["params"]
        cells[rep.labels.of(r)][(int(p["seq_len"]), float(p["depth"]))].append(r["value"])
    labels = rep.labels.ordered(cells)
    lengths = sorted({k[0] for c in cells.values() for k in c})
    depths = sorted({k[1] for c in cells.values() for k in c})
    fig, axes = plots.new_figure(ncols=len(labels), width=3.4, height=3.4,
                                 extra_width=max(1.2, 5.5 - 3.4 * len(labels)))
    image = None
    for ax, label in zip(axes, labels, strict=True):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (length, depth), vals in cells[label].items():
            grid[depths.index(depth), lengths.index(length)] = float(np.mean(vals))
        image = plots.heatmap(ax, grid, lengths, depths, "context length (tokens)",
                              "needle depth (0 = start)", label)
        ax.title.set_color(rep.styles.colour(label))
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.9, label=f"passkey {metric}")
    rep.figure(fig, "passkey_heatmap.png", f"Passkey retrieval ({metric})")


def _induction(rep: Report) -> None:
    metric, recs = _synthetic_metric(rep, "induction")
    if not recs:
        rep.note("Induction heads: no successful records.")
        return
    grouped: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    trained = set()
    for r in recs:
        grouped[rep.labels.of(r)][int(r["params"]["seq_len"])].append(r["value"])
        tp = (r.get("train") or {}).get("task_params") or {}
        if tp.get("seq_len"):
            trained.add(int(tp["seq_len"]))
    fig, axes = plots.new_figure()
    for label in rep.labels.ordered(grouped):
        pts = sorted(grouped[label].items())
        plots.band_line(axes[0], rep.styles, label, [x for x, _ in pts],
                        _as_columns([v for _, v in pts]), markers=True)
    for t in trained:
        axes[0].axvline(t, color="grey", linestyle=":", linewidth=1)
    axes[0].set_xscale("log", base=2)
    axes[0].set_ylim(-0.02, 1.02)
    plots.label_axes(axes[0], "test sequence length (tokens; dotted: training length)",
                     f"induction {metric}", "Induction heads: length extrapolation", logx=False)
    plots.legend(axes[0])
    rep.figure(fig, "induction_extrapolation.png")


def _synthetic_table(rep: Report, names: list[str]) -> None:
    rows = []
    for name in names:
        metric, recs = _synthetic_metric(rep, name)
        cells: dict[tuple[str, str], list[float]] = defaultdict(list)
        for r in recs:
            cells[(params_key(r.get("params"), ("task",)), rep.labels.of(r))].append(r["value"])
        for (setting, label), vals in sorted(cells.items()):
            rows.append([name, setting, f"**{label}**", metric, mean_spread(vals, 3)])
    rep.lines += ["### Other synthetic tasks", ""]
    rep.lines += md_table(["task", "setting", "backbone", "metric", "value"], rows)


# ---- lm-eval --------------------------------------------------------------------------------

def section_lm_eval(rep: Report) -> bool:
    recs = rep.col.evals("lm_eval", ok_only=False)
    if not recs:
        return False
    rep.lines += ["## lm-eval", ""]
    labels = rep.labels.ordered({rep.labels.of(r) for r in recs})
    cells: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for r in recs:
        p = r.get("params") or {}
        row = (str(p.get("task")), f"{r.get('metric')}" + (
            f" ({p['filter']})" if p.get("filter") not in (None, "none") else ""))
        if r.get("status", "ok") != "ok":
            text = r.get("status")
        else:
            text = f"{r['value']:.4g}" + (f" ± {r['stderr']:.2g}" if r.get("stderr") else "")
        cells[row][rep.labels.of(r)] = text
    rows = [[task, metric, *(cells[(task, metric)].get(lb, "–") for lb in labels)]
            for task, metric in sorted(cells)]
    rep.lines += md_table(["task", "metric", *labels], rows)
    rep.lines += ["± is the harness's standard error.", ""]
    return True


# ---- efficiency -----------------------------------------------------------------------------

def _bench(rep: Report, mode: str, ok_only: bool = True) -> list[dict[str, Any]]:
    return [r for r in rep.col.of_kind("bench") if r.get("mode") == mode
            and (not ok_only or r.get("status", "ok") == "ok")]


def _one_batch(recs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    """Curves against context are drawn at one batch size (the smallest measured)."""
    batches = sorted({r.get("batch") for r in recs if r.get("batch") is not None})
    if not batches:
        return recs, None
    return [r for r in recs if r.get("batch") == batches[0]], batches[0]


def _series(rep: Report, recs: list[dict[str, Any]], y: str, x: str = "context"
            ) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        if r.get(y) is not None and r.get(x) is not None:
            out[rep.labels.of(r)][float(r[x])].append(float(r[y]))
    return {lb: sorted((k, float(np.median(v))) for k, v in out[lb].items())
            for lb in rep.labels.ordered(out)}


def _draw_series(ax: Any, rep: Report, series: dict[str, list[tuple[float, float]]],
                 xlabel: str, ylabel: str, title: str, linestyle: str | None = None,
                 suffix: str = "") -> None:
    xs, ys = [], []
    for label, pts in series.items():
        style = rep.styles(label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=style["color"],
                linestyle=linestyle or style["linestyle"], marker=style["marker"], markersize=4,
                label=label + suffix)
        xs += [p[0] for p in pts]
        ys += [p[1] for p in pts]
    plots.label_axes(ax, xlabel, ylabel, title, xs=xs, ys=ys)
    plots.legend(ax)


def section_efficiency(rep: Report) -> bool:
    bench = rep.col.of_kind("bench")
    groups = runs_by_label(rep)
    if not bench and not groups:
        return False
    rep.lines += ["## Efficiency", ""]
    if groups:
        rows = [[f"**{label}**", mean_spread([r.summary.get("tokens_per_s") for r in runs], 3),
                 ", ".join(sorted({str((r.summary.get("provenance") or {}).get("device", {})
                                       .get("name")) for r in runs}))]
                for label, runs in groups.items()]
        rep.lines += ["Training runs (wall clock of the whole run, evaluations included):", ""]
        rep.lines += md_table(["backbone", "train tokens/s", "device"], rows)
    if not bench:
        rep.note("Benchmarks: no `archbench bench` records in the input.")
        return True
    _throughput(rep)
    _memory(rep)
    _max_context(rep)
    _peers(rep)
    return True


def _throughput(rep: Report) -> None:
    panels = [(m, f"{m} tokens/s") for m in ("train", "prefill", "decode") if _bench(rep, m)]
    if not panels:
        rep.note("Throughput: no train / prefill / decode benchmark records.")
        return
    fig, axes = plots.new_figure(ncols=len(panels), width=4.6)
    rows = []
    for ax, (mode, ylabel) in zip(axes, panels, strict=True):
        recs, batch = _one_batch(_bench(rep, mode))
        series = _series(rep, recs, "tokens_per_s")
        _draw_series(ax, rep, series, "context (tokens)", ylabel, f"{mode} (batch {batch})")
        ax.set_xscale("log", base=2)
        for label, pts in series.items():
            rows.append([f"**{label}**", mode, batch, *(f"{c:.0f}: {human(v)}" for c, v in
                                                       [pts[0], pts[-1]])])
    rep.figure(fig, "throughput.png", "Throughput against context (median of timed repeats)")
    rep.lines += md_table(["backbone", "mode", "batch", "shortest context: tokens/s",
                           "longest context: tokens/s"], rows)


def _memory(rep: Report) -> None:
    peak = [r for r in rep.col.of_kind("bench") if r.get("peak_bytes") is not None
            and r.get("status", "ok") == "ok" and r.get("mode") in ("memory", "prefill")]
    state = [r for r in rep.col.of_kind("bench") if r.get("status", "ok") == "ok" and (
        r.get("state_bytes_measured") is not None or r.get("state_bytes_analytic") is not None)]
    if not peak and not state:
        rep.note("Memory: no benchmark records with peak or state bytes.")
        return
    fig, axes = plots.new_figure(ncols=2)
    if peak:
        mode = "memory" if any(r.get("mode") == "memory" for r in peak) else "prefill"
        recs, batch = _one_batch([r for r in peak if r.get("mode") == mode])
        _draw_series(axes[0], rep, _series(rep, recs, "peak_bytes"), "context (tokens)",
                     "peak memory (bytes)", f"peak memory, {mode} (batch {batch})")
    else:
        axes[0].set_axis_off()
    if state:
        recs, batch = _one_batch(state)
        _draw_series(axes[1], rep, _series(rep, recs, "state_bytes_measured"),
                     "context (tokens)", "cache / state (bytes)",
                     f"decoding cache / state (batch {batch}; dashed: analytic)", suffix="")
        for label, pts in _series(rep, recs, "state_bytes_analytic").items():
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], color=rep.styles.colour(label),
                         linestyle="--", linewidth=1)
    else:
        axes[1].set_axis_off()
    for ax in axes:
        if ax.axison:
            ax.set_xscale("log")
            ax.set_yscale("log")
    rep.figure(fig, "memory.png", "Memory against context (log-log)")


def _max_context(rep: Report) -> None:
    recs = _bench(rep, "max_context", ok_only=False)
    if not recs:
        rep.note("Max context: not measured (bench.max_context=false).")
        return
    rows = []
    for r in sorted(recs, key=lambda r: (rep.labels.ordered([rep.labels.of(r)]), str(r))):
        what = r.get("what") or r.get("phase") or r.get("stage") or "prefill"
        rows.append([f"**{rep.labels.of(r)}**", what, r.get("batch", "–"),
                     human(r.get("context")) if r.get("context") else "–", r.get("status")])
    rep.lines += ["### Max context", ""]
    rep.lines += md_table(["backbone", "measured", "batch", "max context (tokens)", "status"], rows)


def _peers(rep: Report) -> None:
    recs = [r for r in rep.col.of_kind("bench") if isinstance(r.get("peer"), dict)
            and r.get("status", "ok") == "ok"]
    if not recs:
        return
    rows = []
    for r in recs:
        peer = r["peer"]
        ours = r.get("tokens_per_s")
        theirs = peer.get("tokens_per_s")
        ratio = peer.get("ratio") or (ours / theirs if ours and theirs else None)
        rows.append([f"**{rep.labels.of(r)}**", r.get("mode"), r.get("context"), r.get("batch"),
                     human(ours), peer.get("name", "peer"), human(theirs),
                     f"{ratio:.2f}×" if ratio else "–"])
    rep.lines += ["### Against peer implementations", ""]
    rep.lines += md_table(["backbone", "mode", "context", "batch", "ours tokens/s", "peer",
                           "peer tokens/s", "ours / peer"], rows)


# ---- provenance -----------------------------------------------------------------------------

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
    for run in sorted(rep.col.runs, key=lambda r: (r.label, str(r.path))):
        rows.append(_prov_row(run.label, f"train `{run.path}`",
                              run.summary.get("provenance") or {},
                              run.summary.get("kernel_paths")))
    seen = set()
    for r in rep.col.records:
        if r.get("kind") not in ("eval", "bench"):
            continue
        prov = r.get("provenance") or {}
        key = (r["kind"], rep.labels.of(r), prov.get("command"), r.get("_source"))
        if key in seen:
            continue
        seen.add(key)
        rows.append(_prov_row(rep.labels.of(r), f"{r['kind']} `{r.get('_source')}`", prov,
                              r.get("kernel_paths")))
    if rows:
        rep.lines += md_table(["backbone", "stage and source", "commit", "device", "versions",
                               "kernel paths"], rows)
    commands = sorted(({(r.get("provenance") or {}).get("command") for r in rep.col.records}
                       | {(run.summary.get("provenance") or {}).get("command")
                          for run in rep.col.runs}) - {None})
    if commands:
        rep.lines += ["Commands:", "", "```", *commands, "```", ""]
    _stages(rep)
    flags = _flags(rep)
    rep.lines += ["### Flagged", ""]
    rep.lines += [f"- {f}" for f in flags] if flags else ["Nothing flagged: every run finished, "
                                                          "every measurement is status ok."]
    rep.lines.append("")
    return True


def _stages(rep: Report) -> None:
    """Stage records of `archbench compare` (what ran, how long, what failed)."""
    recs = rep.col.of_kind("stage")
    if not recs:
        return
    rows = [[r.get("stage"), r.get("what", "–"), r.get("status"), f"{r.get('seconds', 0):.0f}",
             f"`{r.get('log')}`" if r.get("log") else "–"] for r in recs]
    rep.lines += ["Stages run by `archbench compare`:", ""]
    rep.lines += md_table(["stage", "what", "status", "seconds", "log"], rows)


def _flags(rep: Report) -> list[str]:
    flags = list(rep.col.problems)
    for run in rep.col.runs:
        status = run.summary.get("status")
        if status != "finished":
            flags.append(f"training `{run.path}` ({run.label}): {status}"
                         + (f" — {run.summary['error']}" if run.summary.get("error") else ""))
    for r in rep.col.records:
        status = r.get("status", "ok")
        if r.get("kind") in ("eval", "bench") and status != "ok":
            what = r.get("eval") or r.get("mode")
            where = params_key(r.get("params")) if r.get("params") else (
                f"context={r.get('context')}, batch={r.get('batch')}")
            flags.append(f"{r['kind']} {what}/{r.get('metric', '')} of {rep.labels.of(r)} "
                         f"[{where}]: **{status}** ({r.get('reason') or r.get('error') or ''})")
        if r.get("kind") == "stage" and status not in ("ok", "skipped"):
            flags.append(f"compare stage {r.get('stage')} {r.get('what', '')}: **{status}** "
                         f"(exit code {r.get('returncode')}; log `{r.get('log')}`)")
    flags += _kernel_flags(rep)
    return flags


REFERENCE_PATHS = ("torch", "sdpa:math")


def _kernel_flags(rep: Report) -> list[str]:
    """Fairness rule 5: the same class of kernels across backbones, or the report says so."""
    classes: dict[str, set[str]] = defaultdict(set)
    for run in rep.col.runs:
        for sub, path in (run.summary.get("kernel_paths") or {}).items():
            if sub.startswith("mlp"):
                continue
            ref = any(str(path).startswith(p) for p in REFERENCE_PATHS)
            classes["reference" if ref else "fast"].add(f"{run.label}:{sub}={path}")
    if len(classes) > 1:
        return ["kernel classes differ across backbones (fairness rule 5): reference paths "
                + ", ".join(sorted(classes["reference"])) + "; fast paths "
                + ", ".join(sorted(classes["fast"]))]
    return []


# ---- CSV, assembly, CLI ---------------------------------------------------------------------

def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = value
    return out


FIRST_COLUMNS = ("kind", "arch", "size", "run", "eval", "mode", "metric", "value", "status",
                 "context", "batch", "tokens_per_s", "peak_bytes", "_source")


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    rows = [flatten({k: v for k, v in r.items() if k != "_source"} | {"source": r["_source"]})
            for r in records]
    for row in rows:
        if "arch.name" in row:  # train records hold the resolved arch config, not its name
            row["arch"] = row["arch.name"]
    columns = sorted({c for row in rows for c in row})
    first = [c for c in (*FIRST_COLUMNS, "source") if c in columns]
    columns = first + [c for c in columns if c not in first]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


SECTIONS: list[tuple[str, Callable[[Report], bool]]] = [
    ("Line-up", section_lineup),
    ("Quality", section_quality),
    ("Synthetic tasks", section_synthetic),
    ("Efficiency", section_efficiency),
    ("lm-eval", section_lm_eval),
    ("Provenance", section_provenance),
]


def _header(col: Collection, paths: list[str], title: str) -> list[str]:
    devices = sorted({_device_text((run.summary.get("provenance") or {}).get("device") or {})
                      for run in col.runs}
                     | {_device_text((r.get("provenance") or {}).get("device") or {})
                        for r in col.records if r.get("provenance")})
    return [
        f"# {title}", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `archbench report "
        f"{' '.join(paths)}` on {platform.node()} (Python {platform.python_version()}).", "",
        f"Inputs: {len(col.runs)} training runs and {len(col.records)} records from "
        f"{col.files} files.", "",
        "Hardware of the measurements: " + ("; ".join(devices) if devices else "unknown") + ".",
        "",
    ]


def _device_text(dev: dict[str, Any]) -> str:
    if not dev:
        return "unknown"
    text = f"{dev.get('type', '?')} {dev.get('name', '')}".strip()
    if dev.get("type") == "cpu" and dev.get("cpu_threads"):
        text += f" ({dev['cpu_threads']} threads)"
    if dev.get("memory_bytes"):
        text += f", {human_bytes(dev['memory_bytes'])}"
    if dev.get("platform"):
        text += f", {dev['platform']}"
    return text


def build_report(paths: list[str | Path], out: str | Path = DEFAULT_OUT,
                 title: str = "archbench report", preamble: list[str] | None = None
                 ) -> tuple[Path, Collection]:
    """Read `paths`, write `out`/report.md, its PNG plots and `out`/records.csv."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # a plot whose data is gone must not linger from a last build
        old.unlink()
    col = load(paths)
    rep = Report(col, out, Labels(col))
    rep.lines = _header(col, [str(p) for p in paths], title) + list(preamble or [])
    for name, section in SECTIONS:
        if not section(rep):
            rep.note(f"{name}: no data in these records (section omitted).")
    write_text_atomic(out / "report.md", "\n".join(rep.lines).rstrip() + "\n")
    write_csv(col.records, out / "records.csv")
    return out / "report.md", col


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="archbench report",
        description="Build report.md (tables, PNG plots) and records.csv from run directories, "
                    "sweep folders and record files.")
    parser.add_argument("paths", nargs="+", help="run dirs, sweep folders, records .jsonl files")
    parser.add_argument("-o", "--out", default=str(DEFAULT_OUT),
                        help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--title", default="archbench report")
    args = parser.parse_args(argv)
    path, col = build_report(args.paths, args.out, args.title)
    for problem in col.problems:
        print(f"archbench report: {problem.replace('`', '')}", file=sys.stderr)
    print(f"report: {path} ({len(col.runs)} runs, {len(col.records)} records, "
          f"{len(list(path.parent.glob('*.png')))} plots; records.csv beside it)")
