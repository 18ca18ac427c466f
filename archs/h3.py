"""H3, "Hungry Hungry Hippos" (Fu, Dao, Saab, Thomas, Rudra & Re, 2022).

Two SSMs stacked so that a gated recurrence can remember a token and compare it with later ones,
which is what associative recall needs and a single S4D layer cannot do:

    q, k, v = W_q x, W_k x, W_v x
    k' = SSM_shift(k)                   a shift-register SSM: A shifts the state down by one,
                                        B = e_1, so the state holds the last N inputs and the
                                        kernel is N learned taps (plus a skip)
    kv = k' (outer) v, per head         heads of size d_head: a d_head x d_head product per head
    s = SSM_diag(kv)                    S4D's diagonal SSM (one per head, shared by the
                                        d_head^2 entries of that head's product), plus a skip
    y_head = q_head . s                 multiplicative gating by q: (1 x d_head)(d_head x d_head)
    out = W_o y

With d_head = 1 (the default, as the paper's language models) every channel is its own head and
the layer is q * SSM_diag(SSM_shift(k) * v) channel-wise. Training applies both SSMs as FFT
convolutions; decoding keeps the shift register (the last N - 1 inputs of k: the oldest of the
N slots is shifted out before it is ever read again) and the diagonal SSM's complex state,
(B, d_head, d_head, heads, N/2), both constant in the context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from archbench.archs.base import ForwardContext, LayerState, Sublayer, require_kernels
from archbench.archs.kernels.fftconv import fft_causal_conv
from archbench.archs.model import residual_std
from archbench.archs.registry import register_mixer
from archbench.archs.s4d import (
    TORCH_PATH,
    DiagonalSSM,
    check_ssm_settings,
    fft_flops_per_channel,
    state_real_dtype,
)
from archbench.config import ConfigError


@dataclass
class H3Config:
    d_state: int = 64  # N of both SSMs: shift taps, and the diagonal SSM's real state (N/2 modes)
    head_dim: int = 1  # d_head: each head's K.V product is d_head x d_head
    init: str = "lin"  # diagonal SSM init: lin | inv (as S4D)
    dt_min: float = 0.001
    dt_max: float = 0.1
    ssm_lr: float | None = 0.001  # diagonal SSM's log dt and A at min(scheduled lr, ssm_lr)
    # Init std of the Q, K, V projections; null: arch.init_std (0.02). The layer's output is a
    # product of three projections, so its gradient at init scales as std^2: at 0.02 a small
    # model sits on a plateau for thousands of steps on associative recall, at 0.1 it leaves
    # it in a few hundred (conf/validate/h3_synthetics.yaml).
    qkv_init_std: float | None = None
    kernels: str = "auto"  # auto | torch (FFT convolution; the only path)


def check_h3(arch: Any) -> None:
    """H3's settings as config errors naming the field (d_model checked when it is set)."""
    cfg, d_model = arch.h3, arch.d_model
    check_ssm_settings("arch.h3", cfg.d_state, cfg.init, cfg.dt_min, cfg.dt_max, cfg.ssm_lr)
    if cfg.qkv_init_std is not None and cfg.qkv_init_std <= 0:
        raise ConfigError(f"arch.h3.qkv_init_std={cfg.qkv_init_std} is not allowed; it must be "
                          "> 0 or null (arch.init_std)")
    if cfg.head_dim < 1:
        raise ConfigError(f"arch.h3.head_dim={cfg.head_dim} is not allowed; it must be >= 1")
    if d_model and d_model % cfg.head_dim:
        raise ConfigError(f"arch.d_model={d_model} is not divisible by "
                          f"arch.h3.head_dim={cfg.head_dim}")


@dataclass
class H3State(LayerState):
    """Shift register (B, d_model, N - 1) in the model dtype; diagonal SSM state as (real, imag)
    pairs (B, d_head, d_head, heads, N/2, 2) in at least fp32."""

    k_window: torch.Tensor
    h: torch.Tensor
    length: int = 0


@register_mixer("h3", config=H3Config, kernels=("auto", "torch"), validate=check_h3,
                width_divisor=lambda arch: int(arch.h3.head_dim))
class H3(Sublayer):
    """H3 mixer: shift SSM on K, K.V outer product per head, diagonal SSM, gating by Q."""

    config_key = "h3"
    kernel_path = TORCH_PATH

    def __init__(self, arch: Any, layer_idx: int) -> None:
        super().__init__()
        check_h3(arch)
        cfg = arch.h3
        d = arch.d_model
        self.layer_idx, self.d_model, self.kernels = layer_idx, d, cfg.kernels
        self.head_dim, self.n_heads, self.taps = cfg.head_dim, d // cfg.head_dim, cfg.d_state
        self.ssm_lr = cfg.ssm_lr
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d) for _ in range(3))
        self.shift_taps = nn.Parameter(torch.randn(d, cfg.d_state))  # the shift SSM's C
        self.shift_D = nn.Parameter(torch.randn(d))
        self.ssm = DiagonalSSM(self.n_heads, cfg.d_state, cfg.init, cfg.dt_min, cfg.dt_max)
        self.D = nn.Parameter(torch.randn(self.n_heads))
        self.output_linear = nn.Linear(d, d)
        qkv_std = arch.init_std if cfg.qkv_init_std is None else cfg.qkv_init_std
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=qkv_std)
            nn.init.zeros_(proj.bias)
        nn.init.normal_(self.output_linear.weight, std=residual_std(arch))
        nn.init.zeros_(self.output_linear.bias)

    def resolve_kernels(self, device: torch.device) -> str:
        require_kernels(self.kernels, {"torch": None}, f"arch.{self.config_key}.kernels")
        return TORCH_PATH

    def no_weight_decay(self) -> set[str]:
        return {f"ssm.{n}" for n in self.ssm.ssm_parameter_names()} | {"D", "shift_D"}

    def lr_overrides(self) -> dict[str, dict[str, float]]:
        if self.ssm_lr is None:
            return {}
        return {f"ssm.{n}": {"lr_max": float(self.ssm_lr)} for n in self.ssm.ssm_parameter_names()}

    def _ssm_state_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.head_dim, self.head_dim, self.n_heads, self.ssm.modes, 2)

    def init_state(self, batch: int, max_len: int, device: torch.device,
                   dtype: torch.dtype) -> H3State:
        return H3State(
            k_window=torch.zeros(batch, self.d_model, self.taps - 1, device=device, dtype=dtype),
            h=torch.zeros(self._ssm_state_shape(batch), device=device,
                          dtype=state_real_dtype(dtype)),
        )

    def state_bytes(self, batch: int, context: int, dtype: torch.dtype) -> int:
        window = batch * self.d_model * (self.taps - 1) * torch.empty((), dtype=dtype).itemsize
        numel = 1
        for n in self._ssm_state_shape(batch):
            numel *= n
        return window + numel * torch.empty((), dtype=state_real_dtype(dtype)).itemsize

    def flops_per_token(self, context: int) -> float:
        """Shift SSM as an FFT convolution on d channels; the K.V product (d * d_head); the
        diagonal SSM's FFT convolution on d * d_head channels with its skip; the gating by Q and
        the sum over d_head (2 d * d_head); the Vandermonde kernel (8 per mode, per head)."""
        d, hd = self.d_model, self.head_dim
        fft = fft_flops_per_channel(context)
        return d * (fft + 2) + d * hd * (fft + 5) + 8 * self.n_heads * self.ssm.modes

    def _heads(self, t: torch.Tensor, outer: int) -> torch.Tensor:
        """(B, d, *rest) with channels ordered (head, d_head) -> (B, d_head, 1, H, *rest) when
        outer == 1 (the row index of the product), else (B, 1, d_head, H, *rest)."""
        b, rest = t.shape[0], t.shape[2:]
        split = t.reshape(b, self.n_heads, self.head_dim, *rest).transpose(1, 2)
        return split.unsqueeze(2) if outer == 1 else split.unsqueeze(1)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, d_head, H, *rest) -> (B, d, *rest) in (head, d_head) channel order."""
        b, rest = y.shape[0], y.shape[3:]
        return y.transpose(1, 2).reshape(b, self.d_model, *rest)

    def _shift(self, k: torch.Tensor, st: H3State | None) -> torch.Tensor:
        """The shift SSM over (B, d, L): the last N inputs weighted by the taps, plus the skip."""
        length = k.shape[-1]
        if st is None:
            out = fft_causal_conv(k, self.shift_taps)
        else:
            full = torch.cat([st.k_window.to(k.dtype), k], dim=-1)
            out = fft_causal_conv(full, self.shift_taps)[..., -length:]
            st.k_window.copy_(full[..., full.shape[-1] - (self.taps - 1):])
        return out + self.shift_D.unsqueeze(-1) * k

    def forward(self, x: torch.Tensor, state: LayerState | None = None,
                ctx: ForwardContext | None = None) -> torch.Tensor:
        st = state if isinstance(state, H3State) else None
        if st is not None and x.shape[1] == 1:
            st.length += 1
            return self._decode(x[:, 0], st).unsqueeze(1)
        q, k, v = (p(x).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        k = self._shift(k, st)
        kv = self._heads(k, 1) * self._heads(v, 2)  # (B, d_head, d_head, H, L)
        # a fresh state is zero: its free evolution through the chunk need not be computed
        h0 = torch.view_as_complex(st.h) if st is not None and st.length else None
        s, h = self.ssm(kv, h0, return_state=st is not None)
        s = s + self.D.unsqueeze(-1) * kv
        y = (s * self._heads(q, 1)).sum(1)  # (B, d_head, H, L)
        if st is not None and h is not None:
            st.h.copy_(torch.view_as_real(h))
            st.length += x.shape[1]
        return self.output_linear(self._merge(y).transpose(1, 2).to(x.dtype))

    def _decode(self, x: torch.Tensor, st: H3State) -> torch.Tensor:
        """One token (B, d) -> (B, d), both states updated in place; bookkeeping left to callers."""
        q, k, v = (p(x) for p in (self.q_proj, self.k_proj, self.v_proj))
        window = torch.cat([st.k_window, k.unsqueeze(-1).to(st.k_window.dtype)], dim=-1)
        k = (window * self.shift_taps.flip(-1)).sum(-1) + self.shift_D * k
        st.k_window.copy_(window[..., 1:])
        kv = self._heads(k, 1) * self._heads(v, 2)  # (B, d_head, d_head, H)
        s = self.ssm.step(kv, torch.view_as_complex(st.h)) + self.D * kv
        y = (s * self._heads(q, 1)).sum(1)
        return self.output_linear(self._merge(y).to(x.dtype))

    def decode_step(self, x: torch.Tensor, state: LayerState | None, position: torch.Tensor,
                    ctx: ForwardContext) -> torch.Tensor:
        """Shift register and diagonal SSM step; neither needs the position."""
        if not isinstance(state, H3State):
            raise TypeError(f"H3.decode_step needs an H3State, got {type(state).__name__}")
        return self._decode(x, state)
