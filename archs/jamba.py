"""Hugging Face's `JambaForCausalLM`, declared for import and export (archs/hf_layout.py).

A Jamba layer is attention or Mamba (with RMSNorms on dt, B and C: `arch.mamba.inner_norms`),
followed by a dense SwiGLU MLP or a mixture of SwiGLU experts (softmax top-k, weights not
renormalised). Jamba places them by period and offset (layer i is attention when
i % attn_layer_period == attn_layer_offset, and has experts when
i % expert_layer_period == expert_layer_offset); archbench writes the same placement as its layer
pattern, one period of each. The components' own layouts inside a layer are declared with them
(archs/attention.py, archs/mamba.py, archs/mlp.py); this file holds only what is Jamba's.
"""

from __future__ import annotations

import math
from typing import Any

from archbench.archs.hf_layout import (
    HFFamily,
    exact_hidden_mult,
    minimal_period,
    register_hf_family,
    require_falsy,
    require_value,
)
from archbench.config import ConfigError


def _placement(kinds: list[bool]) -> tuple[int, int] | None:
    """(period, offset) with kinds[i] == (i % period == offset) for every layer, if any.
    No layer of the kind at all is period n + 1, offset n (the offset is never reached)."""
    n = len(kinds)
    for period in range(1, n + 2):
        for offset in range(period):
            if all(k == (i % period == offset) for i, k in enumerate(kinds)):
                return period, offset
    return None


def jamba_arch(config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """JambaForCausalLM's config.json as an archbench arch (ConfigError for what we lack)."""
    require_value(config, "hidden_act", "silu", "silu")
    require_falsy(config, "mamba_proj_bias", "sliding_window")
    d, n = int(config["hidden_size"]), int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    experts = int(config.get("num_experts", config.get("num_local_experts", 16)))
    attn = (int(config.get("attn_layer_period", 8)), int(config.get("attn_layer_offset", 4)))
    moe = (int(config.get("expert_layer_period", 2)), int(config.get("expert_layer_offset", 1)))
    mixers = ["attention" if i % attn[0] == attn[1] else "mamba" for i in range(n)]
    mlps = ["moe" if experts > 1 and i % moe[0] == moe[1] else "dense" for i in range(n)]
    hidden_mult = exact_hidden_mult(int(config["intermediate_size"]), d)
    rank = config.get("mamba_dt_rank", "auto")
    arch = {
        "name": "jamba",
        "pattern": {"mixers": minimal_period(mixers), "mlps": minimal_period(mlps)},
        "d_model": d, "n_layers": n, "norm": "rmsnorm",
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "attention": {"head_dim": int(config.get("head_dim") or d // heads), "n_heads": heads,
                      "n_kv_heads": int(config.get("num_key_value_heads") or heads),
                      "position": "none"},
        "mamba": {"d_state": int(config.get("mamba_d_state", 16)),
                  "d_conv": int(config.get("mamba_d_conv", 4)),
                  "expand": int(config.get("mamba_expand", 2)),
                  "dt_rank": math.ceil(d / 16) if rank == "auto" else int(rank),
                  "conv_bias": bool(config.get("mamba_conv_bias", True)), "inner_norms": True},
        "mlp": {"kind": "swiglu", "hidden_mult": hidden_mult, "multiple_of": 1},
        "moe": {"n_experts": max(experts, 1), "top_k": int(config.get("num_experts_per_tok", 2)),
                "renormalize": False, "expert_kind": "swiglu", "hidden_mult": hidden_mult},
    }
    return arch, int(config["vocab_size"])


def _mlp_width(model: Any) -> int | None:
    """The one MLP width Jamba's config has room for (dense and experts alike), or None."""
    widths = {b.mlp.hidden if b.mlp_slot == "moe" else b.mlp.up_proj.out_features
              for b in model.blocks if b.mlp is not None}
    return widths.pop() if len(widths) == 1 else None


def jamba_mismatch(model: Any) -> str | None:
    arch, problems = model.arch, []
    mixers = [b.mixer_kind for b in model.blocks]
    mlps = [b.mlp_slot for b in model.blocks]
    if not set(mixers) <= {"attention", "mamba"} or not set(mlps) <= {"dense", "moe"}:
        problems.append("layers must be attention or mamba, each with a dense or moe MLP")
        return "; ".join(problems)
    if "mamba" not in mixers:
        problems.append("no mamba layer (a pure attention model is Llama)")
    if _placement([m == "attention" for m in mixers]) is None or \
            _placement([m == "moe" for m in mlps]) is None:
        problems.append("attention and experts must each recur with one period and offset")
    if arch.norm != "rmsnorm" or arch.embed_norm or model.pos_embed is not None:
        problems.append("arch.norm must be rmsnorm, with no embed_norm and no learned positions")
    if "mamba" in mixers and not arch.mamba.inner_norms:
        problems.append("Jamba's Mamba layers normalise dt, B and C: arch.mamba.inner_norms=true")
    if "attention" in mixers and (arch.attention.position != "none" or arch.attention.bias):
        problems.append("attention without positions or biases")
    if arch.mlp.kind != "swiglu" or arch.mlp.bias or (
            "moe" in mlps and (arch.moe.expert_kind != "swiglu" or arch.moe.renormalize)):
        problems.append("SwiGLU MLPs without bias; experts SwiGLU with raw top-k weights "
                        "(arch.moe.renormalize=false)")
    if _mlp_width(model) is None:
        problems.append("dense MLPs and experts must have one hidden width")
    attn = next((b.mixer for b in model.blocks if b.mixer_kind == "attention"), None)
    if attn is not None and attn.n_heads * attn.head_dim != arch.d_model:
        problems.append("attention with n_heads * head_dim = d_model")
    return "; ".join(problems) or None


def jamba_config(model: Any) -> dict[str, Any]:
    if (why := jamba_mismatch(model)) is not None:
        raise ConfigError(f"no JambaForCausalLM equivalent: {why}")
    arch = model.arch
    mixers = [b.mixer_kind == "attention" for b in model.blocks]
    has_experts = [b.mlp_slot == "moe" for b in model.blocks]
    attn_period, attn_offset = _placement(mixers)  # type: ignore[misc]
    mamba = next(b.mixer for b in model.blocks if b.mixer_kind == "mamba")
    attn = next((b.mixer for b in model.blocks if b.mixer_kind == "attention"), None)
    out = {
        "vocab_size": model.vocab_size, "hidden_size": arch.d_model,
        "intermediate_size": _mlp_width(model), "num_hidden_layers": arch.n_layers,
        "num_attention_heads": attn.n_heads if attn else 1,
        "num_key_value_heads": attn.n_kv_heads if attn else 1,
        "hidden_act": "silu", "rms_norm_eps": arch.norm_eps,
        "tie_word_embeddings": bool(arch.tie_embeddings),
        "attn_layer_period": attn_period, "attn_layer_offset": attn_offset,
        "num_experts": 1, "num_experts_per_tok": 1, "expert_layer_period": 1,
        "expert_layer_offset": 0, "mamba_d_state": mamba.d_state, "mamba_d_conv": mamba.d_conv,
        "mamba_expand": arch.mamba.expand, "mamba_dt_rank": mamba.dt_rank,
        "mamba_conv_bias": bool(arch.mamba.conv_bias), "mamba_proj_bias": False,
    }
    if any(has_experts):
        period, offset = _placement(has_experts)  # type: ignore[misc]
        out.update(num_experts=arch.moe.n_experts, num_experts_per_tok=arch.moe.top_k,
                   expert_layer_period=period, expert_layer_offset=offset)
    return out


register_hf_family(HFFamily(
    name="jamba", hf_class="JambaForCausalLM", model_type="jamba", base_prefix="model",
    shell={"embed": "model.embed_tokens", "final_norm": "model.final_layernorm",
           "lm_head": "lm_head"},
    layer="model.layers.{i}", norms={"mixer_norm": "input_layernorm",
                                     "mlp_norm": "pre_ff_layernorm"},
    arch_from_config=jamba_arch, config_from_model=jamba_config, mismatch=jamba_mismatch,
))
