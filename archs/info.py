"""`archbench info`: what a config builds, before anything is trained.

Parameters (and how close the solved size landed), FLOPs per token, and memory of weights and of
the decoding cache at a few contexts, as a table. Built on the meta device: nothing is allocated,
so a 350M or 7B configuration is described instantly.
"""

from __future__ import annotations

from typing import Any

import torch

from archbench.archs.model import LanguageModel
from archbench.archs.sizing import _counting_only, solve_size

CONTEXTS = (2048, 8192, 32768, 131072, 262144)


def describe(cfg: Any, vocab_size: int, contexts: tuple[int, ...] = CONTEXTS,
             batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    arch, fit = solve_size(cfg.arch, cfg.size, vocab_size)
    with _counting_only():
        model = LanguageModel(arch, vocab_size)
    return {
        "arch": arch.name, "size": cfg.size.name, "d_model": arch.d_model,
        "n_layers": arch.n_layers, "fit": fit.as_dict(), "params": model.param_counts(),
        "layers": [f"{m}+{f}" for m, f in model.plan],
        "flops_per_token": {c: model.flops_per_token(c)["forward"] for c in contexts},
        "weight_bytes": model.weight_bytes(dtype),
        "cache_bytes": {c: model.cache_bytes(batch, c, dtype) for c in contexts},
        "dtype": str(dtype).replace("torch.", ""), "batch": batch,
    }


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _layer_summary(layers: list[str]) -> str:
    """Run-length form of the layer list: 'mamba+dense x4, attention+moe, ...'."""
    out: list[str] = []
    prev, count = None, 0
    for item in [*layers, None]:
        if item == prev:
            count += 1
            continue
        if prev is not None:
            out.append(prev if count == 1 else f"{prev} x{count}")
        prev, count = item, 1
    return ", ".join(out)


def print_info(cfg: Any) -> dict[str, Any]:
    from archbench.train.tokenizer import vocab_size_of

    vocab = vocab_size_of(cfg.tokenizer)[0]
    info = describe(cfg, vocab)
    fit, params = info["fit"], info["params"]
    print(f"arch={info['arch']} size={info['size']}: d_model={info['d_model']} "
          f"n_layers={info['n_layers']} vocab={vocab}")
    print(f"layers: {_layer_summary(info['layers'])}")
    print(f"size target: {fit['metric']} {fit['target']:.4g} -> {fit['achieved']:.4g} "
          f"({fit['error'] * 100:+.2f}%{'' if fit['solved'] else ', shape set explicitly'})")
    if fit.get("shape_note"):  # the target and the family's shape rules could not both be met
        print(f"shape: {fit['shape_note']}")
    print("\nparameters")
    for key in ("total", "embedding", "non_embedding", "active", "active_non_embedding"):
        print(f"  {key:<22}{params[key]:>16,}  ({_human(params[key])})")
    print(f"\nweights ({info['dtype']}): {_human(info['weight_bytes'], 'B')}")
    print(f"\n{'context':>10}{'FLOPs/token (fwd)':>20}{'cache/state (batch 1)':>24}")
    for c in CONTEXTS:
        print(f"{c:>10}{_human(info['flops_per_token'][c]):>20}"
              f"{_human(info['cache_bytes'][c], 'B'):>24}")
    return info
