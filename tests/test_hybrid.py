"""Hybrid layer patterns (Jamba-style): parsing and its errors, the jamba preset, mixed caches,
state size against context, and a tiny hybrid that learns.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_config
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import archbench.conf
from archbench.archs.base import ForwardContext
from archbench.archs.model import LanguageModel, arch_config, layer_plan
from archbench.archs.registry import mixer_names
from archbench.archs.sizing import solve_size
from archbench.config import ConfigError, expand_period

CONF = Path(archbench.conf.__file__).parent


def jamba(**overrides: object) -> object:
    """conf/arch/jamba.yaml, merged into the schema exactly as Hydra does, with a size set."""
    return arch_config(OmegaConf.merge(OmegaConf.load(CONF / "arch" / "jamba.yaml"), overrides))


# ---- pattern parsing -----------------------------------------------------------------------------
def test_period_items_expand_and_the_string_form_is_the_same() -> None:
    as_list = expand_period(["mamba*4", "attention", "mamba*3"], "k", mixer_names())
    as_string = expand_period("mamba*4, attention,mamba*3", "k", mixer_names())
    assert as_list == as_string == ["mamba"] * 4 + ["attention"] + ["mamba"] * 3


def test_the_command_line_can_write_a_pattern() -> None:
    parser = OverridesParser.create()
    override = parser.parse_override("arch.pattern.mixers=[mamba*4,attention,mamba*3]")
    arch = arch_config({"n_layers": 8, "pattern": {"mixers": override.value()}})
    assert [m for m, _ in layer_plan(arch)] == ["mamba"] * 4 + ["attention"] + ["mamba"] * 3


def base_arch(**changes: object) -> dict:
    arch = {"d_model": 64, "n_layers": 8, "attention": {"head_dim": 16},
            "pattern": {"mixers": ["mamba*3", "attention"], "mlps": ["dense", "moe"]},
            "moe": {"n_experts": 4, "top_k": 2}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            arch[section] = {**arch[section], field: value}
        else:
            arch[key] = value
    return arch


@pytest.mark.parametrize("changes,field", [
    ({"pattern__mixers": ["mamba*3", "atention"]}, "arch.pattern.mixers"),
    ({"pattern__mlps": ["dense", "mixture"]}, "arch.pattern.mlps"),
    ({"pattern__mixers": ["mamba*0", "attention"]}, "arch.pattern.mixers"),
    ({"pattern__mixers": ["mamba*x"]}, "arch.pattern.mixers"),
    ({"pattern__mixers": []}, "arch.pattern.mixers"),
    ({"pattern__mixers": ["mamba*2", "attention"]}, "arch.pattern.mixers"),  # period 3 vs 8
    ({"pattern__mlps": ["dense*2", "moe"]}, "arch.pattern.mlps"),  # period 3 vs 8
    ({"moe__top_k": 5}, "arch.moe.top_k"),
    ({"moe__top_k": 0}, "arch.moe.top_k"),
    ({"moe__n_experts": 0}, "arch.moe.n_experts"),
    ({"moe__expert_kind": "relu"}, "arch.moe.expert_kind"),
    ({"moe__aux_loss_coef": -0.1}, "arch.moe.aux_loss_coef"),
])
def test_bad_patterns_fail_naming_their_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        LanguageModel(base_arch(**changes), 16)
    assert field in str(err.value)


def test_a_period_that_does_not_divide_the_depth_names_both() -> None:
    with pytest.raises(ConfigError, match=r"arch.pattern.mixers has period 3.*arch.n_layers=8"):
        arch_config(base_arch(pattern__mixers=["mamba*2", "attention"]))


def test_top_k_over_experts_is_reported_even_when_moe_is_unused_later() -> None:
    """The check follows the pattern: an MoE setting is only validated when a layer uses MoE."""
    arch_config(base_arch(pattern__mlps=["dense"], moe__top_k=9))  # no MoE layer: accepted
    with pytest.raises(ConfigError, match="arch.moe.top_k=9"):
        arch_config(base_arch(moe__top_k=9))


# ---- the jamba preset ----------------------------------------------------------------------------
def test_jamba_preset_layout() -> None:
    arch = jamba(d_model=64, n_layers=16)
    plan = layer_plan(arch)
    attention_at = [i for i, (mixer, _) in enumerate(plan) if mixer == "attention"]
    moe_at = [i for i, (_, mlp) in enumerate(plan) if mlp == "moe"]
    assert attention_at == [4, 12]  # 1 attention : 7 Mamba, at offset 4 of each block of 8
    assert moe_at == list(range(1, 16, 2))  # MoE every other layer, on the odd ones
    assert {m for m, _ in plan} == {"mamba", "attention"}
    assert (arch.moe.n_experts, arch.moe.top_k) == (16, 2)
    assert arch.attention.position == "none" and arch.norm == "rmsnorm"
    reference = make_config("arch=mamba").arch.mamba
    for key, value in reference.items():
        if key == "inner_norms":  # Jamba normalises dt, B and C (HF JambaMambaMixer)
            assert arch.mamba.inner_norms and not value
            continue
        assert arch.mamba[key] == value, f"jamba's mamba.{key} differs from the Mamba preset"
    with pytest.raises(ConfigError, match="arch.pattern.mixers has period 8"):
        jamba(d_model=64, n_layers=12)


def test_jamba_model_has_no_positions_and_reports_total_and_active() -> None:
    torch.manual_seed(0)
    model = LanguageModel(jamba(d_model=64, n_layers=8), 64)
    assert model.pos_embed is None
    attention = model.blocks[4].mixer
    assert not attention.use_rope
    counts = model.param_counts()
    moe_layers = [b.mlp for b in model.blocks if b.mlp_slot == "moe"]
    assert len(moe_layers) == 4
    per_expert = moe_layers[0].expert_params() // 16
    assert counts["total"] - counts["active"] == 4 * 14 * per_expert  # 14 of 16 experts idle
    assert set(model.kernel_paths()) == {"mamba", "attention", "mlp:dense", "mlp:moe", "matmul"}


# ---- state size against context ------------------------------------------------------------------
def test_hybrid_state_is_an_eighth_of_the_kv_cache_at_256k() -> None:
    """1 attention : 7 Mamba keeps one layer's KV cache plus seven constant Mamba states."""
    common = {"d_model": 64, "n_layers": 8, "attention": {"head_dim": 16}}
    hybrid = LanguageModel({**common, "pattern": {"mixers": ["mamba*4", "attention", "mamba*3"],
                                                  "mlps": ["dense"]}}, 32)
    transformer = LanguageModel({**common, "pattern": {"mixers": ["attention"],
                                                       "mlps": ["dense"]}}, 32)
    context, bf16 = 256 * 1024, torch.bfloat16
    ratio = hybrid.cache_bytes(1, context, bf16) / transformer.cache_bytes(1, context, bf16)
    assert 1 / 8 < ratio < 1 / 8 * 1.002
    # The context-dependent part is exactly one eighth; the Mamba part does not grow at all.
    growth_h = hybrid.cache_bytes(1, context, bf16) - hybrid.cache_bytes(1, context // 2, bf16)
    growth_t = transformer.cache_bytes(1, context, bf16) - transformer.cache_bytes(1, context // 2,
                                                                                   bf16)
    assert 8 * growth_h == growth_t
    mamba_bytes = sum(b.mixer.state_bytes(1, context, bf16) for b in hybrid.blocks
                      if b.mixer_kind == "mamba")
    assert mamba_bytes == sum(b.mixer.state_bytes(1, 1, bf16) for b in hybrid.blocks
                              if b.mixer_kind == "mamba") > 0
    # Analytic bytes are what a real cache allocates (checked at a context that fits in memory).
    for model in (hybrid, transformer):
        cache = model.init_cache(2, 512, dtype=bf16)
        assert cache.nbytes() == model.cache_bytes(2, 512, bf16)


# ---- mixed caches: decoding = full forward -------------------------------------------------------
MIXED = ["attention", "mamba", "mamba2"]


def mixed_model(mixers: list[str], mlps: list[str], dtype: torch.dtype, kernels: str,
                position: str = "rope") -> LanguageModel:
    torch.manual_seed(5)
    model = LanguageModel({
        "d_model": 64, "n_layers": 2 * len(mixers), "pattern": {"mixers": mixers, "mlps": mlps},
        "attention": {"head_dim": 16, "position": position},
        "mamba2": {"head_dim": 32, "d_state": 16, "chunk_size": 4},
        "mamba": {"chunk_size": 4}, "rwkv7": {"head_size": 32, "chunk_size": 4},
        "moe": {"n_experts": 4, "top_k": 2, "kernels": kernels},
    }, 48)
    with torch.no_grad():
        for block in model.blocks:
            if block.mlp_slot == "moe":  # decisive routing; small logit noise cannot flip it
                block.mlp.router.weight.normal_(std=0.5)
    return model.to(dtype).eval()


def assert_decoding_matches(model: LanguageModel, atol: float) -> None:
    tokens = torch.randint(0, 48, (2, 11))
    with torch.no_grad():
        full = model(tokens)
        cache = model.init_cache(2, 11)
        steps = torch.cat([model(tokens[:, t : t + 1], cache) for t in range(11)], dim=1)
        chunked = model.init_cache(2, 11)
        first = model(tokens[:, :6], chunked)  # prefill a chunk, then step
        rest = torch.cat([model(tokens[:, t : t + 1], chunked) for t in range(6, 11)], dim=1)
    torch.testing.assert_close(steps, full, rtol=0, atol=atol)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=0, atol=atol)
    assert cache.pos == 11


@pytest.mark.parametrize("position", ["rope", "none"])
def test_mixed_pattern_decodes_like_the_full_forward(position: str) -> None:
    model = mixed_model(MIXED, ["moe", "dense"], torch.float64, "torch", position)
    kinds = {type(s).__name__ for pair in model.init_cache(1, 4).states for s in pair if s}
    assert kinds == {"KVState", "MambaState"}  # KV buffers and recurrent states side by side
    assert_decoding_matches(model, atol=1e-6)  # mamba2 alone differs by ~1e-8 in fp64


def test_mixed_pattern_decodes_like_the_full_forward_on_the_grouped_path() -> None:
    model = mixed_model(MIXED, ["moe", "dense"], torch.float32, "auto")
    assert "grouped_mm" in model.kernel_paths()["mlp:moe"] or not hasattr(F, "grouped_mm")
    assert_decoding_matches(model, atol=1e-4)


# ---- a tiny hybrid learns ------------------------------------------------------------------------
def test_tiny_hybrid_trains_with_aux_losses() -> None:
    """Counting sequences (next = previous + 1 mod V from a random start): only a model that
    reads its input can beat the untrained loss of log V."""
    torch.manual_seed(6)
    vocab = 32
    model = LanguageModel({
        "d_model": 32, "n_layers": 2, "attention": {"head_dim": 16},
        "pattern": {"mixers": ["mamba", "attention"], "mlps": ["moe", "dense"]},
        "moe": {"n_experts": 4, "top_k": 2, "aux_loss_coef": 0.01, "z_loss_coef": 0.001},
    }, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses, aux_seen = [], []
    for _ in range(40):
        start = torch.randint(0, vocab, (8, 1))
        seq = (start + torch.arange(17)) % vocab
        ctx = ForwardContext()
        logits = model(seq[:, :-1], ctx=ctx)
        loss = F.cross_entropy(logits.reshape(-1, vocab), seq[:, 1:].reshape(-1))
        aux = ctx.aux_loss()
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        losses.append(loss.item())
        aux_seen.append(aux.item())
    assert losses[0] > math.log(vocab) - 0.3
    assert max(losses[-5:]) < 0.2
    assert all(math.isfinite(a) and a > 0 for a in aux_seen)


# ---- size presets: active or total parameters ----------------------------------------------------
def test_size_metric_override_matches_active_or_total_parameters() -> None:
    vocab = 256
    fitted = {}
    for metric in ("non_embedding", "active"):
        cfg = make_config("arch=jamba", "size=s", f"size.metric={metric}")
        assert cfg.size.metric == metric and cfg.arch.name == "jamba"
        arch, fit = solve_size(cfg.arch, cfg.size, vocab)
        with torch.device("meta"):  # exact counts without allocating the weights
            counts = LanguageModel(arch, vocab).param_counts()
        key = "non_embedding" if metric == "non_embedding" else "active_non_embedding"
        # all experts counted, no 8-layer shape of sane width lands within 5% (the old answer
        # was 64 wide x 72 layers): the nearest sane shape, and the fit says so
        assert abs(counts[key] / cfg.size.target - 1) <= (
            cfg.size.tolerance if fit.shape_note is None else 0.25)
        assert (fit.shape_note is None) == (metric == "active")
        assert counts[key] == fit.achieved
        fitted[metric] = counts
    # Matching active parameters gives a model with more weights in total, and vice versa.
    assert fitted["active"]["non_embedding"] > 1.5 * fitted["non_embedding"]["non_embedding"]
    assert fitted["non_embedding"]["active_non_embedding"] < fitted["active"][
        "active_non_embedding"]
