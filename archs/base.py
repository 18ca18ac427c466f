"""The one interface every mixer and MLP implements, so the model shell never asks which it holds.

A sublayer maps (B, T, D) -> (B, T, D). Called with `state=None` it processes a whole sequence
from scratch (training, scoring). Called with a state from `init_state`, it continues from that
state over the next T >= 1 tokens and updates the state in place: T > 1 is a parallel prefill of a
chunk, T == 1 a decoding step. Both must give the outputs of the full forward.

`ctx` is a dict shared by all layers of one forward call. Layers use it to pass things across
depth (RWKV-7's value residual from the first layer) and to report auxiliary losses (MoE).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn


@dataclass
class LayerState:
    """Decoding state of one sublayer. Subclasses add tensor fields; `nbytes` counts them all."""

    def tensors(self) -> list[torch.Tensor]:
        return [v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)]

    def nbytes(self) -> int:
        """Bytes held for decoding, as allocated (a preallocated KV buffer counts in full)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class Sublayer(nn.Module):
    """Base of mixers and MLPs. `kernel_path` names the code path that actually runs."""

    kernel_path: str = "torch"
    # True where a training step may leave some parameters without a gradient (MoE experts that
    # no token picked): DDP must then look for unused parameters.
    leaves_params_unused: bool = False

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, state: LayerState | None = None, ctx: dict[str, Any] | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def init_state(
        self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> LayerState | None:
        """Stateless sublayers (dense MLPs) keep nothing between tokens."""
        return None

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
        raise ValueError(f"{field_name}={choice!r} is not allowed; choose one of "
                         f"{['auto', *available]}")
    reason = available[choice]
    if reason is not None:
        raise RuntimeError(f"{field_name}={choice!r} cannot run: {reason}")
    return choice
