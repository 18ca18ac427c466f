"""What the report builder reads: runs and records from folders and files, labels, formatting.

Inputs are whatever the stages wrote: a training run directory holds `summary.json`,
`metrics.jsonl` and `records.jsonl` (train and eval records, evaluate/records.py); a benchmark
folder holds `records.jsonl` of bench records (evaluate/bench/runner.py); `archbench compare`
adds `stages.jsonl`. Every file is read once even when paths overlap, a record reached twice
(the same file under two names, or copied) counts once, and a file that cannot be read is named
in `Collection.problems` and skipped.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from archbench.evaluate.reporting import plots
from archbench.io import read_jsonl

RUN_FILES = ("summary.json", "metrics.jsonl")


def arch_name(value: Any) -> str | None:
    """The backbone name of an `arch` field: a name, or a resolved arch config holding one."""
    if isinstance(value, dict):
        return value.get("name")
    return None if value is None else str(value)


@dataclass
class Run:
    """A training run: its summary and its logged curve (none when read from a record alone)."""

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
    def finished(self) -> bool:
        return self.summary.get("status") == "finished"

    @property
    def task(self) -> str | None:
        """The synthetic task it was trained on, or None for language modelling on a corpus."""
        data = (self.summary.get("config") or {}).get("data") or {}
        return (data.get("task") or {}).get("name") if data.get("source") == "task" else None

    @property
    def key(self) -> tuple[Any, ...]:
        """What a train record of the same run carries, so the run is not counted twice."""
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

    def bench(self, mode: str | None = None, ok_only: bool = True) -> list[dict[str, Any]]:
        return [r for r in self.of_kind("bench") if (mode is None or r.get("mode") == mode)
                and (not ok_only or r.get("status", "ok") == "ok")]


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
    """Every run and record under `paths`."""
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
    _runs_from_train_records(col)
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
        if key in col._seen_records:
            continue
        col._seen_records.add(key)
        col.records.append({**rec, "_source": str(path)})
        kept += 1
    if not kept and explicit:
        col.problems.append(f"`{path}`: no archbench records in it (skipped)")


def _runs_from_train_records(col: Collection) -> None:
    """A train record whose run directory was not read (a records file given alone) stands in
    for its run, without curves; the others are only kept for the CSV."""
    keys = {run.key for run in col.runs}
    names = {run.summary.get("run") for run in col.runs}
    folders = {run.path.resolve() for run in col.runs}  # their summary.json is the last word
    for rec in col.of_kind("train"):
        key = (rec.get("run"), arch_name(rec.get("arch")),
               (rec.get("provenance") or {}).get("time"))
        if key in keys or (rec.get("status") != "finished" and rec.get("run") in names):
            continue
        if Path(rec["_source"]).parent.resolve() in folders:  # an earlier finish, then resumed
            continue
        summary = {k: v for k, v in rec.items() if not k.startswith("_")}
        summary["final"] = {"loss": rec.get("val_loss"), "bpb": rec.get("val_bpb")}
        col.runs.append(Run(Path(rec["_source"]).parent, summary))
        keys.add(key)


# ---- labels ----------------------------------------------------------------------------------

def record_size(rec: dict[str, Any]) -> str | None:
    return rec.get("size") or (rec.get("train") or {}).get("size")


# Config keys that do not make two runs different experiments: seeds are what "± over seeds"
# summarises, the rest cannot change the numbers (the keys a resume may change, train/resume.py).
_SAME_EXPERIMENT = ("train.seed", "arch.*", "size.name", "tokenizer.path")


def setting(run: Run) -> dict[str, Any]:
    """What a run's numbers depend on besides its backbone and seed: the resolved config (budget,
    size target, data, optimiser, ...), the tokenizer's identity and the data's hash."""
    from archbench.train.resume import RESUME_MAY_CHANGE, flatten

    skip = (*_SAME_EXPERIMENT, *(p for p in RESUME_MAY_CHANGE if p != "train.max_steps"))
    flat = {k: v for k, v in flatten(run.summary.get("config") or {}).items()
            if not any(fnmatch.fnmatchcase(k, p) for p in skip)}
    flat["tokenizer"] = run.summary.get("tokenizer")
    flat["data"] = (run.summary.get("data") or {}).get("hash")
    return flat


def matmul_of(rec: dict[str, Any]) -> str:
    """The projections' GEMM (arch.matmul, "+compiled" dropped) a record or a run summary names
    in its kernel paths; "?" for one made before the setting existed."""
    path = (rec.get("kernel_paths") or {}).get("matmul")
    return str(path).removesuffix("+compiled") if path else "?"


def _short(value: Any) -> str:
    if isinstance(value, float) and value >= 1000:
        return plots.human_tick(value)
    return str(value)[:16]


class Labels:
    """One label per backbone (its colour everywhere); the size joins the label only where a
    backbone comes in several sizes, and the settings that differ join it where runs of one
    backbone differ in more than their seed (another budget, tokenizer or corpus is another
    experiment: it gets its own row and line, never a mean with the others)."""

    def __init__(self, col: Collection) -> None:
        self.sizes: dict[str, set[str]] = defaultdict(set)
        for run in col.runs:
            self.sizes[run.arch].add(str(run.size))
        for rec in col.records:
            arch = arch_name(rec.get("arch"))
            if arch and rec.get("kind") in ("eval", "bench"):
                self.sizes[arch].add(str(record_size(rec)))
        for run in col.runs:
            run.label = self(run.arch, run.size)
        self._split_by_setting(col.runs)
        # Benchmarks of one backbone on different projection GEMMs (arch.matmul) are different
        # measurements: each gets its own row, never a median with the other.
        gemms: dict[str, set[str]] = defaultdict(set)
        for rec in col.records:
            if rec.get("kind") == "bench":
                gemms[arch_name(rec.get("arch")) or "?"].add(matmul_of(rec))
        self.split_gemm = {arch for arch, paths in gemms.items() if len(paths) > 1}
        self.by_run: dict[str, str] = {str(run.path.resolve()): run.label for run in col.runs}
        pairs = [(self(a, s), a) for a, sizes in self.sizes.items() for s in sizes]
        pairs += [(run.label, run.arch) for run in col.runs]
        pairs += [(self.of(r), arch_name(r.get("arch"))) for r in col.records
                  if r.get("kind") == "bench"]
        self.styles = plots.Styles(pairs)

    @staticmethod
    def _split_by_setting(runs: list[Run]) -> None:
        """Runs under one label whose settings differ get the differing keys in their label."""
        groups: dict[str, list[Run]] = defaultdict(list)
        for run in runs:  # language-model runs; synthetic-task sweeps (MQAR widths x learning
            if run.task is None:  # rates) are laid out by their own sections
                groups[run.label].append(run)
        for label, members in groups.items():
            settings = [setting(r) for r in members]
            # a key only some runs have (a run known from a record alone has no config, or the
            # schema grew since) says nothing about whether they are the same experiment
            keys = sorted(set.intersection(*(set(s) for s in settings)))
            varying = [k for k in keys if len({repr(s[k]) for s in settings}) > 1]
            if not varying:
                continue
            shown = varying[:3] + (["..."] if len(varying) > 3 else [])
            for run, values in zip(members, settings, strict=True):
                parts = [f"{k.split('.')[-1]}={_short(values.get(k))}" for k in varying[:3]]
                run.label = f"{label} ({', '.join(parts + shown[3:])})"

    def __call__(self, arch: str | None, size: Any = None) -> str:
        arch = arch or "?"
        sizes = self.sizes.get(arch, set()) - {"None"}
        return f"{arch}/{size}" if len(sizes) > 1 and size is not None else arch

    def of(self, rec: dict[str, Any]) -> str:
        """The label of the run a record measured (by its checkpoint folder), else by backbone
        and size."""
        ckpt = rec.get("ckpt")
        if ckpt:
            path = Path(ckpt)
            run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
            label = self.by_run.get(str(run_dir.resolve()))
            if label is not None:
                return label
        arch = arch_name(rec.get("arch"))
        label = self(arch, record_size(rec))
        if rec.get("kind") == "bench" and arch in self.split_gemm:
            label = f"{label} (matmul={matmul_of(rec)})"
        # A measurement under torch.compile (bench.compile) is its own row and line.
        return f"{label} compiled" if rec.get("kind") == "bench" and rec.get("compiled") else label

    @staticmethod
    def rank(label: str) -> tuple[int, str]:
        """Sort key: known backbones in the canonical order, then the rest alphabetically."""
        order = list(plots.KNOWN_COLOURS)
        base = label.split("/")[0].removesuffix(" compiled").split(" (matmul=")[0]
        return (order.index(base) if base in order else len(order), label)

    def ordered(self, labels: Iterable[str]) -> list[str]:
        return sorted(set(labels), key=self.rank)


# ---- formatting ------------------------------------------------------------------------------

def human(value: Any, unit: str = "") -> str:
    """3 significant digits with K/M/G/T, so a table reads at a glance."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return plots.human_tick(float(value)) + unit


def human_bytes(value: Any) -> str:
    return "–" if value is None else plots.bytes_tick(float(value))


def mean_spread(values: Iterable[Any], digits: int = 4,
                fmt: Callable[[float], str] | None = None) -> str:
    """'mean ± sd' over replicates (seeds), or the single value."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return "–"
    show = fmt or (lambda v: f"{v:.{digits}g}")
    if len(vals) == 1:
        return show(vals[0])
    return f"{show(float(np.mean(vals)))} ± {show(float(np.std(vals, ddof=1)))}"


def context(value: Any) -> str:
    return "–" if value is None else plots.context_tick(float(value))


def md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


def layer_pattern(plan: list[list[str]] | None) -> str:
    """'8 layers: mamba ×7, attention ×1 · MLP dense ×4, moe ×4' from a layer plan."""
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


def device_text(dev: dict[str, Any]) -> str:
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


# ---- the report being written ----------------------------------------------------------------

@dataclass
class Report:
    col: Collection
    out: Path
    labels: Labels
    lines: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

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

    def runs(self, task: str | None = None, finished_only: bool = True) -> dict[str, list[Run]]:
        """Runs per label, language-model runs by default (task=None), or those of a task."""
        out: dict[str, list[Run]] = defaultdict(list)
        for run in self.col.runs:
            if run.task == task and (run.finished or not finished_only):
                out[run.label].append(run)
        return {k: out[k] for k in self.labels.ordered(out)}

    def task_runs(self) -> list[Run]:
        return [r for r in self.col.runs if r.task is not None and r.finished]
