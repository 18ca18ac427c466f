"""The `bench.compile` axis and `bench.profile`: compiled forward / decode step for a measurement,
the exactness check of compiled decoding, and torch.profiler traces with a top-operators table.

Compiled measurements use archs/compiling.py's policy (static shapes; "reduce-overhead" for the
decode step on CUDA, inductor's default elsewhere). For train and prefill, compilation happens
inside the first call, so `compile_s` = first_call_s - median_s, the part of it a steady step does
not pay (compilation, autotuning, CUDA-graph capture); decoding compiles during its exactness
check, timed there (the first compiled pass less an eager pass). `graph_breaks` counts dynamo's
graph breaks in the measured function (0 is the goal for every backbone; tests/test_compile.py).

Compiled decoding is checked against eager decoding before timing: G steps from the same
prefilled state, logits and final states compared (tolerance by dtype); a mismatch fails the
measurement rather than timing wrong code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from archbench.archs.base import ForwardContext
from archbench.archs.compiling import compile_module, graph_report
from archbench.evaluate.bench.measure import Timing, restore_cache, snapshot_cache
from archbench.train.step import lm_loss

CHECK_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}  # max |logit diff| / logit scale
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
              "aten::linear", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_attention_math", "aten::scaled_dot_product_attention",
              "aten::_efficient_attention_forward", "aten::_flash_attention_forward")


def wants_compile(task: dict[str, Any]) -> bool:
    return bool(task.get("compile"))


def inference_context(task: dict[str, Any]) -> AbstractContextManager[Any]:
    """The no-autograd mode our inference measurements run in: `inference_mode` eager, but
    `no_grad` compiled. A compiled step called under `inference_mode` gets AOTAutograd's
    training-style graph, whose cache writes are not kept in the graph: every KV / state buffer
    is copied whole, updated and copied back at each step (seen in inductor's code; compiled
    attention decoding at context 4096 ran at half the speed of the same graph under `no_grad`,
    below eager). Caches made in one mode are used in the same mode (inference tensors cannot be
    updated outside `inference_mode`). The peers stay under `inference_mode`."""
    return torch.no_grad() if wants_compile(task) else torch.inference_mode()


def forward_of(model: Any, task: dict[str, Any], device: torch.device) -> Callable[..., Any]:
    """The model's forward as measured: compiled (static shapes) or the module itself."""
    return compile_module(model, device) if wants_compile(task) else model


def train_graph_breaks(model: Any, tokens: torch.Tensor) -> dict[str, Any]:
    """Graph report of the training forward + loss (dynamo trace only, no code generation)."""
    def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx = ForwardContext()
        return lm_loss(model(inputs, ctx=ctx), targets) + ctx.aux_loss()

    return graph_report(loss_of, tokens[:, :-1], tokens[:, 1:]).as_dict()


def compile_decoder(model: Any, cache: Any, steps: torch.Tensor, dtype: str) -> dict[str, Any]:
    """Compile `model`'s decode step and check it against eager decoding from the state `cache`
    holds now (left as it was found). Returns the record fields (graph_breaks, compile_check)."""
    prefilled = snapshot_cache(cache, to="cpu")
    report = graph_report(model.decode_body, steps[:, 0], cache.states, cache.position_tensor())
    restore_cache(cache, prefilled)
    began = time.perf_counter()
    eager = [model.decode_step(steps[:, i], cache).float().cpu() for i in range(steps.shape[1])]
    eager_s = time.perf_counter() - began
    eager_state = [t.float().cpu() for pair in cache.states for s in pair if s is not None
                   for t in s.tensors()]
    restore_cache(cache, prefilled)
    model.compile_decoding()  # decode_step marks a CUDA cache's buffers static itself
    began = time.perf_counter()
    compiled = [model.decode_step(steps[:, i], cache).float().cpu()
                for i in range(steps.shape[1])]
    compile_s = max(time.perf_counter() - began - eager_s, 0.0)
    state = [t.float().cpu() for pair in cache.states for s in pair if s is not None
             for t in s.tensors()]
    restore_cache(cache, prefilled)
    scale = max(max(float(e.abs().max()) for e in eager), 1.0)
    diff = max(float((a - b).abs().max()) for a, b in zip(eager, compiled, strict=True))
    state_diff = max((float((a - b).abs().max()) / max(float(a.abs().max()), 1.0)
                      for a, b in zip(eager_state, state, strict=True)), default=0.0)
    ok = diff <= CHECK_TOLERANCE[dtype] * scale and state_diff <= CHECK_TOLERANCE[dtype]
    check = {"ok": ok, "max_logit_diff": diff, "logit_scale": scale,
             "max_state_rel_diff": state_diff, "steps": int(steps.shape[1])}
    if not ok:
        raise RuntimeError(f"compiled decoding differs from eager decoding: {check}")
    return {**report.as_dict(), "compile_check": check, "compile_s": compile_s}


def compile_fields(task: dict[str, Any], timing: Timing,
                   compile_s: float | None = None) -> dict[str, Any]:
    """`compiled` and `compile_s` of a record: `compile_s` when compilation was timed apart
    (decoding compiles during its exactness check: the first compiled pass less an eager pass
    over the same steps), else first_call_s - median_s (see the module docstring)."""
    if not wants_compile(task):
        return {"compiled": False, "compile_s": None}
    if compile_s is None:
        compile_s = max(timing.first_call_s - timing.median, 0.0)
    return {"compiled": True, "compile_s": compile_s}


# ---- bench.profile ------------------------------------------------------------------------------


def profile_step(task: dict[str, Any], step: Callable[[], Any],
                 setup: Callable[[], Any] | None = None, calls: int = 3) -> dict[str, Any] | None:
    """With bench.profile: `calls` more runs of the timed unit under torch.profiler; writes a
    Chrome trace and a top-operators table under <out>/profiles/ and returns the record's
    `profile` field: the files, the top operators and the share of time in matmul / attention
    kernels ("matmul-bound" above one half, else "overhead-bound": elementwise work, kernel
    launches and Python)."""
    folder = task.get("profile_dir")
    if not task["bench"].get("profile") or not folder:
        return None
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.device(task["device"]).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            if setup is not None:
                setup()
            step()
        if torch.device(task["device"]).type == "cuda":
            torch.cuda.synchronize()
    return _write_profile(prof, task, Path(folder))


def _write_profile(prof: Any, task: dict[str, Any], folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    name = (f"{task.get('arch_name', 'model')}_{task['mode']}_ctx{task['context']}_"
            f"b{task['batch']}_{'compiled' if wants_compile(task) else 'eager'}")
    trace = folder / f"{name}.trace.json"
    prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    rows = sorted(({"op": e.key, "self_cpu_us": e.self_cpu_time_total, "calls": e.count,
                    "self_device_us": getattr(e, "self_device_time_total", 0.0)}
                   for e in events), key=lambda r: -r["self_cpu_us"])
    total = sum(r["self_cpu_us"] for r in rows) or 1.0
    matmul = sum(r["self_cpu_us"] for r in rows if r["op"] in MATMUL_OPS)
    table = folder / f"{name}.top_ops.txt"
    table.write_text(events.table(sort_by="self_cpu_time_total", row_limit=25,
                                  max_name_column_width=70))
    share = matmul / total
    summary = {"trace": str(trace), "table": str(table), "matmul_share": share,
               "bound": "matmul-bound" if share > 0.5 else "overhead-bound",
               "top_ops": rows[:10]}
    (folder / f"{name}.summary.json").write_text(json.dumps(summary, indent=1))
    return summary
