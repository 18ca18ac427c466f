"""The one interface every mixer and MLP implements, so the model shell never asks which it holds.

A sublayer maps (B, T, D) -> (B, T, D). Called with `state=None` it processes a whole sequence
from scratch (training, scoring). Called with a state from `init_state`, it continues from that
state over the next T >= 1 tokens and updates the state in place: T > 1 is a parallel prefill of a
chunk, T == 1 a decoding step. Both must give the outputs of the full forward.

`ctx` is a `ForwardContext` shared by all layers of one forward call: layers pass a tensor across
depth through it (RWKV-7's value residual from its first layer) and report auxiliary losses and
per-layer statistics (MoE) into it, keyed by layer index.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from archbench.config import ConfigError


@dataclass
class ForwardContext:
    """What the layers of one forward call share. Create a fresh one per forward call.

    Entries are keyed by (name, layer index), so activation checkpointing, which runs a block's
    forward again during backward with the same context, overwrites a layer's entry instead of
    adding it twice. Read the losses before calling backward: those are in the graph.
    """

    value_residual: torch.Tensor | None = None  # RWKV-7: v of the first RWKV-7 layer
    aux_losses: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    layer_stats: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def add_aux_loss(self, name: str, layer_idx: int, value: torch.Tensor) -> None:
        """A weighted loss term to add to the training loss (e.g. MoE load balance)."""
        self.aux_losses[(name, layer_idx)] = value

    def add_layer_stat(self, name: str, layer_idx: int, value: torch.Tensor) -> None:
        """A per-layer diagnostic vector (e.g. the fraction of tokens each expert received)."""
        self.layer_stats[(name, layer_idx)] = value.detach()

    def aux_loss_terms(self) -> dict[str, torch.Tensor]:
        """Each auxiliary loss summed over layers, by name."""
        terms: dict[str, torch.Tensor] = {}
        for (name, _), value in sorted(self.aux_losses.items(), key=lambda kv: kv[0]):
            terms[name] = terms[name] + value if name in terms else value
        return terms

    def aux_loss(self) -> torch.Tensor | float:
        """The sum of every auxiliary loss term (0.0 when the model has none)."""
        return sum(self.aux_loss_terms().values(), 0.0)

    def stats_by_name(self) -> dict[str, list[torch.Tensor]]:
        """Layer statistics grouped by name, in layer order."""
        out: dict[str, list[torch.Tensor]] = defaultdict(list)
        for (name, _), value in sorted(self.layer_stats.items(), key=lambda kv: kv[0]):
            out[name].append(value)
        return dict(out)


def summarise_layer_stats(stats: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """`{name}_max` and `{name}_min` of the mean vector of each statistic over layers and steps
    (for MoE: the most and least used expert's share of the routing)."""
    out: dict[str, float] = {}
    for name, values in sorted(stats.items()):
        if values:
            mean = torch.stack([v.float().cpu() for v in values]).mean(0)
            out[f"{name}_max"], out[f"{name}_min"] = float(mean.max()), float(mean.min())
    return out


@dataclass
class LayerState:
    """Decoding state of one sublayer. Subclasses add tensor fields; `nbytes` counts them all."""

    def tensors(self) -> list[torch.Tensor]:
        return [v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)]

    def nbytes(self) -> int:
        """Bytes held for decoding, as allocated (a preallocated KV buffer counts in full)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def advance(self, tokens: int) -> None:
        """Count `tokens` consumed by `Sublayer.decode_step` in the Python-side bookkeeping (a
        `length` field), which the step itself must not touch: a compiled step that read or
        wrote a Python int would be specialised to its value and recompiled at every position."""
        if isinstance(getattr(self, "length", None), int):
            self.length += tokens  # type: ignore[attr-defined]


class Sublayer(nn.Module):
    """Base of mixers and MLPs. `kernel_path` names the code path that actually runs."""

    kernel_path: str = "torch"
    # True where a training step may leave some parameters without a gradient (MoE experts that
    # no token picked): DDP must then look for unused parameters.
    leaves_params_unused: bool = False

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, state: LayerState | None = None, ctx: ForwardContext | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def init_state(
        self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> LayerState | None:
        """Stateless sublayers (dense MLPs) keep nothing between tokens."""
        return None

    def decode_step(
        self, x: torch.Tensor, state: LayerState | None, position: torch.Tensor,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        """One decoding step, (B, D) -> (B, D), at `position` (a 0-dim int64 tensor, never a
        Python int), updating the state's tensors in place and nothing else.

        This is what `LanguageModel.decode_step` runs, compiled as one graph over all layers (and
        on CUDA captured once as a CUDA graph): so no Python-side state may be read or written
        here (the caller advances it with `LayerState.advance`), no tensor allocated whose shape
        depends on the position, and no host synchronisation. A stateless sublayer's step is its
        forward on one position; a stateful one must override this (see `has_static_decode`).
        """
        if state is not None:
            raise NotImplementedError(
                f"{type(self).__name__} keeps a decoding state but has no decode_step")
        return self.forward(x.unsqueeze(1), None, ctx).squeeze(1)

    @property
    def decode_path(self) -> str:
        """The code path of `decode_step`, where it differs from `kernel_path` (recorded)."""
        return self.kernel_path

    @classmethod
    def has_static_decode(cls) -> bool:
        """True when `decode_step` works for this class: it overrides it, or keeps no state."""
        return cls.decode_step is not Sublayer.decode_step or cls.init_state is Sublayer.init_state

    def state_bytes(self, batch: int, context: int, dtype: torch.dtype) -> int:
        """Analytic decoding-state size at `context` tokens, without allocating it."""
        return 0

    def flops_per_token(self, context: int) -> float:
        """Forward FLOPs per token beyond 2 * parameters (e.g. attention scores). Default 0."""
        return 0.0

    def resolve_kernels(self, device: torch.device) -> str:
        """Pick the code path for `device` (or raise if the configured one cannot run there)."""
        return self.kernel_path

    def inactive_params(self) -> int:
        """Parameters a token does not use (MoE experts it is not routed to). Default 0."""
        return 0

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of parameters AdamW must not decay."""
        return set()

    def lr_overrides(self) -> dict[str, dict[str, float]]:
        """Parameters (names relative to this module) trained at another learning rate than the
        schedule's: {"lr_scale": s} multiplies the scheduled rate, {"lr_max": m} caps it (S4's
        rule for SSM parameters). The optimizer puts each distinct rule in its own group."""
        return {}


def require_kernels(choice: str, available: dict[str, str | None], field_name: str) -> str:
    """Resolve a `kernels=` choice against what is importable; never fall back silently.

    `available` maps path names in order of preference (fastest first) to None when usable or to
    the reason it is not (e.g. "mamba_ssm is not installed"). 'auto' takes the first usable path;
    an explicit choice that cannot run is an error naming why.
    """
    if choice == "auto":
        for name, reason in available.items():
            if reason is None:
                return name
        raise RuntimeError(f"{field_name}: no kernel path can run here: {available}")
    if choice not in available:
        raise ConfigError(f"{field_name}={choice!r} is not allowed; choose one of "
                          f"{['auto', *available]}")
    reason = available[choice]
    if reason is not None:
        raise RuntimeError(f"{field_name}={choice!r} cannot run: {reason}")
    return choice
