"""The shell and the Transformer: GQA and learned-position decoding, accounting, sizes, peers' math.

Causality, cache = full forward, state bytes and kernel-path choice for every mixer at its
defaults: tests/test_mixer_contract.py."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config, tiny_arch

from archbench.archs.model import LanguageModel
from archbench.archs.sizing import solve_size
from archbench.config import ConfigError

VOCAB = 101
TOL = 1e-4  # fp32: cached and full forwards sum in different orders

VARIANTS = {
    "llama": tiny_arch(),
    "llama_gqa_untied": tiny_arch(attention={"head_dim": 16, "n_kv_heads": 2},
                                  tie_embeddings=False),
    "gpt2": tiny_arch(norm="layernorm", attention={"head_dim": 16, "position": "learned",
                                                   "max_position": 64},
                      mlp={"kind": "gelu", "hidden_mult": 4.0, "multiple_of": 16}),
}


def _model(name: str) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(VARIANTS[name], VOCAB).eval()


@pytest.mark.parametrize("name", ["llama_gqa_untied", "gpt2"])  # variants beyond the defaults
@pytest.mark.parametrize("pieces", [[1] * 24, [5, 7, 1, 11]])
def test_cached_decoding_gives_full_forward_logits(name: str, pieces: list[int]) -> None:
    model = _model(name)
    tokens = torch.randint(0, VOCAB, (3, 24))
    with torch.no_grad():
        full = model(tokens)
        cache = model.init_cache(3, 32)
        outs, start = [], 0
        for n in pieces:
            outs.append(model(tokens[:, start : start + n], cache))
            start += n
    assert cache.pos == 24
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=TOL, rtol=TOL)


def test_learned_positions_refuse_longer_context() -> None:
    model = _model("gpt2")
    with pytest.raises(ValueError, match="max_position=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_param_counts_equal_the_modules_parameters(name: str) -> None:
    model = _model(name)
    counts = model.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    d = model.arch.d_model
    embedding = VOCAB * d + (64 * d if name == "gpt2" else 0)
    if name == "llama_gqa_untied":
        embedding += VOCAB * d
    assert counts["embedding"] == embedding
    assert counts["non_embedding"] == counts["total"] - embedding
    blocks = sum(p.numel() for p in model.blocks.parameters())
    final = sum(p.numel() for p in model.final_norm.parameters())
    assert counts["non_embedding"] == blocks + final


def test_kv_cache_bytes_by_hand_grow_linearly() -> None:
    model = _model("llama_gqa_untied")
    # 2 layers x (K, V) x batch 2 x 2 kv heads x 16 dims x 4 bytes per token
    assert model.cache_bytes(2, 64, torch.float32) == 2 * 2 * 2 * 2 * 16 * 4 * 64


def test_flops_per_token_by_hand() -> None:
    model = _model("llama")
    d, layers, context = 64, 2, 128
    hidden = 176  # 8/3 * 64 = 170 rounded up to a multiple of 16
    per_layer = 4 * d * d + 3 * d * hidden + 2 * d  # projections, SwiGLU, two RMSNorm weights
    non_embedding = layers * per_layer + d  # + the final norm
    expected = 2 * (non_embedding + d * VOCAB) + layers * 4 * d * context
    assert model.flops_per_token(context)["forward"] == expected
    assert model.flops_per_token(context)["train"] == 3 * expected


def test_matches_hugging_face_llama_with_the_same_weights() -> None:
    transformers = pytest.importorskip("transformers")
    model = _model("llama_gqa_untied")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    mapping = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight":
               "model.norm.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(2):
        for ours, theirs in (("mixer_norm", "input_layernorm"),
                             ("mlp_norm", "post_attention_layernorm")):
            mapping[f"blocks.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mapping[f"blocks.{i}.mixer.{proj}.weight"] = f"model.layers.{i}.self_attn.{proj}.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            mapping[f"blocks.{i}.mlp.{proj}.weight"] = f"model.layers.{i}.mlp.{proj}.weight"
    ours = model.state_dict()
    hf.load_state_dict({theirs: ours[name] for name, theirs in mapping.items()})
    tokens = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", ["micro", "tiny", "xs", "s", "m"])
@pytest.mark.parametrize("arch", ["transformer", "gpt2"])
def test_size_presets_land_within_tolerance(arch: str, size: str) -> None:
    cfg = make_config(f"arch={arch}", f"size={size}")
    resolved, fit = solve_size(cfg.arch, cfg.size, 258)
    assert abs(fit.error) <= cfg.size.tolerance
    with torch.device("meta"):
        counts = LanguageModel(resolved, 258).param_counts()
    assert counts["non_embedding"] == fit.achieved


def test_impossible_size_names_the_field() -> None:
    cfg = make_config("size.target=1000", "size.tolerance=0.01")
    with pytest.raises(ConfigError, match="size.target"):
        solve_size(cfg.arch, cfg.size, 258)


def test_size_solver_counts_equal_built_hybrid_models() -> None:
    """The solver's per-block counting equals the parameters of the model actually built,
    also where layers differ (RWKV-7's first layer has no value residual LoRA)."""
    from archbench.archs.sizing import measure

    arch = make_config("arch=rwkv7").arch
    arch.pattern.mixers = ["attention", "rwkv7", "rwkv7"]
    arch.pattern.mlps = ["dense"]
    arch.d_model, arch.n_layers = 128, 6
    built = LanguageModel(arch, 258).param_counts()["non_embedding"]
    assert measure(arch, 128, 6, 258, "non_embedding") == built


def test_dropout_acts_in_training_only_and_is_checked() -> None:
    """arch.dropout (nanoGPT's embedding and residual dropout): training forwards differ from
    one call to the next, evaluation is deterministic and equals the model without dropout."""
    torch.manual_seed(0)
    plain = LanguageModel(tiny_arch(), VOCAB)
    torch.manual_seed(0)
    dropped = LanguageModel(tiny_arch(dropout=0.2), VOCAB)
    tokens = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert not torch.allclose(dropped.train()(tokens), dropped.train()(tokens))
        assert torch.equal(dropped.eval()(tokens), plain.eval()(tokens))
    with pytest.raises(ConfigError, match="arch.dropout=1.0"):
        LanguageModel(tiny_arch(dropout=1.0), VOCAB)
