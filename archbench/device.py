"""The device and precision a command runs with, from its `device` / `dtype` settings, and how
records name the hardware. One place, so training, evaluation and benchmarks agree."""

from __future__ import annotations

import platform

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


# Precision names of the config (train.dtype, bench.dtype, eval's checkpoint dtype) and the
# lm-eval model_args spellings of the same three.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def dtype_name(name: str, device: torch.device, field: str = "dtype") -> str:
    """The precision a run uses: 'auto' is bf16 on CUDA and fp32 elsewhere; the long spellings
    (lm-eval's model_args) map to the short names of the config."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    short = DTYPE_ALIASES.get(name, name)
    if short not in DTYPES:
        raise ConfigError(f"{field}={name!r} is not allowed; choose from "
                          f"{['auto', *DTYPES, *DTYPE_ALIASES]}")
    return short


def autocast_dtype(name: str, device: torch.device, field: str = "dtype"
                   ) -> torch.dtype | None:
    """The autocast dtype of precision `name`, or None for fp32: weights stay fp32 in training
    and evaluation, and only the matmuls run in the lower precision."""
    short = dtype_name(name, device, field)
    return None if short == "fp32" else DTYPES[short]


def cpu_name() -> str:
    """The processor as the platform names it (its architecture where it gives no name)."""
    return platform.processor() or platform.machine()


def gpu_name(device: torch.device) -> str | None:
    """The CUDA device's marketing name (what the peak-FLOP table matches), None off CUDA."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None
