"""The trainer: exact resume, checkpoints that survive a kill, clear errors, divergence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config
from safetensors.torch import load_file

from archbench.config import ConfigError, validate
from archbench.train import checkpoint as ckpt_mod
from archbench.train.checkpoint import CheckpointError, check_tokenizer, find_checkpoint, load_model
from archbench.train.tokenizer import train_bpe
from archbench.train.trainer import TrainingDiverged, run_training

TINY = ("size=micro", "data.max_bytes=300000", "data.val_fraction=0.1", "train.batch_size=4",
        "train.seq_len=64",
        "train.tokens=3072", "train.warmup_steps=2", "train.eval_every=6", "train.eval_batches=2",
        "train.log_every=2", "train.progress=false")


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(find_checkpoint(run_dir) / "model.safetensors"))


def test_training_writes_records_and_loss_falls(cache_env: Path, tmp_path: Path) -> None:
    summary = run_training(make_config(*TINY, "train.tokens=20000", "train.lr=3e-3"),
                           tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert summary["status"] == "finished" and summary["step"] == 79
    assert losses[-1] < losses[0] - 1.0  # from ~ln(258)=5.5 a tiny model learns byte statistics
    assert summary["provenance"]["git"]["commit"] and summary["kernel_paths"]["attention"]
    assert summary["param_counts"]["total"] == sum(v.numel() for k, v in _weights(
        tmp_path / "run").items())
    record = json.loads((tmp_path / "run" / "records.jsonl").read_text().splitlines()[-1])
    assert record["kind"] == "train" and record["val_bpb"] == summary["final"]["bpb"]


def test_resume_continues_exactly(cache_env: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    run_training(make_config(*TINY), straight)
    pieces = tmp_path / "pieces"
    run_training(make_config(*TINY, "train.max_steps=5", "train.ckpt_every=5"), pieces)
    assert json.loads((pieces / "checkpoints" / "latest.json").read_text())["step"] == 5
    run_training(make_config(*TINY, "train.resume=true"), pieces)
    a, b = _weights(straight), _weights(pieces)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(x)["step"] for x in (pieces / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == sorted(set(steps))  # no duplicated steps after the resume


def test_checkpoint_survives_a_kill_between_writes(cache_env: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    run_training(make_config(*TINY, "train.max_steps=4", "train.ckpt_every=4"), run)
    before = _weights(run)

    real_replace = os.replace

    def killed(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        if Path(dst).name.startswith("step_"):  # the new folder is complete but not yet visible
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run_training(make_config(*TINY, "train.resume=true", "train.max_steps=8",
                                 "train.ckpt_every=4"), run)
    monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)
    assert find_checkpoint(run).name == "step_0000004"
    after = _weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    model, _, state = load_model(run)
    assert state["step"] == 4 and model.param_counts()["total"] > 0


def test_a_killed_process_leaves_a_loadable_checkpoint(cache_env: Path, tmp_path: Path) -> None:
    """SIGKILL in the middle of a run: the latest checkpoint named is always whole."""
    run = tmp_path / "run"
    code = (
        "import sys; sys.argv=['archbench-train']; from archbench.cli import main; "
        f"main(['train', *{list(TINY)!r}, 'train.tokens=1e7', 'train.ckpt_every=1', "
        f"'out_dir={run}'])"
    )
    env = {**os.environ, "ARCHBENCH_CACHE": str(cache_env)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "checkpoints").glob("step_*")):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    found = find_checkpoint(run)
    assert found is not None
    model, _, state = load_model(run)
    assert state["step"] >= 1 and not (run / "summary.json").exists()


def test_config_errors_name_the_key() -> None:
    cases = {
        "train.lr=-1": "train.lr",
        "arch.norm=batchnorm": "arch.norm",
        "arch.d_model=100": "arch.d_model=100 is not divisible by arch.attention.head_dim=64",
        "arch.pattern.mixers=[attention,lstm]": "arch.pattern.mixers",
        "train.schedule=linear": "train.schedule",
        "generate.top_p=1.5": "generate.top_p",
        "tokenizer.kind=word": "tokenizer.kind",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
            validate(make_config(override))
    with pytest.raises(Exception, match="lrr"):
        make_config("train.lrr=1")
    with pytest.raises(Exception, match="Could not find 'arch/lstm'"):
        make_config("arch=lstm")


def test_cli_reports_config_errors_before_work(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("archbench")
    out = subprocess.run([str(exe), "train", "train.batch_size=0"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "train.batch_size=0 is not allowed" in out.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(cache_env: Path,
                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_training(make_config(*TINY, "train.max_steps=3", "train.ckpt_every=3"), run)
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        run_training(make_config(*TINY, "train.resume=true", "train.lr=1e30",
                                 "train.grad_clip=0", "train.warmup_steps=0",
                                 "train.ckpt_every=1000"), run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert find_checkpoint(run).name == "step_0000003"


def test_checkpoint_refuses_another_tokenizer(cache_env: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_training(make_config(*TINY, "train.max_steps=1"), run)
    other = train_bpe(["some text to learn from " * 10], 270)
    with pytest.raises(CheckpointError, match="trained with tokenizer"):
        check_tokenizer(find_checkpoint(run), other)


def test_checkpoint_files_hold_no_pickle(cache_env: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_training(make_config(*TINY, "train.max_steps=2"), run)
    names = sorted(p.name for p in find_checkpoint(run).iterdir())
    assert names == ["manifest.json", "model.safetensors", "optimizer.safetensors", "state.json",
                     "tokenizer.json"]
