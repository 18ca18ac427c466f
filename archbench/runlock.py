"""One writer per run folder: an OS file lock that the kernel drops when its process dies.

Two trainings in one folder interleave `metrics.jsonl`, delete each other's lines on resume and
overwrite each other's checkpoints, all while both exit 0. `flock` on `<run dir>/.archbench.lock`
makes the second one stop before it touches anything. A PID file alone would outlive a killed
process (and make the next resume fail for nothing); a lock held by a file descriptor cannot,
because the kernel releases it with the process, whatever ended it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".archbench.lock"


class RunFolderLocked(RuntimeError):
    """Another live process is writing this run folder."""

    one_line = True  # the message names the folder, the holder and what to do


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return text or "unknown"


@contextmanager
def run_folder_lock(run_dir: str | Path, command: str = "train") -> Iterator[Path]:
    """Hold the run folder's lock for the block; raise RunFolderLocked naming the folder and the
    process that holds it. The lock file stays (removing it would let a third process lock a new
    file while the second still holds the old one); its text says who held it last."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderLocked(
                f"{run_dir} is being written by another process ({_holder(lock_path)}); wait "
                "for it to end, or choose another folder (hydra.run.dir= or out_dir=)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, archbench {command}, "
                     f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        yield lock_path
    finally:
        os.close(fd)  # releases the lock (also released by the kernel if the process dies)
