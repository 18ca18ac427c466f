"""One measurement: build a model, run one mode, report timings, memory and accounting.

A task is a plain dict (it crosses a process boundary): which model ("ours" or "peer"), the
resolved arch (d_model and n_layers filled), vocabulary, mode, context, batch, dtype, device and
the bench / train settings. `execute` runs it in the calling process; `run_isolated` runs it in a
fresh process forked from a server that has torch and archbench imported (multiprocessing's
forkserver), so a crash, a leak or an out-of-memory cannot poison the next measurement and the
peak RSS belongs to this measurement alone. The child reports its accounting as soon as the
model is built, then the result: if it is killed (the kernel's OOM killer sends SIGKILL), what it
had reported survives.

Modes (ours): train (forward + loss + backward + grad clip + AdamW step, fp32 weights with
autocast for bf16/fp16, as the trainer), prefill (a fresh cache, then the prompt; the head runs on
the last position only, as generation does), decode (prefill untimed, then G single-token steps
from a restored snapshot each repeat; CUDA graphs on CUDA when they check out exact), memory
(cache after a prefill of L: measured and analytic bytes, no timing), probe_prefill and
probe_train (one untimed step, for the max-context search). Peers run train, prefill and decode,
alone ("peer") or in alternation with ours in one process ("pair", bench.peer_interleave).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import multiprocessing as mp
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from archbench.archs import registry
from archbench.archs.compiling import FROZEN_DECODE, freezes_decoding
from archbench.device import DTYPES
from archbench.evaluate.bench.compiled import (
    compile_decoder,
    compile_fields,
    forward_of,
    inference_context,
    profile_step,
    train_graph_breaks,
    wants_compile,
)
from archbench.evaluate.bench.devices import utilisation
from archbench.evaluate.bench.flops import step_flops
from archbench.evaluate.bench.measure import (
    Timing,
    is_oom,
    restore_cache,
    snapshot_cache,
    time_step,
)
from archbench.evaluate.bench.memory import PeakMemory, limit_data
from archbench.provenance import portable_paths
from archbench.train.step import LogitsFn, TrainStep

GRAPH_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 1e-2}

# Every registered mixer module, imported here so that the forkserver (which preloads this module)
# holds them already; a mixer module that does not import is reported by the measurement that
# needs it (the registry raises there), not here.
with contextlib.suppress(Exception):
    registry.discover()


# ---- helpers ----------------------------------------------------------------------------------


class _LastPosition(nn.Module):
    """The LM head applied to the last position only (what generation reads after a prefill)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, -1:])


@contextlib.contextmanager
def last_logits_only(model: Any) -> Iterator[None]:
    head = model.lm_head
    model.lm_head = _LastPosition(head)
    try:
        yield
    finally:
        model.lm_head = head


def _tokens(vocab: int, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


def _timing_fields(timing: Timing, tokens: int, flops: float | None, device: torch.device,
                   dtype: str) -> dict[str, Any]:
    median = timing.median
    tflops = flops / median / 1e12 if flops is not None and median > 0 else None
    return {"median_s": median, "spread": timing.spread(), "first_call_s": timing.first_call_s,
            "tokens_per_s": tokens / median if median > 0 else None, "tflops": tflops,
            "flops": flops, **utilisation(tflops, device, dtype)}


def _bench(task: dict[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(**task["bench"])


def _time(task: dict[str, Any], device: torch.device, step: Callable[[], Any],
          setup: Callable[[], Any] | None = None) -> Timing:
    b = _bench(task)
    return time_step(step, device, warmup=b.warmup, repeats=b.repeats, min_seconds=b.min_seconds,
                     max_repeats=b.max_repeats, max_seconds=b.max_seconds, setup=setup)


# ---- training ---------------------------------------------------------------------------------


def _train_step(
    task: dict[str, Any], module: nn.Module, logits_fn: LogitsFn, device: torch.device,
) -> Callable[[], None]:
    """The trainer's own step (train.step.TrainStep) on one random batch, as one timed unit:
    the whole batch in one micro-batch (gradient accumulation would time a different batch)."""
    from archbench.train.optim import build_optimizer

    tcfg = SimpleNamespace(**task["train"])
    optimizer = build_optimizer(module, tcfg)
    batch, length = task["batch"], task["context"]
    tokens = _tokens(task["vocab_size"], batch, length + 1, task["seed"], device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    amp = DTYPES[task["dtype"]] if task["dtype"] != "fp32" else None
    train_step = TrainStep(logits_fn, module.parameters, optimizer, grad_clip=tcfg.grad_clip,
                           autocast_dtype=amp, device_type=device.type)
    module.train()

    def step() -> None:
        train_step(inputs, targets)

    return step


def _train(task: dict[str, Any], module: nn.Module, logits_fn: Callable, device: torch.device,
           flops_model: Any) -> dict[str, Any]:
    step = _train_step(task, module, logits_fn, device)
    timing = _time(task, device, step)
    batch, context = task["batch"], task["context"]
    flops = step_flops(flops_model, "train", batch, context)
    return {**_timing_fields(timing, batch * context, flops, device, task["dtype"]),
            **compile_fields(task, timing), "profile": profile_step(task, step)}


# ---- ours -------------------------------------------------------------------------------------


def ours_train(model: Any, task: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """With bench.compile: the forward compiled (static shapes), backward through AOTAutograd,
    the optimizer step eager (as the trainer with train.compile)."""
    extra: dict[str, Any] = {}
    if wants_compile(task):
        probe = _tokens(task["vocab_size"], task["batch"], task["context"] + 1, task["seed"],
                        device)
        extra = train_graph_breaks(model, probe)
    forward = forward_of(model, task, device)
    return {**_train(task, model, lambda x, ctx: forward(x, ctx=ctx), device, model), **extra}


def _ours_prefill_unit(model: Any, task: dict[str, Any], device: torch.device
                       ) -> tuple[Callable[[], Any], Callable[[], Any], dict[str, Any]]:
    """(setup, step, held): a fresh cache and the prompt; held["cache"] is the last one."""
    batch, context, dtype = task["batch"], task["context"], DTYPES[task["dtype"]]
    tokens = _tokens(task["vocab_size"], batch, context, task["seed"], device)
    held: dict[str, Any] = {}
    forward = forward_of(model, task, device)

    def step() -> None:
        cache = model.init_cache(batch, context, device, dtype)
        with last_logits_only(model):
            forward(tokens, cache)
        held["cache"] = cache

    return held.clear, step, held


def _ours_decode_unit(model: Any, task: dict[str, Any], device: torch.device,
                      info: dict[str, Any] | None = None,
                      ) -> tuple[Callable[[], Any], Callable[[], Any], Any, dict[str, Any],
                                 torch.Tensor]:
    """(setup, step, cache, positions, steps): the prompt is prefilled here (untimed); every
    repeat restarts from its positions; each token is one `model.decode_step` (all layers in
    one function), compiled and checked against eager decoding with bench.compile (the check's
    fields go into `info`). Call under inference mode."""
    batch, context, dtype = task["batch"], task["context"], DTYPES[task["dtype"]]
    new = int(task["bench"]["decode_tokens"])
    prompt = _tokens(task["vocab_size"], batch, context, task["seed"], device)
    steps = _tokens(task["vocab_size"], batch, new, task["seed"] + 1, device)
    cache = model.init_cache(batch, context + new, device, dtype)
    with last_logits_only(model):
        model(prompt, cache)
    positions = snapshot_cache(cache, tensors=False)
    if wants_compile(task):
        checked = compile_decoder(model, cache, steps, task["dtype"])
        if info is not None:
            info.update(checked)

    def step() -> None:
        for i in range(new):
            model.decode_step(steps[:, i], cache)

    return (lambda: restore_cache(cache, positions)), step, cache, positions, steps


def ours_prefill(model: Any, task: dict[str, Any], device: torch.device) -> dict[str, Any]:
    batch, context, dtype = task["batch"], task["context"], DTYPES[task["dtype"]]
    with inference_context(task):
        setup, step, held = _ours_prefill_unit(model, task, device)
        timing = _time(task, device, step, setup=setup)
        profiled = profile_step(task, step, setup)
    flops = step_flops(model, "prefill", batch, context)
    return {**_timing_fields(timing, batch * context, flops, device, task["dtype"]),
            **compile_fields(task, timing), "profile": profiled,
            "state_bytes_measured": held["cache"].nbytes(),
            "state_bytes_analytic": model.cache_bytes(batch, context, dtype)}


def ours_decode(model: Any, task: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from archbench.evaluate.bench.graphs import graph_decoder_or_reason

    bench = _bench(task)
    batch, context, dtype = task["batch"], task["context"], DTYPES[task["dtype"]]
    new = int(bench.decode_tokens)
    out: dict[str, Any] = {"new_tokens": new}
    with inference_context(task):
        setup, eager_step, cache, positions, steps = _ours_decode_unit(model, task, device, out)
        timing = _time(task, device, eager_step, setup=setup)
        eager = timing
        out.update(compile_fields(task, timing, out.get("compile_s")),
                   profile=profile_step(task, eager_step, setup))
        if wants_compile(task):
            out["cuda_graphs"] = False
            out["cuda_graphs_note"] = ("compiled: inductor's CUDA graphs (mode reduce-overhead)"
                                       if device.type == "cuda" else "not on CUDA")
        elif device.type == "cuda" and bench.cuda_graphs:
            decoder, info = graph_decoder_or_reason(model, cache, positions, steps,
                                                    GRAPH_TOLERANCE[task["dtype"]], bench.warmup)
            out.update(info)
            if decoder is not None:
                timing = _time(task, device, decoder.step, setup=decoder.setup)
                timing.first_call_s += decoder.capture_s
        else:
            out["cuda_graphs"] = False
            out["cuda_graphs_note"] = ("not on CUDA" if device.type != "cuda"
                                       else "bench.cuda_graphs=false")
        measured = cache.nbytes()
        out["growth"] = _decode_growth(model, task, device, setup, eager_step)
    flops = step_flops(model, "decode", batch, context, new)
    out.update(_timing_fields(timing, batch * new, flops, device, task["dtype"]))
    out.update(per_token_s=timing.median / new, eager_median_s=eager.median,
               eager_tokens_per_s=batch * new / eager.median,
               state_bytes_measured=measured,
               state_bytes_analytic=model.cache_bytes(batch, context + new, dtype))
    return out


def _pair_timing(task: dict[str, Any]) -> dict[str, Any]:
    """`time_pair`'s stop rules from the bench config."""
    b = _bench(task)
    return {"warmup": b.warmup, "repeats": b.repeats, "min_seconds": b.min_seconds,
            "max_repeats": b.max_repeats, "max_seconds": b.max_seconds}


def _ratio_summary(ratios: list[float]) -> dict[str, float | int]:
    """Median, quartiles and extremes of per-pair ratios."""
    ratios = sorted(ratios)
    q1, _, q3 = (statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1
                 else (ratios[0],) * 3)
    return {"ratio": statistics.median(ratios), "q1": q1, "q3": q3, "min": ratios[0],
            "max": ratios[-1], "n": len(ratios)}


def _decode_growth(model: Any, task: dict[str, Any], device: torch.device,
                   setup: Callable[[], Any], step: Callable[[], Any]) -> dict[str, Any] | None:
    """The record's `growth` (runner docstring): this decode unit against the same unit at
    bench.growth_reference tokens, in alternation in one process. Separate measurements of the
    two contexts drift with the machine's load (seen: -52%..+204% for steps whose work does not
    depend on the context); adjacent pairs cancel it."""
    from archbench.evaluate.bench.measure import time_pair

    reference = _bench(task).growth_reference
    if reference is None or task["context"] <= int(reference):
        return None
    ref_setup, ref_step, *_ = _ours_decode_unit(model, {**task, "context": int(reference)},
                                                device)
    mine, theirs = time_pair(step, ref_step, device, setup_a=setup, setup_b=ref_setup,
                             **_pair_timing(task))
    ratios = [t_ref / t for t, t_ref in zip(mine.times, theirs.times, strict=True)]
    return {"reference_context": int(reference), **_ratio_summary(ratios)}


def ours_memory(model: Any, task: dict[str, Any], device: torch.device) -> dict[str, Any]:
    batch, context, dtype = task["batch"], task["context"], DTYPES[task["dtype"]]
    tokens = _tokens(task["vocab_size"], batch, context, task["seed"], device)
    with torch.inference_mode():
        cache = model.init_cache(batch, context, device, dtype)
        with last_logits_only(model):
            model(tokens, cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {"state_bytes_measured": cache.nbytes(),
                "state_bytes_analytic": model.cache_bytes(batch, context, dtype)}


def ours_probe_prefill(model: Any, task: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return ours_memory(model, task, device)


def ours_probe_train(model: Any, task: dict[str, Any], device: torch.device) -> dict[str, Any]:
    _train_step(task, model, lambda x, ctx: model(x, ctx=ctx), device)()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {}


OURS_MODES: dict[str, Callable[[Any, dict[str, Any], torch.device], dict[str, Any]]] = {
    "train": ours_train, "prefill": ours_prefill, "decode": ours_decode, "memory": ours_memory,
    "probe_prefill": ours_probe_prefill, "probe_train": ours_probe_train,
}
INFERENCE_MODES = ("prefill", "decode", "memory", "probe_prefill")
OURS_COMPILED_MODES = ("train", "prefill", "decode")  # the modes bench.compile applies to


# ---- peers ------------------------------------------------------------------------------------


def _peer_unit(peer: Any, task: dict[str, Any], device: torch.device
               ) -> tuple[Callable[[], Any] | None, Callable[[], Any]]:
    """(setup, step) of the peer in an inference mode (call under inference mode)."""
    mode, batch, context = task["mode"], task["batch"], task["context"]
    tokens = _tokens(task["vocab_size"], batch, context, task["seed"], device)
    peer.module.eval()
    if mode == "prefill":
        held: dict[str, Any] = {}

        def step() -> None:
            held["cache"] = peer.prefill(tokens)

        return held.clear, step
    if mode == "decode":
        new = int(task["bench"]["decode_tokens"])
        steps = _tokens(task["vocab_size"], batch, new, task["seed"] + 1, device)
        return peer.decode(tokens, steps)
    raise ValueError(f"mode {mode!r} has no peer measurement")


def _units_tokens(task: dict[str, Any]) -> int:
    """Tokens processed by one timed unit of the task's mode."""
    if task["mode"] == "decode":
        return task["batch"] * int(task["bench"]["decode_tokens"])
    return task["batch"] * task["context"]


def peer_run(peer: Any, ours: Any, task: dict[str, Any], device: torch.device) -> dict[str, Any]:
    mode, batch, context = task["mode"], task["batch"], task["context"]
    if mode == "train":
        return _train(task, peer.module, lambda x, ctx: peer.logits(x), device, ours)
    new = int(task["bench"]["decode_tokens"])
    with torch.inference_mode():
        setup, step = _peer_unit(peer, task, device)
        timing = _time(task, device, step, setup=setup)
    flops = step_flops(ours, mode, batch, context, new)
    out = _timing_fields(timing, _units_tokens(task), flops, device, task["dtype"])
    if mode == "decode":
        out.update(per_token_s=timing.median / new, new_tokens=new)
    return out


def _under(make_context: Callable[[], Any], fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` run inside a fresh `make_context()` (the no-autograd mode its tensors were made in)."""
    def run() -> Any:
        with make_context():
            return fn()

    return run


def _alternated(task: dict[str, Any], device: torch.device, ours: Any, other_unit: tuple[
        Callable[[], Any] | None, Callable[[], Any]], other_mode: Callable[[], Any],
                other_name: str) -> dict[str, Any]:
    """Our model's timed unit and `other_unit` (setup, step; run under `other_mode` outside
    training) timed call by call in alternation (ABBA order), so that a drift in the machine's
    load hits both alike; per pair, ratio = t_other / t_ours (our speed over theirs, same
    tokens). Returns the record's `paired` field."""
    from archbench.evaluate.bench.measure import time_pair

    ours_setup, ours_step = _ours_timed_unit(ours, task, device)
    other_setup, other_step = other_unit
    if task["mode"] == "train":
        mine, theirs = time_pair(ours_step, other_step, device, **_pair_timing(task))
    else:
        ours_mode = functools.partial(inference_context, task)
        mine, theirs = time_pair(
            _under(ours_mode, ours_step), _under(other_mode, other_step), device,
            setup_a=_under(ours_mode, ours_setup),
            setup_b=_under(other_mode, other_setup) if other_setup else None,
            **_pair_timing(task))
    ratios = [t_other / t_ours for t_ours, t_other in zip(mine.times, theirs.times, strict=True)]
    tokens = _units_tokens(task)
    return {"paired": {**_ratio_summary(ratios), "ours_tokens_per_s": tokens / mine.median,
                       f"{other_name}_tokens_per_s": tokens / theirs.median}}


def paired_run(peer: Any, ours: Any, task: dict[str, Any], device: torch.device
               ) -> dict[str, Any]:
    """Ours and the peer in one process, in alternation (`_alternated`). The peer runs eager
    under inference_mode; ours as the task says (compiled with bench.compile, first call and
    compilation untimed)."""
    if task["mode"] == "train":
        unit = (None, _train_step(task, peer.module, lambda x, ctx: peer.logits(x), device))
    else:
        with torch.inference_mode():
            unit = _peer_unit(peer, task, device)
    return _alternated(task, device, ours, unit, torch.inference_mode, "peer")


def _ours_timed_unit(model: Any, task: dict[str, Any], device: torch.device
                     ) -> tuple[Callable[[], Any] | None, Callable[[], Any]]:
    """(setup, step) of the unit `task` times for one of our models (no-autograd units are
    built, and must run, under `inference_context(task)`)."""
    if task["mode"] == "train":
        forward = forward_of(model, task, device)
        return None, _train_step(task, model, lambda x, ctx: forward(x, ctx=ctx), device)
    with inference_context(task):
        if task["mode"] == "prefill":
            setup, step, _ = _ours_prefill_unit(model, task, device)
        else:
            setup, step, *_ = _ours_decode_unit(model, task, device)
    return setup, step


def rival_run(ours: Any, rival: Any, task: dict[str, Any], device: torch.device
              ) -> dict[str, Any]:
    """This backbone against another of ours (bench.rivals) at the same size, the same unit in
    alternation in one process (`_alternated`). Separate records of two backbones carry the
    machine's drift between them (up to 3x between sessions on a shared VM); adjacent pairs
    cancel it."""
    return _alternated(task, device, ours, _ours_timed_unit(rival, task, device),
                       functools.partial(inference_context, task), "rival")


# ---- one measurement --------------------------------------------------------------------------


def _build_ours(task: dict[str, Any], device: torch.device, meta: bool) -> Any:
    from archbench.archs.model import LanguageModel, resolve_kernels

    torch.manual_seed(task["seed"])
    if meta:
        with torch.device("meta"):
            return LanguageModel(task["arch"], task["vocab_size"])
    model = LanguageModel(task["arch"], task["vocab_size"])
    resolve_kernels(model, device)
    model.to(device)
    if task["mode"] in INFERENCE_MODES:
        model.to(DTYPES[task["dtype"]])
    return model


def _slow_fallback_training(peer_name: str | None, task: dict[str, Any],
                            device: torch.device) -> bool:
    """HF's Mamba / Mamba-2 training on CPU (no mamba_ssm kernels there) is its slow path."""
    return (task["mode"] == "train" and device.type == "cpu" and peer_name is not None
            and peer_name.startswith(("hf:MambaForCausalLM", "hf:Mamba2ForCausalLM")))


def _describe(model: Any, task: dict[str, Any]) -> dict[str, Any]:
    weights = DTYPES[task["dtype"]] if task["mode"] in INFERENCE_MODES else torch.float32
    paths = model.kernel_paths(decoding=task["mode"] == "decode")
    if wants_compile(task) and task["mode"] in OURS_COMPILED_MODES:
        paths = {kind: f"{path}+compiled" for kind, path in paths.items()}
        if task["mode"] == "decode" and freezes_decoding(task["device"]):
            paths["decode_graph"] = FROZEN_DECODE  # LanguageModel.compile_decoding's default
    return {"params": model.param_counts(), "kernel_paths": paths,
            "weight_bytes": model.weight_bytes(weights)}


def execute(task: dict[str, Any], send: Callable[[dict[str, Any]], None] | None = None,
            isolated: bool = False) -> dict[str, Any]:
    """Run one task here; the result always comes back (status ok | oom | error | skipped)."""
    device = torch.device(task["device"])
    bench = _bench(task)
    if bench.threads and bench.threads > 0:
        torch.set_num_threads(int(bench.threads))
    out: dict[str, Any] = {"status": "error", "error": None, "notes": [],
                           "threads": torch.get_num_threads() if device.type == "cpu" else None}
    budget = task.get("rss_budget_bytes")
    if budget and device.type == "cpu":
        if isolated:
            out["notes"].append(limit_data(budget))
        else:
            out["notes"].append("rss budget not enforced: it needs bench.isolate=true")
    memory = PeakMemory(device)
    memory.reset()
    model = peer = None
    try:
        if task["which"] in ("peer", "pair"):
            from archbench.evaluate.bench.peers import PeerChoice, choose_peer

            model = _build_ours(task, device, meta=True)
            max_pos = max(2048, task["context"] + int(bench.decode_tokens) + 1)
            choice = choose_peer(model, device, max_pos)
            if _slow_fallback_training(choice.name, task, device):
                choice = PeerChoice(None, None, f"peer {choice.name} skipped in train mode on "
                                    "CPU: Hugging Face trains Mamba there through its "
                                    "reference scan, a per-token Python loop (not a peer)")
            if choice.build is None:
                out.update(status="skipped", peer_name=None)
                out["notes"].append(choice.note)
                return out
            if choice.note:
                out["notes"].append(choice.note)
            weights = DTYPES[task["dtype"]] if task["mode"] in INFERENCE_MODES else torch.float32
            if task["which"] == "pair":
                model = _build_ours(task, device, meta=False)
            peer = choice.build(device, weights)
            out.update(peer_name=peer.name,
                       params={"total": sum(p.numel() for p in peer.module.parameters())})
            if send is not None:
                send(dict(out))
            run = paired_run if task["which"] == "pair" else peer_run
            out.update(run(peer, model, task, device))
        elif task["which"] == "rival":
            model = _build_ours(task, device, meta=False)
            peer = _build_ours({**task, "arch": task["rival"]["arch"]}, device, meta=False)
            out["rival_params"] = peer.param_counts()
            out.update(rival_run(model, peer, task, device))
        else:
            model = _build_ours(task, device, meta=False)
            out.update(_describe(model, task))
            if send is not None:
                send(dict(out))
            out.update(OURS_MODES[task["mode"]](model, task, device))
        out["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - every failure is a result of the sweep
        out["status"] = "oom" if is_oom(exc) else "error"
        out["error"] = portable_paths(f"{type(exc).__name__}: {exc}")[:2000]
        if out["status"] == "error":
            out["traceback"] = portable_paths(traceback.format_exc())[-4000:]
    finally:
        out.update(memory.read())
        del model, peer
        if out["status"] != "ok" and not isolated:
            gc.collect()  # a failure's traceback holds frames, and they hold tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ---- isolation --------------------------------------------------------------------------------

_PRELOAD = ["archbench.evaluate.bench.worker"]


def _child(task: dict[str, Any], conn: Any) -> None:
    try:
        result = execute(task, send=conn.send, isolated=True)
        result["final"] = True
        conn.send(result)
    finally:
        conn.close()


def _context(preload_peers: bool) -> Any:
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:  # no forkserver on this platform: a spawned process is fresh too
        return mp.get_context("spawn")
    modules = list(_PRELOAD)
    if preload_peers:
        modules.append("archbench.evaluate.bench.preload_peers")
    ctx.set_forkserver_preload(modules)  # takes effect when the server first starts
    return ctx


def run_isolated(task: dict[str, Any], timeout_s: float,
                 preload_peers: bool = False) -> dict[str, Any]:
    """`execute(task)` in a fresh process; a timeout or a killed child is a result too."""
    ctx = _context(preload_peers)
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(task, sender), daemon=True)
    began = time.monotonic()
    proc.start()
    sender.close()
    result: dict[str, Any] = {}
    timed_out = False
    while not result.get("final"):
        left = timeout_s - (time.monotonic() - began)
        if left <= 0:
            timed_out = True
            break
        try:
            if receiver.poll(min(left, 1.0)):
                result.update(receiver.recv())
            elif not proc.is_alive() and not receiver.poll(0):
                break
        except (EOFError, OSError):
            break
    if proc.is_alive():
        proc.kill()
    proc.join(30)
    receiver.close()
    if result.get("final"):
        result.pop("final")
        return result
    notes = list(result.get("notes", []))
    if timed_out:
        result.update(status="timeout", error=f"no result within bench.timeout_s={timeout_s}s")
    elif proc.exitcode == -9:
        result.update(status="oom", error="the measuring process was killed (SIGKILL), most "
                                          "likely by the kernel's out-of-memory killer")
    else:
        result.update(status="error",
                      error=f"the measuring process died with exit code {proc.exitcode}")
    result["notes"] = notes
    return result
