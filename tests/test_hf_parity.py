"""Published models in: a random tiny Hugging Face model, saved as `save_pretrained` writes it,
imported with `archbench import`, gives the HF model's logits (fp32, within 1e-4) over a whole
sequence and when decoding token by token with each side's own cache; exported again, it gives
back the very tensors HF saved. No downloads: every model is built here from a config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from archbench.hf import export_model, import_model  # noqa: E402
from archbench.train.checkpoint import load_model  # noqa: E402

VOCAB = 300  # >= 258: the byte tokenizer fits when a folder has no tokenizer.json
TOL = 1e-4

CONFIGS = {
    "llama": ("LlamaForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_theta=500.0)),
    "llama_bias_tied": ("LlamaForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, head_dim=8, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True)),
    "gpt2": ("GPT2LMHeadModel", dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=96,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "mamba": ("MambaForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
        conv_kernel=4, time_step_rank=4, tie_word_embeddings=True)),
    "mamba2": ("Mamba2ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
        head_dim=16, num_heads=4, n_groups=1, chunk_size=8, conv_kernel=4,
        tie_word_embeddings=False)),
    "jamba": ("JambaForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=4, mamba_expand=2)),
}


def hf_folder(kind: str, root: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A random HF model of `kind`, every parameter perturbed (norms and biases too, which HF
    initialises to constants), saved with save_pretrained; returns (folder, model)."""
    cls_name, kwargs = CONFIGS[kind]
    cls = getattr(transformers, cls_name)
    config = getattr(transformers, cls_name.replace("ForCausalLM", "Config").replace(
        "LMHeadModel", "Config"))(**kwargs)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    folder = root / f"hf_{kind}"
    model.save_pretrained(folder)
    return folder, model


def _cache_of(out: object) -> object:
    for key in ("cache", "past_key_values", "cache_params"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise AssertionError("no cache returned")


@torch.no_grad()
def hf_decode(model: torch.nn.Module, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    """HF's cached decoding: the prompt in one call, then one token per call."""
    out = model(input_ids=tokens[:, :prompt], use_cache=True)
    logits, cache = [out.logits[:, -1]], _cache_of(out)
    for t in range(prompt, tokens.shape[1]):
        out = model(input_ids=tokens[:, t:t + 1], use_cache=True, cache=cache)
        logits.append(out.logits[:, -1])
        cache = _cache_of(out)
    return torch.stack(logits, 1)


@torch.no_grad()
def our_decode(model: torch.nn.Module, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    logits = [model(tokens[:, :prompt], cache)[:, -1]]
    for t in range(prompt, tokens.shape[1]):
        logits.append(model(tokens[:, t:t + 1], cache)[:, -1])
    return torch.stack(logits, 1)


PARITY: dict[str, tuple[float, float]] = {}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_imported_logits_match_hf(kind: str, tmp_path: Path) -> None:
    folder, hf = hf_folder(kind, tmp_path)
    import_model(str(folder), tmp_path / "run", name=f"hf-{kind}")
    ours, tokenizer, state = load_model(tmp_path / "run", "cpu")
    assert state["imported_from"]["hf_class"] == CONFIGS[kind][0]
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = (ours(tokens) - hf(input_ids=tokens, use_cache=False).logits).abs().max().item()
    decode = (our_decode(ours, tokens, 5) - hf_decode(hf, tokens, 5)).abs().max().item()
    PARITY[kind] = (full, decode)
    print(f"parity {CONFIGS[kind][0]} [{kind}]: max |logit diff| full {full:.2e} "
          f"decode {decode:.2e}")
    assert full < TOL and decode < TOL


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_hf_archbench_hf_gives_identical_tensors(kind: str, tmp_path: Path) -> None:
    folder, hf = hf_folder(kind, tmp_path)
    import_model(str(folder), tmp_path / "run")
    export_model(tmp_path / "run", tmp_path / "back")
    original = load_file(str(folder / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == [CONFIGS[kind][0]]
    reloaded = getattr(transformers, CONFIGS[kind][0]).from_pretrained(tmp_path / "back").eval()
    tokens = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (reloaded(input_ids=tokens).logits - hf(input_ids=tokens).logits).abs().max()
    assert diff.item() == 0.0


def test_imported_run_evaluates_like_a_trained_one(tmp_path: Path) -> None:
    """The imported folder is a run: eval writes records there, with the import's name."""
    from omegaconf import OmegaConf

    from archbench.config import root_schema
    from archbench.evaluate.quality.runner import run_eval

    folder, _ = hf_folder("mamba", tmp_path)
    import_model(str(folder), tmp_path / "run", name="tiny-mamba", seq_len=32)
    cfg = OmegaConf.structured(root_schema())
    cfg.ckpt = str(tmp_path / "run")
    cfg.eval.tasks = ["bpb"]
    cfg.eval.max_batches = 1
    cfg.eval.batch_size = 2
    cfg.eval.device = "cpu"
    run_eval(cfg)
    records = [json.loads(line) for line in
               (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    bpb = [r for r in records if r.get("metric") == "bpb"]
    assert bpb and bpb[0]["arch"] == "tiny-mamba" and bpb[0]["status"] == "ok"
    from archbench.evaluate.reporting.build import main as report_main

    report_main([str(tmp_path / "run"), "-o", str(tmp_path / "report")])
    report = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| **tiny-mamba** | 1 |"))
    assert f"{bpb[0]['value']:.3f}" in row  # the eval's bits per byte, in the quality table
