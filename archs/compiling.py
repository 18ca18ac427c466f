"""torch.compile policy for training and decoding, and the graph-break check the tests and the
benchmark share.

Shapes are static (`dynamic=False`) everywhere, by choice:
- decoding: the position is a tensor (`ModelCache.position`) and every cache buffer is
  preallocated, so one graph serves every position of a cache; a new graph is compiled only for
  another (batch, cache length, dtype). Generation rounds its cache length up to a multiple of
  `CACHE_BUCKET`, so prompts of different lengths share one graph.
- training: the step sees one (batch, seq_len); a validation or scoring call at another length
  compiles one more graph, once (kept in dynamo's cache, reused when that length comes back).
  Marking the length dynamic would not help the recurrent mixers: their chunked scans loop over
  the length in Python, which dynamo specialises anyway.

Modes: "reduce-overhead" on CUDA (CUDA graphs: the decode step is replayed, not relaunched op by
op), inductor's "default" elsewhere ("reduce-overhead" has no effect on CPU).

Decoding on CPU is compiled with frozen weights and autotuned GEMMs (`AUTOTUNED_GEMMS`):
inductor folds every computation of the weights alone into constants (Mamba's -exp(A_log) is a
constant in inductor's output code) and picks each projection's GEMM by timing its C++ GEMM
template, packed for the frozen weight, against aten's at compile time. A decode step
multiplies a handful of rows by each weight, where MKL's GEMM is slow on the AMD EPYC this
project is measured on: a tiny Transformer's batch-8 step reads its weights at ~14 GB/s from a
cache that serves 86. Measured in one process, alternating, tiny models: the Transformer step
1.27x faster at batch 8 and 1.9x at batch 1, Mamba-1 1.5x / 3.1x, Mamba-2 1.2x at batch 8; the
autotuning about doubles compile time. Frozen weights are constants of the graph:
`LanguageModel.compile_decoding` records the weights it froze and compiles again when a cache
is first decoded after they changed. CUDA decoding is not frozen (untested there: this
project's CI has no GPU).
"""

from __future__ import annotations

import contextlib
import itertools
import types
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

CACHE_BUCKET = 256  # decoding caches are allocated in multiples of this many positions

# inductor options of the CPU decode step (see the module doc). "CPP,ATEN": each GEMM takes the
# faster of inductor's C++ template and aten's, timed at compile time on this machine (seconds
# per GEMM shape: LanguageModel.compile_decoding(autotune_gemms=False) skips it).
AUTOTUNED_GEMMS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
FROZEN_DECODE = "frozen weights, GEMMs autotuned (inductor C++ template | aten)"


def compile_mode(device: torch.device | str) -> str:
    """The torch.compile mode for `device`: CUDA graphs on CUDA, inductor's default elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


def compile_module(module: Any, device: torch.device | str) -> Callable[..., Any]:
    """`module` compiled with static shapes for training or a full forward (see module doc).

    Training does not take CUDA graphs: its inputs change every step and the optimizer updates
    the weights between calls, which "reduce-overhead" would have to copy in; inductor's default
    mode is used on every device."""
    del device  # the same mode everywhere; kept for symmetry with compile_mode
    return torch.compile(module, dynamic=False)


def freezes_decoding(device: torch.device | str) -> bool:
    """Whether a compiled decode step on `device` has its weights frozen in by default."""
    return torch.device(device).type == "cpu"


def compile_decode_step(method: Callable[..., Any], device: torch.device | str,
                        frozen: bool, autotune_gemms: bool = True) -> Callable[..., Any]:
    """The bound `method` compiled as a decode step (static shapes; see the module doc), from a
    copy of its code: dynamo keeps its graphs on the code object and a frozen graph is guarded on
    the weights' identity, not their values, so two models of one class, or one model before and
    after training, must not share a code object's graphs."""
    func = method.__func__  # type: ignore[attr-defined]
    code = func.__code__.replace(co_name=f"{func.__name__}_{next(_COPY_NUMBERS)}")
    copy = types.FunctionType(code, func.__globals__, code.co_name, func.__defaults__,
                              func.__closure__)
    bound = types.MethodType(copy, method.__self__)  # type: ignore[attr-defined]
    if frozen:
        options = {"freezing": True, **(AUTOTUNED_GEMMS if autotune_gemms else {})}
        return torch.compile(bound, dynamic=False, options=options)
    return torch.compile(bound, dynamic=False, mode=compile_mode(device))


def freezing(on: bool) -> AbstractContextManager[Any]:
    """Inductor's `freezing` flag set while a frozen step is traced: dynamo reads it when it
    meets the weights (they become constants of the graph, guarded by identity); passed only in
    torch.compile's options it reaches inductor alone, which then finds nothing to freeze."""
    return torch._inductor.config.patch(freezing=True) if on else contextlib.nullcontext()


_COPY_NUMBERS = itertools.count(1)  # names of compile_decode_step's code copies


def bucketed(length: int, bucket: int = CACHE_BUCKET) -> int:
    """`length` rounded up to a multiple of `bucket` (the cache length of a compiled decoder)."""
    return -(-int(length) // bucket) * bucket


def mark_cache_static(cache: Any) -> None:
    """Tell dynamo the cache's buffers keep their addresses (CUDA graphs then update them in
    place instead of copying them in and out at every replay)."""
    for pair in cache.states:
        for state in pair:
            for tensor in ([] if state is None else state.tensors()):
                torch._dynamo.mark_static_address(tensor)
    if cache.position is not None:
        torch._dynamo.mark_static_address(cache.position)


@dataclass
class GraphReport:
    """What dynamo made of one call: graphs, breaks and why (`torch._dynamo.explain`)."""

    graphs: int
    breaks: int
    reasons: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"graphs": self.graphs, "graph_breaks": self.breaks, "reasons": self.reasons}


def graph_report(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> GraphReport:
    """Trace `fn(*args, **kwargs)` with dynamo (no code generation: cheap) and count its graphs
    and graph breaks. Runs `fn` once; dynamo's caches are reset before and after."""
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(fn)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    reasons = [f"{r.reason} ({r.user_stack[-1] if r.user_stack else '?'})"[:300]
               for r in explained.break_reasons]
    return GraphReport(explained.graph_count, explained.graph_break_count, reasons)
