"""Checkpoints under faults: truncation, garbage, a lost latest.json, kills mid-write, a full disk.

Each test first breaks a checkpoint the way the fault would, then checks that discovery takes the
newest intact one and names what it skipped in one line, and that nothing is left behind.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archbench.train import checkpoint as ckpt_mod
from archbench.train.checkpoint import (
    CheckpointError,
    checkpoint_problem,
    find_checkpoint,
    restore_training,
    save_checkpoint,
)
from archbench.train.tokenizer import ByteTokenizer


def _save_steps(run: Path, steps: list[int], width: int = 8) -> torch.nn.Module:
    model = torch.nn.Linear(width, width)
    for step in steps:
        with torch.no_grad():
            model.weight.fill_(float(step))
        save_checkpoint(run, step, model, None, ByteTokenizer(), {"note": "test"})
    return model


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_manifest_records_size_and_checksum_of_every_file(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1])
    folder = tmp_path / "checkpoints" / "step_0000001"
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    assert sorted(manifest) == on_disk
    assert all(manifest[n]["bytes"] == (folder / n).stat().st_size for n in on_disk)
    assert checkpoint_problem(folder) is None


def test_truncated_weights_fall_back_to_the_previous_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save_steps(tmp_path, [1, 2])
    weights = tmp_path / "checkpoints" / "step_0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    found = find_checkpoint(tmp_path)
    assert found is not None and found.name == "step_0000001"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(weights) in err[0] and "truncated" in err[0]
    model = torch.nn.Linear(8, 8)
    restore_training(found, model, None)
    assert float(model.weight.detach()[0, 0]) == 1.0


def test_garbage_latest_json_uses_the_newest_intact_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "latest.json").write_text("{not json")
    assert find_checkpoint(tmp_path).name == "step_0000002"
    assert "latest.json is not valid JSON" in capsys.readouterr().err


def test_missing_latest_json_uses_the_newest_intact_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "latest.json").unlink()
    assert find_checkpoint(tmp_path).name == "step_0000002"
    assert "latest.json is missing" in capsys.readouterr().err


def test_altered_state_json_of_the_same_size_is_caught_by_its_checksum(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save_steps(tmp_path, [1, 2])
    state = tmp_path / "checkpoints" / "step_0000002" / "state.json"
    text = state.read_text()
    state.write_text(text.replace('"step": 2', '"step": 9'))
    assert state.stat().st_size == len(text)
    assert find_checkpoint(tmp_path).name == "step_0000001"
    assert "does not match the checksum" in capsys.readouterr().err


def test_no_intact_checkpoint_is_an_error_naming_each_file(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        (tmp_path / "checkpoints" / f"step_000000{step}" / "state.json").write_text("garbage")
    with pytest.raises(CheckpointError, match="no intact checkpoint") as info:
        find_checkpoint(tmp_path)
    assert "step_0000001/state.json" in str(info.value)
    assert "step_0000002/state.json" in str(info.value)


def test_a_failed_write_leaves_no_temporary_folder(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = _save_steps(tmp_path, [1])

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_mod, "save_file", disk_full)
    for _ in range(3):  # one temporary folder per retry used to pile up
        with pytest.raises(CheckpointError, match="disk full"):
            save_checkpoint(tmp_path, 2, model, None, ByteTokenizer(), {})
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step_0000001"]
    assert find_checkpoint(tmp_path).name == "step_0000001"


FILE_SIZE_LIMIT = """
import resource, signal, sys, torch
from archbench.train.checkpoint import CheckpointError, save_checkpoint
from archbench.train.tokenizer import ByteTokenizer
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
save_checkpoint(sys.argv[1], 1, torch.nn.Linear(8, 8), None, ByteTokenizer(), {})
try:
    save_checkpoint(sys.argv[1], 2, torch.nn.Linear(512, 512), None, ByteTokenizer(), {})
except CheckpointError as exc:
    print(exc)
    sys.exit(3)
"""


def test_a_file_size_limit_mid_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    assert "could not write checkpoint step_0000002" in out.stdout
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step_0000001"]
    assert find_checkpoint(tmp_path).name == "step_0000001"


KILLED_MID_WRITE = """
import sys, time, torch
from archbench.train.checkpoint import save_checkpoint
from archbench.train.tokenizer import ByteTokenizer
class Stuck(ByteTokenizer):
    def save(self, path):
        print("writing", flush=True)
        time.sleep(120)
save_checkpoint(sys.argv[1], 1, torch.nn.Linear(8, 8), None, Stuck(), {})
"""


def test_a_kill_mid_write_leaves_a_temp_folder_the_next_start_removes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    root = tmp_path / "checkpoints"
    stale = root / f".step_0000001.tmp{proc.pid}"
    assert stale.is_dir() and (stale / "model.safetensors").is_file()
    assert find_checkpoint(tmp_path) is None  # a temporary folder is never taken for a checkpoint
    live = root / f".step_0000007.tmp{os.getppid()}"  # a writer that is still running
    live.mkdir()
    _save_steps(tmp_path, [1])
    assert not stale.exists() and live.is_dir()
    assert f"removed {stale}" in capsys.readouterr().err


def test_stale_temp_of_a_dead_pid_is_removed_and_named(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    stale = root / f".step_0000003.tmp{_dead_pid()}"
    stale.mkdir(parents=True)
    (root / f".latest.json.tmp{_dead_pid()}").write_text("{")
    removed = ckpt_mod.remove_stale_temp(root)
    assert len(removed) == 2 and not any(p.exists() for p in removed)


def test_legacy_folder_without_manifest_is_still_read(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1])
    (tmp_path / "checkpoints" / "step_0000001" / "manifest.json").unlink()
    assert find_checkpoint(tmp_path).name == "step_0000001"


def test_atomic_write_that_fails_leaves_no_temporary_file(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from archbench import io

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    (tmp_path / "a.json").write_text("{}\n")
    monkeypatch.setattr(io.os, "fsync", disk_full)
    with pytest.raises(OSError):
        io.write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert (tmp_path / "a.json").read_text() == "{}\n"
