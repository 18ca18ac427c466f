"""CUDA graphs for decoding: one captured graph per decoding position, checked against eager.

Our caches hold tensors updated in place, but attention's KVState keeps its length and the
ModelCache its position as Python ints: a graph captured at position p writes the KV of position
p and attends over p + 1 keys on every replay. So instead of one graph for all steps (which
would be exact only for purely recurrent backbones), one graph is captured per position
L .. L + G - 1, all in one memory pool, replayed in capture order. That is exact for every
backbone by construction, at the price of G captures (reported in `graph_capture_s`).

Exactness is not assumed: before any timing, the G graph replays are compared with G eager steps
from the same prefilled state (logits of every step and the final state). Any difference beyond
rounding, or any capture failure (e.g. a host sync inside the step), turns graphs off for that
measurement, with the reason in the record; the eager timing is then the one reported.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from archbench.evaluate.bench.measure import restore_cache, snapshot_cache


class GraphDecoder:
    """G captured decode steps for `model` with `cache` (already prefilled, snapshot `saved`)."""

    def __init__(self, model: Any, cache: Any, saved: dict[str, Any], steps: torch.Tensor,
                 warmup: int = 3) -> None:
        self.model, self.cache, self.saved, self.steps = model, cache, saved, steps
        self.static_token = steps[:, :1].clone()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.outputs: list[torch.Tensor] = []
        began = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside capture: lazy inits, workspaces
            for _ in range(max(warmup, 1)):
                restore_cache(cache, saved)
                for i in range(steps.shape[1]):
                    self.static_token.copy_(steps[:, i : i + 1])
                    model(self.static_token, cache)
        torch.cuda.current_stream().wait_stream(side)
        restore_cache(cache, saved)
        pool = torch.cuda.graph_pool_handle()
        for _ in range(steps.shape[1]):  # each capture advances the Python positions by one
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs.append(model(self.static_token, cache))
            self.graphs.append(graph)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - began

    def setup(self) -> None:
        restore_cache(self.cache, self.saved)

    def step(self) -> None:
        for i, graph in enumerate(self.graphs):
            self.static_token.copy_(self.steps[:, i : i + 1])
            graph.replay()

    def check(self, tolerance: float) -> tuple[bool, float, str]:
        """Replays against eager steps from the same state: (exact enough, max |diff|, detail)."""
        restore_cache(self.cache, self.saved)
        eager = []
        for i in range(self.steps.shape[1]):
            eager.append(self.model(self.steps[:, i : i + 1], self.cache).float().clone())
        eager_state = snapshot_cache(self.cache)
        self.setup()
        graph = []
        for i, g in enumerate(self.graphs):
            self.static_token.copy_(self.steps[:, i : i + 1])
            g.replay()
            graph.append(self.outputs[i].float().clone())
        torch.cuda.synchronize()
        graph_state = snapshot_cache(self.cache)
        diff = max(float((a - b).abs().max()) for a, b in zip(eager, graph, strict=True))
        scale = max(float(a.abs().max()) for a in eager)
        state_diff = _state_diff(eager_state, graph_state)
        ok = diff <= tolerance * max(scale, 1.0) and state_diff <= tolerance * max(scale, 1.0)
        detail = (f"graph vs eager over {len(graph)} steps: max |logit diff| {diff:.3g} "
                  f"(scale {scale:.3g}), max |state diff| {state_diff:.3g}")
        return ok, diff, detail


def _state_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    worst = 0.0
    for pair_a, pair_b in zip(a["states"], b["states"], strict=True):
        for sa, sb in zip(pair_a, pair_b, strict=True):
            if sa is None:
                continue
            for name, value in sa.items():
                if isinstance(value, torch.Tensor):
                    worst = max(worst, float((value.float() - sb[name].float()).abs().max()))
    return worst


def graph_decoder_or_reason(
    model: Any, cache: Any, saved: dict[str, Any], steps: torch.Tensor, tolerance: float,
    warmup: int,
) -> tuple[GraphDecoder | None, dict[str, Any]]:
    """A verified GraphDecoder, or None and why; the dict goes into the record."""
    try:
        decoder = GraphDecoder(model, cache, saved, steps, warmup)
        ok, _, detail = decoder.check(tolerance)
    except Exception as err:  # noqa: BLE001 - any capture failure means eager decoding
        restore_cache(cache, saved)
        torch.cuda.synchronize()
        return None, {"cuda_graphs": False,
                      "cuda_graphs_note": f"capture failed: {type(err).__name__}: {err}"[:400]}
    if not ok:
        return None, {"cuda_graphs": False, "cuda_graphs_note": f"not exact: {detail}"}
    return decoder, {"cuda_graphs": True, "cuda_graphs_note": detail,
                     "graph_capture_s": decoder.capture_s}

