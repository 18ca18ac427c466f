"""Speed and memory benchmarks (evaluate/bench): FLOPs accounting, records, isolation, OOM as a
result, state bytes against context, the max-context search and the Llama peer mapping.

Speed itself is never asserted; what is asserted is that the numbers are consistent with each
other and with hand counts.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_config

from archbench.archs.compiling import FROZEN_DECODE
from archbench.archs.model import LanguageModel
from archbench.config import ConfigError
from archbench.evaluate.bench import flops, runner
from archbench.evaluate.bench.devices import peak_tflops
from archbench.evaluate.bench.measure import is_oom, restore_cache, snapshot_cache, time_pair
from archbench.evaluate.reporting.build import build_report
from archbench.io import read_jsonl

VOCAB = 258  # the byte tokenizer: 256 bytes + eos + pad

# Small explicit shapes per backbone (no size solving), and the module each one needs.
ARCHS: dict[str, tuple[list[str], str | None]] = {
    "transformer": (["arch.d_model=64", "arch.n_layers=2", "arch.attention.head_dim=16"], None),
    "gpt2": (["arch.d_model=64", "arch.n_layers=2", "arch.attention.head_dim=16"], None),
    "mamba": (["arch.d_model=64", "arch.n_layers=2"], "archbench.archs.mamba"),
    "mamba2": (["arch.d_model=64", "arch.n_layers=2", "arch.mamba2.d_state=16"],
               "archbench.archs.mamba"),
    "rwkv7": (["arch.d_model=64", "arch.n_layers=2"], "archbench.archs.rwkv"),
    "jamba": (["arch.d_model=64", "arch.n_layers=8", "arch.attention.head_dim=16",
               "arch.moe.n_experts=4"], "archbench.archs.mamba"),
}


def _arch_params() -> list[Any]:
    """Every backbone, always: a backbone that stops importing must fail here, not skip."""
    return [pytest.param(name, id=name) for name in ARCHS]


def bench_config(tmp_path: Path, arch: str = "transformer", *extra: str) -> Any:
    return make_config(
        f"arch={arch}", *ARCHS[arch][0], f"out_dir={tmp_path}", "bench=cpu_smoke",
        "bench.repeats=2", "bench.warmup=1", "bench.min_seconds=0", "bench.decode_tokens=4",
        "bench.threads=1", *extra,
    )


# ---- FLOPs ------------------------------------------------------------------------------------


def test_flops_match_a_hand_count_of_a_tiny_transformer() -> None:
    d, layers, heads, head_dim, vocab = 32, 2, 2, 16, VOCAB
    model = LanguageModel({"d_model": d, "n_layers": layers, "attention": {"head_dim": head_dim},
                           "mlp": {"multiple_of": 16}}, vocab)
    hidden = 96  # int(8/3 * 32) = 85, rounded up to a multiple of 16
    per_layer = 4 * d * d + 3 * d * hidden + 2 * d  # q, k, v, o; gate, up, down; two RMSNorms
    non_embedding = layers * per_layer + d  # + the final norm; the head is tied to the embedding
    assert model.param_counts()["active_non_embedding"] == non_embedding

    def forward(context: int) -> float:
        return 2 * (non_embedding + d * vocab) + layers * 4 * heads * head_dim * context

    batch, context, new = 3, 40, 5
    assert flops.train_flops(model, batch, context) == batch * context * 3 * forward(context)
    # prefill: the head runs on the last position only
    expected_prefill = batch * context * forward(context) - batch * (context - 1) * 2 * d * vocab
    assert flops.prefill_flops(model, batch, context) == expected_prefill
    # decode: new token i attends over context + i + 1 positions
    expected_decode = batch * sum(forward(context + i + 1) for i in range(new))
    assert flops.decode_flops(model, batch, context, new) == expected_decode
    assert flops.step_flops(model, "memory", batch, context) is None


def test_peak_table_matches_device_names_and_refuses_unknown_ones() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.5
    assert peak_tflops("NVIDIA H200", "bf16")[0] == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32")[0] == 19.5
    peak, why = peak_tflops("Some Future GPU", "bf16")
    assert peak is None and "not in the peak table" in why


# ---- a CPU smoke run --------------------------------------------------------------------------

TIMED = ("median_s", "spread", "tokens_per_s", "flops", "tflops", "first_call_s")
ALWAYS = ("peak_bytes", "baseline_bytes", "peak_kind", "kernel_paths", "params", "weight_bytes",
          "provenance", "config", "d_model", "n_layers", "size_fit")
BY_MODE = {
    "train": TIMED,
    "prefill": (*TIMED, "state_bytes_measured", "state_bytes_analytic"),
    "decode": (*TIMED, "state_bytes_measured", "state_bytes_analytic", "per_token_s",
               "new_tokens", "eager_median_s", "cuda_graphs"),
    "memory": ("state_bytes_measured", "state_bytes_analytic"),
}


def test_cpu_smoke_run_gives_one_complete_record_per_context_and_mode(tmp_path: Path) -> None:
    cfg = bench_config(tmp_path, "transformer", "bench.contexts=[32,64]")
    records = runner.run_bench(cfg)
    assert sorted((r["mode"], r["context"]) for r in records) == sorted(
        (m, c) for m in ("train", "prefill", "decode", "memory") for c in (32, 64))
    for rec in records:
        assert set(runner.RECORD_KEYS) <= set(rec)
        assert rec["status"] == "ok", rec["error"]
        assert rec["kind"] == "bench" and rec["arch"] == "transformer" and rec["isolated"]
        assert rec["dtype"] == "fp32" and rec["device"] == "cpu" and rec["batch"] == 1
        missing = [k for k in (*ALWAYS, *BY_MODE[rec["mode"]]) if rec[k] is None]
        assert not missing, (rec["mode"], missing)
        assert rec["mfu"] is None  # TFLOP/s only on CPU
        assert rec["peak_bytes"] > rec["baseline_bytes"] > 0
        assert rec["provenance"]["device"]["type"] == "cpu"
        if rec["mode"] != "memory":
            assert "CPU" in rec["peak_source"]
            spread = rec["spread"]
            assert spread["n"] >= 2 and spread["min"] <= rec["median_s"] <= spread["max"]
            units = rec["context"] if rec["mode"] != "decode" else rec["new_tokens"]
            assert rec["tokens_per_s"] == pytest.approx(units / rec["median_s"])
            assert rec["tflops"] == pytest.approx(rec["flops"] / rec["median_s"] / 1e12)
        if rec["mode"] in ("prefill", "memory", "decode"):
            assert rec["state_bytes_measured"] == rec["state_bytes_analytic"] > 0
        if rec["mode"] == "decode":
            assert rec["cuda_graphs"] is False and rec["cuda_graphs_note"] == "not on CUDA"
            assert rec["per_token_s"] == pytest.approx(rec["median_s"] / 4)
    # peak memory is attributed to each measurement: training (grads, AdamW state) needs more
    peak = {(r["mode"], r["context"]): r["peak_bytes"] for r in records}
    assert peak[("train", 64)] > peak[("memory", 64)]
    assert len(read_jsonl(tmp_path / "records.jsonl")) == len(records)
    with open(tmp_path / "bench.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(records) and list(rows[0]) == list(runner.CSV_COLUMNS)
    assert {row["status"] for row in rows} == {"ok"}


def test_a_real_allocation_failure_in_an_isolated_run_is_an_oom_record(tmp_path: Path) -> None:
    # 8 MB of data memory for the measuring process: a 64K-token prefill cannot fit
    cfg = bench_config(tmp_path, "mamba2",
                       "bench.modes=[memory]", "bench.contexts=[65536]",
                       "bench.rss_budget_gb=0.008")
    (rec,) = runner.run_bench(cfg)
    assert rec["status"] == "oom", rec["error"]
    assert "allocate" in rec["error"] and any("RLIMIT_DATA" in n for n in rec["notes"])


# ---- out of memory ----------------------------------------------------------------------------


def test_an_induced_oom_is_recorded_and_the_sweep_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_forward = LanguageModel.forward
    long_calls = []

    def forward(self: Any, tokens: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if tokens.shape[1] >= 64:  # a fake allocator failure for long inputs
            long_calls.append(tokens.shape[1])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return real_forward(self, tokens, *args, **kwargs)

    monkeypatch.setattr(LanguageModel, "forward", forward)
    cfg = bench_config(tmp_path, "transformer", "bench.isolate=false",
                       "bench.contexts=[32,64,128]", "bench.modes=[prefill,decode,memory]")
    records = runner.run_bench(cfg)
    status = {(r["mode"], r["context"]): r["status"] for r in records}
    for mode in ("prefill", "decode", "memory"):
        assert status[(mode, 32)] == "ok"  # the sweep went on after the previous mode's OOM
        assert status[(mode, 64)] == "oom"
        assert status[(mode, 128)] == "oom"
    by_key = {(r["mode"], r["context"]): r for r in records}
    assert "Tried to allocate" in by_key[("prefill", 64)]["error"]
    notes = by_key[("prefill", 128)]["notes"]
    assert any("inferred from the OOM at context 64" in n for n in notes)
    assert long_calls == [64, 64, 64]  # 128 was not run after 64 ran out of memory
    assert len(read_jsonl(tmp_path / "records.jsonl")) == 9


def test_a_kernel_that_cannot_run_is_an_error_record_and_the_sweep_goes_on(
    tmp_path: Path
) -> None:
    cfg = bench_config(tmp_path, "transformer", "bench.isolate=false", "bench.modes=[memory]",
                       "bench.contexts=[16,32]", "arch.attention.kernels=cuda")
    records = runner.run_bench(cfg)
    assert [r["status"] for r in records] == ["error", "error"]  # both contexts were tried
    assert all("cannot run" in r["error"] for r in records)


def test_oom_recognition() -> None:
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to ..."))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))


# ---- state bytes and decoding caches ----------------------------------------------------------


@pytest.mark.parametrize("arch", _arch_params())
def test_state_bytes_are_linear_for_attention_and_constant_for_recurrent_layers(
    tmp_path: Path, arch: str
) -> None:
    cfg = bench_config(tmp_path, arch, "bench.isolate=false", "bench.modes=[memory]",
                       "bench.contexts=[16,32,64]", "bench.batch_sizes=[2]")
    records = runner.run_bench(cfg)
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records]
    measured = {r["context"]: r["state_bytes_measured"] for r in records}
    assert all(r["state_bytes_measured"] == r["state_bytes_analytic"] for r in records)
    model = LanguageModel(cfg.arch, VOCAB)
    attn_layers = [b.mixer for b in model.blocks if b.mixer_kind == "attention"]
    # K and V, fp32, batch 2, per token of context, over the attention layers (by hand)
    slope = sum(2 * 2 * m.n_kv_heads * m.head_dim * 4 for m in attn_layers)
    assert measured[32] - measured[16] == slope * 16
    assert measured[64] - measured[32] == slope * 32
    if not attn_layers:
        assert measured[16] == measured[64] > 0  # recurrent state: constant in the context
    elif arch in ("transformer", "gpt2"):
        assert measured[16] == slope * 16  # nothing but the KV cache


@pytest.mark.parametrize("arch", _arch_params())
def test_restored_cache_decodes_the_same_tokens_as_the_full_forward(
    tmp_path: Path, arch: str
) -> None:
    """Every decode repeat starts from a restored snapshot: it must reproduce the same logits,
    and those must be the full forward's (else the timed decode is not real decoding)."""
    cfg = bench_config(tmp_path, arch)
    torch.manual_seed(0)
    model = LanguageModel(cfg.arch, VOCAB).eval()
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = model.init_cache(2, 12)
        model(tokens[:, :8], cache)
        saved = snapshot_cache(cache)
        for _ in range(2):
            restore_cache(cache, saved)
            steps = [model(tokens[:, i : i + 1], cache) for i in range(8, 12)]
            torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 8:], atol=2e-4, rtol=2e-4)
            assert cache.pos == 12


# ---- max context ------------------------------------------------------------------------------


def test_max_context_search_doubles_then_bisects() -> None:
    tried = []

    def probe(length: int) -> dict[str, Any]:
        tried.append(length)
        return {"status": "ok" if length <= 1000 else "oom"}

    best, probes, failed = runner.search_max_context(probe, 128, 65536, 64)
    assert tried[:5] == [128, 256, 512, 1024, 768]
    assert best is not None and best <= 1000 < best + 64 and best % 64 == 0
    assert failed is not None and failed > 1000 and failed - best <= 64
    assert [p["context"] for p in probes] == tried
    best, _, failed = runner.search_max_context(lambda n: {"status": "ok"}, 128, 1000, 64)
    assert best == 1000 and failed is None  # bounded by the limit
    best, probes, _ = runner.search_max_context(
        lambda n: {"status": "ok" if n < 300 else "error", "error": "boom"}, 128, 4096, 64)
    assert best == 256 and probes[-1]["status"] == "error"  # an error is not a memory limit


def test_max_context_records_come_out_of_the_sweep(tmp_path: Path) -> None:
    cfg = bench_config(tmp_path, "transformer", "bench.isolate=false", "bench.modes=[]",
                       "bench.max_context=true", "bench.contexts=[32]",
                       "bench.max_context_limit=128")
    records = runner.run_bench(cfg)
    assert [(r["mode"], r["probe"]) for r in records] == [("max_context", "prefill"),
                                                          ("max_context", "train")]
    for rec in records:
        assert rec["status"] == "ok" and rec["context"] == 128
        assert [p["context"] for p in rec["probes"]] == [32, 64, 128]
        assert "bounded by bench.max_context_limit" in rec["notes"]
        assert rec["peak_bytes"] and rec["params"]


# ---- peers ------------------------------------------------------------------------------------


def test_llama_peer_is_the_same_network_and_decodes_with_its_cache() -> None:
    pytest.importorskip("transformers")
    import transformers

    from archbench.evaluate.bench import peers

    arch = {"d_model": 64, "n_layers": 2, "tie_embeddings": False, "norm_eps": 1e-6,
            "attention": {"head_dim": 16, "n_kv_heads": 2, "rope_theta": 5e5},
            "mlp": {"multiple_of": 16}}
    torch.manual_seed(0)
    ours = LanguageModel(arch, VOCAB).eval()
    hf = transformers.LlamaForCausalLM(peers.llama_config(ours)).eval()
    hf.load_state_dict(peers.to_llama_state_dict(ours))
    tokens = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=tokens).logits, ours(tokens), atol=1e-4,
                                   rtol=1e-4)
        peer = peers.HFPeer("hf:LlamaForCausalLM", hf)
        setup, step = peer.decode(tokens[:, :20], tokens[:, 20:])
        setup()
        step()
        assert peer.decoding["cache"].get_seq_length() == 24
        torch.testing.assert_close(peer.decoding["logits"][:, -1], ours(tokens)[:, -1],
                                   atol=1e-4, rtol=1e-4)
    gpt2 = LanguageModel({"d_model": 64, "n_layers": 2, "norm": "layernorm",
                          "attention": {"head_dim": 16, "position": "learned"},
                          "mlp": {"kind": "gelu"}}, VOCAB)
    choice = peers.choose_peer(gpt2, torch.device("cpu"))
    assert choice.build is None and "no LlamaForCausalLM equivalent" in choice.note


def test_peer_ratio_in_the_record_is_ours_over_the_peer(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    cfg = bench_config(tmp_path, "transformer", "bench.isolate=false", "bench.peers=true",
                       "bench.modes=[train,memory]", "bench.contexts=[32]", "bench.peer_rounds=2")
    train, memory = runner.run_bench(cfg)
    peer = train["peer"]
    assert peer["name"] == "hf:LlamaForCausalLM" and peer["status"] == "ok"
    assert peer["params_total"] == train["params"]["total"]  # the same network
    first, second = peer["rounds"]  # ours and the peer, measured alternately twice
    assert first["ours_tokens_per_s"] == train["tokens_per_s"]
    assert first["peer_tokens_per_s"] == peer["tokens_per_s"]
    for r in (first, second):
        assert r["ratio"] == pytest.approx(r["ours_tokens_per_s"] / r["peer_tokens_per_s"])
    assert peer["ratio"] == pytest.approx((first["ratio"] + second["ratio"]) / 2)
    assert memory["peer"] is None and any("no peer" in n for n in memory["notes"])


def test_interleaved_peer_timing_alternates_and_gives_the_ratio(tmp_path: Path) -> None:
    calls: list[str] = []
    a, b = time_pair(lambda: calls.append("a"), lambda: calls.append("b"), torch.device("cpu"),
                     warmup=1, repeats=4, min_seconds=0, setup_a=lambda: calls.append("sa"))
    timed = [c for c in calls[6:] if c != "sa"]  # after the first calls and one warm-up each
    assert timed == ["a", "b", "b", "a", "a", "b", "b", "a"]  # each pair adjacent, ABBA
    assert calls.count("sa") == calls.count("a") and len(a.times) == len(b.times) == 4
    pytest.importorskip("transformers")
    cfg = bench_config(tmp_path, "transformer", "bench.isolate=false", "bench.peers=true",
                       "bench.peer_interleave=true", "bench.modes=[decode]", "bench.contexts=[16]",
                       "bench.repeats=3")
    (rec,) = runner.run_bench(cfg)
    peer = rec["peer"]
    paired = peer["interleaved"]
    assert paired["n"] >= 3 and paired["q1"] <= paired["ratio"] <= paired["q3"]
    assert paired["min"] <= paired["q1"] and paired["q3"] <= paired["max"]
    assert peer["ratio"] == paired["ratio"] and peer["ratio_basis"] == "interleaved eager"
    assert paired["ours_tokens_per_s"] > 0 and paired["peer_tokens_per_s"] > 0


def test_a_missing_peer_is_a_note_not_an_error(tmp_path: Path) -> None:
    cfg = bench_config(tmp_path, "rwkv7", "bench.isolate=false", "bench.peers=true",
                       "bench.modes=[prefill]", "bench.contexts=[16]")
    (rec,) = runner.run_bench(cfg)
    assert rec["status"] == "ok" and rec["peer"] is None
    assert any("skipped" in n and "RWKV7" in n for n in rec["notes"])


# ---- CUDA -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", _arch_params())
def test_cuda_graph_decoding_checks_exact_and_is_used(tmp_path: Path, arch: str) -> None:
    cfg = bench_config(tmp_path, arch, "bench.isolate=false", "bench.modes=[decode]",
                       "bench.contexts=[64]", "bench.device=cuda", "bench.dtype=bf16")
    (rec,) = runner.run_bench(cfg)
    assert rec["status"] == "ok", rec["error"]
    assert rec["cuda_graphs"] is True, rec["cuda_graphs_note"]
    assert rec["graph_capture_s"] > 0 and rec["eager_median_s"] > 0
    assert rec["mfu"] is None or 0 < rec["mfu"] < 1
    assert math.isfinite(rec["tokens_per_s"])


def test_compile_axis_gives_eager_and_compiled_records_and_profile_files(tmp_path: Path) -> None:
    """bench.compile=[false,true]: one record per value for decode (memory once), the compiled
    one with "+compiled" kernel paths (on CPU with its weights frozen), its compile time apart,
    no graph breaks, its decoding checked against eager; bench.profile writes a trace and a
    top-operators table for each."""
    cfg = bench_config(tmp_path, "transformer", "bench.isolate=false",
                       "bench.modes=[decode,memory]", "bench.contexts=[16]",
                       "bench.compile=[false,true]", "bench.profile=true")
    records = runner.run_bench(cfg)
    assert [(r["mode"], r["compiled"]) for r in records] == [
        ("decode", False), ("decode", True), ("memory", False)]
    eager, compiled, _ = records
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records]
    assert eager["kernel_paths"] == {"attention": "matmul-softmax", "mlp:dense": "torch",
                                     "matmul": "onednn"}
    assert compiled["kernel_paths"] == {"attention": "matmul-softmax+compiled",
                                        "mlp:dense": "torch+compiled",
                                        "matmul": "onednn+compiled",
                                        "decode_graph": FROZEN_DECODE}
    assert eager["compile_s"] is None and compiled["compile_s"] > 0
    assert compiled["graph_breaks"] == 0 and compiled["compile_check"]["ok"]
    assert compiled["compile_check"]["max_logit_diff"] <= 1e-4 * compiled["compile_check"][
        "logit_scale"]
    for rec in (eager, compiled):
        profile = rec["profile"]
        assert Path(profile["trace"]).stat().st_size > 0 and Path(profile["table"]).is_file()
        assert profile["bound"] in ("matmul-bound", "overhead-bound")
        assert 0 <= profile["matmul_share"] <= 1 and profile["top_ops"]
    with open(tmp_path / "bench.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["compiled"] for row in rows] == ["False", "True", "False"]


def test_rivals_time_another_backbone_of_the_same_size_in_alternation(tmp_path: Path) -> None:
    """bench.rivals=[mamba] on RWKV-7: each train / decode record holds the two timed call by
    call in one process, the rival solved from its own conf/arch defaults to the same size; the
    memory record, which times nothing, holds none."""
    cfg = make_config("arch=rwkv7", "size=micro", f"out_dir={tmp_path}", "bench=cpu_smoke",
                      "bench.repeats=3", "bench.warmup=0", "bench.min_seconds=0",
                      "bench.decode_tokens=2", "bench.threads=1", "bench.isolate=false",
                      "bench.modes=[train,decode,memory]", "bench.contexts=[16]",
                      "bench.rivals=[mamba]")
    records = runner.run_bench(cfg)
    assert [r["mode"] for r in records] == ["train", "decode", "memory"]
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records]
    for rec in records[:2]:
        rival = rec["rivals"]["mamba"]
        assert rival["status"] == "ok" and rival["n"] == 3, rival
        assert rival["min"] <= rival["q1"] <= rival["ratio"] <= rival["q3"] <= rival["max"]
        assert rival["ours_tokens_per_s"] > 0 and rival["rival_tokens_per_s"] > 0
        assert rival["params"]["active"] == pytest.approx(
            rec["params"]["active"], rel=2 * cfg.size.tolerance)  # both solved to size=micro
    assert records[2]["rivals"] is None
    with open(tmp_path / "bench.csv", newline="") as fh:
        ratios = [row["rival_ratios"] for row in csv.DictReader(fh)]
    assert json.loads(ratios[1]) == {"mamba": records[1]["rivals"]["mamba"]["ratio"]}
    assert ratios[2] == ""
    report, _ = build_report([tmp_path], tmp_path / "report")
    # rows are sorted by mode: decode, then train
    rows = [line for line in report.read_text().splitlines()
            if line.startswith("| **rwkv7**") and "| mamba |" in line]
    assert len(rows) == 2 and f"| {records[1]['rivals']['mamba']['ratio']:.2f} |" in rows[0]


@pytest.mark.parametrize("rival", ["rwkv8", "rwkv7"])
def test_a_rival_that_is_not_another_backbone_is_refused_before_any_work(
        tmp_path: Path, rival: str) -> None:
    cfg = bench_config(tmp_path, "rwkv7", f"bench.rivals=[{rival}]")
    with pytest.raises(ConfigError, match=f"bench.rivals: '{rival}' is not allowed"):
        runner.run_bench(cfg)
    assert not (tmp_path / "records.jsonl").exists()


def test_an_empty_compile_axis_is_refused_before_any_work(tmp_path: Path) -> None:
    cfg = bench_config(tmp_path, "transformer", "bench.compile=[]")
    with pytest.raises(ConfigError, match="bench.compile"):
        runner.run_bench(cfg)


def test_by_mode_grids_and_peer_max_context(tmp_path: Path) -> None:
    """bench.by_mode gives a mode its own contexts / batches; above bench.peer_max_context no
    peer is measured (a note says so)."""
    pytest.importorskip("transformers")
    cfg = bench_config(tmp_path, "transformer", "bench.isolate=false", "bench.peers=true",
                       "bench.modes=[prefill,memory]", "bench.contexts=[8]",
                       "bench.peer_max_context=8",
                       "bench.by_mode.prefill.contexts=[8,16]",
                       "bench.by_mode.prefill.batch_sizes=[2]")
    records = runner.run_bench(cfg)
    assert [(r["mode"], r["context"], r["batch"]) for r in records] == [
        ("prefill", 8, 2), ("prefill", 16, 2), ("memory", 8, 1)]
    assert records[0]["peer"]["name"] == "hf:LlamaForCausalLM"
    assert records[1]["peer"] is None
    assert any("peer_max_context=8" in n for n in records[1]["notes"])
    bad = bench_config(tmp_path, "transformer", "bench.by_mode.train.contexts=[0]")
    with pytest.raises(ConfigError, match="bench.by_mode.train.contexts"):
        runner.run_bench(bad)


def test_compiled_measurements_run_under_no_grad_and_eager_ones_under_inference_mode() -> None:
    """A compiled step under inference_mode gets AOTAutograd's copy-every-buffer graph (see
    evaluate/bench/compiled.inference_context); eager steps keep inference_mode's lower cost."""
    from archbench.evaluate.bench.compiled import inference_context

    with inference_context({"compile": True}):
        assert not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    with inference_context({"compile": False}):
        assert torch.is_inference_mode_enabled()


def test_decode_growth_is_timed_against_the_reference_context_in_one_process(
        tmp_path: Path) -> None:
    """Above bench.growth_reference a decode record carries `growth`: its unit and the unit at
    the reference context timed in alternation (ratio = speed here / speed there); at or below
    the reference it is None; the report turns it into a verdict; a bad reference is refused
    before any work."""
    from archbench.evaluate.reporting.systems import growth_verdict

    cfg = bench_config(tmp_path, "mamba", "bench.isolate=false", "bench.modes=[decode]",
                       "bench.contexts=[8,64]", "bench.growth_reference=8", "bench.repeats=3")
    short, long = runner.run_bench(cfg)
    assert short["context"] == 8 and short["growth"] is None
    growth = long["growth"]
    assert growth["reference_context"] == 8 and growth["n"] >= 3
    assert growth["min"] <= growth["q1"] <= growth["ratio"] <= growth["q3"] <= growth["max"]
    with (tmp_path / "bench.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert float(rows[1]["growth_ratio"]) == pytest.approx(growth["ratio"])
    from archbench.evaluate.reporting.build import build_report

    report, _ = build_report([tmp_path], tmp_path / "report", "t")
    text = report.read_text()
    assert "Decoding cost against the context" in text
    assert f"| 8 → 64 | {growth['ratio']:.2f} |" in text
    assert growth_verdict({"ratio": 0.93, "min": 0.7, "max": 1.2}) == "flat (within 10%)"
    assert growth_verdict({"ratio": 0.25, "min": 0.2, "max": 0.3}) == "slower by 75%"
    assert growth_verdict({"ratio": 1.5, "min": 1.2, "max": 1.7}) == "faster by 50%"
    assert growth_verdict({"ratio": 1.21, "min": 0.93, "max": 1.46}).startswith("not resolved")
    # quartiles on one side are not enough: one pair below 1 leaves it unresolved
    assert growth_verdict({"ratio": 1.2, "q1": 1.11, "q3": 1.26, "min": 0.99,
                           "max": 1.32}).startswith("not resolved")
    bad = bench_config(tmp_path, "mamba", "bench.growth_reference=0")
    with pytest.raises(ConfigError, match="bench.growth_reference"):
        runner.run_bench(bad)
