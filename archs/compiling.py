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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

CACHE_BUCKET = 256  # decoding caches are allocated in multiples of this many positions


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
