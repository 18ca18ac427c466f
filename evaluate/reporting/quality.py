"""Report sections on what the models are and how well they do: line-up, quality, synthetic
tasks and lm-eval. Each returns False when the records hold nothing for it (the builder then
writes a one-line note instead), and notes its own missing parts the same way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from archbench.evaluate.reporting import plots
from archbench.evaluate.reporting.data import (
    Report,
    Run,
    human,
    layer_pattern,
    md_table,
    mean_spread,
    params_key,
)
from archbench.evaluate.stats import wilson

TEXT_EVALS = ("bpb", "extrapolation")
PLOTTED_TASKS = ("mqar", "passkey", "induction")


# ---- line-up ----------------------------------------------------------------------------------

def section_lineup(rep: Report) -> bool:
    groups = rep.runs()
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
        width = arch.get("d_model") or fit.get("d_model", "–")
        depth = arch.get("n_layers") or fit.get("n_layers", "–")
        err = fit.get("error")
        rows.append([
            f"**{label}**", layer_pattern(s.get("layer_plan")), f"{width} × {depth}",
            human(counts.get("total")), human(counts.get("active")),
            human(counts.get("non_embedding")),
            f"{fit.get('metric', '')} {err * 100:+.1f}%" if err is not None else "–",
            f"{human(flops)} (T={seq_len})" if flops else "–",
            " / ".join(human(t) for t in tokens) or "–", ", ".join(seeds),
        ])
    rep.lines += md_table(["backbone", "layer pattern", "d_model × layers", "params total",
                           "active", "non-embedding", "size fit", "train FLOPs/token",
                           "tokens trained", "seeds"], rows)
    rep.lines += ["Language-model runs. FLOPs per token are analytic (forward + backward, active "
                  "parameters, at the training context T); the size fit is the distance of the "
                  "matched quantity from the size preset's target.", ""]
    return True


# ---- quality ----------------------------------------------------------------------------------

def curve(run: Run, y_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, FLOPs, y) of a run's logged points that carry `y_key`."""
    fpt = (run.summary.get("flops_per_token") or {}).get("train")
    pts = [m for m in run.metrics if m.get(y_key) is not None and m.get("tokens") is not None]
    tokens = np.array([m["tokens"] for m in pts], dtype=float)
    flops = np.array([m.get("flops") or (fpt * m["tokens"] if fpt else np.nan) for m in pts],
                     dtype=float)
    return tokens, flops, np.array([m[y_key] for m in pts], dtype=float)


def _plot_group(ax: Any, rep: Report, label: str, runs: list[Run], y_key: str,
                by_flops: bool) -> list[float]:
    """Seeds of one backbone: a mean line and a min..max band on their common points."""
    series = [s for s in (curve(r, y_key) for r in runs) if len(s[0])]
    if not series:
        return []
    xi = 1 if by_flops else 0
    common = set(series[0][0].tolist())
    for s in series[1:]:
        common &= set(s[0].tolist())
    few = max(len(s[0]) for s in series) <= 5
    if len(series) > 1 and len(common) >= 2:
        tok = np.array(sorted(common))
        ys = [np.interp(tok, s[0], s[2]) for s in series]
        xs = np.interp(tok, series[0][0], series[0][xi]) if by_flops else tok
        plots.band_line(ax, rep.styles, label, xs, ys, markers=few)
        return xs.tolist()
    style = rep.styles(label)
    out: list[float] = []
    for i, s in enumerate(series):  # no common grid: every run drawn alone
        ax.plot(s[xi], s[2], color=style["color"], linestyle=style["linestyle"],
                marker=style["marker"] if few else None, markersize=4,
                label=label if i == 0 else None, alpha=1.0 if i == 0 else 0.5)
        out += s[xi].tolist()
    return out


def section_quality(rep: Report) -> bool:
    groups = rep.runs()
    if not groups and not any(rep.col.evals(n) for n in TEXT_EVALS):
        return False
    rep.lines += ["## Quality", ""]
    if groups:
        eval_bpb: dict[str, list[float]] = defaultdict(list)
        for rec in rep.col.evals("bpb", "bpb"):
            eval_bpb[rep.labels.of(rec)].append(rec["value"])
        rows = []
        for label, runs in groups.items():
            finals = [r.summary.get("final") or {} for r in runs]
            last = [next((m["loss"] for m in reversed(r.metrics) if "loss" in m), None)
                    for r in runs]
            rows.append([f"**{label}**", len(runs), mean_spread(f.get("bpb") for f in finals),
                         mean_spread(f.get("loss") for f in finals), mean_spread(last),
                         mean_spread(eval_bpb.get(label, []))])
        rep.lines += md_table(["backbone", "runs", "val bits/byte", "val loss (nats/token)",
                               "last train loss", "bits/byte (`archbench eval`)"], rows)
        rep.lines += ["Validation on the held-out split at the end of training; mean ± standard "
                      "deviation over seeds where there are several. Lower is better.", ""]
        _quality_curves(rep, groups)
    else:
        rep.note("Training curves: no language-model training runs in the input.")
    _loss_by_position(rep)
    _extrapolation(rep)
    return True


def _quality_curves(rep: Report, groups: dict[str, list[Run]]) -> None:
    if not any(curve(r, "val_bpb")[0].size for runs in groups.values() for r in runs):
        rep.note("Curves: the runs logged no metrics.")
        return
    panels = [("val_bpb", "validation bits per byte"), ("loss", "training loss (nats/token)")]
    for by_flops, name, xlabel in ((False, "quality_vs_tokens.png", "training tokens"),
                                   (True, "quality_vs_flops.png", "training FLOPs (analytic)")):
        fig, axes = plots.new_figure(ncols=2)
        for ax, (key, ylabel) in zip(axes, panels, strict=True):
            xs: list[float] = []
            ys: list[float] = []
            for label, runs in groups.items():
                xs += _plot_group(ax, rep, label, runs, key, by_flops)
                ys += [v for r in runs for v in curve(r, key)[2].tolist()]
            plots.label_axes(ax, xlabel, ylabel, xs=xs, ys=ys)
            plots.legend(ax)
        what = "FLOPs" if by_flops else "tokens"
        rep.figure(fig, name, f"Quality against training {what} (bands: min..max over seeds)")


def _by_x(rep: Report, recs: list[dict[str, Any]], x: Callable[[dict[str, Any]], float]
          ) -> dict[str, list[tuple[float, list[float]]]]:
    """label -> sorted [(x, replicate values)]."""
    grouped: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        grouped[rep.labels.of(r)][x(r)].append(r["value"])
    return {lb: sorted(grouped[lb].items()) for lb in rep.labels.ordered(grouped)}


def _replicates(values: list[list[float]]) -> list[list[float]]:
    """Per-x lists of replicate values -> replicate rows (NaN-padded), for band_line."""
    n = max(len(v) for v in values)
    return [[v[i] if i < len(v) else np.nan for v in values] for i in range(n)]


def _draw_bands(ax: Any, rep: Report, series: dict[str, list[tuple[float, list[float]]]]
                ) -> None:
    for label, pts in series.items():
        plots.band_line(ax, rep.styles, label, [x for x, _ in pts],
                        _replicates([v for _, v in pts]), markers=True)


def _loss_by_position(rep: Report) -> None:
    recs = rep.col.evals("bpb", "loss_bucket")
    if not recs:
        rep.note("Loss by context position: no `bpb` evaluation records with position buckets.")
        return
    fig, axes = plots.new_figure()
    series = _by_x(rep, recs, lambda r: (r["params"].get("start", 0) + r["params"].get("end", 0))
                   / 2)
    _draw_bands(axes[0], rep, series)
    plots.label_axes(axes[0], "position in the context (tokens, bucket centre)",
                     "loss (nats/token)", "Loss by context position (validation split)")
    plots.legend(axes[0])
    rep.figure(fig, "loss_by_position.png")


def _extrapolation(rep: Report) -> None:
    metric = "bpb" if rep.col.evals("extrapolation", "bpb") else "loss"
    recs = rep.col.evals("extrapolation", metric)
    if not recs:
        rep.note("Length extrapolation: no `extrapolation` evaluation records.")
        return
    fig, axes = plots.new_figure()
    series = _by_x(rep, recs, lambda r: int(r["params"]["context"]))
    _draw_bands(axes[0], rep, series)
    for t in sorted({int(r["params"]["train_context"]) for r in recs
                     if r["params"].get("train_context")}):
        axes[0].axvline(t, color="grey", linestyle=":", linewidth=1)
    unit = "bits per byte" if metric == "bpb" else "loss (nats/token)"
    plots.label_axes(axes[0], "evaluation context (tokens; dotted: training context)", unit,
                     "Length extrapolation (same text, longer windows)", logx=False)
    plots.context_axis(axes[0], [x for pts in series.values() for x, _ in pts])
    plots.legend(axes[0])
    rep.figure(fig, "extrapolation.png")
    missing = [r for r in rep.col.evals("extrapolation", metric, ok_only=False)
               if r.get("status") != "ok"]
    rep.lines += [f"- {rep.labels.of(r)} at context {r['params'].get('context')}: "
                  f"{r.get('status')} ({r.get('reason')})" for r in missing]
    if missing:
        rep.lines.append("")


# ---- synthetic tasks --------------------------------------------------------------------------

def primary(rep: Report, name: str) -> tuple[str, list[dict[str, Any]]]:
    """The task's primary metric (its records say which; else accuracy) and those records."""
    recs = rep.col.evals(name)
    metric = next((r["metric"] for r in recs if r.get("primary")), "accuracy")
    return metric, [r for r in recs if r["metric"] == metric]


def section_synthetic(rep: Report) -> bool:
    names = {r.get("eval") for r in rep.col.evals()} - set(TEXT_EVALS) - {"lm_eval"}
    task_runs = rep.task_runs()
    if not names and not task_runs:
        return False
    rep.lines += ["## Synthetic tasks", ""]
    if task_runs:
        _task_training(rep, task_runs)
    for name, draw in (("mqar", _mqar), ("passkey", _passkey), ("induction", _induction)):
        if name in names:
            draw(rep)
        else:
            rep.note(f"{name}: no records.")
    others = sorted(names - set(PLOTTED_TASKS))
    if others:
        _other_tasks(rep, others)
    return True


def _task_training(rep: Report, runs: list[Run]) -> None:
    rows = []
    for run in sorted(runs, key=lambda r: (r.task or "", rep.labels.rank(r.label))):
        data = (run.summary.get("config") or {}).get("data") or {}
        params = ((data.get("task") or {}).get("params")) or {}
        final = run.summary.get("final") or {}
        counts = run.summary.get("param_counts") or {}
        rows.append([f"**{run.label}**", run.task, params_key(params),
                     (run.summary.get("size_fit") or {}).get("d_model", "–"),
                     human(counts.get("active_non_embedding")), human(run.summary.get(
                         "tokens_seen")), mean_spread([final.get("accuracy")], 3),
                     mean_spread([final.get("loss")], 3)])
    rep.lines += ["Trained from scratch on the task (answer positions only):", ""]
    rep.lines += md_table(["backbone", "task", "training setting", "d_model", "active params",
                           "tokens", "val accuracy", "val loss (nats/answer)"], rows)


def _pooled_best(recs: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]
                 ) -> dict[Any, dict[str, Any]]:
    """Per cell, Zoology's best learning rate: the seeds of one rate are pooled (answers right
    over answers scored, with a Wilson interval) and the best pooled rate is kept. Taking the
    best single run instead would report the luckiest seed, not the best setting."""
    pooled: dict[tuple[Any, Any], list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in recs:
        n = int(r.get("n") or 0)
        if n <= 0:
            continue
        acc = pooled[(key(r), (r.get("train") or {}).get("lr"))]
        acc[0] += round(float(r["value"]) * n)
        acc[1] += n
        acc[2] += 1
    best: dict[Any, dict[str, Any]] = {}
    for (cell, lr), (right, n, runs) in pooled.items():
        iv = wilson(right, n)
        if cell not in best or iv.estimate > best[cell]["value"]:
            best[cell] = {"value": iv.estimate, "interval": iv, "n": n, "lr": lr, "runs": runs}
    return best


def _wilson_bars(rows: list[tuple[Any, dict[str, Any]]]) -> list[tuple[float, float]]:
    return [(r["value"] - r["interval"].low, r["interval"].high - r["value"]) for _, r in rows]


def _mqar(rep: Report) -> None:
    metric, recs = primary(rep, "mqar")
    if not recs:
        rep.note("MQAR: no successful records.")
        return

    def width(r: dict[str, Any]) -> Any:
        return (r.get("train") or {}).get("d_model")

    best = _pooled_best(recs, lambda r: (rep.labels.of(r), r["params"].get("seq_len"),
                                         r["params"].get("num_kv_pairs"), width(r)))
    cells = sorted({(k[1], k[2]) for k in best}, key=lambda c: (c[0] or 0, c[1] or 0))[:6]
    fig, axes = plots.new_figure(ncols=len(cells), width=4.2)
    for ax, (seq_len, pairs) in zip(axes, cells, strict=True):
        series: dict[str, list[tuple[Any, dict[str, Any]]]] = defaultdict(list)
        for (label, sl, kv, d), r in best.items():
            if (sl, kv) == (seq_len, pairs) and d is not None:
                series[label].append((d, r))
        for label in rep.labels.ordered(series):
            pts = sorted(series[label], key=lambda p: p[0])
            plots.points_line(ax, rep.styles, label, [p[0] for p in pts],
                              [p[1]["value"] for p in pts], _wilson_bars(pts))
        ax.set_ylim(-0.03, 1.03)
        plots.label_axes(ax, "model width d_model", f"MQAR {metric}",
                         f"seq_len {seq_len}, {pairs} pairs",
                         xs=[w for v in series.values() for w, _ in v])
        plots.legend(ax)
    rep.figure(fig, "mqar_vs_width.png",
               "MQAR against model width (best learning rate per cell, seeds pooled; bars: "
               "Wilson 95%)")
    _mqar_vs_pairs(rep, metric, recs)
    pairs_all = sorted({k[2] for k in best})
    table: dict[tuple[str, Any, Any], dict[Any, dict[str, Any]]] = defaultdict(dict)
    for (label, sl, kv, d), r in best.items():
        table[(label, d, sl)][kv] = r
    rows = [[f"**{label}**", d, sl, *(f"{cells[kv]['interval'].text()} (n={cells[kv]['n']})"
                                      if kv in cells else "–" for kv in pairs_all)]
            for (label, d, sl), cells in sorted(table.items(), key=lambda t: (
                rep.labels.rank(t[0][0]), str(t[0][1:])))]
    rep.lines += md_table(["backbone", "d_model", "seq_len",
                           *(f"{metric} @{kv} pairs" for kv in pairs_all)], rows)
    rep.lines += ["Best learning rate per cell; its seeds pooled. n: answer positions scored "
                  "(all seeds); [low, high]: Wilson 95% interval.", ""]


def _mqar_vs_pairs(rep: Report, metric: str, recs: list[dict[str, Any]]) -> None:
    by_pairs = _pooled_best(recs, lambda r: (rep.labels.of(r), r["params"].get("num_kv_pairs"),
                                             (r.get("train") or {}).get("d_model")))
    widest: dict[tuple[str, Any], dict[str, Any]] = {}
    for (label, pairs, _), r in by_pairs.items():
        if (label, pairs) not in widest or r["value"] > widest[(label, pairs)]["value"]:
            widest[(label, pairs)] = r
    fig, axes = plots.new_figure()
    series: dict[str, list[tuple[Any, dict[str, Any]]]] = defaultdict(list)
    for (label, pairs), r in widest.items():
        series[label].append((pairs, r))
    for label in rep.labels.ordered(series):
        pts = sorted(series[label], key=lambda p: p[0])
        plots.points_line(axes[0], rep.styles, label, [p[0] for p in pts],
                          [p[1]["value"] for p in pts], _wilson_bars(pts))
    axes[0].set_ylim(-0.03, 1.03)
    plots.label_axes(axes[0], "key-value pairs per sequence", f"MQAR {metric}",
                     "MQAR against number of pairs (best width and rate; bars: Wilson 95%)",
                     logx=False)
    plots.context_axis(axes[0], [p for v in series.values() for p, _ in v])
    plots.legend(axes[0])
    rep.figure(fig, "mqar_vs_pairs.png")


def _passkey(rep: Report) -> None:
    metric, recs = primary(rep, "passkey")
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
    ncols = min(len(labels), 3)
    nrows = -(-len(labels) // ncols)
    fig, axes = plots.new_figure(ncols=ncols, nrows=nrows, width=3.4, height=3.2,
                                 extra_width=max(1.2, 5.5 - 3.4 * ncols))
    image = None
    for ax, label in zip(axes, labels, strict=False):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (length, depth), vals in cells[label].items():
            grid[depths.index(depth), lengths.index(length)] = float(np.mean(vals))
        image = plots.heatmap(ax, grid, [plots.context_tick(x) for x in lengths], depths,
                              "context length (tokens)", "needle depth (0 = start)", label)
        ax.title.set_color(rep.styles.colour(label))
    for ax in axes[len(labels):]:
        ax.set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.9, label=f"passkey {metric}")
    rep.figure(fig, "passkey_heatmap.png", f"Passkey retrieval ({metric}; white: not measured)")
    flagged = [r for r in rep.col.evals("passkey", ok_only=False) if r.get("status") != "ok"]
    if flagged:
        rep.lines += [f"{len(flagged)} passkey cells not measured (see Flagged).", ""]


def _induction(rep: Report) -> None:
    metric, recs = primary(rep, "induction")
    if not recs:
        rep.note("Induction heads: no successful records.")
        return
    series = _by_x(rep, recs, lambda r: int(r["params"]["seq_len"]))
    fig, axes = plots.new_figure()
    _draw_bands(axes[0], rep, series)
    for t in sorted({int(((r.get("train") or {}).get("task_params") or {}).get("seq_len") or 0)
                     for r in recs} - {0}):
        axes[0].axvline(t, color="grey", linestyle=":", linewidth=1)
    axes[0].set_ylim(-0.03, 1.03)
    plots.label_axes(axes[0], "test sequence length (tokens; dotted: training length)",
                     f"induction {metric}", "Induction heads: length extrapolation", logx=False)
    plots.context_axis(axes[0], [x for pts in series.values() for x, _ in pts])
    plots.legend(axes[0])
    rep.figure(fig, "induction_extrapolation.png")


def _other_tasks(rep: Report, names: list[str]) -> None:
    rows = []
    for name in names:
        metric, recs = primary(rep, name)
        cells: dict[tuple[str, str], list[float]] = defaultdict(list)
        for r in recs:
            cells[(params_key(r.get("params"), ("task",)), rep.labels.of(r))].append(r["value"])
        for (setting, label), vals in sorted(cells.items()):
            rows.append([name, setting, f"**{label}**", metric, mean_spread(vals, 3)])
    rep.lines += ["### Other synthetic tasks", ""]
    rep.lines += md_table(["task", "setting", "backbone", "metric", "value"], rows)


# ---- lm-eval ----------------------------------------------------------------------------------

def section_lm_eval(rep: Report) -> bool:
    recs = rep.col.evals("lm_eval", ok_only=False)
    if not recs:
        return False
    rep.lines += ["## lm-eval", ""]
    labels = rep.labels.ordered({rep.labels.of(r) for r in recs})
    cells: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for r in recs:
        p = r.get("params") or {}
        filt = p.get("filter")
        row = (str(p.get("task")),
               str(r.get("metric")) + (f" ({filt})" if filt not in (None, "none") else ""))
        if r.get("status", "ok") != "ok":
            text = str(r.get("status"))
        else:
            text = f"{r['value']:.4g}" + (f" ± {r['stderr']:.2g}" if r.get("stderr") else "")
        cells[row][rep.labels.of(r)] = text
    rows = [[task, metric, *(cells[(task, metric)].get(lb, "–") for lb in labels)]
            for task, metric in sorted(cells)]
    rep.lines += md_table(["task", "metric", *labels], rows)
    rep.lines += ["± is the harness's standard error.", ""]
    return True
