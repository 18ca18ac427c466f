"""The device a command runs on, from its `device` setting."""

from __future__ import annotations

import torch

from archbench.config import ConfigError


def pick_device(name: str, field: str) -> torch.device:
    """'auto' is the current CUDA device when there is one, else the CPU; naming CUDA where there
    is none is an error that names the setting (`field`), never a silent CPU run."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{field}={name!r} but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device
