"""CUDA graphs for decoding: one captured graph per decoding position, checked against eager.

Our caches hold tensors updated in place, but attention's KVState keeps its length and the
ModelCache its position as Python ints: a graph captured at position p writes the KV of position
p and attends over p + 1 keys on every replay. So instead of one graph for all steps (which
would be exact only for purely recurrent backbones), one graph is captured per position
L .. L + G - 1, all in one memory pool, replayed in capture order. That is exact for every
backbone by construction, at the price of G captures (reported in `graph_capture_s`).

Exactness is not assumed: before any timing, the G graph replays are compared with G eager steps
from the same prefilled state (saved to host memory for this, so the GPU cache is not doubled):
the logits of every step, and checksums of the final state, must agree to rounding. A
mismatch, or any capture failure (e.g. a host synchronisation inside the step), turns graphs
off for that measurement, with the reason in the record; the eager timing is then the one
reported.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from archbench.evaluate.bench.measure import restore_cache, snapshot_cache


class GraphDecoder:
    """G captured decode steps of `model` on `cache`, prefilled; `positions` is its scalars-only
    snapshot (what every replay round starts from)."""

    def __init__(self, model: Any, cache: Any, positions: dict[str, Any], steps: torch.Tensor,
                 warmup: int = 3) -> None:
        self.model, self.cache, self.positions, self.steps = model, cache, positions, steps
        self.static_token = steps[:, :1].clone()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.outputs: list[torch.Tensor] = []
        self.prefilled = snapshot_cache(cache, to="cpu")  # for the exactness check only
        began = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside capture: lazy inits, workspaces
            for _ in range(max(warmup, 1)):
                restore_cache(cache, positions)
                for i in range(steps.shape[1]):
                    self.static_token.copy_(steps[:, i : i + 1])
                    model(self.static_token, cache)
        torch.cuda.current_stream().wait_stream(side)
        restore_cache(cache, positions)
        pool = torch.cuda.graph_pool_handle()
        for _ in range(steps.shape[1]):  # each capture advances the Python positions by one
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs.append(model(self.static_token, cache))
            self.graphs.append(graph)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - began

    def setup(self) -> None:
        restore_cache(self.cache, self.positions)

    def step(self) -> None:
        for i, graph in enumerate(self.graphs):
            self.static_token.copy_(self.steps[:, i : i + 1])
            graph.replay()

    def check(self, tolerance: float) -> tuple[bool, str]:
        """Replays against eager steps from the same prefilled state: (close enough, detail)."""
        restore_cache(self.cache, self.prefilled)
        eager = [self.model(self.steps[:, i : i + 1], self.cache).float().clone()
                 for i in range(self.steps.shape[1])]
        eager_state = _checksums(self.cache)
        restore_cache(self.cache, self.prefilled)
        replayed = []
        for i, graph in enumerate(self.graphs):
            self.static_token.copy_(self.steps[:, i : i + 1])
            graph.replay()
            replayed.append(self.outputs[i].float().clone())
        torch.cuda.synchronize()
        graph_state = _checksums(self.cache)
        diff = max(float((a - b).abs().max()) for a, b in zip(eager, replayed, strict=True))
        scale = max(max(float(a.abs().max()) for a in eager), 1.0)
        state_diff = max(abs(a - b) / max(abs(a), 1.0) for a, b in zip(eager_state, graph_state,
                                                                         strict=True))
        ok = diff <= tolerance * scale and state_diff <= tolerance
        detail = (f"graph vs eager over {len(replayed)} steps: max |logit diff| {diff:.3g} "
                  f"(logit scale {scale:.3g}); final-state checksums agree within "
                  f"{state_diff:.3g} (relative)")
        return ok, detail


def _checksums(cache: Any) -> list[float]:
    """Sum and sum of absolute values of every state tensor, in float64: comparing the final
    states this way needs no copy of a cache that may fill most of the GPU."""
    out = []
    for pair in cache.states:
        for state in pair:
            for tensor in ([] if state is None else state.tensors()):
                total = absolute = 0.0
                for chunk in tensor.detach().reshape(-1).split(1 << 24):  # bounded temporaries
                    wide = chunk.double()
                    total += float(wide.sum())
                    absolute += float(wide.abs().sum())
                out += [total, absolute]
    return out


def graph_decoder_or_reason(
    model: Any, cache: Any, positions: dict[str, Any], steps: torch.Tensor, tolerance: float,
    warmup: int,
) -> tuple[GraphDecoder | None, dict[str, Any]]:
    """A verified GraphDecoder, or None and why; the dict goes into the record."""
    try:
        decoder = GraphDecoder(model, cache, positions, steps, warmup)
        ok, detail = decoder.check(tolerance)
    except Exception as err:  # noqa: BLE001 - any capture failure means eager decoding
        torch.cuda.synchronize()
        restore_cache(cache, positions)
        return None, {"cuda_graphs": False,
                      "cuda_graphs_note": f"capture failed: {type(err).__name__}: {err}"[:400]}
    if not ok:
        return None, {"cuda_graphs": False, "cuda_graphs_note": f"not exact: {detail}"}
    return decoder, {"cuda_graphs": True, "cuda_graphs_note": detail,
                     "graph_capture_s": decoder.capture_s}
