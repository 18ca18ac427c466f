"""RWKV-7 "Goose" (Peng et al., 2025): the time-mix mixer and the channel-mix MLP.

Time mix, per token (x the normed input, x_prev the previous token's, all products elementwise):

    xx = x_prev - x;  x_* = x + xx * mu_*            for * in r, w, k, v, a, g (token shift)
    r = W_r x_r,  k = W_k x_k,  v = W_v x_v
    log w = -exp(-1/2) * sigmoid(w0 + tanh(x_w w1) w2)   so each step decays by (e^-0.6065, 1)
    a = sigmoid(a0 + x_a a1 a2)                          in-context learning rate
    v = v + (v_first - v) * sigmoid(v0 + x_v v1 v2)      value residual (not in the first layer)
    g = sigmoid(x_g g1) g2                               output gate
    kk = L2-normalise per head (k * k_k);  k = k * (1 + (a - 1) * k_a)
    S_t = S_{t-1} (diag(w_t) - kk_t^T (a_t * kk_t)) + v_t^T k_t    per head, S is [value, key]
    y = GroupNorm_heads(S_t r_t^T) + ((r * k * r_k).sum per head) * v      (ln_x, eps 64e-5)
    out = W_o (y * g)

The WKV recurrence runs in archs/kernels/rwkv7.py (recurrent, chunked, or fla's Triton kernel).
The first RWKV-7 layer of the model (layer 0 in a pure RWKV stack) stores its v (v_first) in
ctx.value_residual and has no value-residual LoRA; later layers read it. During decoding ctx lives
for one forward call, in which that first layer has already stored v_first of the current token,
so no state is kept for it.

Channel mix: k = x + (x_prev - x) * mu_k;  out = W_v relu(W_k k)^2 with a 4x hidden layer.

Initialisation follows RWKV-LM's x070 training code (r0 = i / (L - 1), r1 = 1 - i / L for layer i
of L, and q_j = j / C over the channels): mu_r = mu_g = 1 - q^(0.2 r1),
mu_w = mu_a = 1 - q^(0.9 r1), mu_k = 1 - (q^(0.9 r1) + 0.4 r0), mu_v = 1 - (q^(0.4 r1) + 0.6 r0);
w0_j = -6.5 + 5 (j / (C - 1))^(0.85 + r0^0.5) (per-step decay about 0.90 to 0.999); a0 = 0,
v0 = 1, k_k = 0.85, k_a = 1, r_k = 0; the first LoRA factors
(w1, a1, v1, g1) zero and the second orthogonal with gain 0.1; W_r, W_v ~ U(+-0.5 / sqrt(C)),
W_k ~ U(+-0.05 / sqrt(C)), W_o = 0; channel mix mu_k = 1 - q^(r1^4), W_k ~ U(+-0.5 / sqrt(C)),
W_v = 0. LoRA ranks default to RWKV-LM's suggestions: decay and learning rate
max(32, round(1.8 sqrt(C) / 32) * 32), value max(32, round(1.3 sqrt(C) / 32) * 32), gate
max(32, round(0.6 C^0.8 / 32) * 32). `arch.init_std` is not used by these layers.
Parameter names are RWKV-LM's (receptance, key, value, output, ln_x, x_r, w0, w1, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
from archbench.archs.kernels.rwkv7 import LOG_DECAY_MIN, MAX_CHUNK, fla_unavailable, wkv7
from archbench.archs.mlp import hidden_size
from archbench.archs.registry import register_embed_init, register_mixer, register_mlp
from archbench.config import ConfigError, pattern_periods, pinned_layers, require_positive

GROUPNORM_EPS = 64e-5  # RWKV-LM: 1e-5 * head_size_divisor**2 with head_size_divisor = 8
_CHOICES = {"auto": "auto", "torch": "torch:chunked", "triton": "triton:fla"}


@dataclass
class RWKV7Config:
    head_size: int = 64
    decay_lora: int | None = None  # None: sized from d_model as in RWKV-LM
    iclr_lora: int | None = None
    value_lora: int | None = None
    gate_lora: int | None = None
    chunk_size: int = 16
    kernels: str = "auto"  # auto | torch (chunked PyTorch) | triton (flash-linear-attention, CUDA)


@dataclass
class RWKV7ChannelMixConfig:
    hidden_mult: float = 4.0  # RWKV-LM: a 4x hidden layer
    multiple_of: int = 32


def check_rwkv7(arch: Any) -> None:
    cfg = arch.rwkv7
    require_positive("arch.rwkv7.head_size", cfg.head_size)
    for key in ("decay_lora", "iclr_lora", "value_lora", "gate_lora"):
        require_positive(f"arch.rwkv7.{key}", cfg[key])
    if not 1 <= cfg.chunk_size <= MAX_CHUNK:
        raise ConfigError(
            f"arch.rwkv7.chunk_size={cfg.chunk_size} must be in [1, {MAX_CHUNK}] (decay "
            "factors inside a chunk grow as exp(0.6065 * chunk_size))"
        )
    if arch.d_model and arch.d_model % cfg.head_size:
        raise ConfigError(
            f"arch.d_model={arch.d_model} is not divisible by arch.rwkv7.head_size={cfg.head_size}"
        )


def check_channel_mix(arch: Any) -> None:
    require_positive("arch.rwkv_cmix.hidden_mult", arch.rwkv_cmix.hidden_mult)
    require_positive("arch.rwkv_cmix.multiple_of", arch.rwkv_cmix.multiple_of)


def _embed_init(weight: torch.Tensor, arch: Any) -> None:
    """RWKV-LM: a tiny uniform embedding, which its ln0 (arch.embed_norm) rescales."""
    nn.init.uniform_(weight, -1e-4, 1e-4)


def _head_init(weight: torch.Tensor, arch: Any) -> None:
    """RWKV-LM's orthogonal head, gain 0.5 * sqrt(vocab / d) when the vocabulary is wider."""
    vocab, d = weight.shape
    nn.init.orthogonal_(weight, gain=0.5 * math.sqrt(vocab / d) if vocab > d else 0.5)


register_embed_init("rwkv", embed=_embed_init, head=_head_init)


def lora_rank(d_model: int, factor: float, power: float = 0.5) -> int:
    """RWKV-LM's suggested LoRA width: factor * C^power, rounded to a multiple of 32, >= 32."""
    return max(32, int(round(factor * d_model**power / 32) * 32))


def _layer_ratios(layer_idx: int, n_layers: int) -> tuple[float, float]:
    """(0 -> 1, 1 -> almost 0) over depth; a single layer counts as the first."""
    ratio_0_to_1 = layer_idx / (n_layers - 1) if n_layers > 1 else 0.0
    return ratio_0_to_1, 1.0 - layer_idx / n_layers


def _channel_ramp(d_model: int) -> torch.Tensor:
    return (torch.arange(d_model, dtype=torch.float32) / d_model).view(1, 1, d_model)


def _orthogonal(rows: int, cols: int, scale: float) -> torch.Tensor:
    """RWKV-LM's ortho_init: gain sqrt(rows / cols) for tall matrices, times `scale`."""
    out = torch.empty(rows, cols)
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    nn.init.orthogonal_(out, gain=gain * scale)
    return out


def _token_shift(x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """x_prev: the input one step earlier (zeros before the first token of a fresh sequence)."""
    first = x.new_zeros(x[:, :1].shape) if shift is None else shift[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


@dataclass
class RWKV7TimeMixState(LayerState):
    shift: torch.Tensor  # (B, C): last input of this time mix, in the model dtype
    wkv: torch.Tensor  # (B, H, N, N) [value, key], always fp32 (it accumulates over the context)


@dataclass
class TokenShiftState(LayerState):
    shift: torch.Tensor  # (B, C): last input of this channel mix


def _first_rwkv_layer(arch: Any) -> int:
    """Index of the model's first RWKV-7 layer: the period's, unless `arch.pattern.at` pins one
    earlier (or is the only place rwkv7 appears). A layer may be built for counting with an
    arch whose n_layers is 0 or shorter than the period, so the period is walked at least once."""
    mixers, _ = pattern_periods(arch)
    depth = int(arch.n_layers or 0)
    pinned = pinned_layers(arch, depth) if depth > 0 else {}
    for index in range(max(depth, len(mixers))):
        if pinned.get(index, mixers[index % len(mixers)]) == "rwkv7":
            return index
    raise ConfigError(f"arch.pattern={arch.pattern} places no rwkv7 layer within "
                      f"arch.n_layers={depth}, yet an RWKV-7 layer is being built")


# ---- Hugging Face layout: flash-linear-attention's RWKV7ForCausalLM (archs/hf_layout.py) --------
# Its LoRAs are Sequential(Linear(d, r), act, Linear(r, d, bias)): lora.0 is our x1 transposed,
# lora.2 our x2 transposed, lora.2.bias our x0; its k_k, k_a and the channel mix's x_k are flat.

_FLA_LORAS = (("w", "w_lora"), ("a", "a_lora"), ("v", "v_lora"), ("g", "g_lora"))
_FLA_LINEARS = (("receptance", "r_proj"), ("key", "k_proj"), ("value", "v_proj"),
                ("output", "o_proj"), ("ln_x", "g_norm"))
_SHIFTS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")


def _fla_time_mix_to_hf(tensors: Tensors, module: Any) -> Tensors:
    out = {name: tensors[name] for name in (*_SHIFTS, "r_k")}
    out.update({name: tensors[name].reshape(-1) for name in ("k_k", "k_a")})
    for ours, theirs in _FLA_LINEARS:
        for leaf in ("weight", "bias"):
            if f"{ours}.{leaf}" in tensors:
                out[f"{theirs}.{leaf}"] = tensors[f"{ours}.{leaf}"]
    for ours, theirs in _FLA_LORAS:
        if f"{ours}1" not in tensors:  # the first layer has no value LoRA
            continue
        out[f"{theirs}.lora.0.weight"] = tensors[f"{ours}1"].t()
        out[f"{theirs}.lora.2.weight"] = tensors[f"{ours}2"].t()
        if ours != "g":
            out[f"{theirs}.lora.2.bias"] = tensors[f"{ours}0"].reshape(-1)
    return out


def _fla_time_mix_from_hf(tensors: Tensors, module: Any) -> Tensors:
    d = module.receptance.in_features
    tensors = dict(tensors)
    if "x_x" in tensors:  # fla's first layout: the six shift mixes stacked (6, d)
        for name, row in zip(_SHIFTS, tensors.pop("x_x").unbind(0)):
            tensors[name] = row
    out = {name: tensors[name].reshape(1, 1, d) for name in (*_SHIFTS, "k_k", "k_a")}
    out["r_k"] = tensors["r_k"]
    for ours, theirs in _FLA_LINEARS:
        for leaf in ("weight", "bias"):
            if f"{theirs}.{leaf}" in tensors:
                out[f"{ours}.{leaf}"] = tensors[f"{theirs}.{leaf}"]
    for ours, theirs in _FLA_LORAS:
        if f"{theirs}.lora.0.weight" not in tensors:
            continue
        out[f"{ours}1"] = tensors[f"{theirs}.lora.0.weight"].t()
        out[f"{ours}2"] = tensors[f"{theirs}.lora.2.weight"].t()
        if ours != "g":
            out[f"{ours}0"] = tensors[f"{theirs}.lora.2.bias"].reshape(1, 1, d)
    return out


def _fla_channel_mix_to_hf(tensors: Tensors, module: Any) -> Tensors:
    return {**tensors, "x_k": tensors["x_k"].reshape(-1)}


def _fla_channel_mix_from_hf(tensors: Tensors, module: Any) -> Tensors:
    return {**tensors, "x_k": tensors["x_k"].reshape(1, 1, -1)}


@register_mixer("rwkv7", config=RWKV7Config, kernels=tuple(_CHOICES), validate=check_rwkv7,
                width_divisor=lambda arch: int(arch.rwkv7.head_size),
                hf={"rwkv7": HFPart("attn", _fla_time_mix_to_hf, _fla_time_mix_from_hf)})
class RWKV7TimeMix(Sublayer):
    """RWKV-7 time mix (see the module docstring for the equations and the initialisation)."""

    def __init__(self, arch: Any, layer_idx: int) -> None:
        super().__init__()
        cfg = arch.rwkv7
        d = arch.d_model
        self.layer_idx = layer_idx
        self.head_size = cfg.head_size
        self.n_heads = d // cfg.head_size
        self.chunk_size = cfg.chunk_size
        self.kernels = cfg.kernels
        # Fixed for the device by resolve_kernels; until then an explicit choice stands as asked.
        self.kernel_path = "triton:fla" if cfg.kernels == "triton" else "torch:chunked"
        self.stores_v_first = layer_idx == _first_rwkv_layer(arch)
        ranks = {
            "w": cfg.decay_lora or lora_rank(d, 1.8),
            "a": cfg.iclr_lora or lora_rank(d, 1.8),
            "v": cfg.value_lora or lora_rank(d, 1.3),
            "g": cfg.gate_lora or lora_rank(d, 0.6, 0.8),
        }
        self.lora_ranks = ranks

        r0, r1 = _layer_ratios(layer_idx, arch.n_layers)
        ramp = _channel_ramp(d)
        self.x_r = nn.Parameter(1.0 - ramp.pow(0.2 * r1))
        self.x_w = nn.Parameter(1.0 - ramp.pow(0.9 * r1))
        self.x_k = nn.Parameter(1.0 - (ramp.pow(0.9 * r1) + 0.4 * r0))
        self.x_v = nn.Parameter(1.0 - (ramp.pow(0.4 * r1) + 0.6 * r0))
        self.x_a = nn.Parameter(1.0 - ramp.pow(0.9 * r1))
        self.x_g = nn.Parameter(1.0 - ramp.pow(0.2 * r1))

        position = torch.arange(d, dtype=torch.float32) / max(d - 1, 1)
        decay_speed = -7.0 + 5.0 * position.pow(0.85 + r0**0.5)
        self.w0 = nn.Parameter((decay_speed + 0.5).view(1, 1, d))
        self.w1 = nn.Parameter(torch.zeros(d, ranks["w"]))
        self.w2 = nn.Parameter(_orthogonal(ranks["w"], d, 0.1))
        self.a0 = nn.Parameter(torch.zeros(1, 1, d))
        self.a1 = nn.Parameter(torch.zeros(d, ranks["a"]))
        self.a2 = nn.Parameter(_orthogonal(ranks["a"], d, 0.1))
        if not self.stores_v_first:
            self.v0 = nn.Parameter(torch.ones(1, 1, d))
            self.v1 = nn.Parameter(torch.zeros(d, ranks["v"]))
            self.v2 = nn.Parameter(_orthogonal(ranks["v"], d, 0.1))
        self.g1 = nn.Parameter(torch.zeros(d, ranks["g"]))
        self.g2 = nn.Parameter(_orthogonal(ranks["g"], d, 0.1))
        self.k_k = nn.Parameter(torch.full((1, 1, d), 0.85))
        self.k_a = nn.Parameter(torch.ones(1, 1, d))
        self.r_k = nn.Parameter(torch.zeros(self.n_heads, self.head_size))

        self.receptance = nn.Linear(d, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.output = nn.Linear(d, d, bias=False)
        self.ln_x = nn.GroupNorm(self.n_heads, d, eps=GROUPNORM_EPS)
        bound = 1.0 / math.sqrt(d)
        nn.init.uniform_(self.receptance.weight, -0.5 * bound, 0.5 * bound)
        nn.init.uniform_(self.key.weight, -0.05 * bound, 0.05 * bound)
        nn.init.uniform_(self.value.weight, -0.5 * bound, 0.5 * bound)
        nn.init.zeros_(self.output.weight)

    # ---- interface ------------------------------------------------------------------------------
    def resolve_kernels(self, device: torch.device) -> str:
        available = {"triton:fla": fla_unavailable(device), "torch:chunked": None}
        return require_kernels(_CHOICES[self.kernels], available, "arch.rwkv7.kernels")

    def init_state(
        self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> RWKV7TimeMixState:
        d, n = self.n_heads * self.head_size, self.head_size
        return RWKV7TimeMixState(
            shift=torch.zeros(batch, d, device=device, dtype=dtype),
            wkv=torch.zeros(batch, self.n_heads, n, n, device=device, dtype=torch.float32),
        )

    def state_bytes(self, batch: int, context: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        d, n = self.n_heads * self.head_size, self.head_size
        return batch * d * itemsize + batch * self.n_heads * n * n * 4

    def flops_per_token(self, context: int) -> float:
        # Per head and token: decay (N^2), S a (2N^2), rank-one update (2N^2), v k^T (2N^2),
        # S r (2N^2). Independent of the context: that is the point of a recurrent state.
        return 9.0 * self.n_heads * self.head_size**2

    def no_weight_decay(self) -> set[str]:
        """RWKV-LM decays only 2-D `.weight` matrices: the shift, decay, learning-rate and bonus
        vectors and the LoRA factors stay undecayed."""
        return {name for name, _ in self.named_parameters(recurse=False)}

    # ---- forward --------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, state: LayerState | None = None, ctx: ForwardContext | None = None
    ) -> torch.Tensor:
        if state is not None and not isinstance(state, RWKV7TimeMixState):
            raise TypeError(f"RWKV7TimeMix needs an RWKV7TimeMixState, got {type(state).__name__}")
        ctx = ForwardContext() if ctx is None else ctx
        batch, length, d = x.shape
        heads, n = self.n_heads, self.head_size
        xx = _token_shift(x, state.shift if state is not None else None) - x
        r, log_w, k, v, kk, iclr, g = self._mix_inputs(x, xx, ctx)

        r4, k4, v4 = (t.view(batch, length, heads, n) for t in (r, k, v))
        path = self.kernel_path
        if state is not None and length == 1:
            path = "torch:recurrent"  # one decoding step: the definition is the fastest form
        y, wkv_state = wkv7(
            path, r4, log_w.view(batch, length, heads, n), k4, v4, -kk,
            kk * iclr.view(batch, length, heads, n),
            state.wkv if state is not None else None, self.chunk_size,
        )
        if state is not None:
            state.wkv.copy_(wkv_state.detach())
            state.shift.copy_(x[:, -1].detach())
        return self._readout(y.to(x.dtype), r4, k4, v4, g)

    def _readout(self, y: torch.Tensor, r4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor,
                 g: torch.Tensor) -> torch.Tensor:
        """Group norm per head of the WKV output, the r.k bonus, gate, output projection."""
        batch, length, d = g.shape
        y = self.ln_x(y.reshape(batch * length, d)).view(batch, length, d)
        bonus = (r4 * k4 * self.r_k).sum(dim=-1, keepdim=True) * v4
        y = y + bonus.view(batch, length, d)
        return self.output(y * g)

    @property
    def decode_path(self) -> str:
        """Decoding steps run the recurrence in PyTorch, whatever path prefill takes."""
        return "torch:recurrent-step"

    def decode_step(
        self, x: torch.Tensor, state: LayerState | None, position: torch.Tensor,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        """One token, (B, D) -> (B, D): the WKV state updated in place with one batched
        (N x 2) @ (2 x N) product for both rank-one terms, no per-step copy of the state."""
        if not isinstance(state, RWKV7TimeMixState):
            raise TypeError(f"RWKV7TimeMix needs an RWKV7TimeMixState, got {type(state).__name__}")
        batch, d = x.shape
        heads, n = self.n_heads, self.head_size
        xt = x.unsqueeze(1)
        r, log_w, k, v, kk, iclr, g = self._mix_inputs(xt, (state.shift.to(x.dtype) - x)[:, None],
                                                       ctx)
        wkv = state.wkv.view(batch * heads, n, n)  # [value, key], fp32
        f32 = wkv.dtype
        r3, k3, v3 = (t.view(batch * heads, n).to(f32) for t in (r, k, v))
        kk3 = kk.reshape(batch * heads, n).to(f32)
        b3 = kk3 * iclr.view(batch * heads, n).to(f32)
        sa = -torch.bmm(wkv, kk3.unsqueeze(-1))  # S a^T with a = -kk
        left = torch.cat([sa, v3.unsqueeze(-1)], dim=-1)  # (BH, N, 2)
        right = torch.stack([b3, k3], dim=1)  # (BH, 2, N)
        wkv.mul_(log_w.view(batch * heads, 1, n).to(f32).exp()).baddbmm_(left, right)
        y = torch.bmm(wkv, r3.unsqueeze(-1)).view(batch, 1, heads, n)
        state.shift.copy_(x)
        r4, k4, v4 = (t.view(batch, 1, heads, n) for t in (r, k, v))
        return self._readout(y.to(x.dtype), r4, k4, v4, g).squeeze(1)

    def _mix_inputs(self, x: torch.Tensor, xx: torch.Tensor, ctx: ForwardContext
                    ) -> tuple[torch.Tensor, ...]:
        """r, log_w (fp32), k (after the in-context learning rate), v (after the value
        residual), kk (normalised per head), iclr and the gate g, from x and xx = x_prev - x."""
        batch, length, d = x.shape
        heads, n = self.n_heads, self.head_size
        xr, xw, xk = x + xx * self.x_r, x + xx * self.x_w, x + xx * self.x_k
        xv, xa, xg = x + xx * self.x_v, x + xx * self.x_a, x + xx * self.x_g

        r = self.receptance(xr)
        # The decay is formed in fp32 even in bf16 runs: it compounds over the whole context.
        w_pre = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        log_w = LOG_DECAY_MIN * torch.sigmoid(w_pre.float())
        k = self.key(xk)
        v = self.value(xv)
        if self.stores_v_first:
            ctx.value_residual = v
        else:
            if ctx.value_residual is None:
                raise RuntimeError(
                    f"RWKV-7 layer {self.layer_idx} needs ctx.value_residual (v_first) from the "
                    "first RWKV-7 layer of the same forward call (run the layers in order with "
                    "one ctx)"
                )
            first = ctx.value_residual
            v = v + (first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        iclr = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(batch, length, heads, n), dim=-1, p=2.0)
        k = k * (1 + (iclr - 1) * self.k_a)
        return r, log_w, k, v, kk, iclr, g


@register_mlp("rwkv_cmix", config=RWKV7ChannelMixConfig, validate=check_channel_mix,
              hf={"rwkv7": HFPart("ffn", _fla_channel_mix_to_hf, _fla_channel_mix_from_hf)})
class RWKV7ChannelMix(Sublayer):
    """RWKV-7 channel mix: token shift, key to the hidden width, relu(.)^2, value back to d."""

    kernel_path = "torch"

    def __init__(self, arch: Any, layer_idx: int) -> None:
        super().__init__()
        d = arch.d_model
        cfg = arch.rwkv_cmix
        hidden = hidden_size(d, cfg.hidden_mult, cfg.multiple_of)
        _, r1 = _layer_ratios(layer_idx, arch.n_layers)
        self.x_k = nn.Parameter(1.0 - _channel_ramp(d).pow(r1**4))
        self.key = nn.Linear(d, hidden, bias=False)
        self.value = nn.Linear(hidden, d, bias=False)
        bound = 0.5 / math.sqrt(d)
        nn.init.uniform_(self.key.weight, -bound, bound)
        nn.init.zeros_(self.value.weight)

    def init_state(
        self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> TokenShiftState:
        return TokenShiftState(shift=torch.zeros(batch, self.x_k.shape[-1], device=device,
                                                 dtype=dtype))

    def state_bytes(self, batch: int, context: int, dtype: torch.dtype) -> int:
        return batch * self.x_k.shape[-1] * torch.empty((), dtype=dtype).element_size()

    def no_weight_decay(self) -> set[str]:
        return {"x_k"}

    def forward(
        self, x: torch.Tensor, state: LayerState | None = None, ctx: ForwardContext | None = None
    ) -> torch.Tensor:
        shift = state.shift if isinstance(state, TokenShiftState) else None
        mixed = x + (_token_shift(x, shift) - x) * self.x_k
        if isinstance(state, TokenShiftState):
            state.shift.copy_(x[:, -1].detach())
        return self.value(torch.relu(self.key(mixed)).square())

    def decode_step(
        self, x: torch.Tensor, state: LayerState | None, position: torch.Tensor,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        """One token, (B, D) -> (B, D), the shift state updated in place."""
        if not isinstance(state, TokenShiftState):
            raise TypeError(f"RWKV7ChannelMix needs a TokenShiftState, got {type(state).__name__}")
        mixed = x + (state.shift.to(x.dtype) - x) * self.x_k.view(-1)
        state.shift.copy_(x)
        return self.value(torch.relu(self.key(mixed)).square())


# ---- the Hugging Face class: flash-linear-attention's RWKV7ForCausalLM --------------------------


def _fla_group_norm_eps(config: dict[str, Any], head_dim: int) -> None:
    """fla's per-head GroupNorm uses eps = head_dim * norm_eps; ours is RWKV-LM's fixed 64e-5."""
    eps = head_dim * float(config.get("norm_eps", 1e-5))
    if not math.isclose(eps, GROUPNORM_EPS, rel_tol=1e-6):
        raise ConfigError(f"config.json norm_eps={config.get('norm_eps', 1e-5)} with head_dim="
                          f"{head_dim} gives a group-norm eps {eps:g}; archbench's RWKV-7 uses "
                          f"{GROUPNORM_EPS:g} (head_dim * norm_eps must equal it)")


def rwkv7_arch(config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """fla's RWKV7ForCausalLM config.json as an archbench arch (ConfigError for what we lack)."""
    require_falsy(config, "attn")  # fla's hybrid: softmax attention in some layers
    require_value(config, "hidden_act", "sqrelu", "sqrelu")
    require_value(config, "norm_bias", True, True)
    d = int(config["hidden_size"])
    value_dims = config.get("value_dim")
    if value_dims is not None and any(int(v) != d for v in (
            value_dims if isinstance(value_dims, list) else [value_dims])):
        raise ConfigError(f"config.json value_dim={value_dims!r} cannot be expressed in "
                          f"archbench; only the hidden size {d} (or null)")
    head_dim = int(config.get("head_dim") or d // int(config["num_heads"]))
    _fla_group_norm_eps(config, head_dim)
    inter = config.get("intermediate_size")
    if inter is None:
        inter = hidden_size(d, float(config.get("hidden_ratio") or 4), 32)
    arch = {
        "name": "rwkv7", "pattern": {"mixers": ["rwkv7"], "mlps": ["rwkv_cmix"]},
        "d_model": d, "n_layers": int(config["num_hidden_layers"]), "norm": "layernorm",
        "norm_eps": float(config.get("norm_eps", 1e-5)),
        "embed_norm": bool(config.get("norm_first", True)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)), "embed_init": "rwkv",
        "rwkv7": {"head_size": head_dim,
                  "decay_lora": int(config.get("decay_low_rank_dim", 64)),
                  "iclr_lora": int(config.get("a_low_rank_dim", 64)),
                  "value_lora": int(config.get("v_low_rank_dim", 16)),
                  "gate_lora": int(config.get("gate_low_rank_dim", 128))},
        "rwkv_cmix": {"hidden_mult": exact_hidden_mult(int(inter), d), "multiple_of": 1},
    }
    return arch, int(config["vocab_size"])


def rwkv7_config(model: Any) -> dict[str, Any]:
    arch, mixer, cmix = model.arch, model.blocks[0].mixer, model.blocks[0].mlp
    ranks = mixer.lora_ranks
    return {
        "vocab_size": model.vocab_size, "hidden_size": arch.d_model,
        "num_hidden_layers": arch.n_layers, "head_dim": mixer.head_size,
        "decay_low_rank_dim": ranks["w"], "a_low_rank_dim": ranks["a"],
        "v_low_rank_dim": ranks["v"], "gate_low_rank_dim": ranks["g"],
        "intermediate_size": cmix.key.out_features, "hidden_act": "sqrelu",
        "norm_first": bool(arch.embed_norm), "norm_bias": True, "norm_eps": arch.norm_eps,
        "tie_word_embeddings": bool(arch.tie_embeddings), "attn": None, "attn_mode": "chunk",
    }


def rwkv7_mismatch(model: Any) -> str | None:
    arch, problems = model.arch, []
    if {b.mixer_kind for b in model.blocks} != {"rwkv7"} or \
            any(b.mlp_slot != "rwkv_cmix" for b in model.blocks):
        problems.append("every layer must be rwkv7 with the rwkv_cmix channel mix")
    if arch.norm != "layernorm" or model.pos_embed is not None:
        problems.append("arch.norm must be layernorm, with no learned positions")
    elif not math.isclose(arch.rwkv7.head_size * arch.norm_eps, GROUPNORM_EPS, rel_tol=1e-6):
        problems.append("fla's group-norm eps is head_size * norm_eps, which must equal "
                        f"{GROUPNORM_EPS:g}")
    return "; ".join(problems) or None


register_hf_family(HFFamily(
    name="rwkv7", hf_class="RWKV7ForCausalLM", model_type="rwkv7", base_prefix="model",
    shell={"embed": "model.embeddings", "embed_norm": "model.layers.0.pre_norm",
           "final_norm": "model.norm", "lm_head": "lm_head"},
    layer="model.layers.{i}", norms={"mixer_norm": "attn_norm", "mlp_norm": "ffn_norm"},
    arch_from_config=rwkv7_arch, config_from_model=rwkv7_config, mismatch=rwkv7_mismatch,
    loads_with="flash-linear-attention (fla.models.RWKV7ForCausalLM; import fla first)",
))
