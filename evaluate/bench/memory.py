"""Peak memory of one measurement: allocated bytes on CUDA, resident set on CPU.

CUDA: the caching allocator's peak of allocated bytes since `reset` (reserved bytes too).
CPU: the kernel's high-water mark of the resident set (VmHWM), reset by writing 5 to
/proc/self/clear_refs (Linux >= 4.0), so that a measurement in a long-lived process is not
charged for an earlier one; where that file cannot be written, ru_maxrss (peak since the process
started) is reported and said so. Either way the baseline (allocated bytes, or RSS of the process
with torch imported) at `reset` is reported next to the peak: peak - baseline is what the
measurement itself added.

An RSS budget for CPU runs is enforced with RLIMIT_DATA on the measuring process: an allocation
past it fails inside torch's allocator, which the runner records as an out-of-memory result.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch


def _proc_status(key: str) -> int | None:
    """A `Vm*` line of /proc/self/status, in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo: what can be allocated without swapping."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """reset() before the measurement (model construction included), read() after it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline: int | None = None
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_hwm"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "ru_maxrss"  # no reset possible: peak since the process started
        self.baseline = _proc_status("VmRSS")

    def read(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peak_kind": self.kind, "baseline_bytes": self.baseline}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            out["peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        elif self.kind == "rss_hwm":
            out["peak_bytes"] = _proc_status("VmHWM")
        else:
            out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return out


def limit_data(budget_bytes: int) -> str:
    """Let this process allocate at most `budget_bytes` more data memory (RLIMIT_DATA)."""
    current = _proc_status("VmData")
    if current is None:
        return "rss budget not enforced: /proc/self/status is unreadable"
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = current + int(budget_bytes)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return f"data memory capped at {budget_bytes / 2**30:.2f} GiB above the start (RLIMIT_DATA)"
