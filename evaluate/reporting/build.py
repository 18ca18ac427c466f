"""`archbench report PATH... [-o DIR]`: one Markdown report (tables + PNG plots) and one CSV of
every record, from any mix of run directories, sweep folders and record files.

The builder only reads what the stages wrote (evaluate/reporting/data.py) and writes a section only
where the records hold its data; a section or part without data is one line saying so, never an
error, so a partial sweep still gives a useful report. A file that cannot be read is named in the
report (and on stderr) and skipped; the others are still reported. Sections:
summary, line-up, quality (evaluate/reporting/quality.py), synthetic tasks, efficiency, lm-eval,
provenance (evaluate/reporting/systems.py). Plots: evaluate/reporting/plots.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from archbench.evaluate.reporting import output
from archbench.evaluate.reporting.data import Collection, Labels, Report, device_text, load
from archbench.evaluate.reporting.findings import (
    section_fairness,
    section_findings,
    section_tuning,
)
from archbench.evaluate.reporting.quality import (
    section_lineup,
    section_lm_eval,
    section_quality,
    section_synthetic,
)
from archbench.evaluate.reporting.scaling import section_scaling
from archbench.evaluate.reporting.systems import (
    section_efficiency,
    section_provenance,
    section_summary,
)
from archbench.io import write_text_atomic
from archbench.progress import Progress

DEFAULT_OUT = Path("reports/latest")

# The answer first: what differs between the backbones, then what the data shows (only claims
# that pass a 95% test), then how the report was made, then the tables.
LEADING: list[Callable[[Report], bool]] = [section_fairness, section_findings]
SECTIONS: list[tuple[str, Callable[[Report], bool]]] = [
    ("Summary", section_summary),
    ("Line-up", section_lineup),
    ("Learning rates", section_tuning),
    ("Quality", section_quality),
    ("Scaling laws", section_scaling),
    ("Synthetic tasks", section_synthetic),
    ("Efficiency", section_efficiency),
    ("lm-eval", section_lm_eval),
    ("Provenance", section_provenance),
]

# Nested fields that would explode into hundreds of CSV columns stay one JSON column each.
JSON_COLUMNS = ("config", "probes", "spread", "notes", "train.task_params")
FIRST_COLUMNS = ("kind", "arch", "size", "run", "eval", "mode", "metric", "value", "status",
                 "context", "batch", "tokens_per_s", "peak_bytes", "source")


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in JSON_COLUMNS:
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple, dict)):
            out[name] = json.dumps(value, sort_keys=True, default=str)
        else:
            out[name] = value
    return out


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    """Every record, one row each; nested fields as dotted columns (`params.seq_len`)."""
    rows = []
    for r in records:
        rec = {k: v for k, v in r.items() if k != "_source"}
        if isinstance(rec.get("arch"), dict):  # train records hold the resolved arch config
            rec["arch_config"] = json.dumps(rec["arch"], sort_keys=True)
            rec["arch"] = rec["arch"].get("name")
        rows.append(flatten({**rec, "source": r["_source"]}))
    columns = sorted({c for row in rows for c in row})
    first = [c for c in FIRST_COLUMNS if c in columns]
    columns = first + [c for c in columns if c not in first]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _header(col: Collection, title: str, command: str) -> list[str]:
    devices = sorted({device_text((run.summary.get("provenance") or {}).get("device") or {})
                      for run in col.runs if run.summary.get("provenance")}
                     | {device_text((r.get("provenance") or {}).get("device") or {})
                        for r in col.records if r.get("provenance")})
    return [
        f"# {title}", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `{command}` on "
        f"{platform.node()} (Python {platform.python_version()}).", "",
        f"Inputs: {len(col.runs)} training runs and {len(col.records)} records from "
        f"{col.files} files.", "",
        "Hardware of the measurements: " + ("; ".join(devices) if devices else "unknown") + ".",
        "",
    ]


def build_report(paths: list[str | Path], out: str | Path = DEFAULT_OUT,
                 title: str = "archbench report", preamble: list[str] | None = None,
                 command: str | None = None) -> tuple[Path, Collection]:
    """Read `paths`; write `out`/report.md, its PNG plots and `out`/records.csv. `out` must be
    new, empty or an earlier report's folder (evaluate/reporting/output.py); only the files the
    last build wrote there are replaced."""
    out = Path(out)
    output.check_inputs(paths)
    previous = output.claim(out)
    output.remove_previous(out, previous)  # a plot whose data is gone must not linger
    progress = Progress(len(SECTIONS) + 1, f"report {out}")
    progress.start(f"reading {len(paths)} input(s)")
    col = load(paths)
    progress.advance(f"read {len(col.runs)} runs and {len(col.records)} records")
    rep = Report(col, out, Labels(col))
    command = command or "archbench report " + " ".join(str(p) for p in paths)
    rep.lines = _header(col, title, command)
    for lead in LEADING:
        lead(rep)
    rep.lines += list(preamble or [])
    for name, section in SECTIONS:
        if not section(rep):
            rep.note(f"{name}: no data in these records (section omitted).")
        progress.advance(name)
    write_text_atomic(out / "report.md", "\n".join(rep.lines).rstrip() + "\n")
    write_csv(col.records, out / "records.csv")
    output.record(out, [out / "report.md", out / "records.csv", *rep.figures])
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
    try:
        path, col = build_report(args.paths, args.out, args.title)
    except output.ReportOutputError as exc:
        print(f"archbench report: {exc}", file=sys.stderr)
        sys.exit(2)
    for problem in col.problems:
        print(f"archbench report: {problem.replace('`', '')}", file=sys.stderr)
    plots = len(list(path.parent.glob("*.png")))
    print(f"report: {path} ({len(col.runs)} runs, {len(col.records)} records, {plots} plots; "
          f"records.csv beside it)")
