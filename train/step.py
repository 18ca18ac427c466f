"""The training step, shared by the trainer and the training-speed benchmark.

A benchmark that times its own copy of the step measures something the trainer does not run:
a copy drifts (a loss without `ignore_index`, a missing auxiliary loss, another clipping rule).
So both go through `TrainStep`: forward under autocast, the language-model loss with the task
mask, the mixers' auxiliary losses, backward over gradient-accumulation micro-batches, gradient
clipping and the optimizer step.

The step never converts a loss to a Python float itself: that is a device synchronisation, which
the trainer needs (logging, divergence check) and a timed benchmark must not add. `StepLosses`
holds the detached tensors and turns them into floats on request, in the trainer's order.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from archbench.archs.base import ForwardContext, summarise_layer_stats

IGNORE_INDEX = -100  # targets off the answer positions of a synthetic task (no loss there)

# (inputs, ctx) -> logits; ctx collects what layers report (auxiliary losses, layer statistics).
LogitsFn = Callable[[torch.Tensor, ForwardContext], torch.Tensor]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 over the positions whose target is not masked."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE_INDEX)


@dataclass
class StepLosses:
    """What one accumulated step measured, as detached tensors (no device sync until read)."""

    grad_accum: int
    losses: list[torch.Tensor] = field(default_factory=list)
    aux: list[dict[str, torch.Tensor]] = field(default_factory=list)
    layer_stats: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def loss(self) -> float:
        """The step's mean language-model loss (each micro-batch weighs 1 / grad_accum)."""
        total = 0.0
        for value in self.losses:
            total += float(value) / self.grad_accum
        return total

    def layer_stat_summary(self) -> dict[str, float]:
        """Per-layer statistics (e.g. MoE expert fractions) as {name}_max / {name}_min."""
        return summarise_layer_stats(self.layer_stats)

    def aux_means(self) -> dict[str, float]:
        """Each auxiliary loss averaged over the micro-batches, by name."""
        sums: dict[str, float] = {}
        for micro in self.aux:
            for key, value in micro.items():
                sums[key] = sums.get(key, 0.0) + float(value) / self.grad_accum
        return sums


class TrainStep:
    """One optimizer step of `logits_fn` over a batch: `accumulate` (forward + backward of every
    micro-batch), then `update` (clip + optimizer step). They are apart so the trainer can stop
    a diverged run before the optimizer applies its gradients; `__call__` does both."""

    def __init__(self, logits_fn: LogitsFn, params: Callable[[], Any],
                 optimizer: torch.optim.Optimizer, *, grad_clip: float, grad_accum: int = 1,
                 autocast_dtype: torch.dtype | None = None, device_type: str = "cpu",
                 no_sync: Callable[[bool], AbstractContextManager[Any]] | None = None) -> None:
        self.logits_fn, self.params, self.optimizer = logits_fn, params, optimizer
        self.grad_clip, self.grad_accum = float(grad_clip), int(grad_accum)
        self.autocast_dtype, self.device_type = autocast_dtype, device_type
        # no_sync(skip): DDP / FSDP skip the gradient reduction on all but the last micro-batch.
        self.no_sync = no_sync or (lambda skip: nullcontext())

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def accumulate(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepLosses:
        """Forward and backward of each micro-batch; gradients add up in the parameters."""
        out = StepLosses(self.grad_accum)
        micro = inputs.shape[0] // self.grad_accum
        for m in range(self.grad_accum):
            rows = slice(m * micro, (m + 1) * micro)
            ctx = ForwardContext()
            with self._autocast(), self.no_sync(m < self.grad_accum - 1):
                loss = lm_loss(self.logits_fn(inputs[rows], ctx), targets[rows])
                aux = ctx.aux_loss_terms()
                total = loss + sum(aux.values()) if aux else loss
            # Read ctx before backward: the recompute of activation checkpointing may overwrite.
            out.aux.append({key: value.detach() for key, value in aux.items()})
            for name, values in ctx.stats_by_name().items():
                out.layer_stats.setdefault(name, []).extend(values)
            (total / self.grad_accum).backward()
            out.losses.append(loss.detach())
        return out

    def update(self) -> torch.Tensor:
        """Clip the gradients (when grad_clip > 0), step and clear them; the pre-clip norm."""
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.params(), self.grad_clip)
                     if self.grad_clip > 0 else torch.tensor(0.0))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepLosses:
        losses = self.accumulate(inputs, targets)
        self.update()
        return losses
