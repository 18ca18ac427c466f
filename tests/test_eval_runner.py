"""`archbench eval`: records in the documented shape, written where the report builder looks,
bpb / extrapolation / synthetic tasks from a checkpoint, and the experiment configs compose."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from archbench.archs.model import LanguageModel
from archbench.config import DataConfig, RootConfig, register_schema, validate
from archbench.evaluate.quality.perplexity import file_split, split_metrics
from archbench.evaluate.quality.runner import EvaluationsFailed, expand_checkpoints, run_eval
from archbench.evaluate.records import EvalContext, best_per_group, make_record
from archbench.io import read_jsonl
from archbench.train.checkpoint import save_checkpoint
from archbench.train.tasks import make_task, score_examples, task_token_data
from archbench.train.tasks.mad import mad_settings
from archbench.train.tokenizer import ByteTokenizer

FIELDS = {"kind", "eval", "metric", "value", "status", "params", "ckpt", "run", "arch",
          "tokenizer", "train", "provenance"}
TEXT = "def add(a, b):\n    return a + b\n\nclass C:\n    x = [1, 2, 3]\n" * 40


def checkpoint(root: Path, name: str, arch: dict, vocab: int, config: dict) -> tuple[Path, Any]:
    torch.manual_seed(0)
    model = LanguageModel({"d_model": 32, "n_layers": 2, **arch}, vocab).eval()
    tok = ByteTokenizer()
    save_checkpoint(root / name, 5, model, None, tok,
                    {"arch": OmegaConf.to_container(model.arch), "vocab_size": vocab,
                     "config": config, "tokenizer": tok.identity,
                     "param_counts": model.param_counts()})
    return root / name, model


def eval_cfg(ckpt: Path, **eval_values: object) -> object:
    return OmegaConf.merge(OmegaConf.structured(RootConfig),
                           {"ckpt": str(ckpt), "eval": eval_values})


def test_make_record_has_the_documented_fields_and_refuses_bad_values() -> None:
    ctx = EvalContext("ck", "run-a", "mamba", "tok123", {"d_model": 64})
    r = make_record(ctx, "mqar", "accuracy", 0.5, params={"seq_len": 64}, n=10, stderr=0.1)
    assert FIELDS <= set(r) and r["value"] == 0.5 and r["n"] == 10 and r["stderr"] == 0.1
    assert r["train"] == {"d_model": 64} and "git" in r["provenance"]
    json.dumps(r)
    with pytest.raises(ValueError, match="finite"):
        make_record(ctx, "bpb", "loss", float("nan"))
    with pytest.raises(ValueError, match="reason"):
        make_record(ctx, "bpb", "loss", None, status="not_supported")
    skipped = make_record(ctx, "bpb", "loss", None, status="oom", reason="too long")
    assert skipped["value"] is None and skipped["reason"] == "too long"


def test_best_per_group_takes_the_best_learning_rate_per_cell() -> None:
    ctx = EvalContext(None, "r", "mamba", "t")
    records = []
    for d_model, lr, acc in ((64, 1e-3, 0.2), (64, 1e-2, 0.6), (128, 1e-3, 0.9), (128, 1e-2, 0.1)):
        ctx.train = {"d_model": d_model, "lr": lr}
        records.append(make_record(ctx, "mqar", "accuracy", acc, params={"seq_len": 64}))
    best = best_per_group(records, ["arch", "params.seq_len", "train.d_model"], "accuracy")
    assert {k[2]: v["train"]["lr"] for k, v in best.items()} == {64: 1e-2, 128: 1e-3}


def test_bpb_and_extrapolation_records_from_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    ckpt, model = checkpoint(tmp_path, "gpt2-run", {"attention": {"head_dim": 16,
                                                                  "position": "learned",
                                                                  "max_position": 64}},
                             258, {"train": {"seq_len": 32, "lr": 1e-3}, "size": {"name": "x"}})
    cfg = eval_cfg(ckpt, tasks=["bpb", "extrapolation"], file=str(tmp_path / "text.txt"),
                   max_batches=2, batch_size=4, position_buckets=4, extrapolation=[1, 2, 4])
    records = run_eval(cfg)
    written = read_jsonl(ckpt / "records.jsonl")
    assert written == json.loads(json.dumps(records, default=str))
    assert all(FIELDS <= set(r) for r in records)
    assert {r["run"] for r in records} == {"gpt2-run"} and records[0]["train"]["seq_len"] == 32
    by = {(r["eval"], r["metric"], r["params"].get("context"), r["params"].get("start")): r
          for r in records}
    tok = ByteTokenizer()
    direct = split_metrics(model, file_split(tmp_path / "text.txt", tok), 32, 4,
                           tok.token_bytes(), 2)
    assert by[("bpb", "bpb", 32, None)]["value"] == pytest.approx(direct["bpb"])
    assert by[("bpb", "loss", 32, None)]["value"] == pytest.approx(direct["loss"])
    assert len([r for r in records if r["metric"] == "loss_bucket"]) == 4
    # per-window sums, for paired comparisons: they add up to the totals, one entry per window
    windows = by[("bpb", "bpb", 32, None)]["windows"]
    assert len(windows["nats"]) == direct["windows"] == 8
    assert sum(windows["nats"]) / math.log(2) / sum(windows["bytes"]) == pytest.approx(
        direct["bpb"])
    assert sum(windows["tokens"]) == direct["tokens"]
    assert by[("extrapolation", "loss", 64, None)]["status"] == "ok"
    past = by[("extrapolation", "loss", 128, None)]
    assert past["status"] == "not_supported" and past["value"] is None and "64" in past["reason"]


def test_a_one_file_corpus_is_scored_on_the_tail_training_held_out(tmp_path: Path) -> None:
    """A one-document corpus (tinyshakespeare) has no document-level validation split: training
    holds out the last `holdout_tail` of the text, and `archbench eval` must score that tail too
    (it once split by documents only and found no window to score)."""
    text_file = tmp_path / "one.txt"
    text_file.write_text(TEXT * 4, encoding="utf-8")
    data = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(DataConfig), {
        "source": "path", "path": str(text_file), "val_fraction": 0.0, "holdout_tail": 0.1,
        "cache_dir": str(tmp_path / "cache")}))
    ckpt, model = checkpoint(tmp_path, "tail-run", {"attention": {"head_dim": 16}}, 258,
                             {"train": {"seq_len": 32}, "data": data})
    records = run_eval(eval_cfg(ckpt, tasks=["bpb"], max_batches=2, batch_size=4))
    bpb = next(r for r in records if r["eval"] == "bpb" and r["metric"] == "bpb")
    assert bpb["status"] == "ok"
    tail = TEXT * 4
    tail = tail[len(tail) - int(len(tail) * 0.1):]
    (tmp_path / "tail.txt").write_text(tail, encoding="utf-8")
    tok = ByteTokenizer()
    direct = split_metrics(model, file_split(tmp_path / "tail.txt", tok), 32, 4,
                           tok.token_bytes(), 2)
    assert bpb["value"] == pytest.approx(direct["bpb"], rel=0.05)


def test_a_task_checkpoint_is_scored_on_its_own_task(tmp_path: Path) -> None:
    params = {"vocab_size": 64, "seq_len": 16, "num_kv_pairs": 2}
    config = {"train": {"seq_len": 16, "lr": 3e-3},
              "data": {"source": "task", "task": {"name": "mqar", "params": params,
                                                  "n_train": 100, "n_val": 10, "seed": 0}}}
    ckpt, model = checkpoint(tmp_path, "mqar-run", {"attention": {"head_dim": 16}}, 64, config)
    out = tmp_path / "all.jsonl"
    records = run_eval(eval_cfg(ckpt, tasks=["mqar", "bpb"], n_examples=24, records=str(out),
                                seed=9))
    acc = next(r for r in records if r["eval"] == "mqar" and r["metric"] == "accuracy")
    assert acc["params"] == {"task": "mqar", **params, "power_a": 0.01,
                             "random_non_queries": True}
    assert acc["train"]["task"] == "mqar" and acc["n"] == 48 and acc["primary"] is True
    task = make_task("mqar", params, split="test")
    inputs, targets = task.batch(range(24), seed=9)
    assert acc["value"] == pytest.approx(score_examples(model, inputs, targets)["accuracy"])
    bpb = [r for r in records if r["eval"] == "bpb"]
    assert bpb and all(r["status"] == "not_supported" for r in bpb)
    assert len(read_jsonl(out)) == len(records)


def test_checkpoints_are_found_in_sweep_folders(tmp_path: Path) -> None:
    for name in ("a", "b"):
        checkpoint(tmp_path / "sweep" / name, "run", {"attention": {"head_dim": 16}}, 258, {})
    found = expand_checkpoints(str(tmp_path / "sweep"))
    assert [p.parent.name for p in found] == ["a", "b"]
    assert expand_checkpoints(str(tmp_path / "sweep" / "*" / "run")) == found
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        expand_checkpoints(str(tmp_path / "nothing"))


@pytest.mark.parametrize("experiment", ["mqar", "mad"])
def test_experiment_configs_compose_and_make_task_data(experiment: str) -> None:
    register_schema()
    with initialize_config_module("archbench.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}"],
                      return_hydra_config=True)
        sweep = dict(cfg.hydra.sweeper.params)
        plain = compose("config", overrides=[f"+experiment={experiment}"])
    validate(plain)
    data = task_token_data(plain.data.task, ByteTokenizer())
    assert plain.train.seq_len >= data.meta["seq_len"]
    if experiment == "mqar":
        assert sweep["data.task.params.seq_len"].split(",") == ["64", "128", "256", "512"]
        assert len(sweep["arch.d_model"].split(",")) == 4 and len(sweep["train.lr"].split(",")) == 4
        assert data.meta["task"]["params"]["num_kv_pairs"] == 4
        assert plain.train.seq_len == 64
    else:
        settings = [s.strip() for s in sweep["data.task.params.setting"].split(",")]
        assert settings == mad_settings()
        longest = max(make_task(*_resolved(s)).seq_len for s in settings)
        assert plain.train.seq_len >= longest


def _resolved(setting: str) -> tuple[str, dict]:
    from archbench.train.tasks.mad import resolve_setting

    task, params, _ = resolve_setting(setting)
    return task, params


def test_token_bytes_cover_task_vocabularies_beyond_the_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    ckpt, _ = checkpoint(tmp_path, "big-vocab", {"attention": {"head_dim": 16}}, 300,
                         {"train": {"seq_len": 16}})
    records = run_eval(eval_cfg(ckpt, tasks=["bpb"], file=str(tmp_path / "t.txt"),
                                max_batches=1, position_buckets=0))
    assert {r["metric"] for r in records} == {"loss", "bpb"}
    assert np.isfinite([r["value"] for r in records]).all()


def test_a_mad_checkpoint_gives_records_the_mad_score_reads(tmp_path: Path) -> None:
    from archbench.train.tasks.mad import mad_scores

    config = {"train": {"seq_len": 32, "lr": 1e-3},
              "data": {"source": "task", "task": {"name": "mad", "n_train": 5, "n_val": 5,
                                                  "params": {"setting": "compression/baseline"}}}}
    ckpt, _ = checkpoint(tmp_path, "mad-run", {"attention": {"head_dim": 16}}, 16, config)
    records = run_eval(eval_cfg(ckpt, tasks=["mad"], n_examples=8))
    acc = next(r for r in records if r["metric"] == "accuracy")
    assert acc["eval"] == "mad" and acc["params"]["task"] == "compression"
    assert acc["params"]["setting"] == "compression/baseline" and acc["params"]["seq_len"] == 32
    scores = mad_scores(records)
    assert list(scores) == ["transformer-d32-l2"]
    assert scores["transformer-d32-l2"]["tasks"] == {"compression": acc["value"]}
    with pytest.raises(EvaluationsFailed, match="ValueError: .*MAD setting"):
        run_eval(eval_cfg(checkpoint(tmp_path, "text-run", {"attention": {"head_dim": 16}},
                                     258, {})[0], tasks=["mad"]))
