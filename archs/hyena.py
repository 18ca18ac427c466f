"""Hyena (Poli, Massaroli, Nguyen, Fu, Dao, Baccus, Bengio, Ermon & Re, 2023), the operator of
order N: a recurrence of long convolutions and element-wise gates.

    x^1, ..., x^N, v = short_conv(W_in u)         N + 1 streams; depthwise causal conv (width 3)
    z^1 = v;  z^(n+1) = x^n * (h^n conv z^n + b^n * z^n)
    y = W_out z^(N+1)

The long filters h^n are implicit: a small FFN with sine activations maps positional features of
t (t itself, and cos / sin of 2 pi k t / l_max for k = 1..K) to one value per channel and filter,
and an exponential decay window, exp(-a_c t / l_max) with rates a_c spread across channels from
fast to slow, shapes it. Filters therefore exist at any length (the features are defined for t
past l_max too), and every convolution runs through the FFT in O(L log L).

There is no constant-size state: a long convolution at position t reads every earlier input.
Decoding keeps, per filter, the history of its input z^n (preallocated to the cache's max_len)
and the filters themselves over max_len (computed once when the state is made), and a step costs
O(t) per channel. `state_bytes` counts all of it, so it grows linearly with the context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from archbench.archs.base import ForwardContext, LayerState, Sublayer, require_kernels
from archbench.archs.kernels.fftconv import fft_causal_conv
from archbench.archs.model import residual_std
from archbench.archs.registry import register_mixer
from archbench.archs.s4d import TORCH_PATH, fft_flops_per_channel, state_real_dtype
from archbench.config import ConfigError


@dataclass
class HyenaConfig:
    order: int = 2  # N: long convolutions and gates; the input projection makes N + 1 streams
    short_conv: int = 3  # width of the depthwise causal conv on the projected streams
    filter_width: int = 64  # hidden width of the implicit-filter FFN
    filter_depth: int = 2  # hidden (width x width) sine layers after the first
    pos_features: int = 33  # t plus (pos_features - 1) / 2 cos/sin pairs; odd, >= 3
    sine_freq: float = 1.0  # initial frequency w of the sin(w x) activations (trained)
    l_max: int = 2048  # positions are measured in units of l_max (features and window)
    decay_fast: float = 0.3  # the fastest channel's window falls to decay_target at this t/l_max
    decay_slow: float = 1.5  # ... and the slowest channel's at this t/l_max
    decay_target: float = 0.01
    kernels: str = "auto"  # auto | torch (FFT convolution; the only path)


def check_hyena(arch: Any) -> None:
    """Hyena's settings as config errors naming the field."""
    cfg = arch.hyena
    for key in ("order", "short_conv", "filter_width", "l_max"):
        value = getattr(cfg, key)
        if value < 1:
            raise ConfigError(f"arch.hyena.{key}={value} is not allowed; it must be >= 1")
    if cfg.filter_depth < 0:
        raise ConfigError(f"arch.hyena.filter_depth={cfg.filter_depth} must be >= 0")
    if cfg.pos_features < 3 or cfg.pos_features % 2 == 0:
        raise ConfigError(f"arch.hyena.pos_features={cfg.pos_features} is not allowed; it must "
                          "be odd and >= 3 (t plus cos/sin pairs)")
    if not 0 < cfg.decay_fast <= cfg.decay_slow:
        raise ConfigError(f"arch.hyena.decay_fast={cfg.decay_fast}, arch.hyena.decay_slow="
                          f"{cfg.decay_slow}: need 0 < decay_fast <= decay_slow")
    if not 0 < cfg.decay_target < 1:
        raise ConfigError(f"arch.hyena.decay_target={cfg.decay_target} must be in (0, 1)")


class Sine(nn.Module):
    """sin(w x) with a trained frequency per unit: the FFN's activation, which lets the filters
    carry high frequencies (the paper's remedy for the low-frequency bias of smooth MLPs)."""

    def __init__(self, width: int, freq: float) -> None:
        super().__init__()
        self.freq = nn.Parameter(torch.full((width,), float(freq)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilters(nn.Module):
    """`count` x `channels` long filters as a function of position, of any length."""

    def __init__(self, cfg: Any, channels: int, count: int) -> None:
        super().__init__()
        self.channels, self.count = channels, count
        self.bands, self.l_max = (cfg.pos_features - 1) // 2, cfg.l_max
        layers: list[nn.Module] = [nn.Linear(cfg.pos_features, cfg.filter_width),
                                   Sine(cfg.filter_width, cfg.sine_freq)]
        for _ in range(cfg.filter_depth):
            layers += [nn.Linear(cfg.filter_width, cfg.filter_width),
                       Sine(cfg.filter_width, cfg.sine_freq)]
        layers.append(nn.Linear(cfg.filter_width, count * channels, bias=False))
        self.ffn = nn.Sequential(*layers)
        fast = -math.log(cfg.decay_target) / cfg.decay_fast
        slow = -math.log(cfg.decay_target) / cfg.decay_slow
        self.register_buffer("decay", torch.linspace(fast, slow, channels), persistent=False)

    def features(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(length, pos_features): t / l_max, then cos and sin of 2 pi k t / l_max."""
        t = torch.arange(length, device=device, dtype=dtype).unsqueeze(-1) / self.l_max
        k = torch.arange(1, self.bands + 1, device=device, dtype=dtype)
        angle = 2 * math.pi * k * t
        return torch.cat([t, torch.cos(angle), torch.sin(angle)], dim=-1)

    def forward(self, length: int) -> torch.Tensor:
        """(count, channels, length) filters h^n[c, t], windowed by exp(-a_c t / l_max)."""
        weight = self.ffn[0].weight
        z = self.features(length, weight.device, weight.dtype)
        h = self.ffn(z).view(length, self.count, self.channels).permute(1, 2, 0)
        window = torch.exp(-self.decay.to(h.dtype).unsqueeze(-1) * z[:, 0])
        return h * window


@dataclass
class HyenaState(LayerState):
    """Short-conv window (B, (N+1) d, width - 1); per filter the history of its input
    (N, B, d, max_len) and the filters themselves (N, d, max_len), preallocated in full."""

    conv_window: torch.Tensor
    history: torch.Tensor
    filters: torch.Tensor
    length: int = 0


@register_mixer("hyena", config=HyenaConfig, kernels=("auto", "torch"), validate=check_hyena)
class Hyena(Sublayer):
    """Hyena operator of order N (default 2) with implicit long filters."""

    config_key = "hyena"
    kernel_path = TORCH_PATH

    def __init__(self, arch: Any, layer_idx: int) -> None:
        super().__init__()
        check_hyena(arch)
        cfg = arch.hyena
        d = arch.d_model
        self.layer_idx, self.d_model, self.kernels = layer_idx, d, cfg.kernels
        self.order, self.width = cfg.order, cfg.short_conv
        streams = (cfg.order + 1) * d
        self.in_proj = nn.Linear(d, streams)
        self.short_filter = nn.Conv1d(streams, streams, cfg.short_conv, groups=streams)
        self.filters = ImplicitFilters(cfg, d, cfg.order)
        self.filter_bias = nn.Parameter(torch.randn(cfg.order, d))  # skip of each long conv
        self.out_proj = nn.Linear(d, d)
        nn.init.normal_(self.in_proj.weight, std=arch.init_std)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.normal_(self.out_proj.weight, std=residual_std(arch))
        nn.init.zeros_(self.out_proj.bias)

    def resolve_kernels(self, device: torch.device) -> str:
        require_kernels(self.kernels, {"torch": None}, f"arch.{self.config_key}.kernels")
        return TORCH_PATH

    def no_weight_decay(self) -> set[str]:
        return {"filter_bias"}

    def init_state(self, batch: int, max_len: int, device: torch.device,
                   dtype: torch.dtype) -> HyenaState:
        """Computes the filters over max_len once: decoding reuses them at every step."""
        with torch.no_grad():
            filters = self.filters(max_len).to(device=device, dtype=state_real_dtype(dtype))
        streams = (self.order + 1) * self.d_model
        return HyenaState(
            conv_window=torch.zeros(batch, streams, self.width - 1, device=device, dtype=dtype),
            history=torch.zeros(self.order, batch, self.d_model, max_len, device=device,
                                dtype=dtype),
            filters=filters.contiguous(),
        )

    def state_bytes(self, batch: int, context: int, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).itemsize
        filter_item = torch.empty((), dtype=state_real_dtype(dtype)).itemsize
        window = batch * (self.order + 1) * self.d_model * (self.width - 1) * item
        history = self.order * batch * self.d_model * context * item
        return window + history + self.order * self.d_model * context * filter_item

    def flops_per_token(self, context: int) -> float:
        """N FFT convolutions on d channels, each with its skip and gate (4 per channel), and
        the decay window on the filters (counted per position, as the FFN's weights are)."""
        return self.order * self.d_model * (fft_flops_per_channel(context) + 5)

    def _short_conv(self, u: torch.Tensor, st: HyenaState | None) -> torch.Tensor:
        """Depthwise causal conv over (B, streams, L), continuing from the state's window."""
        if st is None:
            padded = F.pad(u, (self.width - 1, 0))
        else:
            padded = torch.cat([st.conv_window.to(u.dtype), u], dim=-1)
            st.conv_window.copy_(padded[..., padded.shape[-1] - (self.width - 1):])
        return F.conv1d(padded, self.short_filter.weight, self.short_filter.bias,
                        groups=padded.shape[1])

    def _long_conv(self, n: int, z: torch.Tensor, filters: torch.Tensor,
                   st: HyenaState | None) -> torch.Tensor:
        """h^n conv z (+ skip) over (B, d, T); with a state, over the whole stored history."""
        length = z.shape[-1]
        if st is None:
            out = fft_causal_conv(z, filters[n])
        else:
            start, end = st.length, st.length + length
            st.history[n, ..., start:end] = z
            if length == 1:  # a decoding step: one dot product with the reversed filter
                past = st.history[n, ..., :end]
                out = (past * filters[n, :, :end].flip(-1).to(past.dtype)).sum(-1, keepdim=True)
            else:
                out = fft_causal_conv(st.history[n, ..., :end], filters[n, :, :end])[..., start:]
        return out + self.filter_bias[n].unsqueeze(-1) * z

    def decode_step(self, x: torch.Tensor, state: LayerState | None, position: torch.Tensor,
                    ctx: ForwardContext) -> torch.Tensor:
        """One token at `position` with static shapes (what compiled decoding needs): each long
        convolution is a masked dot product of its whole preallocated history with the filter
        reversed at `position`, so a compiled step costs O(max_len) per channel; the eager path
        (`forward` on one token) reads only the first position + 1 entries."""
        if not isinstance(state, HyenaState):
            raise TypeError(f"Hyena.decode_step needs a HyenaState, got {type(state).__name__}")
        u = self.in_proj(x)
        window = torch.cat([state.conv_window, u.unsqueeze(-1).to(state.conv_window.dtype)], -1)
        state.conv_window.copy_(window[..., 1:])
        streams = (window * self.short_filter.weight.squeeze(1)).sum(-1) + self.short_filter.bias
        *gates, z = streams.to(x.dtype).split(self.d_model, dim=1)
        lags = position - torch.arange(state.history.shape[-1], device=x.device)
        for n, gate in enumerate(gates):
            history = state.history[n]
            history.index_copy_(-1, position.view(1), z.unsqueeze(-1).to(history.dtype))
            reversed_filter = state.filters[n][:, lags.clamp(min=0)] * (lags >= 0)
            out = (history * reversed_filter.to(history.dtype)).sum(-1)
            z = gate * (out + self.filter_bias[n] * z)
        return self.out_proj(z)

    def forward(self, x: torch.Tensor, state: LayerState | None = None,
                ctx: ForwardContext | None = None) -> torch.Tensor:
        st = state if isinstance(state, HyenaState) else None
        length = x.shape[1]
        if st is not None and st.length + length > st.history.shape[-1]:
            raise ValueError(f"Hyena state holds {st.history.shape[-1]} positions; cannot add "
                             f"{length} after {st.length}")
        streams = self._short_conv(self.in_proj(x).transpose(1, 2), st)
        *gates, z = streams.split(self.d_model, dim=1)
        filters = st.filters if st is not None else self.filters(length)
        for n, gate in enumerate(gates):
            z = gate * self._long_conv(n, z, filters, st)
        if st is not None:
            st.length += length
        return self.out_proj(z.transpose(1, 2))
