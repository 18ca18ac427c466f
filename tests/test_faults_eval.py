"""Evaluation under partial failure: every task that can run writes its records, the failed ones
are recorded with their error, the exit code says so; a user's task folder never hides the local
lm-eval tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_checkpoint

OFFLINE = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    return save_tiny_checkpoint(tmp_path / "run")


def test_a_failing_task_does_not_lose_the_others(tiny_run: Path) -> None:
    exe = str(Path(sys.executable).with_name("archbench"))
    out = subprocess.run([exe, "eval", f"ckpt={tiny_run}", "eval.limit=3", "eval.batch_size=4",
                          "eval.tasks=[archbench_kv_recall,no_such_task]"],
                         cwd=tiny_run.parent, env=OFFLINE, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "1 evaluation(s) failed" in out.stderr and "no_such_task" in out.stderr
    assert "eval run: 1/2 lm-eval" in out.stderr or "eval run: 2/2" in out.stderr  # progress
    records = [json.loads(x) for x in (tiny_run / "records.jsonl").read_text().splitlines()]
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] == "failed"]
    assert ok and all(r["params"]["task"] == "archbench_kv_recall" for r in ok)
    assert [r["eval"] for r in failed] == ["no_such_task"] and failed[0]["reason"]


def test_a_users_include_path_keeps_the_local_tasks(tiny_run: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mytasks"
    mine.mkdir()
    cmd = [sys.executable, "-m", "archbench.evaluate.quality.lm_eval_adapter", "run",
           "--model", "archbench", "--model_args", f"ckpt={tiny_run},device=cpu",
           "--tasks", "archbench_kv_recall", "--limit", "3", "--batch_size", "4",
           "--include_path", str(mine), "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=OFFLINE, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert "acc,none" in result["results"]["archbench_kv_recall"]


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_another_tokenizer_on_the_command_line_is_refused(tiny_run: Path, tmp_path: Path,
                                                          command: str) -> None:
    from archbench.train.tokenizer import train_bpe

    other = tmp_path / "other.json"
    train_bpe(["some other text to learn from " * 20], 270).save(other)
    exe = str(Path(sys.executable).with_name("archbench"))
    base = [exe, command, f"ckpt={tiny_run}", "prompt=abc", "generate.max_new_tokens=2",
            "eval.tasks=[archbench_kv_recall]", "eval.limit=2", "tokenizer=file"]
    refused = subprocess.run([*base, f"tokenizer.path={other}"], env=OFFLINE,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "was trained with tokenizer" in refused.stderr
    if command == "generate":  # its own tokenizer file is accepted
        own = tiny_run / "checkpoints" / "step_0000003" / "tokenizer.json"
        accepted = subprocess.run([*base, f"tokenizer.path={own}"], env=OFFLINE,
                                  capture_output=True, text=True, timeout=300)
        assert accepted.returncode == 0, accepted.stderr[-2000:]


def test_compare_retries_an_evaluation_recorded_as_failed(tmp_path: Path) -> None:
    from archbench.compare import eval_done

    records = [{"kind": "eval", "eval": "bpb", "status": "ok"},
               {"kind": "eval", "eval": "hellaswag", "status": "failed", "reason": "offline"}]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert eval_done(tmp_path, ["bpb", "hellaswag"]) == ["hellaswag"]
