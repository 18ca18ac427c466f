"""Causal self-attention (Llama-style with RoPE and optional GQA, or GPT-2 style with the learned
positions added by the shell) through `scaled_dot_product_attention`, with a preallocated KV cache.

Parameter names follow Hugging Face Llama (q_proj, k_proj, v_proj, o_proj). This module also
declares the Hugging Face classes made of attention and a dense MLP, `LlamaForCausalLM` and
`GPT2LMHeadModel` (archs/hf_layout.py): their config field maps and GPT-2's fused QKV layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from archbench.archs.base import ForwardContext, LayerState, Sublayer, require_kernels
from archbench.archs.hf_layout import (
    HFFamily,
    HFPart,
    Tensors,
    exact_hidden_mult,
    register_hf_family,
    require_falsy,
    require_value,
)
from archbench.archs.model import residual_std
from archbench.archs.registry import register_mixer
from archbench.config import ConfigError, require_choice, require_positive

POSITION_KINDS = ("rope", "learned", "none")


@dataclass
class AttentionConfig:
    head_dim: int = 64
    n_heads: int | None = None  # None: d_model // head_dim
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); fewer gives GQA
    position: str = "rope"  # rope | learned (a table added by the shell) | none
    rope_theta: float = 10000.0
    max_position: int = 2048  # only for learned positions
    kernels: str = "auto"  # auto | torch (math SDPA) | cuda (flash SDPA, error if unavailable)
    bias: bool = False  # biases on q, k, v and o projections (GPT-2; Llama's attention_bias)


def check_attention(arch: Any) -> None:
    att = arch.attention
    require_choice("arch.attention.position", att.position, POSITION_KINDS)
    require_positive("arch.attention.head_dim", att.head_dim)
    require_positive("arch.attention.max_position", att.max_position)
    if not arch.d_model:
        return
    n_heads = att.n_heads or arch.d_model // att.head_dim
    if att.n_heads is None and arch.d_model % att.head_dim:
        raise ConfigError(
            f"arch.d_model={arch.d_model} is not divisible by "
            f"arch.attention.head_dim={att.head_dim}"
        )
    if att.n_kv_heads is not None and (att.n_kv_heads < 1 or n_heads % att.n_kv_heads):
        raise ConfigError(
            f"arch.attention.n_kv_heads={att.n_kv_heads} must divide n_heads={n_heads}"
        )


def attention_width_divisor(arch: Any) -> int:
    """Whole heads: d_model steps by head_dim unless n_heads is fixed."""
    return int(arch.attention.head_dim) if arch.attention.n_heads is None else 1


def learned_position_rows(arch: Any) -> int:
    return int(arch.attention.max_position) if arch.attention.position == "learned" else 0


@dataclass
class KVState(LayerState):
    k: torch.Tensor  # (B, n_kv_heads, max_len, head_dim)
    v: torch.Tensor
    length: int = 0


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# Decoding reads its RoPE rows from one table per (head size, theta, device), shared by every
# layer: computed per step instead, the compiled step recomputed the powers, sines and cosines of
# the query's rotation inside the score loop, once per cached position (inductor inlines the
# rotation into its multiply-and-sum form of the one-row matmul).
_ROPE_TABLES: dict[tuple[int, float, str], tuple[torch.Tensor, torch.Tensor]] = {}


def rope_table(length: int, head_dim: int, theta: float,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos / sin of positions 0..length-1 (at least), half a head wide: the rows
    `rope_tables` gives are these halves twice (see `rope_rows`)."""
    key = (head_dim, float(theta), str(device))
    held = _ROPE_TABLES.get(key)
    if held is None or held[0].shape[0] < length:
        cos, sin = rope_tables(torch.arange(length, device=device), head_dim, theta,
                               torch.float32)
        held = _ROPE_TABLES[key] = (cos[:, : head_dim // 2].clone(),
                                    sin[:, : head_dim // 2].clone())
    return held


def rope_rows(table: torch.Tensor, at: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Full-width rows of a half-width `rope_table` at positions `at`."""
    half = table[at]
    return torch.cat([half, half], dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head (the Llama / GPT-NeoX layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     position: torch.Tensor) -> torch.Tensor:
    """One query row per head over a whole static KV buffer, positions after `position` masked:
    two batched mat-vecs and a softmax. q (B, n_kv, rep, D), k / v (B, n_kv, max_len, D)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, n_kv, rep, max_len)
    empty = torch.arange(k.shape[2], device=q.device) > position
    return torch.softmax(scores.masked_fill(empty, float("-inf")), dim=-1) @ v


def _gpt2_attention_to_hf(tensors: Tensors, module: Any) -> Tensors:
    """GPT-2 keeps q, k, v in one Conv1D (weights stored input-major); no bias is a zero bias."""
    def bias(name: str) -> torch.Tensor:
        weight = tensors[f"{name}.weight"]
        return tensors.get(f"{name}.bias", weight.new_zeros(weight.shape[0]))

    qkv = torch.cat([tensors[f"{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")])
    return {"c_attn.weight": qkv.t(), "c_attn.bias": torch.cat([bias(n) for n in
                                                                ("q_proj", "k_proj", "v_proj")]),
            "c_proj.weight": tensors["o_proj.weight"].t(), "c_proj.bias": bias("o_proj")}


def _gpt2_attention_from_hf(tensors: Tensors, module: Any) -> Tensors:
    q, k, v = tensors["c_attn.weight"].t().chunk(3, dim=0)
    qb, kb, vb = tensors["c_attn.bias"].chunk(3)
    return {"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v,
            "o_proj.weight": tensors["c_proj.weight"].t(), "q_proj.bias": qb, "k_proj.bias": kb,
            "v_proj.bias": vb, "o_proj.bias": tensors["c_proj.bias"]}


ATTENTION_HF = {
    "llama": HFPart("self_attn", ignore=("rotary_emb.inv_freq",)),
    "jamba": HFPart("self_attn"),
    "gpt2": HFPart("attn", _gpt2_attention_to_hf, _gpt2_attention_from_hf,
                   ignore=("bias", "masked_bias")),  # GPT-2's causal-mask buffers
}

_BACKENDS = {
    "sdpa:math": [SDPBackend.MATH],
    "sdpa:flash": [SDPBackend.FLASH_ATTENTION],
}


@register_mixer(
    "attention", config=AttentionConfig, kernels=("auto", "torch", "cuda"),
    validate=check_attention, width_divisor=attention_width_divisor,
    learned_positions=learned_position_rows, position_key="arch.attention.max_position",
    hf=ATTENTION_HF,
)
class Attention(Sublayer):
    def __init__(self, arch: Any, layer_idx: int) -> None:
        super().__init__()
        cfg = arch.attention
        d = arch.d_model
        self.head_dim = cfg.head_dim
        self.n_heads = cfg.n_heads or d // cfg.head_dim
        self.n_kv_heads = cfg.n_kv_heads or self.n_heads
        self.use_rope = cfg.position == "rope"
        self.rope_theta = cfg.rope_theta
        self.kernels = cfg.kernels
        self.kernel_path = "sdpa" if cfg.kernels in ("auto", "cuda") else "sdpa:math"
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=cfg.bias)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=arch.init_std)
        nn.init.normal_(self.o_proj.weight, std=residual_std(arch))
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        # The decoding rows of RoPE, set by `init_state` (not saved: a function of the config).
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)

    def resolve_kernels(self, device: torch.device) -> str:
        on_cuda = device.type == "cuda"
        flash = None if on_cuda else f"flash attention needs a CUDA device, got {device.type}"
        choice = {"cuda": "sdpa:flash", "torch": "sdpa:math", "auto": "auto"}[self.kernels]
        if choice == "auto":
            return "sdpa"
        return require_kernels(
            choice, {"sdpa:flash": flash, "sdpa:math": None}, "arch.attention.kernels"
        )

    def init_state(
        self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> KVState:
        shape = (batch, self.n_kv_heads, max_len, self.head_dim)
        if self.use_rope:
            self.rope_cos, self.rope_sin = rope_table(max_len, self.head_dim, self.rope_theta,
                                                      torch.device(device))
        return KVState(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
        )

    def state_bytes(self, batch: int, context: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * batch * self.n_kv_heads * context * self.head_dim * itemsize

    def flops_per_token(self, context: int) -> float:
        # QK^T and AV: 2 * 2 * n_heads * head_dim * context (no causal discount, as in PaLM/MFU).
        return 4.0 * self.n_heads * self.head_dim * context

    def forward(
        self,
        x: torch.Tensor,
        state: LayerState | None = None,
        ctx: ForwardContext | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        start = state.length if isinstance(state, KVState) else 0
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            positions = torch.arange(start, start + length, device=x.device)
            cos, sin = rope_tables(positions, self.head_dim, self.rope_theta, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask: torch.Tensor | None = None
        causal = True
        if isinstance(state, KVState):
            state.k[:, :, start : start + length] = k
            state.v[:, :, start : start + length] = v
            state.length = start + length
            k, v = state.k[:, :, : start + length], state.v[:, :, : start + length]
            if length == 1:
                causal = False
            elif start > 0:
                rows = torch.arange(start, start + length, device=x.device)[:, None]
                mask = torch.arange(start + length, device=x.device)[None, :] <= rows
                causal = False
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if self.kernel_path == "sdpa":  # torch picks the fastest backend for the inputs
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        else:
            with sdpa_kernel(_BACKENDS[self.kernel_path]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def decode_step(
        self, x: torch.Tensor, state: LayerState | None, position: torch.Tensor,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        """One token at a tensor position: its K and V written into the static buffers with
        `index_copy_`, the query attending over the whole buffer under a mask of the positions
        filled so far (so the shapes never depend on the position). Grouped-query heads attend
        as `rep` query rows of their KV head: no repeated copy of the cache per step."""
        if not isinstance(state, KVState):
            raise TypeError(f"Attention.decode_step needs a KVState, got {type(state).__name__}")
        batch = x.shape[0]
        n_kv, rep = self.n_kv_heads, self.n_heads // self.n_kv_heads
        q = self.q_proj(x).view(batch, n_kv, rep, self.head_dim)
        k = self.k_proj(x).view(batch, n_kv, 1, self.head_dim)
        v = self.v_proj(x).view(batch, n_kv, 1, self.head_dim)
        at = position.view(1)
        if self.use_rope:
            if self.rope_cos is None or self.rope_cos.shape[0] < state.k.shape[2]:
                raise RuntimeError("decode_step needs a cache made by this model's init_cache")
            cos = rope_rows(self.rope_cos, at, q.dtype)
            sin = rope_rows(self.rope_sin, at, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        state.k.index_copy_(2, at, k)
        state.v.index_copy_(2, at, v)
        # One query row per head: two batched mat-vecs and a softmax, written out (the
        # `decode_path`). SDPA's CPU flash kernel measured 1.2-20x slower here with the mask,
        # and flash attention on CUDA takes no mask at all. Compiled on CPU, inductor turns the
        # one-row matmuls into fused multiply-and-sum loops with the scale, mask and softmax;
        # with the RoPE rows read from the table this beat calling the eager matmuls as one
        # opaque operator at every cache length measured (1.09-1.23x at 128 and 4096, batches
        # 1 and 8; reports/cpu-speed/NOTES.md), so there is no such operator any more.
        out = cached_attention(q, state.k, state.v, position)
        return self.o_proj(out.reshape(batch, -1))

    @property
    def decode_path(self) -> str:
        """The attention of `decode_step` is the written-out form, whatever the SDPA backend."""
        return "matmul-softmax"


# ---- Hugging Face classes made of attention and a dense MLP -------------------------------------


def _dense_only(model: Any, mlp_kind: str, position: str) -> str | None:
    """Why `model` is not attention + dense `mlp_kind` MLP with `position` positions."""
    arch, problems = model.arch, []
    if {b.mixer_kind for b in model.blocks} != {"attention"}:
        problems.append("every mixer must be attention")
    if any(b.mlp_slot != "dense" for b in model.blocks) or arch.mlp.kind != mlp_kind:
        problems.append(f"every layer needs a dense {mlp_kind} MLP")
    if arch.embed_norm:
        problems.append("no embedding norm (arch.embed_norm=false)")
    if arch.attention.position != position:
        problems.append(f"arch.attention.position must be {position}")
    return "; ".join(problems) or None


def llama_mismatch(model: Any) -> str | None:
    why = _dense_only(model, "swiglu", "rope")
    if model.arch.norm != "rmsnorm":
        why = "; ".join(filter(None, [why, "arch.norm must be rmsnorm"]))
    return why


def llama_arch(config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """LlamaForCausalLM's config.json as an archbench arch (ConfigError for what we lack)."""
    require_value(config, "hidden_act", "silu", "silu")
    require_falsy(config, "rope_scaling")
    rope = dict(config.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"config.json rope_parameters.rope_type={rope_type!r} cannot be "
                          "expressed in archbench; only 'default' RoPE is supported")
    d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    arch = {
        "name": "llama", "pattern": {"mixers": ["attention"], "mlps": ["dense"]},
        "d_model": d, "n_layers": int(config["num_hidden_layers"]), "norm": "rmsnorm",
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "attention": {
            "head_dim": int(config.get("head_dim") or d // heads), "n_heads": heads,
            "n_kv_heads": int(config.get("num_key_value_heads") or heads), "position": "rope",
            "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            "bias": bool(config.get("attention_bias", False)),
        },
        "mlp": {"kind": "swiglu", "multiple_of": 1,
                "hidden_mult": exact_hidden_mult(int(config["intermediate_size"]), d),
                "bias": bool(config.get("mlp_bias", False))},
    }
    return arch, int(config["vocab_size"])


def llama_config(model: Any) -> dict[str, Any]:
    """config.json fields of LlamaForCausalLM for `model` (RoPE theta written in both the
    transformers 4 and 5 spellings)."""
    arch, attn = model.arch, model.blocks[0].mixer
    theta = float(arch.attention.rope_theta)
    return {
        "vocab_size": model.vocab_size, "hidden_size": arch.d_model,
        "intermediate_size": model.blocks[0].mlp.up_proj.out_features,
        "num_hidden_layers": arch.n_layers, "num_attention_heads": attn.n_heads,
        "num_key_value_heads": attn.n_kv_heads, "head_dim": attn.head_dim,
        "rms_norm_eps": arch.norm_eps, "tie_word_embeddings": bool(arch.tie_embeddings),
        "attention_bias": bool(arch.attention.bias), "mlp_bias": bool(arch.mlp.bias),
        "hidden_act": "silu", "max_position_embeddings": 2048, "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
    }


register_hf_family(HFFamily(
    name="llama", hf_class="LlamaForCausalLM", model_type="llama", base_prefix="model",
    shell={"embed": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"},
    layer="model.layers.{i}", norms={"mixer_norm": "input_layernorm",
                                     "mlp_norm": "post_attention_layernorm"},
    arch_from_config=llama_arch, config_from_model=llama_config, mismatch=llama_mismatch,
))

_GPT2_GELU = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh approximation, as arch.mlp gelu


def gpt2_mismatch(model: Any) -> str | None:
    why = _dense_only(model, "gelu", "learned")
    attn = model.blocks[0].mixer if model.blocks[0].mixer_kind == "attention" else None
    extra = []
    if model.arch.norm != "layernorm":
        extra.append("arch.norm must be layernorm")
    if attn is not None and (attn.n_kv_heads != attn.n_heads
                             or attn.n_heads * attn.head_dim != model.arch.d_model):
        extra.append("multi-head attention with n_heads * head_dim = d_model")
    return "; ".join(filter(None, [why, *extra])) or None


def gpt2_arch(config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """GPT2LMHeadModel's config.json as an archbench arch (ConfigError for what we lack)."""
    act = config.get("activation_function", "gelu_new")
    if act not in _GPT2_GELU:
        raise ConfigError(f"config.json activation_function={act!r} cannot be expressed in "
                          f"archbench; supported: {list(_GPT2_GELU)} (tanh GELU)")
    require_value(config, "scale_attn_weights", True, True)
    require_falsy(config, "scale_attn_by_inverse_layer_idx", "add_cross_attention")
    d, heads = int(config["n_embd"]), int(config["n_head"])
    if d % heads:
        raise ConfigError(f"config.json n_embd={d} is not divisible by n_head={heads}")
    inner = int(config.get("n_inner") or 4 * d)
    arch = {
        "name": "gpt2", "pattern": {"mixers": ["attention"], "mlps": ["dense"]},
        "d_model": d, "n_layers": int(config["n_layer"]), "norm": "layernorm",
        "norm_eps": float(config.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
        "attention": {"head_dim": d // heads, "n_heads": heads, "position": "learned",
                      "max_position": int(config.get("n_positions", 1024)), "bias": True},
        "mlp": {"kind": "gelu", "multiple_of": 1, "hidden_mult": exact_hidden_mult(inner, d),
                "bias": True},
    }
    return arch, int(config["vocab_size"])


def gpt2_config(model: Any) -> dict[str, Any]:
    """config.json fields of GPT2LMHeadModel for `model` (dropout off: evaluation only)."""
    arch = model.arch
    return {
        "vocab_size": model.vocab_size, "n_embd": arch.d_model, "n_layer": arch.n_layers,
        "n_head": model.blocks[0].mixer.n_heads, "n_positions": model.pos_embed.num_embeddings,
        "n_inner": model.blocks[0].mlp.up_proj.out_features, "activation_function": "gelu_new",
        "layer_norm_epsilon": arch.norm_eps, "tie_word_embeddings": bool(arch.tie_embeddings),
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "attn_pdrop": 0.0, "embd_pdrop": 0.0,
        "resid_pdrop": 0.0, "summary_first_dropout": 0.0,
    }


register_hf_family(HFFamily(
    name="gpt2", hf_class="GPT2LMHeadModel", model_type="gpt2", base_prefix="transformer",
    shell={"embed": "transformer.wte", "pos_embed": "transformer.wpe",
           "final_norm": "transformer.ln_f", "lm_head": "lm_head"},
    layer="transformer.h.{i}", norms={"mixer_norm": "ln_1", "mlp_norm": "ln_2"},
    arch_from_config=gpt2_arch, config_from_model=gpt2_config, mismatch=gpt2_mismatch,
))
