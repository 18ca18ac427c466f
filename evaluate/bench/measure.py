"""Timing that survives scrutiny: first call apart, warm-up, enough repeats, median and spread.

The first call of a step pays for lazy initialisation, allocator growth, kernel autotuning or
graph capture; it is timed alone and reported as `first_call_s`, never mixed into the median.
Then `warmup` untimed calls, then timed calls until both `repeats` and `min_seconds` are met;
capped by `max_repeats`, and for slow steps by `max_seconds` once at least 3 calls are timed (a
128K-token prefill need not run 10 times to have a median and a spread). On CUDA each timed
call is bracketed by CUDA events on the current stream (device time, launch gaps included), and
the first call by host time with a synchronisation on each side.

Also here: recognising an out-of-memory error (CUDA or CPU allocator), and saving / restoring a
decoding cache so that every decode repeat starts from the same prefilled state.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class Timing:
    first_call_s: float
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def spread(self) -> dict[str, float | int]:
        """Quartiles (IQR) and extremes of the timed repeats, in seconds."""
        ordered = sorted(self.times)
        if len(ordered) >= 2:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q1 = q3 = ordered[0]
        return {"q1": q1, "q3": q3, "iqr": q3 - q1, "min": ordered[0], "max": ordered[-1],
                "n": len(ordered)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(
    step: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    min_seconds: float,
    max_repeats: int = 1000,
    max_seconds: float = float("inf"),
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time `step` (with an untimed `setup` before every call, e.g. restoring a cache)."""
    def timed() -> float:
        return _timed(step, setup, device)

    if setup is not None:
        setup()
    synchronize(device)
    began = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - began
    for _ in range(warmup):
        timed()
    times: list[float] = []
    began = time.perf_counter()
    while True:
        times.append(timed())
        n, elapsed = len(times), time.perf_counter() - began
        if n >= max(max_repeats, 1):
            break
        if n >= repeats and elapsed >= min_seconds:
            break
        if n >= min(3, repeats) and elapsed >= max_seconds:
            break
    return Timing(first_call_s=first, times=times)


def time_pair(
    step_a: Callable[[], Any],
    step_b: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    min_seconds: float,
    max_repeats: int = 1000,
    max_seconds: float = float("inf"),
    setup_a: Callable[[], Any] | None = None,
    setup_b: Callable[[], Any] | None = None,
) -> tuple[Timing, Timing]:
    """Two steps timed call by call in alternation (a b, b a, a b, ...): pair i is adjacent in
    time, so a ratio per pair cancels load that drifts slower than one pair. The stop rules of
    `time_step` apply to the pairs."""
    runs = []
    for step, setup in ((step_a, setup_a), (step_b, setup_b)):
        if setup is not None:
            setup()
        synchronize(device)
        began = time.perf_counter()
        step()
        synchronize(device)
        runs.append(time.perf_counter() - began)
    first_a, first_b = runs
    a = Timing(first_a, [])
    b = Timing(first_b, [])
    for _ in range(warmup):
        _timed(step_a, setup_a, device)
        _timed(step_b, setup_b, device)
    began = time.perf_counter()
    while True:
        if len(a.times) % 2 == 0:
            a.times.append(_timed(step_a, setup_a, device))
            b.times.append(_timed(step_b, setup_b, device))
        else:
            b.times.append(_timed(step_b, setup_b, device))
            a.times.append(_timed(step_a, setup_a, device))
        n, elapsed = len(a.times), time.perf_counter() - began
        if n >= max(max_repeats, 1) or (n >= repeats and elapsed >= 2 * min_seconds):
            break
        if n >= min(3, repeats) and elapsed >= 2 * max_seconds:
            break
    return a, b


def _timed(step: Callable[[], Any], setup: Callable[[], Any] | None,
           device: torch.device) -> float:
    if setup is not None:
        setup()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    began = time.perf_counter()
    step()
    return time.perf_counter() - began


_CPU_OOM_MARKERS = ("can't allocate memory", "cannot allocate memory", "out of memory")


def is_oom(exc: BaseException) -> bool:
    """A CUDA OOM, a failed CPU allocation (e.g. under an RSS budget), or Python's MemoryError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _CPU_OOM_MARKERS)


# ---- decoding-cache snapshots ------------------------------------------------------------------


def snapshot_cache(cache: Any, tensors: bool = True,
                   to: torch.device | str | None = None) -> dict[str, Any]:
    """A copy of a ModelCache's scalars (position, per-layer lengths) and, with `tensors`, of
    every state tensor (placed on `to`, e.g. the host, so that a GPU cache is not doubled)."""
    states = []
    for pair in cache.states:
        saved = []
        for state in pair:
            if state is None:
                saved.append(None)
                continue
            values = {}
            for f in fields(state):
                value = getattr(state, f.name)
                if isinstance(value, torch.Tensor):
                    if tensors:
                        values[f.name] = value.detach().to(to or value.device, copy=True)
                else:
                    values[f.name] = copy.deepcopy(value)
            saved.append(values)
        states.append(saved)
    return {"states": states, "pos": cache.pos, "extra": _copy(cache.extra)}


def restore_cache(cache: Any, saved: dict[str, Any]) -> None:
    """Put a snapshot back. Tensors are copied into the existing buffers (their addresses do not
    change, which CUDA graph replay relies on); scalars are reassigned.

    A scalars-only snapshot resets the positions and leaves the tensors as they are: that is
    what timed decode repeats use. It costs no memory, and a decoding step costs the same
    whatever values the state holds: attention overwrites the positions it decodes before
    reading them, and a recurrent state is read and written whole at every step.
    """
    for pair, saved_pair in zip(cache.states, saved["states"], strict=True):
        for state, values in zip(pair, saved_pair, strict=True):
            if state is None:
                continue
            for name, value in values.items():
                current = getattr(state, name)
                if isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor) \
                        and current.shape == value.shape:
                    current.copy_(value)
                else:
                    setattr(state, name, _copy(value))
    cache.pos = saved["pos"]
    cache.extra = _copy(saved["extra"])


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return copy.deepcopy(value)
