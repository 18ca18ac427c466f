"""Sweeps beyond one process: the joblib launcher runs jobs in parallel, a re-run skips finished
runs, a failed job is recorded with its error while the others finish, and the Slurm and local
submitit launchers take their resource settings from conf/hydra/launcher/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_config, run_killable
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from archbench.config import register_schema
from archbench.train.resume import is_finished as _finished

EXE = Path(sys.executable).with_name("archbench")
TINY = ("data.max_bytes=300000", "data.val_fraction=0.1", "arch.d_model=32", "arch.n_layers=2",
        "arch.attention.head_dim=16", "train.batch_size=4", "train.seq_len=16",
        "train.max_steps=2", "train.eval_batches=1", "train.progress=false", "train.device=cpu")


def _sweep(sweep_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    # Job directories named by job number: the default (every override in the name) exceeds the
    # 255-byte file-name limit with this many overrides.
    cmd = [str(EXE), "train", "-m", f"hydra.sweep.dir={sweep_dir}",
           "hydra.sweep.subdir=${hydra.job.num}", *TINY, *overrides]
    env = {**os.environ, "ARCHBENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return run_killable(cmd, sweep_dir.parent, env)


def _summary(job_dir: Path) -> dict:
    return json.loads((job_dir / "summary.json").read_text())


def _records(job_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (job_dir / "records.jsonl").read_text().splitlines()]


def test_joblib_sweep_runs_in_parallel_and_a_rerun_skips_finished(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    first = _sweep(sweep, tmp_path / "cache", "hydra/launcher=joblib", "train.seed=0,1")
    assert first.returncode == 0, first.stderr[-4000:]
    assert "Joblib.Parallel(n_jobs=2" in first.stdout + first.stderr
    jobs = [sweep / "0", sweep / "1"]
    summaries = [_summary(j) for j in jobs]
    assert [s["status"] for s in summaries] == ["finished", "finished"]
    assert [s["seed"] for s in summaries] == [0, 1]
    before = [(j / "summary.json").read_bytes() for j in jobs]

    again = _sweep(sweep, tmp_path / "cache", "hydra/launcher=joblib", "train.seed=0,1")
    assert again.returncode == 0, again.stderr[-4000:]
    assert (again.stdout + again.stderr).count("already finished") == 2
    assert [(j / "summary.json").read_bytes() for j in jobs] == before  # not trained again
    assert all(len(_records(j)) == 1 for j in jobs)


def test_a_failed_job_is_recorded_and_the_others_finish(tmp_path: Path) -> None:
    """Four jobs in order (the basic launcher runs them one after another): job 0 fails inside
    the training loop (learned positions shorter than the context), jobs 1 and 3 fail their
    config check, job 2 trains after those failures. The sweep exits non-zero at the end."""
    sweep = tmp_path / "sweep"
    out = _sweep(sweep, tmp_path / "cache", "arch.attention.position=learned",
                 "arch.attention.max_position=8,2048", "arch.attention.n_kv_heads=1,3")
    assert out.returncode != 0  # Hydra reports the first failure after running every job
    statuses = [_summary(sweep / str(i))["status"] for i in range(4)]
    assert statuses == ["failed", "failed", "finished", "failed"]

    in_loop = sweep / "0"  # max_position=8, n_kv_heads=1: fails at the first forward
    summary = _summary(in_loop)
    assert summary["status"] == "failed" and "max_position=8" in summary["error"]
    assert summary["error"].startswith("ValueError") and summary["step"] == 0
    record = _records(in_loop)[-1]
    assert record["kind"] == "train" and record["status"] == "failed"
    assert record["error"] == summary["error"]

    config_error = sweep / "1"  # n_kv_heads=3 does not divide the 2 heads
    summary = _summary(config_error)
    assert summary["status"] == "failed" and summary["error"].startswith("ConfigError")
    record = _records(config_error)[-1]
    assert "n_kv_heads=3" in record["error"] and record["status"] == "failed"
    assert record["arch"] == "transformer" and record["kind"] == "train"

    finished = sweep / "2"  # max_position=2048, n_kv_heads=1: trains after the failures
    assert _summary(finished)["status"] == "finished"
    assert _summary(finished)["final"]["loss"] > 0


def test_finished_means_nothing_left_to_train() -> None:
    cfg = make_config("train.resume=true")
    done = {"status": "finished", "step": 100, "total_steps": 100}
    assert _finished(done, cfg)
    assert not _finished({**done, "status": "failed"}, cfg)
    assert not _finished({**done, "status": "diverged"}, make_config())
    stopped_early = {"status": "finished", "step": 50, "total_steps": 100}
    assert _finished(stopped_early, make_config())  # no resume: finished is finished
    assert not _finished(stopped_early, cfg)  # resume continues it to the end of its schedule
    assert _finished(stopped_early, make_config("train.resume=true", "train.max_steps=50"))


def _launcher(*overrides: str):
    register_schema()
    with initialize_config_module(config_module="archbench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    cfg.hydra.sweep.dir = "/tmp/sweep"
    cfg.hydra.job.name = "train"
    return cfg.hydra.launcher


@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema:UserWarning")
def test_slurm_launcher_resources_reach_sbatch(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key of conf/hydra/launcher/submitit_slurm.yaml is one the launcher and submitit
    accept (a typo would fail here), and the resources land in the sbatch script."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    # No Slurm here: only the check for `srun` is bypassed, the script is written as on a cluster.
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))

    node = _launcher("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                     "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4")
    launcher = instantiate(node)
    params = dict(launcher.params)
    assert params["partition"] == "gpu" and params["timeout_min"] == 240
    # What SlurmLauncher.launch does with them, short of calling sbatch.
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path,
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes",
            "name", "stderr_to_stdout"}
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v
                                  for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -c pass", "0")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --time=240", "#SBATCH --mem=64GB",
                 "#SBATCH --cpus-per-task=8"):
        assert line in script, line


@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema:UserWarning")
def test_local_launchers_compose_with_their_settings() -> None:
    joblib = instantiate(_launcher("hydra/launcher=joblib", "hydra.launcher.n_jobs=3"))
    assert joblib.joblib["n_jobs"] == 3 and joblib.joblib["prefer"] == "processes"
    local = instantiate(_launcher("hydra/launcher=submitit_local",
                                  "hydra.launcher.tasks_per_node=2"))
    assert local.params["tasks_per_node"] == 2 and local.params["timeout_min"] == 60


@pytest.mark.slow
def test_submitit_tasks_train_as_ranks(tmp_path: Path, cache_env: Path) -> None:
    """The cluster path end to end, with submitit's local executor standing in for Slurm: one job
    of two tasks with train.distributed=ddp is one 2-rank run (each task reads its rank from
    submitit's environment), equal to a single process with the same global batch."""
    from archbench.train.trainer import run_training

    sweep = tmp_path / "sweep"
    out = _sweep(sweep, cache_env, "hydra/launcher=submitit_local",
                 "hydra.launcher.tasks_per_node=2", "train.distributed=ddp", "train.batch_size=8",
                 "train.grad_accum=2", "train.log_every=1", "train.seed=0")
    assert out.returncode == 0, out.stderr[-4000:]
    logs = sorted(p.name for p in (sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # two tasks
    run_training(make_config(*TINY, "train.batch_size=8", "train.log_every=1"), tmp_path / "one")

    def losses(run: Path) -> list[float]:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in lines if "loss" in r]

    assert len(losses(sweep / "0")) == 2  # rank 0 alone wrote the metrics
    assert losses(sweep / "0") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
