"""Mamba-1 (selective SSM) and Mamba-2 (SSD) mixers, with constant-memory decoding states.

Parameter names and shapes follow `mamba_ssm.modules.mamba_simple.Mamba` and
`mamba_ssm.modules.mamba2.Mamba2` (which Hugging Face's MambaMixer / Mamba2Mixer share), so weights
move between our pure-PyTorch path, `mamba_ssm`'s kernels and `transformers` (the HF classes
`MambaForCausalLM` / `Mamba2ForCausalLM` are declared at the end of this file; Jamba's Mamba
layers, with `inner_norms`, in archs/jamba.py). Initialisation is the published one: S4D-real
A for Mamba-1 (A_log = log 1..N), A ~ U[1, 16] per head for Mamba-2, dt log-uniform in
[dt_min, dt_max] mapped through the inverse softplus into the dt bias, D = 1; the output
projection uses the shell's scaled residual std, the other projections keep PyTorch's default
init as mamba_ssm does.

A block is mixer-only by default (pattern mlps [none]): a Mamba layer has about the parameters of
half a Transformer layer, so a 24-layer Mamba matches a 12-layer Transformer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from archbench.archs.base import ForwardContext, LayerState, Sublayer, require_kernels
from archbench.archs.hf_layout import (
    HFFamily,
    HFPart,
    family_for_model,
    json_float,
    register_hf_family,
    require_falsy,
    require_value,
    to_hf_state_dict,
)
from archbench.archs.kernels import conv, selective_scan, ssd
from archbench.archs.model import residual_std
from archbench.archs.registry import register_mixer
from archbench.config import ConfigError, require_positive

MAMBA_KERNELS = ("auto", "torch", "cuda")  # cuda: mamba_ssm + causal_conv1d, error if missing


@dataclass
class MambaConfig:
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    # Torch path only: time steps per scan chunk (speed/memory, not math). One value for every
    # context, by measurement: size tiny, fp32, 1 thread, ms (min of 3, load ~3.5 on 2 cores),
    # two runs each of chunk 8 / 16 / 32: training b8 x 256: 1686/1658/1563, 878/784/1210;
    # prefill b1 x 512: 74/87/75, 74/69/69; b1 x 4096: 941/1170/1088, 841/769/743. The best
    # chunk changes between runs of the same context (noise, not a trend in the context), so
    # no per-context table: 16 stays (scan buffers in L2; 64 measured ~1.2-1.5x slower).
    chunk_size: int = 16
    kernels: str = "auto"
    dt_scale: float = 1.0  # dt_proj.weight ~ U(+-dt_scale / sqrt(dt_rank)), as mamba_ssm
    # RMSNorm on dt, B and C after x_proj (Jamba; HF JambaMambaMixer's dt/b/c_layernorm), in
    # every kernel path: the norms act before the scan, whichever scan runs.
    inner_norms: bool = False


@dataclass
class Mamba2Config:
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    ngroups: int = 1
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    # SSD chunk length (the quadratic block); a speed knob, not math. One value for every
    # context, by measurement: size tiny, fp32, 1 thread, ms (min of 3, load ~3.7 on 2 cores)
    # for chunk 32 / 64 / 128 / 256: training b8 x 256: 1729/1668/1770/2022; prefill b1 x 512:
    # 151/136/156/192; b1 x 4096: 1144/1110/1189/1407. 64 is fastest at every context measured.
    chunk_size: int = 64
    kernels: str = "auto"
    a_init_range: list[float] = field(default_factory=lambda: [1.0, 16.0])  # A ~ U[lo, hi]


def _check_common(arch: Any, key: str) -> None:
    cfg = arch[key]
    for name in ("d_state", "d_conv", "expand", "chunk_size"):
        require_positive(f"arch.{key}.{name}", cfg[name])
    if not 0 < cfg.dt_min <= cfg.dt_max:
        raise ConfigError(f"arch.{key}.dt_min={cfg.dt_min} and dt_max={cfg.dt_max} must "
                          "satisfy 0 < dt_min <= dt_max")


def check_mamba(arch: Any) -> None:
    _check_common(arch, "mamba")
    require_positive("arch.mamba.dt_rank", arch.mamba.dt_rank)


def check_mamba2(arch: Any) -> None:
    _check_common(arch, "mamba2")
    cfg = arch.mamba2
    require_positive("arch.mamba2.head_dim", cfg.head_dim)
    lo, hi = (float(v) for v in cfg.a_init_range)
    if not 0 < lo <= hi:
        raise ConfigError(f"arch.mamba2.a_init_range={[lo, hi]} must satisfy 0 < lo <= hi")
    if not arch.d_model:
        return
    d_inner = cfg.expand * arch.d_model
    if d_inner % cfg.head_dim:
        raise ConfigError(f"arch.mamba2.head_dim={cfg.head_dim} must divide d_inner = expand * "
                          f"d_model = {d_inner}")
    n_heads = d_inner // cfg.head_dim
    if cfg.ngroups < 1 or n_heads % cfg.ngroups:
        raise ConfigError(
            f"arch.mamba2.ngroups={cfg.ngroups} must divide the number of heads {n_heads}"
        )


def mamba2_width_divisor(arch: Any) -> int:
    """Widths whose expand * d_model holds whole heads."""
    head_dim, expand = int(arch.mamba2.head_dim), int(arch.mamba2.expand)
    return head_dim // math.gcd(head_dim, expand)


@dataclass
class MambaState(LayerState):
    """Decoding state of one Mamba layer; its size does not depend on the context length."""

    conv_state: torch.Tensor  # (B, conv channels, d_conv - 1): the last inputs of the conv
    ssm_state: torch.Tensor  # Mamba-1: (B, d_inner, N); Mamba-2: (B, heads, head_dim, N)
    length: int = 0  # tokens consumed so far (for bookkeeping; the math needs no position)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The SSM state accumulates over the whole context: keep it in at least fp32."""
    return torch.promote_types(dtype, torch.float32)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dt_bias_init(size: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """Bias b such that softplus(b) ~ log-uniform in [dt_min, dt_max], clamped at `floor`."""
    log_dt = torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


def _cuda_reasons(device: torch.device, *missing: str | None) -> str | None:
    reasons = [] if device.type == "cuda" else [f"needs a CUDA device, got {device.type!r}"]
    reasons += [m for m in missing if m is not None]
    return "; ".join(reasons) if reasons else None


class _MambaBase(Sublayer):
    """What Mamba-1 and Mamba-2 share: kernel choice, conv dispatch and the state protocol."""

    config_key: str
    torch_path: str
    cuda_path = "cuda:mamba_ssm"
    kernels: str
    d_conv: int
    conv_channels: int
    conv1d: nn.Conv1d

    def _cuda_missing(self) -> str | None:
        raise NotImplementedError

    @property
    def decode_path(self) -> str:
        """Decoding steps run the recurrence, not the chunked scan / SSD of `kernel_path`."""
        return "cuda:selective_state_update" if self.kernel_path == self.cuda_path else (
            "torch:recurrent-step")

    def _ssm_state_shape(self, batch: int) -> tuple[int, ...]:
        raise NotImplementedError

    def resolve_kernels(self, device: torch.device) -> str:
        needs_import = self.kernels in ("cuda", "auto")
        available = {
            "cuda": _cuda_reasons(device, self._cuda_missing() if needs_import else None),
            "torch": None,
        }
        choice = require_kernels(self.kernels, available, f"arch.{self.config_key}.kernels")
        return self.cuda_path if choice == "cuda" else self.torch_path

    def _use_cuda(self, x: torch.Tensor) -> bool:
        if self.kernel_path != self.cuda_path:
            return False
        if not x.is_cuda:
            raise RuntimeError(
                f"arch.{self.config_key}.kernels: path {self.kernel_path!r} needs CUDA tensors, "
                f"got {x.device.type!r}; call archbench.archs.model.resolve_kernels(model, device)"
            )
        return True

    def init_state(
        self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> MambaState:
        """Constant in `max_len`: the conv window and the SSM state are all a layer keeps."""
        return MambaState(
            conv_state=torch.zeros(
                batch, self.conv_channels, self.d_conv - 1, device=device, dtype=dtype
            ),
            ssm_state=torch.zeros(
                self._ssm_state_shape(batch), device=device, dtype=_state_dtype(dtype)
            ),
        )

    def state_bytes(self, batch: int, context: int, dtype: torch.dtype) -> int:
        conv_bytes = batch * self.conv_channels * (self.d_conv - 1) * _itemsize(dtype)
        return conv_bytes + math.prod(self._ssm_state_shape(batch)) * _itemsize(
            _state_dtype(dtype)
        )

    def _conv(self, x: torch.Tensor, state: MambaState | None, cuda: bool) -> torch.Tensor:
        """silu(causal conv) over (B, T, channels), continuing from and updating the state."""
        weight = self.conv1d.weight.squeeze(1)
        conv_state = state.conv_state if state is not None else None
        if cuda:
            return conv.causal_conv1d_cuda(x, weight, self.conv1d.bias, conv_state)
        return conv.causal_conv1d(x, weight, self.conv1d.bias, conv_state)

    def _conv_step(self, x: torch.Tensor, state: MambaState, cuda: bool) -> torch.Tensor:
        weight = self.conv1d.weight.squeeze(1)
        if cuda:
            return conv.causal_conv1d_step_cuda(x, weight, self.conv1d.bias, state.conv_state)
        return conv.causal_conv1d_step(x, weight, self.conv1d.bias, state.conv_state)


@register_mixer("mamba", config=MambaConfig, kernels=MAMBA_KERNELS, validate=check_mamba,
                hf={"mamba": HFPart("mixer"), "jamba": HFPart("mamba")})
class Mamba(_MambaBase):
    """Mamba-1 mixer (Gu & Dao, 2023): in_proj -> conv + SiLU -> selective scan -> gate -> out."""

    config_key = "mamba"
    torch_path = "torch:chunked-scan"

    def __init__(self, arch: Any, layer_idx: int) -> None:
        super().__init__()
        cfg = arch.mamba
        d = arch.d_model
        self.layer_idx = layer_idx
        self.d_inner = cfg.expand * d
        self.d_state = cfg.d_state
        self.d_conv = cfg.d_conv
        self.dt_rank = cfg.dt_rank or math.ceil(d / 16)
        self.chunk_size = cfg.chunk_size
        self.kernels = cfg.kernels
        self.conv_channels = self.d_inner
        self.kernel_path = self.cuda_path if cfg.kernels == "cuda" else self.torch_path

        self.in_proj = nn.Linear(d, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, cfg.d_conv, groups=self.d_inner,
            padding=cfg.d_conv - 1, bias=cfg.conv_bias,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        a_init = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a_init))  # S4D-real: A = -(1, 2, ..., N)
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)
        self.inner_norms = bool(cfg.inner_norms)
        if self.inner_norms:  # names as HF Jamba's, so its weights load unrenamed
            self.dt_layernorm = nn.RMSNorm(self.dt_rank, eps=arch.norm_eps)
            self.b_layernorm = nn.RMSNorm(self.d_state, eps=arch.norm_eps)
            self.c_layernorm = nn.RMSNorm(self.d_state, eps=arch.norm_eps)
        with torch.no_grad():
            bound = cfg.dt_scale * self.dt_rank**-0.5
            nn.init.uniform_(self.dt_proj.weight, -bound, bound)
            self.dt_proj.bias.copy_(
                dt_bias_init(self.d_inner, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
            )
        nn.init.normal_(self.out_proj.weight, std=residual_std(arch))

    def _cuda_missing(self) -> str | None:
        return selective_scan.mamba_ssm_missing() or conv.causal_conv1d_missing()

    def _ssm_state_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.d_inner, self.d_state)

    def no_weight_decay(self) -> set[str]:
        return {"A_log", "D", "dt_proj.bias"}

    def flops_per_token(self, context: int) -> float:
        """Scan FLOPs beyond the weight matmuls: 9 * d_inner * N per token.

        Per (channel, state) element: delta * A and its exp (2), delta * u * B (2), the update
        a * h + b (2), C * h and its sum (2), plus about one for the state-space bookkeeping.
        """
        return 9.0 * self.d_inner * self.d_state

    def _ssm_inputs(
        self, xs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """delta (after softplus), A, B, C from the conv output. Every path (chunked scan, the
        mamba_ssm kernels, the decoding steps) takes them from here, inner norms included."""
        dt_low, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_norms:
            dt_low, B, C = self.dt_layernorm(dt_low), self.b_layernorm(B), self.c_layernorm(C)
        delta = F.softplus(self.dt_proj(dt_low).float())
        return delta, -torch.exp(self.A_log.float()), B, C

    def forward(
        self, x: torch.Tensor, state: LayerState | None = None, ctx: ForwardContext | None = None
    ) -> torch.Tensor:
        st = state if isinstance(state, MambaState) else None
        cuda = self._use_cuda(x)
        if st is not None and x.shape[1] == 1:
            return self._step(x, st, cuda)
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = self._conv(xs, st, cuda)
        delta, A, B, C = self._ssm_inputs(xs)
        h0 = st.ssm_state if st is not None else None
        if cuda:
            y, last = selective_scan.selective_scan_cuda(xs, delta, A, B, C, self.D, z, h0)
        else:
            y, last = selective_scan.selective_scan_chunked(
                xs, delta, A, B, C, self.D, z, h0, self.chunk_size
            )
        if st is not None:
            st.ssm_state.copy_(last)
            st.length += x.shape[1]
        return self.out_proj(y)

    def _step(self, x: torch.Tensor, st: MambaState, cuda: bool) -> torch.Tensor:
        y = self._decode(x[:, 0], st, cuda)
        st.advance(1)
        return y.unsqueeze(1)

    def _decode(self, x: torch.Tensor, st: MambaState, cuda: bool) -> torch.Tensor:
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = self._conv_step(xs, st, cuda)
        delta, A, B, C = self._ssm_inputs(xs)
        step = selective_scan.selective_state_step_cuda if cuda else (
            selective_scan.selective_state_step
        )
        y = step(st.ssm_state, xs, delta, A, B, C, self.D, z).to(x.dtype)
        return self.out_proj(y)

    def decode_step(
        self, x: torch.Tensor, state: LayerState | None, position: torch.Tensor,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        """One token, (B, D) -> (B, D): conv window and SSM state updated in place; the
        position is not needed (the recurrence has none)."""
        if not isinstance(state, MambaState):
            raise TypeError(f"Mamba.decode_step needs a MambaState, got {type(state).__name__}")
        return self._decode(x, state, self._use_cuda(x))


class GatedRMSNorm(nn.Module):
    """Mamba-2's norm: RMSNorm(x * silu(z)) per group of channels (gate before the norm)."""

    def __init__(self, dim: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = x.float() * F.silu(z.float())
        groups = h.view(*h.shape[:-1], -1, self.group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return (groups.view_as(h) * self.weight.float()).to(x.dtype)


@register_mixer("mamba2", config=Mamba2Config, kernels=MAMBA_KERNELS, validate=check_mamba2,
                width_divisor=mamba2_width_divisor, hf={"mamba2": HFPart("mixer")})
class Mamba2(_MambaBase):
    """Mamba-2 mixer (Dao & Gu, 2024): one in_proj to [z, x, B, C, dt], conv over (x, B, C), SSD
    with a scalar decay per head, gated RMSNorm, out_proj."""

    config_key = "mamba2"
    torch_path = "torch:chunked-ssd"

    def __init__(self, arch: Any, layer_idx: int) -> None:
        super().__init__()
        cfg = arch.mamba2
        d = arch.d_model
        self.layer_idx = layer_idx
        self.d_inner = cfg.expand * d
        self.head_dim = cfg.head_dim
        self.n_heads = self.d_inner // cfg.head_dim
        lo, hi = (float(v) for v in cfg.a_init_range)
        self.ngroups = cfg.ngroups
        self.d_state = cfg.d_state
        self.d_conv = cfg.d_conv
        self.chunk_size = cfg.chunk_size
        self.kernels = cfg.kernels
        self.conv_channels = self.d_inner + 2 * self.ngroups * self.d_state
        self.kernel_path = self.cuda_path if cfg.kernels == "cuda" else self.torch_path

        self.in_proj = nn.Linear(d, self.d_inner + self.conv_channels + self.n_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_channels, self.conv_channels, cfg.d_conv, groups=self.conv_channels,
            padding=cfg.d_conv - 1, bias=cfg.conv_bias,
        )
        self.dt_bias = nn.Parameter(
            dt_bias_init(self.n_heads, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
        )
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_heads).uniform_(lo, hi)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.ngroups, arch.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)
        nn.init.normal_(self.out_proj.weight, std=residual_std(arch))

    def _cuda_missing(self) -> str | None:
        return ssd.ssd_cuda_missing() or conv.causal_conv1d_missing()

    def _ssm_state_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.n_heads, self.head_dim, self.d_state)

    def no_weight_decay(self) -> set[str]:
        return {"A_log", "D", "dt_bias"}

    def flops_per_token(self, context: int) -> float:
        """SSD FLOPs beyond the weight matmuls, per token, at chunk Q = min(chunk_size, context):

        C B^T within the chunk 2 Q G N, the masked scores times x 2 Q H P, the chunk state
        (x B^T) 2 H P N, and the entering state read out (C H) 2 H P N; the state passing between
        chunks adds 2 H P N / Q. Total 2 Q (G N + H P) + 4 H P N + 2 H P N / Q.
        """
        q = min(self.chunk_size, context) if context > 0 else self.chunk_size
        hpn = self.n_heads * self.head_dim * self.d_state
        intra = 2.0 * q * (self.ngroups * self.d_state + self.n_heads * self.head_dim)
        return intra + 4.0 * hpn + 2.0 * hpn / q

    def _split(
        self, x: torch.Tensor, st: MambaState | None, cuda: bool, step: bool
    ) -> tuple[torch.Tensor, ...]:
        z, xbc, dt = self.in_proj(x).split(
            [self.d_inner, self.conv_channels, self.n_heads], dim=-1
        )
        xbc = self._conv_step(xbc, st, cuda) if step else self._conv(xbc, st, cuda)
        xs, B, C = xbc.split(
            [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1
        )
        dt = F.softplus(dt.float() + self.dt_bias.float())
        return z, xs, B, C, dt

    def forward(
        self, x: torch.Tensor, state: LayerState | None = None, ctx: ForwardContext | None = None
    ) -> torch.Tensor:
        st = state if isinstance(state, MambaState) else None
        cuda = self._use_cuda(x)
        if st is not None and x.shape[1] == 1:
            return self._step(x, st, cuda)
        batch, length, _ = x.shape
        z, xs, B, C, dt = self._split(x, st, cuda, step=False)
        A = -torch.exp(self.A_log.float())
        args = (
            xs.reshape(batch, length, self.n_heads, self.head_dim), dt, A,
            B.reshape(batch, length, self.ngroups, self.d_state),
            C.reshape(batch, length, self.ngroups, self.d_state),
            self.chunk_size, self.D, st.ssm_state if st is not None else None,
        )
        y, last = ssd.ssd_cuda(*args) if cuda else ssd.ssd_chunked(*args)
        if st is not None:
            st.ssm_state.copy_(last)
            st.length += length
        y = self.norm(y.reshape(batch, length, self.d_inner), z)
        return self.out_proj(y)

    def _step(self, x: torch.Tensor, st: MambaState, cuda: bool) -> torch.Tensor:
        y = self._decode(x[:, 0], st, cuda)
        st.advance(1)
        return y.unsqueeze(1)

    def _decode(self, x: torch.Tensor, st: MambaState, cuda: bool) -> torch.Tensor:
        batch = x.shape[0]
        z, xs, B, C, dt = self._split(x, st, cuda, step=True)
        A = -torch.exp(self.A_log.float())
        step = ssd.ssd_step_cuda if cuda else ssd.ssd_step
        y = step(
            st.ssm_state, xs.reshape(batch, self.n_heads, self.head_dim), dt, A,
            B.reshape(batch, self.ngroups, self.d_state),
            C.reshape(batch, self.ngroups, self.d_state), self.D,
        )
        y = self.norm(y.reshape(batch, self.d_inner).to(x.dtype), z)
        return self.out_proj(y)

    def decode_step(
        self, x: torch.Tensor, state: LayerState | None, position: torch.Tensor,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        """One token, (B, D) -> (B, D): conv window and SSD state updated in place."""
        if not isinstance(state, MambaState):
            raise TypeError(f"Mamba2.decode_step needs a MambaState, got {type(state).__name__}")
        return self._decode(x, state, self._use_cuda(x))


# ---- Hugging Face classes: MambaForCausalLM, Mamba2ForCausalLM (archs/hf_layout.py) -----------


def _ssm_only(model: Any, kind: str) -> str | None:
    """Why `model` is not a stack of mixer-only `kind` layers in the HF Mamba layout."""
    arch, problems = model.arch, []
    if {b.mixer_kind for b in model.blocks} != {kind}:
        problems.append(f"every mixer must be {kind}")
    if any(b.mlp is not None for b in model.blocks):
        problems.append("blocks must be mixer-only (arch.pattern.mlps [none])")
    if arch.norm != "rmsnorm" or arch.embed_norm or model.pos_embed is not None:
        problems.append("arch.norm must be rmsnorm, with no embed_norm and no learned positions")
    if kind == "mamba" and arch.mamba.inner_norms:
        problems.append("arch.mamba.inner_norms=true (dt/B/C norms) exists only in Jamba")
    return "; ".join(problems) or None


def _ssm_common(config: dict[str, Any], kind: str, tie_default: bool) -> dict[str, Any]:
    require_value(config, "hidden_act", "silu", "silu")
    require_falsy(config, "use_bias")  # in_proj / out_proj biases
    return {
        "name": kind, "pattern": {"mixers": [kind], "mlps": ["none"]},
        "d_model": int(config["hidden_size"]), "n_layers": int(config["num_hidden_layers"]),
        "norm": "rmsnorm", "norm_eps": float(config.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", tie_default)),
    }


def mamba_arch(config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """MambaForCausalLM's config.json as an archbench arch (ConfigError for what we lack)."""
    arch = _ssm_common(config, "mamba", True)
    d, expand = arch["d_model"], int(config.get("expand", 2))
    inter = config.get("intermediate_size")
    if inter is not None and int(inter) != expand * d:
        raise ConfigError(f"config.json intermediate_size={inter} must equal expand * "
                          f"hidden_size = {expand * d}")
    rank = config.get("time_step_rank", "auto")
    arch["mamba"] = {
        "d_state": int(config.get("state_size", 16)), "d_conv": int(config.get("conv_kernel", 4)),
        "expand": expand, "dt_rank": math.ceil(d / 16) if rank == "auto" else int(rank),
        "conv_bias": bool(config.get("use_conv_bias", True)),
    }
    return arch, int(config["vocab_size"])


def mamba2_arch(config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Mamba2ForCausalLM's config.json as an archbench arch (ConfigError for what we lack)."""
    arch = _ssm_common(config, "mamba2", False)
    require_value(config, "rms_norm", True, True)
    require_value(config, "norm_before_gate", False, False)
    limit = config.get("time_step_limit", [0.0, float("inf")])
    if [json_float(v) for v in limit] != [0.0, float("inf")]:
        raise ConfigError(f"config.json time_step_limit={limit!r} cannot be expressed in "
                          "archbench (dt is not clamped); only [0.0, inf] is supported")
    d, expand = arch["d_model"], int(config.get("expand", 2))
    heads, head_dim = int(config["num_heads"]), int(config.get("head_dim", 64))
    if heads * head_dim != expand * d:
        raise ConfigError(f"config.json num_heads={heads} x head_dim={head_dim} must equal "
                          f"expand * hidden_size = {expand * d}")
    arch["mamba2"] = {
        "d_state": int(config.get("state_size", 128)), "d_conv": int(config.get("conv_kernel", 4)),
        "expand": expand, "head_dim": head_dim, "ngroups": int(config.get("n_groups", 1)),
        "chunk_size": int(config.get("chunk_size", 256)),
        "conv_bias": bool(config.get("use_conv_bias", True)),
    }
    return arch, int(config["vocab_size"])


def _ssm_config(model: Any) -> dict[str, Any]:
    arch = model.arch
    return {
        "vocab_size": model.vocab_size, "hidden_size": arch.d_model,
        "num_hidden_layers": arch.n_layers, "layer_norm_epsilon": arch.norm_eps,
        "tie_word_embeddings": bool(arch.tie_embeddings), "residual_in_fp32": False,
        "use_bias": False, "hidden_act": "silu",
    }


def mamba_config(model: Any) -> dict[str, Any]:
    cfg, mixer = model.arch.mamba, model.blocks[0].mixer
    return {**_ssm_config(model), "state_size": cfg.d_state, "expand": cfg.expand,
            "intermediate_size": mixer.d_inner, "conv_kernel": cfg.d_conv,
            "time_step_rank": mixer.dt_rank, "use_conv_bias": bool(cfg.conv_bias)}


def mamba2_config(model: Any) -> dict[str, Any]:
    cfg, mixer = model.arch.mamba2, model.blocks[0].mixer
    return {**_ssm_config(model), "num_heads": mixer.n_heads, "head_dim": cfg.head_dim,
            "state_size": cfg.d_state, "expand": cfg.expand, "conv_kernel": cfg.d_conv,
            "n_groups": cfg.ngroups, "chunk_size": cfg.chunk_size,
            "use_conv_bias": bool(cfg.conv_bias), "rms_norm": True, "norm_before_gate": False}


for _kind, _cls, _arch, _config in (("mamba", "MambaForCausalLM", mamba_arch, mamba_config),
                                    ("mamba2", "Mamba2ForCausalLM", mamba2_arch, mamba2_config)):
    register_hf_family(HFFamily(
        name=_kind, hf_class=_cls, model_type=_kind, base_prefix="backbone",
        shell={"embed": "backbone.embeddings", "final_norm": "backbone.norm_f",
               "lm_head": "lm_head"},
        layer="backbone.layers.{i}", norms={"mixer_norm": "norm"},
        arch_from_config=_arch, config_from_model=_config,
        mismatch=lambda model, kind=_kind: _ssm_only(model, kind),
    ))


def hf_mamba_config(model: nn.Module) -> Any:
    """A `transformers` MambaConfig / Mamba2Config of the same network (benchmark peers)."""
    import transformers

    family = family_for_model(model)
    if family.name not in ("mamba", "mamba2"):
        raise ValueError(f"model has no Hugging Face Mamba equivalent (it is {family.hf_class})")
    cls = transformers.MambaConfig if family.name == "mamba" else transformers.Mamba2Config
    return cls(**family.config_from_model(model))


def to_hf_mamba_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under `MambaForCausalLM` / `Mamba2ForCausalLM` names (benchmark peers)."""
    family = family_for_model(model)
    tensors = to_hf_state_dict(model, family)
    if model.arch.tie_embeddings:  # HF's state dict lists the tied head too
        tensors["lm_head.weight"] = tensors["backbone.embeddings.weight"]
    return tensors
