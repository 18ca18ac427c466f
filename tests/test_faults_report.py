"""`archbench report` under misuse: a folder with someone else's files, a missing input, runs of
different experiments that used to be averaged into one "± over seeds" row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from archbench.evaluate.reporting.build import build_report
from archbench.evaluate.reporting.output import MARKER, ReportOutputError

ARCHBENCH = str(Path(sys.executable).with_name("archbench"))


def _run(root: Path, name: str, tokens: float, seed: int, bpb: float,
         tokenizer: str = "bytes0") -> Path:
    """A finished run folder as the trainer leaves it (the fields the report reads)."""
    run = root / name
    run.mkdir(parents=True)
    config = {"train": {"tokens": tokens, "seed": seed, "lr": 0.001, "seq_len": 64},
              "size": {"name": "micro", "target": 7e5}, "data": {"source": "stdlib"},
              "tokenizer": {"kind": "byte"}, "arch": {"name": "transformer"}}
    summary = {"status": "finished", "arch": "transformer", "size": "micro", "seed": seed,
               "run": name, "config": config, "final": {"bpb": bpb, "loss": bpb * 0.6},
               "tokens_seen": tokens, "tokens_budget": tokens, "tokenizer": tokenizer,
               "data": {"hash": "corpus0"}, "param_counts": {"total": 10}}
    (run / "summary.json").write_text(json.dumps(summary))
    lines = [{"step": s, "tokens": s * 100, "loss": 5.0 - s / 10} for s in (1, 2)]
    lines.append({"step": 2, "tokens": 200, "val_loss": bpb * 0.6, "val_bpb": bpb})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def _quality_rows(report: Path) -> list[str]:
    """The rows of the first table of the Quality section (one per backbone setting)."""
    lines = report.read_text().split("## Quality", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return [line for line in lines[start:end] if line.startswith("| **")]


def test_runs_of_other_budgets_or_tokenizers_are_never_averaged(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _run(runs, "a", 3e4, 0, 5.0)
    _run(runs, "b", 1.02e5, 0, 5.3)
    _run(runs, "c", 2.01e5, 0, 5.6)
    _run(runs, "d", 2.01e5, 0, 4.0, tokenizer="bpe270")
    report, _ = build_report([runs], tmp_path / "out")
    rows = _quality_rows(report)
    assert len(rows) == 4 and not any("±" in row for row in rows)
    assert any("tokens=30K" in row or "tokens=3e+04" in row for row in rows), rows


def test_seeds_of_one_setting_are_one_row_with_a_spread(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _run(runs, "s0", 3e4, 0, 5.0)
    _run(runs, "s1", 3e4, 1, 5.2)
    report, _ = build_report([runs], tmp_path / "out")
    rows = _quality_rows(report)
    assert len(rows) == 1 and "5.1 ± 0.1414" in rows[0]


def test_a_folder_with_foreign_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    _run(tmp_path / "runs", "a", 3e4, 0, 5.0)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "holiday.png").write_bytes(b"not a plot of ours")
    (out / "report.md").write_text("my own notes\n")
    cli = subprocess.run([ARCHBENCH, "report", str(tmp_path / "runs"), "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and "did not write" in cli.stderr
    assert (out / "holiday.png").read_bytes() == b"not a plot of ours"
    assert (out / "report.md").read_text() == "my own notes\n"
    assert not (out / MARKER).exists()


def test_a_rebuild_replaces_only_its_own_files(tmp_path: Path) -> None:
    _run(tmp_path / "runs", "a", 3e4, 0, 5.0)
    out = tmp_path / "out"
    build_report([tmp_path / "runs"], out)
    ours = json.loads((out / MARKER).read_text())["files"]
    assert "report.md" in ours and any(n.endswith(".png") for n in ours)
    (out / "notes.png").write_bytes(b"added by a person")
    build_report([tmp_path / "runs"], out)
    assert (out / "notes.png").read_bytes() == b"added by a person"


def test_a_report_folder_from_before_markers_is_adopted(tmp_path: Path) -> None:
    out = tmp_path / "old"
    out.mkdir()
    (out / "report.md").write_text("# t\n\nGenerated 2026 by `archbench report runs` on x.\n\n"
                                   "![q](quality_vs_tokens.png)\n")
    (out / "quality_vs_tokens.png").write_bytes(b"old plot")
    (out / "keep.png").write_bytes(b"not referenced")
    _run(tmp_path / "runs", "a", 3e4, 0, 5.0)
    build_report([tmp_path / "runs"], out)
    assert (out / "keep.png").read_bytes() == b"not referenced"
    assert (out / "quality_vs_tokens.png").read_bytes() != b"old plot"


def test_a_missing_input_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ReportOutputError, match="no such file or folder"):
        build_report([tmp_path / "missing_dir"], tmp_path / "out")
    cli = subprocess.run([ARCHBENCH, "report", str(tmp_path / "missing_dir"), "-o",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and "missing_dir" in cli.stderr
    assert not (tmp_path / "out").exists()


def test_a_resumed_run_is_one_run_not_two(tmp_path: Path) -> None:
    run = _run(tmp_path / "runs", "a", 3e4, 0, 5.0)
    earlier = {"kind": "train", "run": "a", "arch": "transformer", "size": "micro", "seed": 0,
               "status": "finished", "tokens_seen": 1e4, "val_bpb": 5.9,
               "provenance": {"time": "2026-01-01T00:00:00"}}
    (run / "records.jsonl").write_text(json.dumps(earlier) + "\n")  # its first finish
    report, col = build_report([tmp_path / "runs"], tmp_path / "out")
    assert len(col.runs) == 1
    assert len(_quality_rows(report)) == 1 and "±" not in _quality_rows(report)[0]
