"""The model shell shared by every backbone: embedding -> pre-norm residual blocks -> norm -> head.

A backbone is nothing but a layer pattern (which mixer and which MLP at each depth) plus the
settings of those sublayers; the shell itself never branches on the backbone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.checkpoint import checkpoint

from archbench.archs import registry
from archbench.archs.base import ForwardContext, LayerState, Sublayer, require_kernels
from archbench.archs.kernels.linear import onednn_missing, use_matmul_path
from archbench.config import (
    ConfigError,
    arch_schema,
    pattern_periods,
    pinned_layers,
    validate_arch,
)


def arch_config(arch: Any) -> DictConfig:
    """Any arch description (dataclass, dict, DictConfig) as a typed, checked DictConfig."""
    schema_cls = arch_schema()
    schema = OmegaConf.structured(schema_cls)
    given = OmegaConf.structured(arch) if isinstance(arch, schema_cls) else arch
    cfg = OmegaConf.merge(schema, given)
    validate_arch(cfg)
    return cfg  # type: ignore[return-value]


def layer_plan(arch: Any, n_layers: int | None = None) -> list[tuple[str, str]]:
    """The resolved (mixer, mlp kind) of every layer: the periodic pattern, then the mixers
    `arch.pattern.at` pins to layers (a paper's placement that no period gives at every depth).
    """
    n = n_layers if n_layers is not None else arch.n_layers
    mixers, mlps = pattern_periods(arch)
    pinned = pinned_layers(arch, n) if n else {}
    return [(pinned.get(i, mixers[i % len(mixers)]), mlps[i % len(mlps)]) for i in range(n)]


def learned_position_rows(arch: Any, mixers: set[str]) -> tuple[int, str]:
    """(rows, setting) of the learned absolute position table the pattern's mixers ask the shell
    for; (0, "") when none does. The largest request wins; `setting` names the key fixing it."""
    rows, key = 0, ""
    for name in sorted(mixers):
        comp = registry.get("mixer", name)
        wanted = comp.learned_positions(arch) if comp.learned_positions is not None else 0
        if wanted > rows:
            rows, key = wanted, comp.position_key
    return rows, key


def make_norm(arch: Any, dim: int) -> nn.Module:
    if arch.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=arch.norm_eps)
    return nn.LayerNorm(dim, eps=arch.norm_eps)


def build_mlp(kind: str, arch: Any, layer_idx: int) -> Sublayer | None:
    if kind == registry.NO_MLP:
        return None
    return registry.get("mlp", kind).build(arch, layer_idx)


class Block(nn.Module):
    """norm -> mixer -> add; norm -> MLP -> add (the MLP half is absent for mixer-only layers)."""

    def __init__(self, arch: Any, layer_idx: int, mixer_kind: str, mlp_slot: str) -> None:
        super().__init__()
        self.mixer_kind, self.mlp_slot = mixer_kind, mlp_slot
        self.mixer_norm = make_norm(arch, arch.d_model)
        self.mixer = registry.get("mixer", mixer_kind).build(arch, layer_idx)
        self.mlp = build_mlp(mlp_slot, arch, layer_idx)
        self.mlp_norm = make_norm(arch, arch.d_model) if self.mlp is not None else None
        self.drop = nn.Dropout(float(arch.dropout))  # residual dropout; identity at 0 or in eval

    def forward(
        self,
        x: torch.Tensor,
        states: tuple[LayerState | None, LayerState | None] | None,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        mixer_state, mlp_state = states if states is not None else (None, None)
        x = x + self.drop(self.mixer(self.mixer_norm(x), mixer_state, ctx))
        if self.mlp is not None:
            x = x + self.drop(self.mlp(self.mlp_norm(x), mlp_state, ctx))
        return x


@dataclass
class ModelCache:
    """Per-layer decoding states (KV buffers and recurrent states side by side) and the position."""

    states: list[tuple[LayerState | None, LayerState | None]]
    max_len: int
    pos: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # `pos` as a 0-dim int64 tensor on the cache's device, for `LanguageModel.decode_step`: a
    # compiled step reads the position from a tensor at a fixed address, so one graph (one CUDA
    # graph) serves every position. `_position_holds` is the value last written into it.
    position: torch.Tensor | None = None
    _position_holds: int = -1

    def nbytes(self) -> int:
        return sum(s.nbytes() for pair in self.states for s in pair if s is not None)

    def position_tensor(self) -> torch.Tensor:
        """`position`, made equal to `pos` first (a restored snapshot may have moved `pos`)."""
        if self.position is None:
            raise ValueError("this cache has no position tensor; build it with init_cache")
        if self._position_holds != self.pos:
            self.position.fill_(self.pos)
            self._position_holds = self.pos
        return self.position

    def advance(self, tokens: int) -> None:
        """Count `tokens` decoded by `decode_step`: the position and every state's bookkeeping."""
        self.pos += tokens
        for pair in self.states:
            for state in pair:
                if state is not None:
                    state.advance(tokens)
        if self.position is not None and self._position_holds == self.pos - tokens:
            self.position.add_(tokens)
            self._position_holds = self.pos


class LanguageModel(nn.Module):
    def __init__(self, arch: Any, vocab_size: int) -> None:
        super().__init__()
        arch = arch_config(arch)
        if arch.d_model <= 0 or arch.n_layers <= 0:
            raise ConfigError("arch.d_model and arch.n_layers must be set (solve a size first)")
        self.arch = arch
        self.vocab_size = vocab_size
        self.plan = layer_plan(arch)
        d = arch.d_model
        self.embed = nn.Embedding(vocab_size, d)
        rows, self.position_key = learned_position_rows(arch, {m for m, _ in self.plan})
        self.pos_embed = nn.Embedding(rows, d) if rows else None
        self.embed_norm = make_norm(arch, d) if arch.embed_norm else None
        self.embed_drop = nn.Dropout(float(arch.dropout))
        self.blocks = nn.ModuleList(
            Block(arch, i, mixer, mlp_slot) for i, (mixer, mlp_slot) in enumerate(self.plan)
        )
        self.final_norm = make_norm(arch, d)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.matmul_path = "aten"  # until resolve_kernels picks arch.matmul's path for a device
        self.activation_checkpointing = False
        # Whether every sublayer has a graph-friendly decode_step (base.Sublayer.decode_step).
        self.static_decode = all(s.has_static_decode() for s in self.sublayers())
        self._compiled_step: Any = None  # set by compile_decoding
        self.decode_frozen = False  # whether the compiled decode step has the weights frozen in
        self._frozen_weights: tuple[tuple[int, int, int], ...] | None = None
        self._autotune_gemms = True
        self._init_shell()

    def _init_shell(self) -> None:
        """The token embedding and untied head by the registered scheme `arch.embed_init` (each
        family's published initialisation, fairness rule 4); learned positions GPT-style."""
        scheme = registry.embed_inits()[self.arch.embed_init]
        scheme.embed(self.embed.weight, self.arch)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, std=self.arch.init_std)
        if self.arch.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            scheme.head(self.lm_head.weight, self.arch)

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        cache: ModelCache | None = None,
        ctx: ForwardContext | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V). With a cache, continue from it (prefill a chunk or step one token)."""
        ctx = ForwardContext() if ctx is None else ctx
        start = cache.pos if cache is not None else 0
        length = tokens.shape[1]
        if cache is not None and start + length > cache.max_len:
            raise ValueError(
                f"cache holds {cache.max_len} tokens; cannot add {length} after position {start}"
            )
        x = self.embed(tokens)
        if self.pos_embed is not None:
            limit = self.pos_embed.num_embeddings
            if start + length > limit:
                raise ValueError(
                    f"context {start + length} exceeds {self.position_key}={limit} of "
                    "learned positions; use another position scheme or a longer table"
                )
            x = x + self.pos_embed(torch.arange(start, start + length, device=tokens.device))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.embed_drop(x)
        for i, block in enumerate(self.blocks):
            states = cache.states[i] if cache is not None else None
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, states, ctx, use_reentrant=False)
            else:
                x = block(x, states, ctx)
        if cache is not None:
            cache.pos = start + length
        return self.lm_head(self.final_norm(x))

    def init_cache(
        self,
        batch: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ModelCache:
        param = self.embed.weight
        device = torch.device(device) if device is not None else param.device
        dtype = dtype or param.dtype
        states = []
        for block in self.blocks:
            mlp_state = block.mlp.init_state(batch, max_len, device, dtype) if block.mlp else None
            states.append((block.mixer.init_state(batch, max_len, device, dtype), mlp_state))
        position = torch.zeros((), dtype=torch.long, device=device)
        return ModelCache(states=states, max_len=max_len, position=position, _position_holds=0)

    # ---- decoding: one step over all layers --------------------------------------------------
    def decode_step(self, tokens: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """Logits (B, V) of one new token per row (`tokens` (B,) or (B, 1)), continuing `cache`.

        Equal to `forward(tokens, cache)[:, -1]`, but written as one function of (tokens, cache
        buffers, position tensor) with every state updated in place: nothing is allocated per
        layer on the Python side and nothing Python-side is read inside, so `compile_decoding`
        turns it into one graph for every position (a CUDA graph with mode reduce-overhead).
        A model with a sublayer lacking a static step decodes through `forward` instead.
        """
        if cache.pos + 1 > cache.max_len:
            raise ValueError(f"cache holds {cache.max_len} tokens; it is full")
        if self.pos_embed is not None and cache.pos + 1 > self.pos_embed.num_embeddings:
            raise ValueError(f"context {cache.pos + 1} exceeds {self.position_key}="
                             f"{self.pos_embed.num_embeddings} of learned positions")
        if not self.static_decode:
            return self(tokens.reshape(-1, 1), cache)[:, -1]
        if self._compiled_step is not None and cache.extra.get("compiled_step") \
                is not self._compiled_step:
            logits = self._first_compiled_step(tokens.reshape(-1), cache)
        else:
            step = self._compiled_step or self.decode_body
            logits = step(tokens.reshape(-1), cache.states, cache.position_tensor())
        cache.advance(1)
        return logits

    def decode_body(self, tokens: torch.Tensor,
                    states: list[tuple[LayerState | None, LayerState | None]],
                    position: torch.Tensor) -> torch.Tensor:
        """The step itself (what gets compiled): tokens (B,) -> logits (B, V)."""
        ctx = ForwardContext()
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for block, (mixer_state, mlp_state) in zip(self.blocks, states, strict=True):
            x = x + block.mixer.decode_step(block.mixer_norm(x), mixer_state, position, ctx)
            if block.mlp is not None:
                x = x + block.mlp.decode_step(block.mlp_norm(x), mlp_state, position, ctx)
        return self.lm_head(self.final_norm(x))

    def compile_decoding(self, frozen: bool | None = None, autotune_gemms: bool = True
                         ) -> None:
        """Compile `decode_body` with static shapes: one graph per (batch, cache length, dtype),
        reused at every position; "reduce-overhead" (CUDA graphs) on CUDA. `frozen` (None: on
        CPU only) freezes the weights into the graph, whose GEMMs are then autotuned unless
        `autotune_gemms` is False (archs/compiling.py); the first step of each cache compiles
        again if the weights changed since. Decode under `torch.no_grad()`, with the cache made
        there: under `torch.inference_mode()` AOTAutograd builds a graph that copies every cache
        buffer whole at each step instead of writing the new row in place, and freezes
        nothing."""
        from archbench.archs.compiling import compile_decode_step, freezes_decoding

        if not self.static_decode:
            missing = sorted({type(s).__name__ for s in self.sublayers()
                              if not s.has_static_decode()})
            raise ValueError(f"cannot compile decoding: {missing} have no static decode_step")
        device = self.embed.weight.device
        self.decode_frozen = freezes_decoding(device) if frozen is None else bool(frozen)
        self._frozen_weights = self._weights_signature() if self.decode_frozen else None
        self._autotune_gemms = autotune_gemms
        self._compiled_step = compile_decode_step(self.decode_body, device, self.decode_frozen,
                                                  autotune_gemms)

    def _weights_signature(self) -> tuple[tuple[int, int, int], ...]:
        """Identity, address and version counter of every parameter and buffer: any optimizer
        step, load_state_dict or reassignment changes it (in-place writes through `.data`, which
        bypass the version counter, do not; nor do writes to inference tensors, which have no
        counter: weights made under `torch.inference_mode`)."""
        return tuple((id(t), t.data_ptr(), -1 if t.is_inference() else t._version)
                     for t in (*self.parameters(), *self.buffers()))

    def _first_compiled_step(self, tokens: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """The first compiled step of a cache, where a new (batch, cache length, dtype) is
        traced: a frozen step whose weights changed since it was compiled is compiled again
        (reading ~100 version counters costs ~20 us, too much for every step), the trace runs
        under inductor's `freezing` flag (dynamo reads it while tracing: without it the weights
        are graph inputs and nothing is frozen), and a CUDA cache's buffers are marked static
        so that CUDA graphs update them in place. A trace at a later step (not expected) would
        read the weights as inputs: slower, never stale."""
        from archbench.archs.compiling import freezing, mark_cache_static

        if self.decode_frozen and self._weights_signature() != self._frozen_weights:
            self.compile_decoding(frozen=True, autotune_gemms=self._autotune_gemms)
        if cache.position_tensor().is_cuda:
            mark_cache_static(cache)
        with freezing(self.decode_frozen):
            logits = self._compiled_step(tokens, cache.states, cache.position_tensor())
        cache.extra["compiled_step"] = self._compiled_step
        return logits

    # ---- accounting ----------------------------------------------------------------------------
    def sublayers(self) -> list[Sublayer]:
        out: list[Sublayer] = []
        for block in self.blocks:
            out.append(block.mixer)
            if block.mlp is not None:
                out.append(block.mlp)
        return out

    def kernel_paths(self, decoding: bool = False) -> dict[str, str]:
        """Which code path each kind of sublayer runs, e.g. {'mamba': 'cuda:mamba_ssm'}; with
        `decoding`, the paths of `decode_step` (attention's step has its own)."""
        paths: dict[str, set[str]] = {}
        for block in self.blocks:
            parts = [(block.mixer_kind, block.mixer)]
            if block.mlp is not None:
                parts.append((f"mlp:{block.mlp_slot}", block.mlp))
            for kind, sub in parts:
                path = sub.decode_path if decoding and self.static_decode else sub.kernel_path
                paths.setdefault(kind, set()).add(path)
        return {**{k: ",".join(sorted(v)) for k, v in paths.items()}, "matmul": self.matmul_path}

    def param_counts(self) -> dict[str, int]:
        """total, embedding (token + position + untied head), non_embedding, and active ones.

        Active parameters count each MoE layer's experts at top_k / n_experts, as FLOPs do.
        """
        total = sum(p.numel() for p in self.parameters())
        embedding = self.embed.weight.numel()
        if self.pos_embed is not None:
            embedding += self.pos_embed.weight.numel()
        if not self.arch.tie_embeddings:
            embedding += self.lm_head.weight.numel()
        inactive = sum(getattr(s, "inactive_params", lambda: 0)() for s in self.sublayers())
        non_embedding = total - embedding
        return {
            "total": total,
            "embedding": embedding,
            "non_embedding": non_embedding,
            "active": total - inactive,
            "active_non_embedding": non_embedding - inactive,
        }

    def flops_per_token(self, context: int) -> dict[str, float]:
        """Analytic FLOPs per token at `context`: 2 per active weight (including the LM head),
        plus each mixer's context-dependent term; training is forward + backward = 3x forward."""
        counts = self.param_counts()
        head = self.arch.d_model * self.vocab_size
        forward = 2.0 * (counts["active_non_embedding"] + head)
        forward += sum(s.flops_per_token(context) for s in self.sublayers())
        return {"forward": forward, "train": 3.0 * forward}

    def weight_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        return self.param_counts()["total"] * torch.empty((), dtype=dtype).element_size()

    def cache_bytes(self, batch: int, context: int, dtype: torch.dtype = torch.bfloat16) -> int:
        return sum(s.state_bytes(batch, context, dtype) for s in self.sublayers())

    def no_weight_decay_names(self) -> set[str]:
        """Parameters AdamW leaves undecayed: norms, biases, embeddings, and what mixers flag."""
        names: set[str] = set()
        for name, param in self.named_parameters():
            if param.ndim < 2 or name.startswith(("embed.", "pos_embed.", "lm_head.")):
                names.add(name)
        for mod_name, module in self.named_modules():
            if isinstance(module, Sublayer):
                names.update(f"{mod_name}.{n}" for n in module.no_weight_decay())
        return names

    def lr_overrides(self) -> dict[str, dict[str, float]]:
        """Full parameter name -> learning-rate rule, from every sublayer's `lr_overrides`."""
        rules: dict[str, dict[str, float]] = {}
        for mod_name, module in self.named_modules():
            if isinstance(module, Sublayer):
                rules.update({f"{mod_name}.{n}": rule for n, rule in module.lr_overrides().items()})
        return rules


def _normal_init(weight: torch.Tensor, arch: Any) -> None:
    nn.init.normal_(weight, std=arch.init_std)


# GPT-style: token embedding and untied head ~ N(0, init_std).
registry.register_embed_init("normal", embed=_normal_init, head=_normal_init)


def residual_std(arch: Any) -> float:
    """Std of output projections: GPT-2's scaled init divides by sqrt(2 * n_layers)."""
    if arch.scaled_residual_init:
        return arch.init_std / math.sqrt(2 * arch.n_layers)
    return arch.init_std


def resolve_kernels(model: nn.Module, device: torch.device | str) -> dict[str, str]:
    """Fix every sublayer's kernel path and the projections' GEMM (arch.matmul) for `device`
    before any work; errors surface here."""
    device = torch.device(device)
    for module in model.modules():
        if isinstance(module, Sublayer):
            module.kernel_path = module.resolve_kernels(device)
    if not isinstance(model, LanguageModel):
        return {}
    available = {"onednn": onednn_missing(device), "aten": None}
    model.matmul_path = require_kernels(model.arch.matmul, available, "arch.matmul")
    use_matmul_path(model, model.matmul_path)
    return model.kernel_paths()
