"""Analytic FLOPs of one benchmark step, from the model's own per-token accounting.

`LanguageModel.flops_per_token(context)` gives 2 FLOPs per active weight (LM head included) plus
each mixer's context term (attention: 4 * n_heads * head_dim * context, no causal discount, as in
PaLM's MFU); training is 3x forward. A step's FLOPs follow from what the step computes:

- train at (B, L): B * L tokens, each attending over a context of L;
- prefill of L tokens: the same forward, but the head only runs on the last position (generation
  needs nothing else, and the benchmark asks for the last logits only);
- decode of G tokens after L: the i-th new token (0-based) attends over L + i + 1 positions.
"""

from __future__ import annotations

from typing import Any


def head_flops(model: Any) -> float:
    return 2.0 * model.arch.d_model * model.vocab_size


def train_flops(model: Any, batch: int, context: int) -> float:
    return float(batch * context * model.flops_per_token(context)["train"])


def prefill_flops(model: Any, batch: int, context: int, last_logits_only: bool = True) -> float:
    total = batch * context * model.flops_per_token(context)["forward"]
    if last_logits_only:
        total -= batch * (context - 1) * head_flops(model)
    return float(total)


def decode_flops(model: Any, batch: int, prompt: int, new_tokens: int) -> float:
    return float(batch * sum(model.flops_per_token(prompt + i + 1)["forward"]
                             for i in range(new_tokens)))


def step_flops(
    model: Any, mode: str, batch: int, context: int, new_tokens: int = 0
) -> float | None:
    """FLOPs of one timed unit of `mode` (None for modes that are not timed)."""
    if mode == "train":
        return train_flops(model, batch, context)
    if mode == "prefill":
        return prefill_flops(model, batch, context)
    if mode == "decode":
        return decode_flops(model, batch, context, new_tokens)
    return None
