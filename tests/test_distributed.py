"""Data parallelism on CPU (gloo, 2 processes under torchrun): N ranks x batch b trains exactly as
1 rank x batch N*b, under DDP and FSDP2, and checkpoints move between world sizes.

Tolerance: the same global batch reduced in another order differs by float32 rounding only;
measured here about 1e-7 relative on the loss. Asserted: losses and gradient norms to rtol 1e-5,
final weights to atol 1e-5 after 6 AdamW steps.

Run as a script (`torchrun ... tests/test_distributed.py JOBS`), this file is the worker that runs
several trainings in one launch, one process group after another: a launch costs seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config, run_killable
from safetensors.torch import load_file

from archbench.train import distributed as dist_utils
from archbench.train.checkpoint import find_checkpoint
from archbench.train.trainer import run_training

BATCH = 8  # the global batch: 1 rank x 8, or 2 ranks x 4 (each as 2 micro-batches of 2)
TINY = ("data.max_bytes=300000", "data.val_fraction=0.1", "arch.d_model=32", "arch.n_layers=2",
        "arch.attention.head_dim=16", f"train.batch_size={BATCH}", "train.seq_len=16",
        "train.warmup_steps=0", "train.lr=3e-3", "train.log_every=1", "train.eval_every=1000",
        "train.eval_batches=2", "train.progress=false", "train.device=cpu")
HALF, FULL = 3, 6  # steps saved by one world size, then resumed by another
BIN = Path(sys.executable).parent


def _losses(run_dir: Path) -> dict[int, dict[str, float]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(find_checkpoint(run_dir) / "model.safetensors"))


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "ARCHBENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def _torchrun(args: list[str], cwd: Path, cache: Path) -> None:
    """torchrun in its own session, so that a hang kills its workers too."""
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *args]
    proc = run_killable(cmd, cwd, _env(cache))
    stdout, stderr = proc.stdout, proc.stderr
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]


def _same_training(run: Path, ref: Path, steps: range) -> None:
    got, want = _losses(run), _losses(ref)
    for step in steps:
        for key in ("loss", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (run, step, key)


def _same_weights(run: Path, ref: Path) -> None:
    a, b = _weights(run), _weights(ref)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every training of this file, in three launches of two ranks plus in-process runs."""
    root = tmp_path_factory.mktemp("dist")
    cache = root / "cache"
    saved_env = os.environ.get("ARCHBENCH_CACHE")
    os.environ["ARCHBENCH_CACHE"] = str(cache)
    try:
        out = {name: root / name for name in (
            "reference", "half", "fsdp_cli", "ddp", "fsdp_from_1", "ddp_from_1")}
        # One rank, batch 8: the reference, straight through, and the first half alone.
        run_training(make_config(*TINY, f"train.max_steps={FULL}"), out["reference"])
        run_training(make_config(*TINY, f"train.max_steps={HALF}"), out["half"])
        for name in ("fsdp_from_1", "ddp_from_1"):
            shutil.copytree(out["half"], out[name])
        # Two ranks through the real command line: FSDP2, gradient accumulation, activation
        # checkpointing and a tracker (that only rank 0 may write).
        _torchrun(["--no-python", str(BIN / "archbench"), "train", *TINY,
                   "train.distributed=fsdp", "train.grad_accum=2",
                   "train.activation_checkpointing=true", "logger=tensorboard",
                   f"train.max_steps={HALF}", f"out_dir={out['fsdp_cli']}"], root, cache)
        # Two ranks, several trainings in one launch: a fresh DDP run, and the 1-rank checkpoint
        # resumed under FSDP2 (broadcast + shard) and under DDP (broadcast).
        jobs = [
            [[*TINY, "train.distributed=ddp", "train.grad_accum=2", f"train.max_steps={HALF}"],
             str(out["ddp"])],
            [[*TINY, "train.distributed=fsdp", "train.resume=true", f"train.max_steps={FULL}"],
             str(out["fsdp_from_1"])],
            [[*TINY, "train.distributed=ddp", "train.resume=true", f"train.max_steps={FULL}"],
             str(out["ddp_from_1"])],
        ]
        _torchrun([__file__, json.dumps(jobs)], root, cache)
        # One rank resumes what two ranks saved.
        for name in ("fsdp_cli", "ddp"):
            shutil.copytree(out[name], root / f"{name}_to_1")
            run_training(make_config(*TINY, "train.resume=true", f"train.max_steps={FULL}"),
                         root / f"{name}_to_1")
            out[f"{name}_to_1"] = root / f"{name}_to_1"
        return out
    finally:
        if saved_env is None:
            os.environ.pop("ARCHBENCH_CACHE", None)
        else:
            os.environ["ARCHBENCH_CACHE"] = saved_env


@pytest.mark.parametrize("name", ["fsdp_cli", "ddp"])
def test_two_ranks_train_as_one_rank_with_twice_the_batch(runs: dict[str, Path],
                                                         name: str) -> None:
    _same_training(runs[name], runs["reference"], range(1, HALF + 1))
    summary = json.loads((runs[name] / "summary.json").read_text())
    one_rank = json.loads((runs["half"] / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["tokens_seen"] == HALF * BATCH * 16
    assert summary["final"]["loss"] == pytest.approx(one_rank["final"]["loss"], rel=1e-5)


def test_only_rank_zero_writes(runs: dict[str, Path]) -> None:
    run = runs["fsdp_cli"]
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, HALF + 1))
    records = (run / "records.jsonl").read_text().splitlines()
    assert [json.loads(r)["kind"] for r in records] == ["train"]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("saved_by_two", ["fsdp_cli", "ddp"])
def test_saved_on_two_ranks_resumes_on_one(runs: dict[str, Path], saved_by_two: str) -> None:
    run = runs[f"{saved_by_two}_to_1"]
    _same_training(run, runs["reference"], range(1, FULL + 1))
    _same_weights(run, runs["reference"])


@pytest.mark.parametrize("name", ["fsdp_from_1", "ddp_from_1"])
def test_saved_on_one_rank_resumes_on_two(runs: dict[str, Path], name: str) -> None:
    _same_training(runs[name], runs["reference"], range(1, FULL + 1))
    _same_weights(runs[name], runs["reference"])


def test_fsdp_checkpoint_is_the_full_single_process_layout(runs: dict[str, Path]) -> None:
    """Gathered from shards, with the tied head stored once, as a one-process run stores it."""
    sharded, plain = _weights(runs["fsdp_cli"]), _weights(runs["half"])
    assert sharded.keys() == plain.keys() and "lm_head.weight" not in sharded
    assert all(sharded[k].shape == plain[k].shape for k in plain)
    opt_sharded = load_file(str(find_checkpoint(runs["fsdp_cli"]) / "optimizer.safetensors"))
    opt_plain = load_file(str(find_checkpoint(runs["half"]) / "optimizer.safetensors"))
    assert opt_sharded.keys() == opt_plain.keys()
    for key in opt_plain:
        torch.testing.assert_close(opt_sharded[key], opt_plain[key], rtol=1e-4, atol=1e-7)


def test_launch_errors_are_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="needs a torchrun launch"):
        dist_utils.setup("ddp")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="train.distributed='none'"):
        dist_utils.setup("none")


def test_a_slurm_task_is_a_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a submitit Slurm job with several tasks, each task reads its rank from Slurm."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(var, "")  # registers the variable, so teardown removes what the
        monkeypatch.delenv(var)  # export below writes into os.environ
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "42", "SLURM_PROCID": "3",
             "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    dist_utils._export_submitit_env()
    got = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    assert got == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07"}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"  # each rank picks its GPU by LOCAL_RANK


def _worker(jobs: list[tuple[list[str], str]]) -> None:
    """Several trainings in one process group: gloo is not reliably re-initialised in the same
    processes (a rank can connect to the previous group's address), so the group is kept."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    teardown = dist_utils.teardown
    dist_utils.teardown = lambda ctx: dist.barrier() if ctx.active else None
    for overrides, run_dir in jobs:
        run_training(make_config(*overrides), run_dir)
    teardown(dist_utils.DistContext(active=True))


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
