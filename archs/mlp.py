"""Dense MLPs (SwiGLU for Llama-style blocks, GELU for GPT-2) and the mixture of experts (MoE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from archbench.archs.base import ForwardContext, LayerState, Sublayer, require_kernels
from archbench.archs.hf_layout import HFPart, Tensors
from archbench.archs.model import residual_std
from archbench.archs.registry import register_mlp
from archbench.config import ConfigError, require_choice, require_positive

DENSE_KINDS = ("swiglu", "gelu")


@dataclass
class MLPConfig:
    """The dense MLP (`arch.mlp`); `multiple_of` also rounds the MoE experts' hidden size."""

    kind: str = "swiglu"  # swiglu (Llama) | gelu (GPT-2)
    hidden_mult: float = 8.0 / 3.0
    multiple_of: int = 32
    bias: bool = False  # biases on every projection (GPT-2; Llama's mlp_bias)


@dataclass
class MoEConfig:
    n_experts: int = 16
    top_k: int = 2
    renormalize: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    expert_kind: str = "swiglu"
    hidden_mult: float = 8.0 / 3.0
    kernels: str = "auto"  # auto | torch (expert loop, the reference) | grouped_mm


def check_dense(arch: Any) -> None:
    require_choice("arch.mlp.kind", arch.mlp.kind, DENSE_KINDS)
    require_positive("arch.mlp.hidden_mult", arch.mlp.hidden_mult)
    require_positive("arch.mlp.multiple_of", arch.mlp.multiple_of)


def check_moe(arch: Any) -> None:
    moe = arch.moe
    require_positive("arch.moe.n_experts", moe.n_experts)
    require_positive("arch.moe.top_k", moe.top_k)
    require_positive("arch.moe.hidden_mult", moe.hidden_mult)
    require_positive("arch.moe.aux_loss_coef", moe.aux_loss_coef, allow_zero=True)
    require_positive("arch.moe.z_loss_coef", moe.z_loss_coef, allow_zero=True)
    require_choice("arch.moe.expert_kind", moe.expert_kind, DENSE_KINDS)
    require_positive("arch.mlp.multiple_of", arch.mlp.multiple_of)
    if moe.top_k > moe.n_experts:
        raise ConfigError(
            f"arch.moe.top_k={moe.top_k} is greater than arch.moe.n_experts={moe.n_experts}; "
            "top_k must be <= n_experts"
        )


def hidden_size(d_model: int, mult: float, multiple_of: int) -> int:
    """Llama rounds the 8/3 d hidden size up to a multiple, for efficient matmuls."""
    raw = int(mult * d_model)
    return multiple_of * ((raw + multiple_of - 1) // multiple_of)


def _gpt2_mlp_to_hf(tensors: Tensors, module: Any) -> Tensors:
    """GPT-2's Conv1D layers store weights input-major; no bias is a zero bias."""
    out = {}
    for ours, theirs in (("up_proj", "c_fc"), ("down_proj", "c_proj")):
        weight = tensors[f"{ours}.weight"]
        out[f"{theirs}.weight"] = weight.t()
        out[f"{theirs}.bias"] = tensors.get(f"{ours}.bias", weight.new_zeros(weight.shape[0]))
    return out


def _gpt2_mlp_from_hf(tensors: Tensors, module: Any) -> Tensors:
    out = {}
    for ours, theirs in (("up_proj", "c_fc"), ("down_proj", "c_proj")):
        out[f"{ours}.weight"] = tensors[f"{theirs}.weight"].t()
        out[f"{ours}.bias"] = tensors[f"{theirs}.bias"]
    return out


DENSE_HF = {"llama": HFPart("mlp"), "jamba": HFPart("feed_forward"),
            "gpt2": HFPart("mlp", _gpt2_mlp_to_hf, _gpt2_mlp_from_hf)}


@register_mlp("dense", config=MLPConfig, config_key="mlp", validate=check_dense, hf=DENSE_HF)
class DenseMLP(Sublayer):
    """SwiGLU (gate_proj, up_proj, down_proj) or GELU (up_proj, down_proj), biases optional."""

    def __init__(self, arch: Any, layer_idx: int, kind: str | None = None,
                 hidden_mult: float | None = None) -> None:
        super().__init__()
        d = arch.d_model
        self.kind = kind or arch.mlp.kind
        hidden = hidden_size(d, hidden_mult or arch.mlp.hidden_mult, arch.mlp.multiple_of)
        bias = bool(arch.mlp.bias)
        self.gate_proj = nn.Linear(d, hidden, bias=bias) if self.kind == "swiglu" else None
        self.up_proj = nn.Linear(d, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d, bias=bias)
        for proj in (self.gate_proj, self.up_proj):
            if proj is not None:
                nn.init.normal_(proj.weight, std=arch.init_std)
        nn.init.normal_(self.down_proj.weight, std=residual_std(arch))
        for proj in (self.gate_proj, self.up_proj, self.down_proj):
            if proj is not None and proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(
        self, x: torch.Tensor, state: LayerState | None = None, ctx: ForwardContext | None = None
    ) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


# ---- mixture of experts ------------------------------------------------------------------------
#
# Token-choice top-k routing over a softmax, computed without dropping tokens: the (token, expert)
# assignments are sorted by expert so that each expert multiplies one contiguous block of rows.
# Two code paths share the same parameters: `grouped_mm` (one grouped GEMM per projection, when the
# installed torch has one that runs on the device) and `expert-loop` (the pure-PyTorch reference,
# one matmul per expert over its block). `kernel_path` names the one that runs.

def _grouped_mm_fn() -> Any | None:
    """torch >= 2.8 exposes the MoE grouped GEMM as F.grouped_mm (earlier as torch._grouped_mm)."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


# On CPU the grouped GEMM runs eagerly in fp32, but torch's shape rule for the compiler accepts
# bf16 only (torch 2.13: "Expected inputs of BF16 type"), so a compiled Jamba failed at its first
# MoE layer. There it is called through this operator, which the compiler treats as opaque: the
# same kernel, a shape rule for every dtype, and its gradients from the same operator.
@torch.library.custom_op("archbench::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a (M, K) x b (G, K, N) -> (M, N), rows of a grouped by offs; or a (K, M) x b (M, N) ->
    (G, K, N), one product per group of a's columns / b's rows (the weight gradient)."""
    fn = _grouped_mm_fn()
    assert fn is not None, "the operator is only used where grouped_mm exists"
    return fn(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _grouped_mm_shape(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])


def _grouped_mm_keep(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_grads(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    a, b, offs = ctx.saved_tensors  # only the (M, K) x (G, K, N) form is differentiated
    grad_a = _grouped_mm_op(grad, b.transpose(-2, -1), offs)
    grad_b = _grouped_mm_op(a.t(), grad, offs)
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_grouped_mm_grads, setup_context=_grouped_mm_keep)


def route_top_k(
    logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax in at least fp32 (bf16 would round nearby probabilities together), then top-k.

    Returns (probs (N, E), weights (N, k), experts (N, k)); with `renormalize` the k weights of a
    token sum to 1 (Mixtral), otherwise they are the raw softmax probabilities (Switch, Jamba).
    """
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, experts


def load_balance_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss: E * sum_e f_e * P_e.

    f_e is the fraction of the N * k top-k assignments that go to expert e (not differentiable),
    P_e the mean router probability of e (differentiable). Balanced routing with uniform
    probabilities gives exactly 1, whatever E and k; collapse onto one expert approaches E.
    """
    fractions = expert_fractions(experts, n_experts, probs.dtype)
    return n_experts * (fractions * probs.mean(dim=0)).sum()


def expert_counts(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert, (n_experts,) int64. A scatter-add rather than `bincount`, whose
    output length depends on the data as far as the compiler knows (a graph break per layer)."""
    flat = experts.reshape(-1)
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def expert_fractions(
    experts: torch.Tensor, n_experts: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fraction of top-k assignments per expert (sums to 1), the signal of routing collapse."""
    return expert_counts(experts, n_experts).to(dtype) / experts.numel()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss, mean of logsumexp(logits)^2: keeps router logits small so the fp32/bf16
    softmax stays well conditioned."""
    lse = torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return lse.pow(2).mean()


def _jamba_experts_to_hf(tensors: Tensors, module: Any) -> Tensors:
    """Jamba's checkpoints hold one gate/up/down Linear per expert; ours are stacked (E, ...)."""
    out = {"router.weight": tensors["router.weight"]}
    for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
        for e, weight in enumerate(tensors[ours].unbind(0)):
            out[f"experts.{e}.{theirs}.weight"] = weight
    return out


def _jamba_experts_from_hf(tensors: Tensors, module: Any) -> Tensors:
    """Per-expert Linears (released checkpoints), or transformers 5's fused in-memory layout
    (experts.gate_up_proj (E, 2h, d) with gate first, experts.down_proj (E, d, h))."""
    out = {"router.weight": tensors["router.weight"]}
    if "experts.gate_up_proj" in tensors:
        out["w_gate"], out["w_up"] = tensors["experts.gate_up_proj"].chunk(2, dim=1)
        out["w_down"] = tensors["experts.down_proj"]
        return out
    for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
        out[ours] = torch.stack([tensors[f"experts.{e}.{theirs}.weight"]
                                 for e in range(module.n_experts)])
    return out


@register_mlp("moe", config=MoEConfig, kernels=("auto", "torch", "grouped_mm"),
              validate=check_moe,
              hf={"jamba": HFPart("feed_forward", _jamba_experts_to_hf, _jamba_experts_from_hf)})
class MoE(Sublayer):
    """Mixture of SwiGLU (or GELU) experts with a softmax top-k router, dropless.

    Expert weights are stacked as (E, out, in) so that expert e's slices are exactly the
    `weight` of DenseMLP's gate_proj / up_proj / down_proj; `router` is a bias-free d -> E Linear.
    The router stays weight-decayed like every other matrix: its logits are already held small by
    the z-loss, and decaying it as well only pulls the routing towards uniform, which is what the
    load-balancing loss asks for anyway; no published recipe we follow exempts it.
    """

    leaves_params_unused = True

    def __init__(self, arch: Any, layer_idx: int) -> None:
        super().__init__()
        cfg = arch.moe
        d = arch.d_model
        self.d_model = d
        self.layer_idx = layer_idx
        self.n_experts, self.top_k = int(cfg.n_experts), int(cfg.top_k)
        self.renormalize = bool(cfg.renormalize)
        self.aux_loss_coef, self.z_loss_coef = float(cfg.aux_loss_coef), float(cfg.z_loss_coef)
        self.expert_kind = cfg.expert_kind
        self.kernels = cfg.kernels
        self.hidden = hidden_size(d, cfg.hidden_mult, arch.mlp.multiple_of)
        n, h = self.n_experts, self.hidden
        self.router = nn.Linear(d, n, bias=False)
        if self.expert_kind == "swiglu":
            self.w_gate: nn.Parameter | None = nn.Parameter(torch.empty(n, h, d))
        else:
            self.register_parameter("w_gate", None)
        self.w_up = nn.Parameter(torch.empty(n, h, d))
        self.w_down = nn.Parameter(torch.empty(n, d, h))
        nn.init.normal_(self.router.weight, std=arch.init_std)
        for w in (self.w_gate, self.w_up):
            if w is not None:
                nn.init.normal_(w, std=arch.init_std)
        nn.init.normal_(self.w_down, std=residual_std(arch))
        # Until resolve_kernels(device) probes the device, assume the CPU-capable choice.
        self.kernel_path = self._choose(self._grouped_mm_reason(torch.device("cpu"), probe=False))

    # ---- kernel choice ---------------------------------------------------------------------------
    def _grouped_mm_reason(self, device: torch.device, probe: bool = True) -> str | None:
        """None when grouped_mm can run here, else why not (shown when it was asked for)."""
        fn = _grouped_mm_fn()
        if fn is None:
            return f"torch {torch.__version__} has no grouped_mm"
        if self.d_model % 8 or self.hidden % 8:
            # Grouped GEMM kernels need 16-byte aligned row strides, in fp32 and in bf16.
            return (f"grouped_mm needs d_model ({self.d_model}) and the expert hidden size "
                    f"({self.hidden}) to be multiples of 8")
        if not probe:
            return None
        # The parameters' dtype, and on CUDA also bf16, which the trainer's autocast computes in.
        dtypes = {self.w_up.dtype} | ({torch.bfloat16} if device.type == "cuda" else set())
        for dtype in dtypes:
            try:  # a tiny forward and backward through the real shapes, on the real device
                a = torch.zeros(3, self.d_model, device=device, dtype=dtype, requires_grad=True)
                b = torch.zeros(2, self.hidden, self.d_model, device=device, dtype=dtype,
                                requires_grad=True)
                offs = torch.tensor([1, 3], device=device, dtype=torch.int32)
                out = fn(a, b.transpose(-2, -1), offs=offs)
                out.backward(torch.ones_like(out))
            except (RuntimeError, NotImplementedError) as err:
                return f"grouped_mm does not run on {device.type} in {dtype}: {err}"
        return None

    def _choose(self, grouped_reason: str | None) -> str:
        choice = {"auto": "auto", "torch": "expert-loop", "grouped_mm": "grouped_mm"}[self.kernels]
        return require_kernels(
            choice, {"grouped_mm": grouped_reason, "expert-loop": None}, "arch.moe.kernels"
        )

    def resolve_kernels(self, device: torch.device) -> str:
        return self._choose(self._grouped_mm_reason(device))

    # ---- accounting ------------------------------------------------------------------------------
    def expert_params(self) -> int:
        return sum(w.numel() for w in (self.w_gate, self.w_up, self.w_down) if w is not None)

    def inactive_params(self) -> int:
        """Each token uses top_k of n_experts experts: the other (1 - k/E) of them are idle."""
        per_expert = self.expert_params() // self.n_experts
        return (self.n_experts - self.top_k) * per_expert

    # ---- forward ---------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, state: LayerState | None = None, ctx: ForwardContext | None = None
    ) -> torch.Tensor:
        flat = x.reshape(-1, self.d_model)
        logits = self.router(flat)
        probs, weights, experts = route_top_k(logits, self.top_k, self.renormalize)
        if ctx is not None:
            self._report(ctx, logits, probs, experts)
        out = self.combine(flat, weights, experts)
        return out.view(x.shape)

    def _report(self, ctx: ForwardContext, logits: torch.Tensor, probs: torch.Tensor,
                experts: torch.Tensor) -> None:
        """This layer's weighted aux losses and its routing fractions, under its layer index (a
        recompute under activation checkpointing replaces them rather than adding them again)."""
        balance = self.aux_loss_coef * load_balance_loss(probs, experts, self.n_experts)
        ctx.add_aux_loss("moe_load_balance", self.layer_idx, balance)
        ctx.add_aux_loss("moe_z_loss", self.layer_idx, self.z_loss_coef * router_z_loss(logits))
        ctx.add_layer_stat("expert_fraction", self.layer_idx,
                           expert_fractions(experts, self.n_experts))

    def combine(
        self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """sum_j weights[t, j] * expert_{experts[t, j]}(flat[t]) for every token t, dropless."""
        flat_experts = experts.reshape(-1)
        order = flat_experts.argsort(stable=True)  # assignments grouped by expert
        token_idx = order // self.top_k
        counts = expert_counts(flat_experts, self.n_experts)
        rows = flat[token_idx]
        if self.kernel_path == "grouped_mm":
            ys = self._grouped(rows, counts)
        else:
            ys = self._loop(rows, counts)
        ys = ys * weights.reshape(-1)[order].to(ys.dtype)[:, None]
        out = torch.zeros(flat.shape[0], self.d_model, device=flat.device, dtype=ys.dtype)
        return out.index_add_(0, token_idx, ys).to(flat.dtype)

    def _activate(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        if gate is not None:
            return F.silu(gate) * up
        return F.gelu(up, approximate="tanh")

    def _loop(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Reference path: one matmul per expert over its contiguous block of rows."""
        # unbind once: its backward is one stack, where indexing w[e] per expert would add a full
        # (E, ...) zero gradient for every expert.
        gates = self.w_gate.unbind(0) if self.w_gate is not None else None
        ups, downs = self.w_up.unbind(0), self.w_down.unbind(0)
        outs = []
        for e, block in enumerate(rows.split(counts.tolist())):
            if block.shape[0] == 0:
                continue
            gate = block @ gates[e].t() if gates is not None else None
            outs.append(self._activate(gate, block @ ups[e].t()) @ downs[e].t())
        if not outs:
            return rows.new_zeros(0, self.d_model)
        return torch.cat(outs)

    def _grouped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One grouped GEMM per projection; offs are the cumulative block ends."""
        fn = _grouped_mm_op if rows.device.type == "cpu" else _grouped_mm_fn()
        device_type = rows.device.type
        dtype = (torch.get_autocast_dtype(device_type)
                 if torch.is_autocast_enabled(device_type) else rows.dtype)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise RuntimeError(
                f"arch.moe.kernels: the grouped_mm path cannot run in {dtype}; use "
                "arch.moe.kernels=torch (the expert loop), or resolve_kernels after a dtype change"
            )
        offs = counts.cumsum(0).to(torch.int32)
        with torch.autocast(device_type, enabled=False):
            a = rows.to(dtype)

            def mm(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return fn(inp, w.to(dtype).transpose(-2, -1), offs=offs)

            gate = mm(a, self.w_gate) if self.w_gate is not None else None
            return mm(self._activate(gate, mm(a, self.w_up)), self.w_down)
