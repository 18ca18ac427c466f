"""Resume, skip and refusal of a run folder that already holds a run (train/resume.py).

One tiny run is trained once for the module; each test copies it and then does what a user did:
resume with another tokenizer or learning rate, re-run with another backbone, lose latest.json,
start twice, corrupt every checkpoint. Nothing may be trained into a folder that holds another
run, and a refused start may not touch the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_config, run_killable

from archbench.train.checkpoint import CheckpointError, find_checkpoint, load_model
from archbench.train.resume import RunFolderConflict, plan_start
from archbench.train.tokenizer import train_bpe
from archbench.train.trainer import run_training

TINY = ("size=micro", "data.max_bytes=300000", "data.val_fraction=0.1", "train.batch_size=4",
        "train.seq_len=64", "train.tokens=3072", "train.warmup_steps=2", "train.eval_every=2",
        "train.eval_batches=2", "train.log_every=2", "train.progress=false")
ARCHBENCH = str(Path(sys.executable).with_name("archbench"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(a run stopped at step 4 of 12 with checkpoints at 2 and 4, the token cache)."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARCHBENCH_CACHE", str(root / "cache"))
        run_training(make_config(*TINY, "train.max_steps=4", "train.ckpt_every=2"), root / "run")
        yield root / "run", root / "cache"


@pytest.fixture
def run(trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ARCHBENCH_CACHE", str(trained[1]))
    shutil.copytree(trained[0], tmp_path / "run")
    return tmp_path / "run"


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _plan(run: Path, *overrides: str) -> object:
    return plan_start(make_config(*overrides), run, list(overrides))


def test_resume_with_another_tokenizer_is_refused_naming_both(run: Path) -> None:
    with pytest.raises(RunFolderConflict,
                       match="tokenizer.kind: the run has 'byte', this command 'file'"):
        _plan(run, "train.resume=true", "tokenizer=file", "tokenizer.path=other.json")


def test_resume_with_another_learning_rate_is_refused(run: Path) -> None:
    with pytest.raises(RunFolderConflict, match="train.lr: the run has 0.001, this command 0.003"):
        _plan(run, "train.resume=true", "train.lr=3e-3")


def test_resume_without_the_original_overrides_uses_the_stored_config(run: Path) -> None:
    plan = _plan(run, "train.resume=true", "train.max_steps=6", "train.progress=true")
    cfg = plan.cfg
    assert cfg.size.name == "micro" and cfg.train.seq_len == 64 and cfg.train.batch_size == 4
    assert cfg.train.max_steps == 6 and cfg.train.progress is True  # allowed changes applied
    assert "stored config" in plan.message


def test_a_finished_run_is_skipped_only_with_the_same_config(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert _plan(run, *TINY, "train.max_steps=4", "train.ckpt_every=2").cfg is None
    with pytest.raises(RunFolderConflict, match="arch.name: the run has 'transformer', this "
                                                "command 'mamba'"):
        _plan(run, *TINY, "arch=mamba")


def test_a_folder_with_checkpoints_is_not_restarted_from_step_0(run: Path) -> None:
    (run / "summary.json").unlink()  # killed: checkpoints, no summary
    with pytest.raises(RunFolderConflict, match="add train.resume=true"):
        _plan(run, *TINY)


def test_missing_latest_json_resumes_from_the_newest_step(run: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    (run / "summary.json").unlink()
    (run / "checkpoints" / "latest.json").unlink()
    before = (run / "metrics.jsonl").read_text()
    cfg = _plan(run, "train.resume=true", "train.max_steps=6").cfg
    summary = run_training(cfg, run)
    out = capsys.readouterr()
    assert "resumed from" in out.out and "step_0000004 at step 4" in out.out
    assert "latest.json is missing" in out.err
    assert summary["step"] == 6
    assert (run / "metrics.jsonl").read_text().startswith(before)  # the first 4 steps are kept


def test_resume_through_the_python_api_checks_the_tokenizer(run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    train_bpe(["some other text to learn from " * 20], 270).save(other)
    kept = _digests(run)
    with pytest.raises(CheckpointError, match="trained with tokenizer"):
        run_training(make_config(*TINY, "train.resume=true", "train.max_steps=6",
                                 "tokenizer=file", f"tokenizer.path={other}"), run)
    assert _digests(run) == kept  # a refused resume leaves the folder as it was


def test_corrupt_checkpoints_fall_back_in_eval_and_fail_in_one_line(run: Path) -> None:
    newest = run / "checkpoints" / "step_0000004"
    (newest / "model.safetensors").write_bytes(b"\0" * 10)
    _, _, state = load_model(run)
    assert state["step"] == 2
    (run / "checkpoints" / "step_0000002" / "state.json").write_text("{garbage")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        find_checkpoint(run)
    out = subprocess.run([ARCHBENCH, "generate", f"ckpt={run}", "prompt=abc"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "step_0000004/model.safetensors is truncated" in out.stderr
    assert "step_0000002/state.json" in out.stderr


def _cli(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ARCHBENCH_CACHE": str(cache)}
    return run_killable([ARCHBENCH, "train", *args], cwd=cwd, env=env, timeout=300)


def test_readme_resume_command_keeps_the_original_record(trained: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    first = _cli([*TINY, "train.ckpt_every=2", "hydra.run.dir=runs/X"], tmp_path, trained[1])
    assert first.returncode == 0, first.stderr
    run = tmp_path / "runs" / "X"
    record = (run / ".hydra" / "overrides.yaml").read_text()
    shutil.rmtree(run / "checkpoints" / "step_0000012")  # as if killed after step 10
    (run / "checkpoints" / "latest.json").unlink()
    (run / "summary.json").unlink()
    refused = _cli(["hydra.run.dir=runs/X", "train.resume=true", "train.lr=3e-3"], tmp_path,
                   trained[1])
    assert refused.returncode == 2 and "train.lr: the run has 0.001" in refused.stderr
    assert not (run / "summary.json").exists()  # a refused start writes nothing
    resumed = _cli(["hydra.run.dir=runs/X", "train.resume=true"], tmp_path, trained[1])
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 12  # the stored budget
    assert "resumed from" in resumed.stdout and "at step 10" in resumed.stdout
    assert summary["config"]["size"]["name"] == "micro"
    assert (run / ".hydra" / "overrides.yaml").read_text() == record
    assert len(list((run / ".hydra" / "starts").iterdir())) == 2


def test_a_second_training_into_the_same_folder_is_refused(trained: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    env = {**os.environ, "ARCHBENCH_CACHE": str(trained[1])}
    args = [ARCHBENCH, "train", *TINY, "train.tokens=1e8", "hydra.run.dir=runs/X"]
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "runs" / "X" / "metrics.jsonl").exists():
            time.sleep(0.2)
        second = _cli([*TINY, "hydra.run.dir=runs/X"], tmp_path, trained[1])
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"is being written by another process (pid {first.pid}" in second.stderr
