"""Where a number came from: code version, library versions, device, command (every record)."""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from archbench.device import cpu_name

_OPTIONAL = ("mamba-ssm", "causal-conv1d", "flash-linear-attention", "transformers", "lm-eval",
             "hydra-core", "triton", "einops", "tokenizers", "safetensors")


@lru_cache(maxsize=1)
def _local_prefixes() -> tuple[tuple[str, str], ...]:
    """(prefix, replacement) pairs, longest first: the checkout and the installed libraries."""
    import sysconfig

    root = str(Path(__file__).resolve().parents[1]) + "/"
    libs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    pairs = [(root, ""), *((str(Path(lib)) + "/", "site-packages/") for lib in libs)]
    return tuple(sorted(pairs, key=lambda p: -len(p[0])))


def portable_paths(text: str) -> str:
    """Error text as a reader of a committed record can use it: file paths relative to the
    checkout (`archs/mlp.py`) or to the installed libraries (`site-packages/torch/...`), not to
    the machine that happened to run it."""
    for prefix, replacement in _local_prefixes():
        text = text.replace(prefix, replacement)
    return text


@lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"commit": commit or "unknown", "dirty": dirty}


@lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda}
    for name in ("archbench", *_OPTIONAL):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info(device: torch.device | str | None = None) -> dict[str, Any]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info: dict[str, Any] = {"type": device.type, "host": socket.gethostname(),
                            "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}")
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip()
            info["driver"] = out.splitlines()[0] if out else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["name"] = cpu_name()
    return info


def provenance(device: torch.device | str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "git": git_state(),
        "versions": versions(),
        "device": device_info(device),
        "command": " ".join(sys.argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
