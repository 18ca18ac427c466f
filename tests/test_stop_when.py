"""train.stop_when: a run stops at the first evaluation that meets the rule, says so in its
summary and train record, and stays stopped when resumed; a bad rule is refused before work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_config

from archbench.config import ConfigError, validate
from archbench.io import read_jsonl
from archbench.train.resume import is_finished
from archbench.train.trainer import run_training

TINY = ("size=micro", "data.max_bytes=300000", "data.val_fraction=0.1", "train.batch_size=4",
        "train.seq_len=64", "train.tokens=6144", "train.warmup_steps=2", "train.eval_every=4",
        "train.eval_batches=2", "train.log_every=2", "train.lr=3e-3", "train.progress=false",
        "train.ckpt_every=1000")
TOKENS_PER_STEP = 4 * 64


def _val_curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_jsonl(run_dir / "metrics.jsonl")
            if "val_loss" in r]


@pytest.mark.parametrize("overrides, named", [
    (["train.stop_when.metric=val_acc", "train.stop_when.at_least=0.9"], "train.stop_when.metric"),
    (["train.stop_when.metric=val_loss"], "exactly one of"),
    (["train.stop_when.metric=val_loss", "train.stop_when.at_least=1",
      "train.stop_when.at_most=2"], "exactly one of"),
    (["train.stop_when.at_least=0.9"], "no metric"),
    (["train.stop_when.metric=val_accuracy", "train.stop_when.at_least=0.9"], "data.source"),
    (["data.source=task", "train.stop_when.metric=val_accuracy",
      "train.stop_when.at_least=1.5"], "(0, 1]"),
])
def test_bad_rules_are_refused_naming_the_field(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match="train.stop_when") as err:
        validate(make_config(*overrides))
    assert named in str(err.value)


def test_stops_at_the_first_evaluation_that_meets_the_rule(cache_env: Path,
                                                           tmp_path: Path) -> None:
    full = run_training(make_config(*TINY), tmp_path / "full")
    curve = _val_curve(tmp_path / "full")
    assert full["stopped_early"] is None and full["step"] == full["total_steps"] == 24
    # a threshold the curve first meets at an evaluation before the last one
    (hit_step, hit_loss) = next((s, v) for s, v in curve if v < curve[0][1])
    assert hit_step < full["step"]
    threshold = (hit_loss + max(v for s, v in curve if s < hit_step)) / 2
    expected = next(s for s, v in curve if v <= threshold)

    run = tmp_path / "stopped"
    summary = run_training(make_config(*TINY, "train.stop_when.metric=val_loss",
                                       f"train.stop_when.at_most={threshold}"), run)
    stop = summary["stopped_early"]
    assert summary["status"] == "finished" and summary["step"] == expected == stop["step"]
    assert summary["tokens_seen"] == stop["tokens"] == expected * TOKENS_PER_STEP
    assert stop["budget_tokens"] == 24 * TOKENS_PER_STEP and stop["rule"] == "at_most"
    assert stop["value"] <= threshold  # never below the rule: it met it
    assert all(v > threshold for s, v in _val_curve(run) if s < expected)  # the first to meet it
    record = read_jsonl(run / "records.jsonl")[-1]
    assert record["kind"] == "train" and record["stopped_early"]["step"] == expected
    assert record["tokens_seen"] < record["tokens_budget"]
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == expected

    # resumed, it stays where it stopped (trainer and the start check agree)
    again = run_training(make_config(*TINY, "train.stop_when.metric=val_loss",
                                     f"train.stop_when.at_most={threshold}",
                                     "train.resume=true"), run)
    assert again["step"] == expected and again["stopped_early"]["step"] == expected
    assert again["final"]["loss"] == pytest.approx(summary["final"]["loss"])
    assert is_finished(again, make_config(*TINY, "train.resume=true"))


def test_an_unmet_rule_trains_the_whole_budget(cache_env: Path, tmp_path: Path) -> None:
    summary = run_training(make_config(*TINY, "train.tokens=2048",
                                       "train.stop_when.metric=val_loss",
                                       "train.stop_when.at_most=0.001"), tmp_path / "run")
    assert summary["stopped_early"] is None
    assert summary["step"] == summary["total_steps"] == 8
    assert summary["tokens_seen"] == 8 * TOKENS_PER_STEP


def test_task_accuracy_rule(cache_env: Path, tmp_path: Path) -> None:
    """The accuracy of a synthetic task is the metric read: with 16 symbols a guessing model
    gets some answers right once it predicts values, so at_least=0.0001 is met early."""
    summary = run_training(make_config(
        "data.source=task", "data.task.name=mqar", "data.task.n_train=256",
        "++data.task.params={vocab_size:16,seq_len:64,num_kv_pairs:4}",
        "data.task.n_val=32", "train.seq_len=64", "train.batch_size=8", "train.tokens=16384",
        "train.eval_every=4", "train.eval_batches=1", "train.warmup_steps=1", "train.lr=1e-2",
        "train.progress=false", "arch.d_model=32", "arch.n_layers=2",
        "arch.attention.head_dim=16", "train.stop_when.metric=val_accuracy",
        "train.stop_when.at_least=0.0001"), tmp_path / "run")
    stop = summary["stopped_early"]
    assert stop is not None and stop["metric"] == "val_accuracy"
    val = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "val_accuracy" in r]
    assert [r["step"] for r in val][-1] == stop["step"] < summary["total_steps"]
    assert all(r["val_accuracy"] < 0.0001 for r in val[:-1])
    assert stop["value"] == val[-1]["val_accuracy"] == summary["final"]["accuracy"] >= 0.0001
