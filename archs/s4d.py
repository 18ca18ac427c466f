"""S4D (Gu, Gupta, Goel & Re, 2022): a diagonal state-space layer with complex modes.

Every channel is its own linear time-invariant SSM x' = A x + B u, y = C x + D u with a diagonal
complex A of N/2 modes; the conjugate half of a real state of size N is implied, which is why the
kernel carries a factor 2 and a real part. Zero-order hold with a learned step dt gives
dA = exp(dt A) and dB = (exp(dt A) - 1) / A * B (B fixed at 1: its scale is absorbed by C, as in
the paper's minimal form). Because the system is time-invariant, training computes the length-L
convolution kernel K_l = 2 Re(sum_n C_n dB_n dA_n^l) by a Vandermonde product and applies it
with an FFT (O(L log L)); decoding runs the same system as a recurrence over a constant-size
complex state. A chunk that continues from a state adds the state's free evolution through the
chunk, y_t += 2 Re(C dA^(t+1) h0), and leaves h_T = dA^T h0 + dB sum_s dA^(T-1-s) u_s, both in
closed form.

The layer is the paper's standalone block: SSM + skip D, GELU, then a position-wise linear layer
to 2d followed by a GLU that mixes the channels. SSM parameters (log dt, the real and imaginary
parts of A) train without weight decay and with the learning rate capped (S4's published rule),
through the generic per-parameter rules of the optimizer (`Sublayer.lr_overrides`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from archbench.archs.base import ForwardContext, LayerState, Sublayer, require_kernels
from archbench.archs.kernels.fftconv import fft_causal_conv
from archbench.archs.model import residual_std
from archbench.archs.registry import register_mixer
from archbench.config import ConfigError

S4D_INITS = ("lin", "inv")
TORCH_PATH = "torch:fft"
# Positions per block of the Vandermonde matrix: memory channels x modes x 512, not x L.
KERNEL_CHUNK = 512


@dataclass
class S4DConfig:
    d_state: int = 64  # real state size N per channel (N/2 complex modes); must be even
    init: str = "lin"  # lin: A_n = -1/2 + i pi n | inv: A_n = -1/2 + i (N/pi)(N/(2n+1) - 1)
    dt_min: float = 0.001  # the step dt is initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    ssm_lr: float | None = 0.001  # SSM parameters train at min(scheduled lr, ssm_lr); null: same
    kernels: str = "auto"  # auto | torch (FFT convolution; the only path)


def check_ssm_settings(key: str, d_state: int, init: str, dt_min: float, dt_max: float,
                       ssm_lr: float | None) -> None:
    """What S4D and H3's diagonal SSM need, as config errors naming the field."""
    if d_state < 2 or d_state % 2:
        raise ConfigError(f"{key}.d_state={d_state} is not allowed; it must be even and >= 2 "
                          "(N/2 complex modes with their conjugates)")
    if init not in S4D_INITS:
        raise ConfigError(f"{key}.init={init!r} is not allowed; choose one of {list(S4D_INITS)}")
    if not 0 < dt_min <= dt_max:
        raise ConfigError(f"{key}.dt_min={dt_min}, {key}.dt_max={dt_max}: need "
                          "0 < dt_min <= dt_max")
    if ssm_lr is not None and ssm_lr <= 0:
        raise ConfigError(f"{key}.ssm_lr={ssm_lr} is not allowed; it must be > 0 or null")


def state_real_dtype(dtype: torch.dtype) -> torch.dtype:
    """A recurrent state accumulates over the whole context: at least fp32."""
    return torch.promote_types(dtype, torch.float32)


def fft_flops_per_channel(context: int) -> float:
    """FLOPs per token and channel of one FFT convolution at length `context`: three real FFTs
    of size n = 2L at about 2.5 n log2 n each, plus the n/2 complex products, over L tokens."""
    length = max(context, 1)
    n = 2 * length
    return (3 * 2.5 * n * math.log2(n) + 3 * n) / length


def check_s4d(arch: Any) -> None:
    cfg = arch.s4d
    check_ssm_settings("arch.s4d", cfg.d_state, cfg.init, cfg.dt_min, cfg.dt_max, cfg.ssm_lr)


class DiagonalSSM(nn.Module):
    """`channels` independent complex diagonal SSMs of d_state / 2 modes each (no D: callers add
    their skip). Used by S4D and by H3's second SSM."""

    def __init__(self, channels: int, d_state: int, init: str, dt_min: float,
                 dt_max: float) -> None:
        super().__init__()
        modes = d_state // 2
        self.channels, self.modes = channels, modes
        self.chunk = KERNEL_CHUNK
        log_dt = torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.full((channels, modes), math.log(0.5)))
        n = torch.arange(modes, dtype=torch.float32)
        if init == "lin":
            imag = math.pi * n
        else:
            imag = (d_state / math.pi) * (d_state / (2 * n + 1) - 1)
        self.A_imag = nn.Parameter(imag.repeat(channels, 1))
        # C ~ complex standard normal, stored as (real, imag) pairs so optimizers see reals
        self.C = nn.Parameter(torch.view_as_real(torch.randn(channels, modes,
                                                             dtype=torch.cfloat)))

    def ssm_parameter_names(self) -> tuple[str, ...]:
        """Names (relative to this module) of the parameters S4's learning-rate rule covers."""
        return ("log_dt", "log_A_real", "A_imag")

    def discrete(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dt A, dA, dB, C), complex (channels, modes), by zero-order hold with B = 1."""
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)
        dt_A = torch.exp(self.log_dt).unsqueeze(-1) * A
        dA = torch.exp(dt_A)
        dB = (dA - 1) / A
        return dt_A, dA, dB, torch.view_as_complex(self.C)

    def powers(self, dt_A: torch.Tensor, start: int, stop: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Real and imaginary parts of dA^l = exp(l Re(dt A)) (cos + i sin)(l Im(dt A)) for
        l = start..stop-1, each (channels, modes, stop - start): a block of the Vandermonde
        matrix. Real exp, cos and sin instead of a complex exp: the same numbers, about 10x
        faster on CPU."""
        pos = torch.arange(start, stop, device=dt_A.device, dtype=dt_A.real.dtype)
        decay = torch.exp(dt_A.real.unsqueeze(-1) * pos)
        angle = dt_A.imag.unsqueeze(-1) * pos
        return decay * torch.cos(angle), decay * torch.sin(angle)

    def table(self, dt_A: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """dA^j for j < min(chunk, length), as `powers(dt_A, 0, ...)` gives it, built by
        doubling (dA^(n + j) = dA^n dA^j, dA^n by one complex exp per level): complex products
        instead of an exp, a cos and a sin per entry, and rounding that grows with log2 of the
        block, not with its length."""
        size = min(self.chunk, length)
        re = torch.ones(*dt_A.shape, 1, device=dt_A.device, dtype=dt_A.real.dtype)
        im = torch.zeros_like(re)
        filled = 1
        while filled < size:
            step = torch.exp(dt_A * filled).unsqueeze(-1)
            re, im = (torch.cat([re, re * step.real - im * step.imag], dim=-1),
                      torch.cat([im, re * step.imag + im * step.real], dim=-1))
            filled *= 2
        return re[..., :size], im[..., :size]

    def _blocks(self, length: int) -> Iterator[tuple[int, int]]:
        """Position blocks of at most `chunk`: the whole Vandermonde matrix (channels x modes x
        L, 600 MiB at a 4K prefill of a micro model) never exists at once."""
        for start in range(0, length, self.chunk):
            yield start, min(start + self.chunk, length)

    def power_sums(self, coeff: torch.Tensor, dt_A: torch.Tensor, length: int,
                   table: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """2 Re(sum_n coeff_n dA_n^l) for l < length, (..., channels, length): the kernel
        (coeff = C dB) and a carried state's free evolution (coeff = C dA h0, batched).

        Block by block, with one table of dA^j for j < chunk: dA^(start + j) = dA^start dA^j,
        so dA^start folds into the coefficients and the exp / cos / sin (the costly part) run
        over chunk positions, not L (`table`, when the caller has it already)."""
        p_re, p_im = table if table is not None else self.table(dt_A, length)
        out = []
        for start, stop in self._blocks(length):
            shifted = coeff * torch.exp(dt_A * start)
            width = stop - start
            out.append(2 * (torch.einsum("...hm,hml->...hl", shifted.real, p_re[..., :width])
                            - torch.einsum("...hm,hml->...hl", shifted.imag, p_im[..., :width])))
        return torch.cat(out, dim=-1)

    def input_sum(self, u: torch.Tensor, dt_A: torch.Tensor,
                  table: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """sum_s dA^(L-1-s) u_s (complex (..., channels, modes)) over u (..., channels, L): the
        part of the state after a chunk that its inputs made. Per block, the exponent is
        (L - stop) + (stop - 1 - s): the same table as `power_sums`, then dA^(L - stop)."""
        length = u.shape[-1]
        p_re, p_im = table if table is not None else self.table(dt_A, length)
        total = None
        for start, stop in self._blocks(length):
            part = u[..., start:stop].flip(-1)
            width = stop - start
            block = torch.complex(torch.einsum("...hl,hml->...hm", part, p_re[..., :width]),
                                  torch.einsum("...hl,hml->...hm", part, p_im[..., :width]))
            block = block * torch.exp(dt_A * (length - stop))
            total = block if total is None else total + block
        return total

    def kernel(self, length: int) -> torch.Tensor:
        """The real convolution kernel K (channels, length) of the whole system."""
        dt_A, _, dB, C = self.discrete()
        return self.power_sums(C * dB, dt_A, length)

    def forward(self, u: torch.Tensor, h0: torch.Tensor | None = None,
                return_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """y = K * u over the last dim of u (..., channels, L), continuing from complex state h0
        (..., channels, modes) when given; with `return_state`, also the state after the chunk.
        """
        length = u.shape[-1]
        u = u.to(state_real_dtype(u.dtype))
        dt_A, dA, dB, C = self.discrete()
        table = self.table(dt_A, length)
        y = fft_causal_conv(u, self.power_sums(C * dB, dt_A, length, table))
        if h0 is not None:  # the carried state decays through the chunk: 2 Re(C dA^(t+1) h0)
            y = y + self.power_sums(h0 * (C * dA), dt_A, length, table)
        if not return_state:
            return y, None
        # h_L = dA^L h0 + dB sum_s dA^(L-1-s) u_s
        h = dB * self.input_sum(u, dt_A, table)
        if h0 is not None:
            h = h + h0 * torch.exp(dt_A * length)
        return y, h

    def step(self, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One token: u (..., channels) real, h (..., channels, modes) complex, updated in place;
        returns y (..., channels) = 2 Re(sum_n C_n h_n) after the update."""
        _, dA, dB, C = self.discrete()
        h.copy_(dA * h + dB * u.to(h.real.dtype).unsqueeze(-1))
        return 2 * (h * C).sum(-1).real


@dataclass
class S4DState(LayerState):
    """The complex SSM state as (real, imag) pairs: (B, d_model, modes, 2), constant in context."""

    h: torch.Tensor
    length: int = 0


@register_mixer("s4d", config=S4DConfig, kernels=("auto", "torch"), validate=check_s4d)
class S4D(Sublayer):
    """S4D mixer: per-channel diagonal SSM + D skip, GELU, linear to 2d and GLU."""

    config_key = "s4d"
    kernel_path = TORCH_PATH

    def __init__(self, arch: Any, layer_idx: int) -> None:
        super().__init__()
        check_s4d(arch)
        cfg = arch.s4d
        d = arch.d_model
        self.layer_idx, self.d_model, self.kernels = layer_idx, d, cfg.kernels
        self.ssm_lr = cfg.ssm_lr
        self.ssm = DiagonalSSM(d, cfg.d_state, cfg.init, cfg.dt_min, cfg.dt_max)
        self.D = nn.Parameter(torch.randn(d))
        self.output_linear = nn.Linear(d, 2 * d)
        nn.init.normal_(self.output_linear.weight, std=residual_std(arch))
        nn.init.zeros_(self.output_linear.bias)

    def resolve_kernels(self, device: torch.device) -> str:
        require_kernels(self.kernels, {"torch": None}, f"arch.{self.config_key}.kernels")
        return TORCH_PATH

    def no_weight_decay(self) -> set[str]:
        return {f"ssm.{n}" for n in self.ssm.ssm_parameter_names()} | {"D"}

    def lr_overrides(self) -> dict[str, dict[str, float]]:
        if self.ssm_lr is None:
            return {}
        return {f"ssm.{n}": {"lr_max": float(self.ssm_lr)} for n in self.ssm.ssm_parameter_names()}

    def init_state(self, batch: int, max_len: int, device: torch.device,
                   dtype: torch.dtype) -> S4DState:
        shape = (batch, self.d_model, self.ssm.modes, 2)
        return S4DState(h=torch.zeros(shape, device=device, dtype=state_real_dtype(dtype)))

    def state_bytes(self, batch: int, context: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=state_real_dtype(dtype)).element_size()
        return batch * self.d_model * self.ssm.modes * 2 * itemsize

    def flops_per_token(self, context: int) -> float:
        """The FFT convolution per channel, plus the kernel's Vandermonde product (8 FLOPs per
        complex multiply-add and mode, counted once per sequence position) and D, GELU, GLU."""
        return self.d_model * (fft_flops_per_channel(context) + 8 * self.ssm.modes + 12)

    def _decode(self, x: torch.Tensor, st: S4DState) -> torch.Tensor:
        """One token (B, d) -> (B, d), the state updated in place; bookkeeping left to callers."""
        y = self.ssm.step(x, torch.view_as_complex(st.h)) + self.D * x
        return F.glu(self.output_linear(F.gelu(y).to(x.dtype)), dim=-1)

    def decode_step(self, x: torch.Tensor, state: LayerState | None, position: torch.Tensor,
                    ctx: ForwardContext) -> torch.Tensor:
        """The recurrence needs no position: h <- dA h + dB x, y = 2 Re(C h) + D x."""
        if not isinstance(state, S4DState):
            raise TypeError(f"S4D.decode_step needs an S4DState, got {type(state).__name__}")
        return self._decode(x, state)

    def forward(self, x: torch.Tensor, state: LayerState | None = None,
                ctx: ForwardContext | None = None) -> torch.Tensor:
        st = state if isinstance(state, S4DState) else None
        if st is not None and x.shape[1] == 1:
            st.length += 1
            return self._decode(x[:, 0], st).unsqueeze(1)
        u = x.transpose(1, 2)  # (B, d, L)
        # a fresh state is zero: its free evolution through the chunk need not be computed
        h0 = torch.view_as_complex(st.h) if st is not None and st.length else None
        y, h = self.ssm(u, h0, return_state=st is not None)
        if st is not None and h is not None:
            st.h.copy_(torch.view_as_real(h))
            st.length += x.shape[1]
        y = y + self.D.unsqueeze(-1) * u
        y = F.gelu(y).transpose(1, 2).to(x.dtype)
        return F.glu(self.output_linear(y), dim=-1)
