"""Weights and settings exchanged with Hugging Face model classes, in both directions.

A published model class (LlamaForCausalLM, MambaForCausalLM, ...) is an `HFFamily`: where the
shell's modules live in its state dict (embedding, final norm, head, the per-layer norms), how its
`config.json` maps to an archbench arch and back, and why a given model cannot be written in it.
What each mixer or MLP looks like inside one HF layer is an `HFPart`, declared by that component
next to its own code (`register_mixer(..., hf={"llama": HFPart(...)})`): the sub-module it lives
under and, where the layouts differ (GPT-2's fused QKV, stacked experts), how tensors convert.
This module only walks the names; it never imports transformers.

Conversions are exact: a setting archbench cannot express is a ConfigError naming the field and
its value, and an HF tensor that nothing here claims is an error, never dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from archbench.archs import registry
from archbench.config import ConfigError

Tensors = dict[str, torch.Tensor]


def _same(tensors: Tensors, module: Any) -> Tensors:
    return dict(tensors)


@dataclass(frozen=True)
class HFPart:
    """One component inside one HF layer: its sub-module name (`prefix`), the conversions of its
    tensors (names relative to the component / to the HF sub-module), and HF names that hold no
    weights (buffers derived from the config, e.g. GPT-2's causal mask), skipped on import."""

    prefix: str
    to_hf: Callable[[Tensors, Any], Tensors] = _same
    from_hf: Callable[[Tensors, Any], Tensors] = _same
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class HFFamily:
    """A Hugging Face causal-LM class archbench reads and writes.

    `shell` maps the shell's modules (embed, pos_embed, embed_norm, final_norm, lm_head) to HF
    module paths; `layer` is the HF path of layer i ("model.layers.{i}"); `norms` names the
    block norms inside it. `arch_from_config(config.json) -> (arch dict, vocab)` raises a
    ConfigError naming any field it cannot express; `mismatch(model)` says why a model cannot be
    written as this class (None when it can); `config_from_model(model)` gives config.json.
    """

    name: str
    hf_class: str
    model_type: str
    base_prefix: str
    shell: dict[str, str]
    layer: str
    norms: dict[str, str]
    arch_from_config: Callable[[dict[str, Any]], tuple[dict[str, Any], int]]
    config_from_model: Callable[[Any], dict[str, Any]]
    mismatch: Callable[[Any], str | None]
    loads_with: str = "transformers"
    aliases: tuple[str, ...] = field(default=())


_FAMILIES: dict[str, HFFamily] = {}


def register_hf_family(family: HFFamily) -> None:
    """Declare a Hugging Face class (called by the module of the family's defining mixer)."""
    _FAMILIES[family.name] = family


def families() -> dict[str, HFFamily]:
    registry.discover()
    return dict(_FAMILIES)


def family_for_config(config: dict[str, Any]) -> HFFamily:
    """The family of a config.json, by its `architectures` entry, else by `model_type`."""
    names = list(config.get("architectures") or [])
    known = families().values()
    for fam in known:
        if fam.hf_class in names or any(a in names for a in fam.aliases):
            return fam
    for fam in known:
        if config.get("model_type") == fam.model_type:
            return fam
    supported = sorted(f.hf_class for f in known)
    raise ConfigError(f"config.json architectures={names} model_type="
                      f"{config.get('model_type')!r} is not a class archbench can import; "
                      f"supported: {supported}")


def family_for_model(model: Any) -> HFFamily:
    """The HF class that represents `model` exactly; a ConfigError saying why each one cannot."""
    reasons = []
    for fam in families().values():
        why = fam.mismatch(model)
        if why is None:
            return fam
        reasons.append(f"{fam.hf_class}: {why}")
    mixers = sorted({b.mixer_kind for b in model.blocks})
    raise ConfigError(f"arch.name={model.arch.name!r} (mixers {mixers}) has no Hugging Face "
                      "class that represents it exactly; " + "; ".join(reasons))


# ---- helpers for the families' config maps -----------------------------------------------------


def require_value(config: dict[str, Any], key: str, allowed: Any, default: Any = None) -> None:
    """A ConfigError unless config[key] (default when absent) equals `allowed`."""
    value = config.get(key, default)
    if value != allowed:
        raise ConfigError(f"config.json {key}={value!r} cannot be expressed in archbench; "
                          f"only {allowed!r} is supported")


def require_falsy(config: dict[str, Any], *keys: str) -> None:
    """A ConfigError for each key that is set to something (a feature archbench lacks)."""
    for key in keys:
        if config.get(key):
            raise ConfigError(f"config.json {key}={config[key]!r} cannot be expressed in "
                              "archbench (only unset / false / null is supported)")


def exact_hidden_mult(hidden: int, d_model: int) -> float:
    """A hidden_mult that, with multiple_of 1, rebuilds exactly `hidden` (archs/mlp.py)."""
    from archbench.archs.mlp import hidden_size

    mult = hidden / d_model
    for _ in range(4):  # hidden / d * d may land a hair below `hidden`: step up one ulp at a time
        if hidden_size(d_model, mult, 1) == hidden:
            return mult
        mult = math.nextafter(mult, math.inf)
    raise ConfigError(f"MLP width {hidden} at d_model {d_model} cannot be expressed")


def minimal_period(kinds: list[str]) -> list[str]:
    """The shortest prefix whose repetition gives `kinds` (the pattern's period)."""
    n = len(kinds)
    for p in range(1, n + 1):
        if n % p == 0 and kinds == kinds[:p] * (n // p):
            return kinds[:p]
    return kinds


def json_float(value: Any) -> float:
    """A float from config.json, where transformers 5 writes infinities as {"__float__": "inf"}."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def same_float(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)


# ---- state dict conversion ---------------------------------------------------------------------


def _part(model: Any, i: int, slot: str, family: HFFamily) -> tuple[HFPart, Any]:
    block = model.blocks[i]
    kind = block.mixer_kind if slot == "mixer" else block.mlp_slot
    comp = registry.get("mixer" if slot == "mixer" else "mlp", kind)
    part = (comp.hf or {}).get(family.name)
    if part is None:
        raise ConfigError(f"{kind} has no layout in {family.hf_class}")
    return part, getattr(block, slot)


def to_hf_state_dict(model: Any, family: HFFamily) -> Tensors:
    """Our model's tensors under the family's HF names (a tied head is not written)."""
    out: Tensors = {}
    grouped: dict[tuple[int, str], Tensors] = {}
    for name, tensor in model.state_dict().items():
        head, _, rest = name.partition(".")
        if head == "lm_head" and model.arch.tie_embeddings:
            continue
        if head in family.shell:
            out[f"{family.shell[head]}.{rest}"] = tensor
            continue
        if head != "blocks":
            raise ConfigError(f"{family.hf_class} has no place for parameter {name!r}")
        index, slot, sub = rest.split(".", 2)
        layer = family.layer.format(i=index)
        if slot in family.norms:
            out[f"{layer}.{family.norms[slot]}.{sub}"] = tensor
        else:
            grouped.setdefault((int(index), slot), {})[sub] = tensor
    for (i, slot), tensors in sorted(grouped.items()):
        part, module = _part(model, i, slot, family)
        layer = family.layer.format(i=i)
        converted = part.to_hf(tensors, module)
        out.update({f"{layer}.{part.prefix}.{k}": v for k, v in converted.items()})
    return {k: v.detach().contiguous() for k, v in out.items()}


def _with_base_prefix(tensors: Tensors, family: HFFamily) -> Tensors:
    """Checkpoints saved from the bare base model (e.g. the original GPT-2 files: `h.0.attn...`)
    lack the causal-LM wrapper's prefix: add it, as transformers does when loading."""
    prefix = family.base_prefix + "."
    if any(k.startswith(prefix) for k in tensors):
        return tensors
    return {(k if k.startswith("lm_head.") else prefix + k): v for k, v in tensors.items()}


def from_hf_state_dict(model: Any, family: HFFamily, hf_tensors: Tensors) -> Tensors:
    """HF tensors renamed (and converted) to our model's names; every HF name must be claimed."""
    tensors = _with_base_prefix(hf_tensors, family)
    shell = {v: k for k, v in family.shell.items()}
    layer_re = re.compile("^" + re.escape(family.layer).replace(r"\{i\}", r"(\d+)") + r"\.(.+)$")
    norms = {v: k for k, v in family.norms.items()}
    out: Tensors = {}
    grouped: dict[tuple[int, str], Tensors] = {}
    unclaimed = []
    for name, tensor in tensors.items():
        owner = next((s for s in shell if name.startswith(s + ".")), None)
        if owner is not None:  # shell paths first: RWKV's ln0 lives inside layer 0
            out[f"{shell[owner]}.{name[len(owner) + 1:]}"] = tensor
            continue
        match = layer_re.match(name)
        if match is None or int(match.group(1)) >= len(model.blocks):
            unclaimed.append(name)
            continue
        i, sub = int(match.group(1)), match.group(2)
        module, _, rest = sub.partition(".")
        if module in norms:
            out[f"blocks.{i}.{norms[module]}.{rest}"] = tensor
            continue
        for slot in ("mixer", "mlp"):
            if slot == "mlp" and model.blocks[i].mlp is None:
                continue
            part, _ = _part(model, i, slot, family)
            if sub.startswith(part.prefix + "."):
                local = sub[len(part.prefix) + 1:]
                if local not in part.ignore:
                    grouped.setdefault((i, slot), {})[local] = tensor
                break
        else:
            unclaimed.append(name)
    if unclaimed:
        raise ConfigError(f"{len(unclaimed)} tensors of the {family.hf_class} checkpoint have "
                          f"no place in the archbench model (e.g. {unclaimed[:4]}); the config "
                          "and the weights disagree, or the checkpoint holds extra modules")
    for (i, slot), group in sorted(grouped.items()):
        part, module = _part(model, i, slot, family)
        out.update({f"blocks.{i}.{slot}.{k}": v for k, v in part.from_hf(group, module).items()})
    return out
