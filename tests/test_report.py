"""The report builder on records written by the real code: a tiny training of two backbones, their
evaluations (bits per byte, extrapolation, passkey), a model trained on MQAR and its evaluation,
and CPU benchmarks. Every section and plot with data appears, sections without data are one-line
notes, sweeps merge without double counting, and a corrupt file is named and skipped."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import matplotlib.image
import pytest
import torch
from conftest import make_config

from archbench.evaluate.bench.runner import run_bench
from archbench.evaluate.quality.runner import run_eval
from archbench.evaluate.reporting.build import build_report, main
from archbench.evaluate.reporting.data import Collection, Labels, Run, human, load
from archbench.io import read_jsonl
from archbench.train.trainer import run_training

SHAPE = ("arch.d_model=32", "arch.n_layers=2", "arch.attention.head_dim=16")
TINY = (*SHAPE, "data.max_bytes=200000", "data.val_fraction=0.1", "train.batch_size=4",
        "train.seq_len=32", "train.tokens=512", "train.eval_every=2", "train.eval_batches=1",
        "train.log_every=1", "train.progress=false", "train.device=cpu")
EVAL = ("eval.tasks=[bpb,extrapolation,passkey]", "eval.extrapolation=[1,2]",
        "eval.max_batches=1", "eval.batch_size=2", "eval.n_examples=2",
        "++eval.grid={seq_len:[256,320],depth:[0.0,1.0]}",
        "++eval.task_params={filler_max_bytes:200000}")
MQAR = ("data.source=task", "data.task.name=mqar", "data.task.n_train=64", "data.task.n_val=16",
        "++data.task.params={vocab_size:32,seq_len:32,num_kv_pairs:2}")
BENCH = ("bench=cpu_smoke", "bench.contexts=[16,32]", "bench.repeats=1", "bench.warmup=0",
         "bench.min_seconds=0", "bench.decode_tokens=2", "bench.isolate=false", "bench.threads=1")
PLOTS_WITH_DATA = {"quality_vs_tokens.png", "quality_vs_flops.png", "loss_by_position.png",
                   "extrapolation.png", "passkey_heatmap.png", "mqar_vs_width.png",
                   "mqar_vs_pairs.png", "throughput.png", "memory.png"}


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """runs/{transformer,mamba} (trained and evaluated), mqar/transformer, bench/{...}."""
    root = tmp_path_factory.mktemp("records")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARCHBENCH_CACHE", str(root / "cache"))
        for arch in ("transformer", "mamba"):
            run_dir = root / "runs" / arch
            run_training(make_config(f"arch={arch}", *TINY), run_dir)
            run_eval(make_config(f"arch={arch}", f"ckpt={run_dir}", *EVAL))
            run_bench(make_config(f"arch={arch}", *SHAPE, *BENCH,
                                  f"out_dir={root / 'bench' / arch}"))
        task_dir = root / "mqar" / "transformer"
        run_training(make_config("arch=transformer", *TINY, *MQAR), task_dir)
        run_eval(make_config("arch=transformer", f"ckpt={task_dir}", "eval.tasks=[mqar]",
                             "eval.n_examples=4", "++eval.grid={num_kv_pairs:[1,2,4]}"))
    torch.set_num_threads(threads)
    yield root


def _records_in(*folders: Path) -> list[dict]:
    return [r for f in folders for p in sorted(f.rglob("*.jsonl")) if p.name != "metrics.jsonl"
            for r in read_jsonl(p) if "kind" in r]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_section_and_plot_with_data_is_written(fixture: Path, tmp_path: Path) -> None:
    inputs = [fixture / "runs", fixture / "mqar", fixture / "bench"]
    report, col = build_report(inputs, tmp_path / "out")
    text = report.read_text()
    for heading in ("## Summary", "## Line-up", "## Quality", "## Synthetic tasks",
                    "## Efficiency", "## Provenance"):
        assert heading in text
    assert "*lm-eval: no data in these records (section omitted).*" in text
    assert "*induction: no records.*" in text
    assert {p.name for p in (tmp_path / "out").glob("*.png")} == PLOTS_WITH_DATA
    for name in PLOTS_WITH_DATA:
        assert f"]({name})" in text
        image = matplotlib.image.imread(tmp_path / "out" / name)
        assert image.shape[0] > 200 and image.shape[1] > 300

    summary = json.loads((fixture / "runs" / "mamba" / "summary.json").read_text())
    lineup_row = next(line for line in text.splitlines() if line.startswith("| **mamba** | 2 "))
    assert human(summary["param_counts"]["total"]) in lineup_row
    quality_row = next(line for line in text.split("## Quality")[1].splitlines()
                       if line.startswith("| **mamba**"))
    assert f"{summary['final']['bpb']:.4g}" in quality_row
    # the MQAR-trained run is in the synthetic section, not among the language models
    assert "| **transformer** | mqar |" in text
    assert [r.task for r in col.runs].count("mqar") == 1

    rows = _csv_rows(tmp_path / "out" / "records.csv")
    assert len(rows) == len(_records_in(*inputs)) == len(col.records)
    bench = [r for r in _records_in(fixture / "bench") if r["mode"] == "prefill"]
    csv_bench = {(r["arch"], r["context"]): float(r["tokens_per_s"]) for r in rows
                 if r["kind"] == "bench" and r["mode"] == "prefill"}
    assert csv_bench == {(r["arch"], str(r["context"])): r["tokens_per_s"] for r in bench}
    assert any(r["params.num_kv_pairs"] == "4" for r in rows if r["eval"] == "mqar")


def test_sections_without_data_are_one_line_notes(fixture: Path, tmp_path: Path) -> None:
    report, col = build_report([fixture / "bench"], tmp_path / "out")
    text = report.read_text()
    assert col.runs == [] and not col.problems
    for name in ("Line-up", "Quality", "Synthetic tasks", "lm-eval"):
        assert f"## {name}" not in text
        assert f"*{name}: no data in these records (section omitted).*" in text
    assert "## Efficiency" in text and "*Benchmarks:" not in text
    assert {p.name for p in (tmp_path / "out").glob("*.png")} == {"throughput.png", "memory.png"}


def test_records_from_two_sweeps_merge_without_double_counting(fixture: Path,
                                                                tmp_path: Path) -> None:
    a, b = tmp_path / "sweep_a", tmp_path / "sweep_b"
    shutil.copytree(fixture / "runs" / "transformer", a / "transformer")
    shutil.copytree(fixture / "runs" / "mamba", b / "mamba")
    shutil.copy(a / "transformer" / "records.jsonl", b / "copied.jsonl")  # the same records
    report, col = build_report([a, b, a / "transformer"], tmp_path / "out")
    assert sorted(r.arch for r in col.runs) == ["mamba", "transformer"]
    assert len(col.records) == len(_records_in(a, b)) - len(_records_in(a))
    lineup = report.read_text().split("## Line-up")[1].split("## Quality")[0]
    assert "| **transformer** |" in lineup and "| **mamba** |" in lineup


def test_a_corrupt_record_file_is_named_and_skipped(fixture: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    shutil.copytree(fixture / "runs", sweep)
    broken = sweep / "mamba" / "records.jsonl"
    with open(broken, "a") as fh:
        fh.write('{"kind": "eval", "eval": "bpb", "val\n')
    main([str(sweep), "-o", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert str(broken) in out.err and "corrupt record file" in out.err
    assert out.out.startswith(f"report: {tmp_path / 'out' / 'report.md'}")
    text = (tmp_path / "out" / "report.md").read_text()
    flagged = text.split("### Flagged")[1]
    assert str(broken) in flagged
    col = load([sweep])
    assert {r.get("_source") for r in col.records} == {str(sweep / "transformer" /
                                                          "records.jsonl")}
    assert sorted(r.arch for r in col.runs) == ["mamba", "transformer"]  # its summary is fine
    assert "| **mamba** |" in text.split("## Line-up")[1]
    assert (tmp_path / "out" / "loss_by_position.png").is_file()  # transformer's records


def test_one_colour_per_backbone_and_sizes_only_where_needed() -> None:
    col = Collection(runs=[Run(Path(p), {"arch": a, "size": s, "status": "finished"})
                           for p, a, s in (("1", "mamba", "micro"), ("2", "mamba", "tiny"),
                                           ("3", "transformer", "micro"), ("4", "newnet", "s"))])
    labels = Labels(col)
    assert [r.label for r in col.runs] == ["mamba/micro", "mamba/tiny", "transformer", "newnet"]
    micro, tiny = labels.styles("mamba/micro"), labels.styles("mamba/tiny")
    assert micro["color"] == tiny["color"] != labels.styles("transformer")["color"]
    assert micro["linestyle"] != tiny["linestyle"]
    assert labels.styles("transformer")["color"] == "#1f77b4"  # the same in every report
    assert labels.ordered(["newnet", "mamba/tiny", "transformer"]) == [
        "transformer", "mamba/tiny", "newnet"]


def test_an_oom_is_flagged_and_never_replaced_by_a_shorter_context(fixture: Path,
                                                                   tmp_path: Path) -> None:
    """A backbone that ran out of memory at the longest context shows no number there in the
    summary (not its shorter-context one), and the OOM is listed under Flagged."""
    records = _records_in(fixture / "bench" / "mamba")
    longest = max(r["context"] for r in records)
    for r in records:
        if r["mode"] == "decode" and r["context"] == longest:
            r.update(status="oom", tokens_per_s=None, error="OutOfMemoryError: induced")
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    report, _ = build_report([path, fixture / "bench" / "transformer"], tmp_path / "out")
    text = report.read_text()
    summary = text.split("## Summary")[1].split("##")[0]
    header = next(line for line in summary.splitlines() if line.startswith("| backbone"))
    column = header.split(" | ").index(f"decode tok/s ↑ @{longest}")
    mamba = next(line for line in summary.splitlines() if line.startswith("| **mamba**"))
    assert mamba.split(" | ")[column] == "–"
    transformer = next(line for line in summary.splitlines()
                       if line.startswith("| **transformer**"))
    assert transformer.split(" | ")[column] != "–"
    flagged = text.split("### Flagged")[1]
    assert f"bench decode of mamba at context {longest}, batch 1: **oom**" in flagged


def test_compiled_bench_records_are_their_own_row_in_the_backbones_colour() -> None:
    """bench.compile: a compiled measurement is labelled '<backbone> compiled' (its own row and
    line, never a median with the eager one), in the backbone's colour, ordered after it."""
    records = [{"kind": "bench", "arch": "mamba", "size": "tiny", "compiled": flag}
               for flag in (False, True)]
    col = Collection(runs=[], records=records)
    labels = Labels(col)
    assert [labels.of(r) for r in records] == ["mamba", "mamba compiled"]
    assert labels.styles("mamba compiled")["color"] == labels.styles("mamba")["color"]
    assert labels.ordered(["mamba compiled", "transformer", "mamba"]) == [
        "transformer", "mamba", "mamba compiled"]


def test_projection_gemms_are_said_at_the_top(fixture: Path, tmp_path: Path) -> None:
    """Records on oneDNN's projections get the note that mixers' own products stay on aten;
    records whose projections ran on different GEMMs are flagged as not comparable in speed;
    compiled decoding with frozen weights and autotuned GEMMs is said."""
    onednn = _records_in(fixture / "bench" / "transformer")
    assert {r["kernel_paths"]["matmul"].removesuffix("+compiled") for r in onednn} == {"onednn"}
    report, _ = build_report([fixture / "bench" / "transformer"], tmp_path / "one")
    text = report.read_text()
    assert "projections and the LM head ran on oneDNN's GEMM" in text
    assert "ran on different GEMMs" not in text and "weights frozen" not in text
    aten = _records_in(fixture / "bench" / "mamba")
    for r in aten:
        r["kernel_paths"]["matmul"] = "aten"
    path = tmp_path / "aten.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in aten))
    report, _ = build_report([path, fixture / "bench" / "transformer"], tmp_path / "two")
    flag = next(line for line in report.read_text().splitlines()
                if "ran on different GEMMs" in line)
    assert "aten: mamba" in flag and "onednn: transformer" in flag
    frozen = _records_in(fixture / "bench" / "transformer")
    frozen[0]["kernel_paths"]["decode_graph"] = "frozen weights"
    path = tmp_path / "frozen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in frozen))
    report, _ = build_report([path], tmp_path / "frozen")
    note = next(line for line in report.read_text().splitlines() if "weights frozen" in line)
    assert "GEMMs autotuned" in note and "transformer" in note


def test_one_backbone_on_two_gemms_gets_two_rows() -> None:
    """arch.matmul=aten beside the default: two measurements, never one median of both."""
    records = [{"kind": "bench", "arch": "transformer", "size": "tiny", "compiled": flag,
                "kernel_paths": {"matmul": path + ("+compiled" if flag else "")}}
               for path in ("onednn", "aten") for flag in (False, True)]
    records.append({"kind": "bench", "arch": "mamba", "size": "tiny", "compiled": False,
                    "kernel_paths": {"matmul": "onednn"}})
    labels = Labels(Collection(runs=[], records=records))
    assert [labels.of(r) for r in records] == [
        "transformer (matmul=onednn)", "transformer (matmul=onednn) compiled",
        "transformer (matmul=aten)", "transformer (matmul=aten) compiled", "mamba"]
    assert labels.ordered(["mamba", "transformer (matmul=aten)"]) == [
        "transformer (matmul=aten)", "mamba"]
