"""AdamW with the usual exemptions from weight decay, and the learning-rate schedules."""

from __future__ import annotations

import math
from typing import Any

import torch


def build_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.AdamW:
    """Decay only matrices of the mixers and MLPs: norms, biases, embeddings and what a mixer
    flags (Mamba's A_log and D, RWKV's mixing vectors) are left undecayed, as their papers do.

    Parameters a mixer gives a learning-rate rule (`Sublayer.lr_overrides`, e.g. S4D's SSM
    parameters capped at 1e-3) get one group per (decay, rule), after the two plain groups; the
    rule's keys live in the group, and `group_lr` applies them to the scheduled rate."""
    skip = model.no_weight_decay_names() if hasattr(model, "no_weight_decay_names") else set()
    rules = model.lr_overrides() if hasattr(model, "lr_overrides") else {}
    decay, no_decay = [], []
    ruled: dict[tuple[bool, tuple[tuple[str, float], ...]], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        clean = name.replace("_orig_mod.", "").replace("module.", "")
        if clean in rules:
            unknown = set(rules[clean]) - {"lr_scale", "lr_max"}
            if unknown:
                raise ValueError(f"learning-rate rule of {clean!r} has unknown keys "
                                 f"{sorted(unknown)}; allowed: lr_scale, lr_max")
            key = (clean in skip, tuple(sorted(rules[clean].items())))
            ruled.setdefault(key, []).append(param)
        else:
            (no_decay if clean in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    for (undecayed, rule), params in sorted(ruled.items(), key=lambda item: item[0]):
        group = {"params": params, "weight_decay": 0.0 if undecayed else cfg.weight_decay,
                 **dict(rule)}
        group["lr"] = group_lr(group, cfg.lr)
        groups.append(group)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def group_lr(group: dict[str, Any], lr: float) -> float:
    """The rate of one parameter group when the schedule is at `lr`: times its `lr_scale`,
    capped at its `lr_max` (groups without a rule take `lr` itself)."""
    lr = lr * float(group.get("lr_scale", 1.0))
    return min(lr, float(group["lr_max"])) if "lr_max" in group else lr


def lr_at(step: int, total_steps: int, cfg: Any) -> float:
    """Linear warmup, then cosine to min_lr_ratio * lr, or WSD (warmup-stable-decay: constant,
    then a linear decay over the last wsd_decay_fraction of training), or constant."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(total_steps * cfg.wsd_decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return peak
        frac = min(1.0, (step - decay_start) / decay_steps)
        return peak + (floor - peak) * frac
    span = max(1, total_steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * frac))
