"""`archbench compare` end to end on a very small configuration (two backbones, a few hundred
tokens; the CI-sized form of `make demo`: the same stages, tuning and seeds, tiny budgets): every
stage runs and the report appears, learning rates are tuned per backbone and the report leads with
its intervals; run again, nothing is trained, evaluated or benchmarked a second time; a changed
setting is noticed. The GPU preset expands (dry run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archbench.compare import TRAIN_SECTIONS, Comparison, differences, main

SMALL = ["compare.backbones=[transformer,mamba]", "~compare.studies.mqar",
         "compare.studies.lm.evals=[{tasks:[bpb,extrapolation],overrides:[]}]",
         "arch.d_model=32", "arch.n_layers=2", "arch.attention.head_dim=16",
         "data.max_bytes=200000", "data.val_fraction=0.1", "train.tokens=256", "train.seq_len=32",
         "train.batch_size=4", "train.eval_every=1", "train.eval_batches=1",
         "eval.max_batches=1", "eval.batch_size=2", "eval.extrapolation=[1,2]",
         "bench.contexts=[16,32]", "bench.repeats=1", "bench.warmup=0", "bench.min_seconds=0",
         "bench.decode_tokens=2", "bench.isolate=false", "bench.modes=[prefill,decode]",
         "compare.tune.lrs=[1e-3,1e-2]", "compare.tune.tokens=128", "compare.seeds=[0,1]",
         "compare.parallel=2"]


def _compare(tmp: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    """One `archbench compare` (in this process; its stages are subprocesses as always)."""
    main([*SMALL, f"compare.sweep_dir={tmp / 'sweep'}", f"compare.out={tmp / 'report'}", *extra])
    return capsys.readouterr().out


def _stages(tmp: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp / "sweep" / "stages.jsonl").read_text().splitlines()]


def _state(tmp: Path) -> dict[str, float | int]:
    """What a second run must not touch: checkpoints, curves, records, benchmarks."""
    files = [p for p in (tmp / "sweep").rglob("*") if p.is_file() and (
        "checkpoints" in p.parts or p.name in ("metrics.jsonl", "records.jsonl", "bench.csv"))]
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in files}


def test_compare_builds_the_report_and_a_second_run_skips_finished_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    first = _compare(tmp_path, capsys)
    report = tmp_path / "report" / "report.md"
    assert f"report: {report}" in first
    text = report.read_text()
    lineup = text.split("## Line-up")[1].split("## Quality")[0]
    assert "| **transformer** |" in lineup and "| **mamba** |" in lineup
    for png in ("quality_vs_tokens.png", "extrapolation.png", "throughput.png", "memory.png"):
        assert (tmp_path / "report" / png).is_file()
    stages = _stages(tmp_path)
    assert {(s["stage"], s["status"]) for s in stages} == {
        ("train", "ok"), ("eval", "ok"), ("bench", "ok")}
    # the tuning stage: every backbone at every rate, one choice each, shown in the report
    tuning = [json.loads(x) for x in (tmp_path / "sweep" / "tune_lm" / "tuning.jsonl")
              .read_text().splitlines()]
    assert {t["arch"] for t in tuning} == {"transformer", "mamba"}
    for t in tuning:
        assert set(t["grid"]) <= set(t["lrs"]) and t["chosen_lr"] in t["lrs"]
        tuned_run = tmp_path / "sweep" / "tune_lm" / t["arch"] / "train.lr=0.001"
        # the tuning budget, not the user's train.tokens=256 of the main runs
        assert json.loads((tuned_run / "summary.json").read_text())["tokens_budget"] == 128
        run = tmp_path / "sweep" / "lm" / t["arch"] / "train.seed=0"
        used = json.loads((run / "summary.json").read_text())["config"]["train"]["lr"]
        assert used == t["chosen_lr"]  # the main run trained at the tuned rate
    assert "## Learning rates" in text and (tmp_path / "report" / "lr_tuning_lm.png").is_file()
    assert text.index("## What this comparison shows") < text.index("## Summary")
    shows = text.split("## What this comparison shows")[1].split("\n## ")[0]
    assert "Validation bits per byte" in shows and "| **mamba** | validation bits" in shows
    runs = [tmp_path / "sweep" / "lm" / a / f"train.seed={s}" for a in ("transformer", "mamba")
            for s in (0, 1)]
    for run in runs:
        assert json.loads((run / "summary.json").read_text())["status"] == "finished"
        evals = {r["eval"] for r in map(json.loads, (run / "records.jsonl").read_text()
                                        .splitlines()) if r["kind"] == "eval"}
        assert evals == {"bpb", "extrapolation"}
    before = _state(tmp_path)
    assert any("checkpoints" in k for k in before)

    second = _compare(tmp_path, capsys)
    assert _state(tmp_path) == before  # nothing retrained, re-evaluated or re-benchmarked
    for run in runs:
        assert f"skipping {run}: already finished" in second
        assert f"skipping eval bpb+extrapolation of {run}: records present" in second
    assert "skipping bench of transformer: bench.csv present" in second
    assert "tune lm: mamba: lr" in second  # chosen again from the finished tuning runs
    assert {s["status"] for s in _stages(tmp_path)} == {"skipped"}
    assert report.is_file() and "| **mamba** |" in report.read_text()

    # a changed setting is seen: the finished run no longer matches what would run now
    comparison = Comparison([*SMALL, "train.lr=0.0456", f"compare.sweep_dir={tmp_path / 'sweep'}"])
    (job_dir, job), = comparison.jobs(tmp_path / "sweep" / "lm", [], "mamba")
    assert job_dir == tmp_path / "sweep" / "lm" / "mamba"
    saved = json.loads((runs[2] / "summary.json").read_text())["config"]
    tuned = saved["train"]["lr"]
    assert comparison.stale(saved, job, TRAIN_SECTIONS) == [f"train.lr: {tuned!r} then, 0.0456 now"]
    same = Comparison([*SMALL, f"compare.sweep_dir={tmp_path / 'sweep'}"])
    same.tuned = {"mamba": tuned}
    (seed0, job0), _ = same.jobs(tmp_path / "sweep" / "lm", ["train.seed=0,1"], "mamba")
    assert seed0 == runs[2] and same.stale(saved, job0, TRAIN_SECTIONS) == []


def test_differences_ignore_new_keys_and_settings_that_change_nothing() -> None:
    then = {"train": {"lr": 1e-3, "progress": True, "tokens": 1000}, "data": {"cache_dir": "/a"}}
    now = {"train": {"lr": 0.001, "progress": False, "tokens": 1000.0, "new_knob": 1},
           "data": {"cache_dir": "/b"}}
    assert differences(then, now) == []
    now["train"]["tokens"] = 2000
    assert differences(then, now) == ["train.tokens: 1000 then, 2000 now"]


def test_gpu_preset_expands_every_study_in_a_dry_run(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    main(["+preset=gpu", "compare.dry_run=true", f"compare.sweep_dir={tmp_path / 'gpu'}"])
    out = capsys.readouterr().out
    assert "experiment compare_gpu" in out and "nothing was run" in out
    assert "backbones: transformer, gpt2, mamba, mamba2, rwkv7, jamba" in out
    train = [line for line in out.splitlines() if "archbench train" in line]
    assert len(train) == 4  # lr tuning, lm, mqar, induction: one multirun each
    assert "train.lr=choice(0.0003,0.001,0.003)" in train[0] and "train.tokens=5e+06" in train[0]
    assert "train.seed=0,1" in train[1] and "size=micro,tiny,xs" in train[2]
    assert f"{tmp_path / 'gpu'}/lm/mamba/train.seed=1" in out  # two seeds, one folder each
    assert f"{tmp_path / 'gpu'}/mqar/jamba/size=xs,train.lr=0.001" in out
    assert "archbench bench +experiment=compare_gpu" in out
    assert not (tmp_path / "gpu").exists()


def test_bad_tuning_settings_fail_before_any_work() -> None:
    from archbench.config import ConfigError

    with pytest.raises(ConfigError, match="compare.tune.lrs"):
        Comparison(["compare.tune.lrs=[0.001,-1]"])
    with pytest.raises(ConfigError, match="compare.tune.studies"):
        Comparison(["compare.tune.studies=[nope]"])
    with pytest.raises(ConfigError, match="compare.reference"):
        Comparison(["compare.reference=s4"])


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown preset 'tpu'"):
        main(["+preset=tpu"])


def test_a_study_stopped_once_solved_is_reported_and_not_retrained(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An MQAR study as the demo's, with its train.stop_when rule in the study's overrides (met
    early here: at_least=0.0001 on a 36-symbol task): the run stops before its budget, the report
    names it at the top with the tokens it trained, and a second `archbench compare` skips it as
    finished."""
    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    argv = _mqar_argv(tmp_path, vocab_size=36)
    main(argv)
    capsys.readouterr()
    assert {(r["stage"], r["status"], r["returncode"]) for r in _stages(tmp_path)} == {
        ("train", "ok", 0), ("eval", "ok", 0)}
    run = tmp_path / "sweep" / "mqar" / "transformer"  # one seed: no seed sweep in the name
    summary = json.loads((run / "summary.json").read_text())
    stop = summary["stopped_early"]
    assert summary["status"] == "finished" and stop is not None
    assert summary["config"]["train"]["stop_when"]["metric"] == "val_accuracy"  # the study's
    assert summary["tokens_seen"] == stop["tokens"] < stop["budget_tokens"] == 16384
    text = (tmp_path / "report" / "report.md").read_text()
    head = text.split("## What this comparison shows")[0]
    assert "training stopped once solved (mqar: stop at the first evaluation with " \
           "val_accuracy >= 0.0001" in head
    assert f"transformer seed 0 at {stop['tokens']:,} of 16,384 tokens" in head
    before = _state(tmp_path)
    main(argv)
    assert f"skipping {run}: already finished" in capsys.readouterr().out
    assert _state(tmp_path) == before


def _mqar_argv(tmp: Path, vocab_size: int) -> list[str]:
    """A one-backbone MQAR study as the demo's, tiny, whose train.stop_when rule is met early
    (at_least=0.0001: any answer right)."""
    return ["compare.backbones=[transformer]", "compare.studies.mqar.backbones=[transformer]",
            "~compare.studies.lm", "compare.tune.studies=[]", "compare.bench=false",
            "compare.seeds=[0]", "compare.parallel=1",
            "compare.studies.mqar.train=[" + ",".join(f"'{o}'" for o in (
                "data.source=task", "data.task.name=mqar",
                f"++data.task.params={{vocab_size:{vocab_size},seq_len:64,num_kv_pairs:4}}",
                "data.task.n_train=256", "data.task.n_val=32", "train.seq_len=64",
                "train.stop_when.metric=val_accuracy", "train.stop_when.at_least=0.0001")) + "]",
            "arch.d_model=32", "arch.n_layers=2", "arch.attention.head_dim=16",
            "train.batch_size=8", "train.tokens=16384", "train.lr=1e-2", "train.warmup_steps=1",
            "train.eval_every=4", "train.eval_batches=1", "eval.n_examples=16",
            f"compare.sweep_dir={tmp / 'sweep'}", f"compare.out={tmp / 'report'}"]


def test_an_evaluation_grid_that_fails_part_way_is_a_failed_stage(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 symbols hold 7 keys: the demo's grid of 4, 8 and 16 pairs fails at 8 after writing
    the 4-pair records; the stage says failed (not ok) and the report flags the evaluation."""
    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    main(_mqar_argv(tmp_path, vocab_size=16))
    capsys.readouterr()
    stage = next(r for r in _stages(tmp_path) if r["stage"] == "eval")
    assert stage["status"] == "failed" and stage["failed"] == ["mqar"]
    assert stage["returncode"] != 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "compare stage eval mqar: transformer mqar: **failed**" in text
