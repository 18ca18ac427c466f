"""`archbench bench`: speed and memory of one backbone at one size, across contexts and batches.

`run_bench(cfg)` takes the resolved config (arch, size, tokenizer, bench, train) and, for every
batch in bench.batch_sizes, every mode in bench.modes and every context in bench.contexts
(ascending), runs one measurement -- in a fresh process when bench.isolate -- and appends one
record to `<out>/records.jsonl`; `<out>/bench.csv` is rewritten from those records at the end.
With bench.peers the same measurement is repeated on the peer library model (evaluate/bench/
peers.py) in its own fresh process and attached as `peer`. With bench.max_context (or the mode
"max_context" in bench.modes) the largest prefill and training contexts that fit are searched.
Once a mode runs out of memory at a context, its larger contexts are recorded as "oom" without
running (the note says so). Any failure is a record and the sweep goes on. Hydra's `-m` sweeps
arch x size x dtype (and lists of contexts / batches) over separate runs. Isolation uses
multiprocessing's forkserver: a script that calls run_bench must guard its entry point with
`if __name__ == "__main__":`, as multiprocessing requires (the archbench CLI does).

Record fields (one JSON object per line; every key is present in every record, None where it
does not apply to the mode; the CSV holds the scalar ones):

  kind              "bench"
  mode              train | prefill | decode | memory | max_context
  arch, size        config names (cfg.arch.name, cfg.size.name); d_model, n_layers: solved shape;
                    size_fit: the size solver's fit (metric, target, achieved, error)
  context           tokens: train sequence length, prefill prompt length, decode prompt length
                    (the G new tokens come after it), memory cache length, or for max_context the
                    largest length that fit (None when even the first probe failed)
  batch             sequences per step
  dtype             fp32 | bf16 | fp16. train: fp32 weights + autocast (as the trainer);
                    prefill / decode / memory: weights and cache cast to dtype
  device            "cpu" | "cuda:0" ...; device_name: GPU model name (None on CPU)
  status            ok | oom | error | timeout ("timeout": no result within bench.timeout_s)
  error             the exception (type: message) when not ok, else None
  notes             list of strings: skipped peers, budgets, inferred OOMs, graph checks
  median_s          median seconds of one timed unit: a training step; a prefill (fresh cache +
                    prompt, LM head on the last position only, as generation needs); decode: all
                    G new tokens, fed one at a time (fixed random tokens: the cost of a step
                    does not depend on the token, and sampling is not measured; repeats restart
                    from the prefilled positions). None for memory / max_context
  spread            {"q1", "q3", "iqr", "min", "max", "n"} of the timed repeats, seconds
  tokens_per_s      train, prefill: batch * context / median_s; decode: batch * G / median_s
  per_token_s       decode only: median_s / G (latency of one decoding step)
  new_tokens        decode only: G (bench.decode_tokens)
  flops             analytic FLOPs of one timed unit (evaluate/bench/flops.py)
  tflops            flops / median_s / 1e12 (achieved)
  mfu               tflops / peak_tflops on a GPU in the peak table; None on CPU or unknown GPU
  peak_tflops, peak_source   the peak used for mfu and where it comes from
  peak_bytes        CUDA: max allocated bytes during the measurement (model construction,
                    optimizer state, activations, cache included); CPU: peak RSS (VmHWM) of the
                    measuring process, torch's own footprint included (see baseline_bytes)
  baseline_bytes    CUDA: allocated bytes before the model was built; CPU: RSS before it
  peak_kind         cuda_max_allocated | rss_hwm | ru_maxrss
  state_bytes_measured   prefill / decode / memory: bytes held by the decoding cache
                    (ModelCache.nbytes(), buffers as allocated: decode preallocates L + G)
  state_bytes_analytic   model.cache_bytes(batch, same length, dtype)
  weight_bytes      bytes of the weights in the precision they are held in for this mode
  first_call_s      host seconds of the very first call (lazy init, allocator growth, autotune;
                    for decode with CUDA graphs, the capture time is added), kept out of median_s
  cuda_graphs       decode: True when timed through CUDA graphs that were checked exact against
                    eager decoding in this very run; False otherwise (cuda_graphs_note says why;
                    compiled decoding on CUDA takes inductor's CUDA graphs instead);
                    None for other modes. eager_median_s / eager_tokens_per_s: the decode
                    timing without bench.cuda_graphs replay (always measured; the step compiled
                    when compiled; the peer ratio of decode uses it)
  graph_capture_s   decode with graphs: seconds to warm up and capture the G graphs
  kernel_paths      {"attention": "sdpa", "mamba": "torch:chunked", ...} as resolved; with
                    "+compiled" appended to each when the measurement ran compiled
  compiled          True when measured with torch.compile (the bench.compile axis: train,
                    prefill and decode are measured once per value; memory once, eager)
  compile_s         compiled only: first_call_s - median_s, the one-time cost of compilation
                    (and autotuning, CUDA-graph capture) kept out of the steady-state timing
  graph_breaks, graphs, reasons   compiled train / decode: dynamo's graph count and breaks in
                    the training forward + loss or the decode step (evaluate/bench/compiled.py)
  compile_check     compiled decode: compiled against eager decoding over the G steps from the
                    same prefilled state ({"ok", "max_logit_diff", "logit_scale",
                    "max_state_rel_diff", "steps"}); a mismatch is an error record
  profile           with bench.profile: {"trace", "table" (files under <out>/profiles/),
                    "matmul_share", "bound" (matmul-bound | overhead-bound), "top_ops"}
  params            model.param_counts(): total, embedding, non_embedding, active,
                    active_non_embedding
  threads           torch CPU threads of the measurement (None on CUDA)
  isolated          True when measured in a fresh process
  probe             max_context only: "prefill" | "train"; probes: [{"context", "status",
                    "peak_bytes", "error"}] in the order tried; first_failed_context;
                    limit: bench.max_context_limit; rss_budget_bytes (CPU)
  peer              None (no peer asked, none exists, or not installed: see notes), or
                    {"name", "status", "tokens_per_s", "median_s", "per_token_s", "ratio",
                    "ratio_basis", "peak_bytes", "first_call_s", "params_total", "error",
                    "rounds", "interleaved"}; ratio = our tokens_per_s / the peer's (> 1: ours
                    is faster); ratio_basis "same" (train, prefill: the same timed unit) or
                    "eager" for decode (our eager decoding against the peer's eager decoding,
                    whatever cuda_graphs says). The peer runs the same tokens; its prefill also
                    keeps the last logits only. With bench.peer_rounds = R > 1, ours and the
                    peer are measured R times alternately (each in a fresh process) and ratio is
                    the median of the R per-round ratios, listed in rounds (the record's own
                    timing fields are from the first round): a shared machine's load drifts,
                    alternation cancels it. With bench.peer_interleave, ours and the peer are
                    also timed call by call in alternation in one process: interleaved =
                    {"ratio" (median over pairs of t_peer / t_ours), "q1", "q3", "min", "max",
                    "n", "ours_tokens_per_s", "peer_tokens_per_s"}, and ratio is that median
                    (ratio_basis "interleaved", "interleaved eager" for decode); else None
  growth            decode above bench.growth_reference = R tokens: the same decode unit at
                    context R, timed in alternation with this one in one process (ABBA), as
                    {"reference_context": R, "ratio" (median over pairs of t_R / t_context: the
                    speed at this context relative to R; 1 = flat), "q1", "q3", "min", "max",
                    "n"}; None otherwise (eager timing; compiled when the record is)
  rivals            with bench.rivals: {name: {"ratio" (median over pairs of t_rival / t_ours:
                    our speed over the rival's; > 1: ours is faster), "q1", "q3", "min", "max",
                    "n", "ours_tokens_per_s", "rival_tokens_per_s", "d_model", "n_layers",
                    "params", "status", "error"}}: the rival backbone (conf/arch/<name>.yaml at
                    its defaults, solved to the same size) timed with the same unit in
                    alternation in one process; None without bench.rivals
  provenance        archbench.provenance.provenance(device): git, versions, device, command
  config            the resolved config
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from archbench.config import ConfigError, to_container, validate
from archbench.device import dtype_name, gpu_name, pick_device
from archbench.io import append_jsonl, read_jsonl, write_text_atomic
from archbench.provenance import provenance
from archbench.train.tokenizer import vocab_size_of

MODES = ("train", "prefill", "decode", "memory")
COMPILE_MODES = ("train", "prefill", "decode")  # the modes the bench.compile axis applies to
PEER_MODES = ("train", "prefill", "decode")

RECORD_KEYS = (
    "kind", "mode", "arch", "size", "d_model", "n_layers", "size_fit", "context", "batch",
    "dtype", "device", "device_name", "status", "error", "notes", "median_s", "spread",
    "tokens_per_s", "per_token_s", "new_tokens", "flops", "tflops", "mfu", "peak_tflops",
    "peak_source", "peak_bytes", "baseline_bytes", "peak_kind", "state_bytes_measured",
    "state_bytes_analytic", "weight_bytes", "first_call_s", "cuda_graphs", "cuda_graphs_note",
    "eager_median_s", "eager_tokens_per_s", "graph_capture_s", "kernel_paths", "params",
    "threads", "isolated", "probe", "probes", "first_failed_context", "limit",
    "rss_budget_bytes", "peer", "provenance", "config", "compiled", "compile_s",
    "graph_breaks", "graphs", "reasons", "compile_check", "profile", "growth", "rivals",
)

CSV_COLUMNS = (
    "mode", "arch", "size", "context", "batch", "dtype", "device", "device_name", "status",
    "median_s", "q1_s", "q3_s", "iqr_s", "min_s", "max_s", "repeats", "tokens_per_s",
    "per_token_s", "tflops", "mfu", "peak_bytes", "baseline_bytes", "state_bytes_measured",
    "state_bytes_analytic", "weight_bytes", "first_call_s", "cuda_graphs", "params_total",
    "params_active_non_embedding", "kernel_paths", "peer_name", "peer_tokens_per_s",
    "peer_ratio", "peer_ratio_basis", "probe", "error", "notes", "compiled", "compile_s",
    "graph_breaks", "profile_bound", "growth_reference", "growth_ratio", "rival_ratios",
)


def _output_dir(cfg: DictConfig) -> Path:
    if cfg.get("out_dir"):
        return Path(cfg.out_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _check_bench(bench: Any) -> list[str]:
    modes = list(bench.modes)
    for mode in modes:
        if mode not in (*MODES, "max_context"):
            raise ConfigError(f"bench.modes: {mode!r} is not allowed; choose from "
                              f"{[*MODES, 'max_context']}")
    for key in ("contexts", "batch_sizes"):
        values = list(bench[key])
        if not values or any(int(v) < 1 for v in values):
            raise ConfigError(f"bench.{key}={values} must be a non-empty list of integers >= 1")
    for mode, own in (bench.get("by_mode") or {}).items():
        for key, values in (own or {}).items():
            if values is not None and (not values or any(int(v) < 1 for v in values)):
                raise ConfigError(f"bench.by_mode.{mode}.{key}={list(values)} must be a "
                                  "non-empty list of integers >= 1")
    reference = bench.get("growth_reference")
    if reference is not None and (not isinstance(reference, int) or reference < 1):
        raise ConfigError(f"bench.growth_reference={reference!r} is not allowed; give a context "
                          "length >= 1 (tokens), or null to measure no growth")
    for key in ("warmup", "decode_tokens", "max_context_step"):
        if int(bench[key]) < (1 if key != "warmup" else 0):
            raise ConfigError(f"bench.{key}={bench[key]} is too small")
    if int(bench.repeats) < 1:
        raise ConfigError(f"bench.repeats={bench.repeats} must be >= 1")
    return modes


def _compile_values(bench: Any) -> list[bool]:
    """bench.compile as a list of booleans (a single value counts as a list of one)."""
    raw = bench.get("compile", [False])
    values = list(raw) if OmegaConf.is_list(raw) or isinstance(raw, (list, tuple)) else [raw]
    if not values or any(not isinstance(v, bool) for v in values):
        raise ConfigError(f"bench.compile={values} is not allowed; give a list of true / false, "
                          "e.g. 'bench.compile=[false,true]'")
    return list(dict.fromkeys(values))


class Bench:
    """The state of one `run_bench` call: config, device, shapes, where records go."""

    def __init__(self, cfg: DictConfig, out_dir: Path) -> None:
        from archbench.archs.sizing import solve_size

        self.cfg, self.out_dir = cfg, out_dir
        self.bench = cfg.bench
        self.modes = _check_bench(self.bench)
        self.compile_values = _compile_values(self.bench)
        self.device = pick_device(self.bench.device, "bench.device")
        self.dtype = dtype_name(self.bench.dtype, self.device, "bench.dtype")
        self.vocab_size, vocab_note = vocab_size_of(cfg.tokenizer)
        self.arch, self.fit = solve_size(cfg.arch, cfg.size, self.vocab_size)
        self.rivals = {name: rival_arch(name, cfg, self.vocab_size)
                       for name in self.bench.get("rivals") or []}
        self.notes = [vocab_note] if vocab_note else []
        self.provenance = provenance(self.device)
        self.config = to_container(cfg)
        self.records: list[dict[str, Any]] = []
        self.isolate = bool(self.bench.isolate)
        budget = self.bench.rss_budget_gb
        self.rss_budget = int(float(budget) * 2**30) if budget else None

    # ---- tasks ---------------------------------------------------------------------------------
    def task(self, mode: str, context: int, batch: int, which: str = "ours",
             rss_budget: int | None = None, compiled: bool = False) -> dict[str, Any]:
        return {
            "which": which, "mode": mode, "context": int(context), "batch": int(batch),
            "compile": bool(compiled), "arch_name": str(self.cfg.arch.name),
            "profile_dir": str(self.out_dir / "profiles"),
            "arch": OmegaConf.to_container(self.arch, resolve=True),
            "vocab_size": self.vocab_size, "dtype": self.dtype, "device": str(self.device),
            "bench": OmegaConf.to_container(self.bench, resolve=True),
            "train": OmegaConf.to_container(self.cfg.train, resolve=True),
            "seed": int(self.cfg.train.seed), "rss_budget_bytes": rss_budget or self.rss_budget,
        }

    def measure(self, task: dict[str, Any]) -> dict[str, Any]:
        from archbench.evaluate.bench import worker

        if self.isolate:
            result = worker.run_isolated(task, float(self.bench.timeout_s),
                                         preload_peers=bool(self.bench.peers))
        else:
            result = worker.execute(task)
        result["isolated"] = self.isolate
        return result

    # ---- records -------------------------------------------------------------------------------
    def record(self, mode: str, context: int | None, batch: int, result: dict[str, Any],
               peer: dict[str, Any] | None = None) -> dict[str, Any]:
        rec: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
        rec.update({k: v for k, v in result.items() if k in RECORD_KEYS})
        rec.update(
            kind="bench", mode=mode, arch=self.cfg.arch.name, size=self.cfg.size.name,
            d_model=int(self.arch.d_model), n_layers=int(self.arch.n_layers),
            size_fit=self.fit.as_dict(), context=context, batch=batch, dtype=self.dtype,
            device=str(self.device), notes=[*self.notes, *result.get("notes", [])],
            device_name=gpu_name(self.device),
            peer=peer, provenance=self.provenance, config=self.config,
        )
        if "traceback" in result and rec["status"] == "error":
            rec["notes"].append(result["traceback"])
        append_jsonl(self.out_dir / "records.jsonl", rec)
        self.records.append(rec)
        return rec

    def peer_of(self, mode: str, context: int, batch: int, ours: dict[str, Any],
                compiled: bool = False) -> tuple[dict[str, Any] | None, list[str]]:
        """The peer's measurement as a record's `peer`, with bench.peer_rounds alternations
        (the peer always eager; ours compiled when `compiled`)."""
        result = self.measure(self.task(mode, context, batch, which="peer"))
        if result["status"] == "skipped":
            return None, [n for n in result.get("notes", []) if n]
        theirs = result.get("tokens_per_s") if result["status"] == "ok" else None
        mine = _ours_speed(mode, ours)
        peer = {
            "name": result.get("peer_name"), "status": result["status"],
            "tokens_per_s": theirs, "median_s": result.get("median_s"),
            "per_token_s": result.get("per_token_s"),
            "ratio": mine / theirs if (mine and theirs) else None,
            "ratio_basis": "compiled" if compiled else ("eager" if mode == "decode" else "same"),
            "peak_bytes": result.get("peak_bytes"), "first_call_s": result.get("first_call_s"),
            "params_total": (result.get("params") or {}).get("total"),
            "error": result.get("error"), "rounds": None,
        }
        notes = [f"peer: {n}" for n in result.get("notes", []) if n]
        if peer["ratio"] is not None and int(self.bench.peer_rounds) > 1:
            pairs = [(mine, theirs)]
            for _ in range(int(self.bench.peer_rounds) - 1):
                again = self.measure(self.task(mode, context, batch, compiled=compiled))
                other = self.measure(self.task(mode, context, batch, which="peer"))
                if again["status"] == other["status"] == "ok":
                    pairs.append((_ours_speed(mode, again), other["tokens_per_s"]))
            ratios = [a / b for a, b in pairs]
            peer["rounds"] = [{"ours_tokens_per_s": a, "peer_tokens_per_s": b, "ratio": a / b}
                              for a, b in pairs]
            peer["ratio"] = statistics.median(ratios)
            notes.append(f"peer ratio: median of {len(ratios)} alternating rounds "
                         f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
        peer["interleaved"] = None
        if peer["ratio"] is not None and self.bench.peer_interleave:
            pair = self.measure(self.task(mode, context, batch, which="pair", compiled=compiled))
            if pair["status"] == "ok":
                peer["interleaved"] = pair["paired"]
                peer["ratio"] = pair["paired"]["ratio"]
                peer["ratio_basis"] = "interleaved" + (
                    " compiled" if compiled else " eager" if mode == "decode" else "")
            else:
                notes.append(f"interleaved peer measurement failed ({pair['status']}): "
                             f"{pair.get('error')}; ratio from the separate measurements")
        return peer, notes

    def rival_of(self, name: str, mode: str, context: int, batch: int, compiled: bool
                 ) -> dict[str, Any]:
        """One entry of a record's `rivals`: ours and the rival timed in alternation."""
        arch, fit = self.rivals[name]
        task = self.task(mode, context, batch, which="rival", compiled=compiled)
        task["rival"] = {"name": name, "arch": OmegaConf.to_container(arch, resolve=True)}
        result = self.measure(task)
        return {**(result.get("paired") or {}), "status": result["status"],
                "error": result.get("error"), "d_model": int(arch.d_model),
                "n_layers": int(arch.n_layers), "size_fit": fit.as_dict(),
                "params": result.get("rival_params")}

    # ---- the sweep -----------------------------------------------------------------------------
    def grid(self, mode: str) -> tuple[list[int], list[int]]:
        """(contexts, batch sizes) of `mode`: bench.contexts / bench.batch_sizes unless
        bench.by_mode.<mode> gives its own (e.g. training at batch 8, decoding at 1 and 8)."""
        own = (self.bench.get("by_mode") or {}).get(mode) or {}
        contexts = own.get("contexts") or self.bench.contexts
        batches = own.get("batch_sizes") or self.bench.batch_sizes
        return sorted({int(c) for c in contexts}), [int(b) for b in batches]

    def run_modes(self) -> None:
        modes = [m for m in self.modes if m in MODES]
        grids = {mode: self.grid(mode) for mode in modes}
        every_batch = list(dict.fromkeys(b for mode in modes for b in grids[mode][1]))
        for batch in every_batch:
            for mode in (m for m in modes if batch in grids[m][1]):
                # bench.compile applies to train / prefill / decode; memory is measured once.
                for compiled in (self.compile_values if mode in COMPILE_MODES else [False]):
                    self.run_contexts(mode, grids[mode][0], batch, compiled)

    def run_contexts(self, mode: str, contexts: list[int], batch: int, compiled: bool) -> None:
        failed_at: int | None = None
        for context in contexts:
            if failed_at is not None:
                self.record(mode, context, batch, {
                    "status": "oom", "compiled": compiled, "error": f"not run: {mode} ran out "
                    f"of memory at context {failed_at}", "notes": [
                        f"inferred from the OOM at context {failed_at}"]})
                continue
            result = self.measure(self.task(mode, context, batch, compiled=compiled))
            peer = None
            limit = self.bench.get("peer_max_context")
            if self.bench.peers and limit is not None and context > int(limit):
                result.setdefault("notes", []).append(
                    f"no peer measurement above bench.peer_max_context={limit}")
            elif self.bench.peers and mode in PEER_MODES and result["status"] == "ok":
                peer, notes = self.peer_of(mode, context, batch, result, compiled)
                result.setdefault("notes", []).extend(notes)
            elif self.bench.peers and mode not in PEER_MODES:
                result.setdefault("notes", []).append(f"no peer measurement in {mode} mode")
            if self.rivals and mode in PEER_MODES and result["status"] == "ok":
                result["rivals"] = {name: self.rival_of(name, mode, context, batch, compiled)
                                    for name in self.rivals}
            result.setdefault("compiled", compiled)
            self.record(mode, context, batch, result, peer)
            if result["status"] == "oom":
                failed_at = context
            _progress(self.records[-1])

    def run_max_context(self) -> None:
        from archbench.evaluate.bench.memory import available_bytes

        limit = int(self.bench.max_context_limit)
        start = min(min(int(c) for c in self.bench.contexts), limit)
        budget = self.rss_budget
        notes = []
        if self.device.type == "cpu" and budget is not None:
            notes.append(f"CPU: RSS budget {budget / 2**30:.2f} GiB per probe (RLIMIT_DATA)")
        if self.device.type == "cpu" and budget is None:
            free = available_bytes()
            if free:
                budget = free // 2
                notes.append(f"CPU: RSS budget of half the available memory, {budget / 2**30:.2f}"
                             " GiB (set bench.rss_budget_gb)")
        for batch in [int(b) for b in self.bench.batch_sizes]:
            for probe in ("prefill", "train"):
                best, probes, first_failed = search_max_context(
                    lambda n, p=probe, b=batch: self.measure(
                        self.task(f"probe_{p}", n, b, rss_budget=budget)),
                    start, limit, int(self.bench.max_context_step))
                last = probes[-1] if probes else {}
                found = next((p for p in probes if p["context"] == best), {})
                result = {
                    "status": "ok" if best is not None else last.get("status", "error"),
                    "error": None if best is not None else last.get("error"),
                    "notes": list(notes), "probe": probe,
                    "probes": [{k: p.get(k) for k in ("context", "status", "peak_bytes", "error")}
                               for p in probes],
                    "first_failed_context": first_failed, "limit": limit,
                    "rss_budget_bytes": budget if self.device.type == "cpu" else None,
                    **{k: found.get(k) for k in ("peak_bytes", "baseline_bytes", "peak_kind",
                                                 "params", "kernel_paths", "weight_bytes",
                                                 "state_bytes_measured",
                                                 "state_bytes_analytic", "threads")},
                }
                if best == limit:
                    result["notes"].append("bounded by bench.max_context_limit")
                errors = [p for p in probes if p["status"] == "error"]
                if errors:
                    result["notes"].append(f"a probe failed with an error: {errors[0]['error']}")
                self.record("max_context", best, batch, result)
                _progress(self.records[-1])


def rival_arch(name: str, cfg: DictConfig, vocab_size: int) -> tuple[Any, Any]:
    """The arch of bench.rivals' `name`: conf/arch/<name>.yaml over the schema's defaults,
    validated and solved to `cfg`'s size (the command line's arch.* overrides are this
    backbone's, not the rival's)."""
    from importlib import resources

    from archbench.archs.sizing import solve_size
    from archbench.config import arch_schema, validate_arch

    folder = resources.files("archbench.conf") / "arch"
    names = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir()
                   if p.name.endswith(".yaml"))
    if name not in names or name == cfg.arch.name:
        raise ConfigError(f"bench.rivals: {name!r} is not allowed; choose from "
                          f"{[n for n in names if n != cfg.arch.name]} (conf/arch/, not the "
                          "backbone itself)")
    arch = OmegaConf.merge(OmegaConf.structured(arch_schema()),
                           OmegaConf.create((folder / f"{name}.yaml").read_text()))
    validate_arch(arch)
    return solve_size(arch, cfg.size, vocab_size)


def search_max_context(probe: Any, start: int, limit: int, step: int
                       ) -> tuple[int | None, list[dict[str, Any]], int | None]:
    """Largest length in [start, limit] that fits: doubling, then bisection to `step` tokens.

    `probe(length)` returns a result dict with a status; "ok" fits, "oom" and "timeout" do not,
    "error" stops the search (an error is not a memory limit). Returns (best or None, the probe
    results in order, each with its "context", the smallest failing length or None).
    """
    probes: list[dict[str, Any]] = []

    def fits(length: int) -> str:
        result = probe(length)
        probes.append({**result, "context": length})
        return result["status"]

    good: int | None = None
    bad: int | None = None
    length = start
    while True:
        status = fits(length)
        if status == "ok":
            good = length
            if length >= limit:
                break
            length = min(2 * length, limit)
        elif status == "error":
            return good, probes, None
        else:
            bad = length
            break
    if good is not None and bad is not None:
        while bad - good > step:
            mid = (good + bad) // 2 // step * step
            if mid <= good:
                mid = good + step
            if mid >= bad:
                break
            status = fits(mid)
            if status == "ok":
                good = mid
            elif status == "error":
                break
            else:
                bad = mid
    return good, probes, bad


def _ours_speed(mode: str, result: dict[str, Any]) -> float | None:
    """Our tokens/s as compared with a peer: eager decoding for decode (the peers run eager)."""
    return result.get("eager_tokens_per_s") if mode == "decode" else result.get("tokens_per_s")


def _progress(rec: dict[str, Any]) -> None:
    speed = f"{rec['tokens_per_s']:.0f} tok/s" if rec.get("tokens_per_s") else ""
    peer = rec.get("peer") or {}
    ratio = f" ratio vs {peer['name']}: {peer['ratio']:.2f}" if peer.get("ratio") else ""
    ratio += "".join(f", vs {name}: {pair['ratio']:.2f}" if pair.get("ratio") else
                     f", vs {name}: {pair.get('status')}"
                     for name, pair in (rec.get("rivals") or {}).items())
    compiled = f" compiled (+{rec['compile_s']:.1f}s)" if rec.get("compiled") and rec.get(
        "compile_s") is not None else ""
    print(f"[bench] {rec['arch']}/{rec['size']} {rec['mode']:<11} ctx={rec['context']} "
          f"batch={rec['batch']} {rec['dtype']}{compiled}: {rec['status']} {speed}{ratio}",
          flush=True)


# ---- CSV --------------------------------------------------------------------------------------


def csv_row(rec: dict[str, Any]) -> dict[str, Any]:
    spread = rec.get("spread") or {}
    params = rec.get("params") or {}
    peer = rec.get("peer") or {}
    row = {k: rec.get(k) for k in CSV_COLUMNS if k in rec}
    row.update(
        q1_s=spread.get("q1"), q3_s=spread.get("q3"), iqr_s=spread.get("iqr"),
        min_s=spread.get("min"), max_s=spread.get("max"), repeats=spread.get("n"),
        params_total=params.get("total"),
        params_active_non_embedding=params.get("active_non_embedding"),
        kernel_paths=json.dumps(rec.get("kernel_paths"), sort_keys=True)
        if rec.get("kernel_paths") else None,
        peer_name=peer.get("name"), peer_tokens_per_s=peer.get("tokens_per_s"),
        peer_ratio=peer.get("ratio"), peer_ratio_basis=peer.get("ratio_basis"),
        profile_bound=(rec.get("profile") or {}).get("bound"),
        growth_reference=(rec.get("growth") or {}).get("reference_context"),
        growth_ratio=(rec.get("growth") or {}).get("ratio"),
        rival_ratios=json.dumps({name: pair.get("ratio") for name, pair in rec["rivals"].items()},
                                sort_keys=True) if rec.get("rivals") else None,
        notes=" | ".join(n.splitlines()[0] for n in rec.get("notes") or [] if n),
    )
    return row


def write_csv(out_dir: Path) -> Path:
    """bench.csv from every bench record of records.jsonl (so appended runs stay complete)."""
    records = [r for r in read_jsonl(out_dir / "records.jsonl") if r.get("kind") == "bench"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for rec in records:
        writer.writerow(csv_row(rec))
    path = out_dir / "bench.csv"
    write_text_atomic(path, buf.getvalue())
    return path


def run_bench(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the benchmark of `cfg` and return its records (also in records.jsonl / bench.csv)."""
    validate(cfg)
    out_dir = _output_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(cfg, out_dir)
    bench.run_modes()
    if bench.bench.max_context or "max_context" in bench.modes:
        bench.run_max_context()
    if bench.records:
        path = write_csv(out_dir)
        print(f"[bench] {len(bench.records)} records -> {out_dir / 'records.jsonl'}, {path}")
    return bench.records
