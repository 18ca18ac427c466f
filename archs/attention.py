"""Causal self-attention (Llama-style with RoPE and optional GQA, or GPT-2 style with the learned
positions added by the shell) through `scaled_dot_product_attention`, with a preallocated KV cache.

Parameter names follow Hugging Face Llama (q_proj, k_proj, v_proj, o_proj) so weights move to
`LlamaForCausalLM` for peer checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from archbench.archs.base import ForwardContext, LayerState, Sublayer, require_kernels
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head (the Llama / GPT-NeoX layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


_BACKENDS = {
    "sdpa:math": [SDPBackend.MATH],
    "sdpa:flash": [SDPBackend.FLASH_ATTENTION],
}


@register_mixer(
    "attention", config=AttentionConfig, kernels=("auto", "torch", "cuda"),
    validate=check_attention, width_divisor=attention_width_divisor,
    learned_positions=learned_position_rows, position_key="arch.attention.max_position",
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
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=arch.init_std)
        nn.init.normal_(self.o_proj.weight, std=residual_std(arch))

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
            cos, sin = rope_tables(at, self.head_dim, self.rope_theta, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        state.k.index_copy_(2, at, k)
        state.v.index_copy_(2, at, v)
        filled = (torch.arange(state.k.shape[2], device=x.device) <= position).view(1, -1)
        # Flash attention takes no mask: under sdpa:flash the step runs SDPA's masked backends.
        if self.kernel_path == "sdpa:math":
            with sdpa_kernel(_BACKENDS[self.kernel_path]):
                out = F.scaled_dot_product_attention(q, state.k, state.v, attn_mask=filled)
        else:
            out = F.scaled_dot_product_attention(q, state.k, state.v, attn_mask=filled)
        return self.o_proj(out.reshape(batch, -1))
