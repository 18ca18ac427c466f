"""One writer per run folder: a second writer is refused by name, a dead one never blocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from archbench.runlock import RunFolderLocked, run_folder_lock

HOLD = """
import sys, time
from archbench.runlock import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_gets_an_error_naming_the_folder_and_the_holder(tmp_path: Path) -> None:
    with run_folder_lock(tmp_path / "run"):
        with pytest.raises(RunFolderLocked) as info:
            with run_folder_lock(tmp_path / "run"):
                pass
    assert str(tmp_path / "run") in str(info.value) and f"pid {os.getpid()}" in str(info.value)
    with run_folder_lock(tmp_path / "run"):  # released at the end of the block
        pass


def test_the_lock_dies_with_a_killed_process(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderLocked, match=f"pid {proc.pid}"):
            with run_folder_lock(tmp_path / "run"):
                pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with run_folder_lock(tmp_path / "run") as lock_path:
        assert f"pid {os.getpid()}" in lock_path.read_text()
