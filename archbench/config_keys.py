"""Keys added on the command line with `+` must be keys of the schema.

Hydra keeps the typed tree closed, but `+key=value` opens it: `+train.lrr=1e-3` (the spelling
Hydra's own error for `train.lrr=1e-3` suggests) used to train with the typo silently ignored.
Every dataclass node of the composed config may hold only its fields; maps declared as plain
dicts in the schema (eval.task_params, eval.grid, data.task.params, compare.arch_overrides,
compare.studies) are free-form on purpose and take any key.
"""

from __future__ import annotations

import dataclasses
import difflib

from omegaconf import DictConfig, ListConfig, OmegaConf

from archbench.config import ConfigError


def _fields(node: DictConfig) -> set[str] | None:
    """The keys a node may hold, or None for a free-form map."""
    node_type = OmegaConf.get_type(node)
    if node_type is None or not dataclasses.is_dataclass(node_type):
        return None
    return {f.name for f in dataclasses.fields(node_type)}


def unknown_keys(node: DictConfig | ListConfig, prefix: str = ""
                 ) -> list[tuple[str, set[str]]]:
    """(full key, the keys allowed beside it) for every key no schema declares."""
    found: list[tuple[str, set[str]]] = []
    if isinstance(node, ListConfig):
        children = [(f"{prefix}[{i}]", node._get_node(i)) for i in range(len(node))]
    else:
        allowed = _fields(node)
        children = []
        for key in node.keys():
            path = f"{prefix}.{key}" if prefix else str(key)
            if allowed is not None and key not in allowed:
                found.append((path, allowed))
            else:
                children.append((path, node._get_node(key)))  # unresolved: no interpolation runs
    for path, child in children:
        if isinstance(child, (DictConfig, ListConfig)):
            found += unknown_keys(child, path)
    return found


def check_known_keys(cfg: DictConfig) -> None:
    """Raise ConfigError for the first key that is not in the schema, with the nearest
    spellings of the keys allowed in its place."""
    for path, allowed in unknown_keys(cfg):
        parent, _, key = path.rpartition(".")
        prefix = f"{parent}." if parent else ""
        close = difflib.get_close_matches(key, sorted(allowed), n=3, cutoff=0.6)
        hint = (f"did you mean {' or '.join(prefix + c for c in close)}?" if close else
                f"the keys of {parent or 'the root'} are {sorted(allowed)}")
        raise ConfigError(f"{path} is not a key of the configuration (a '+' override adds it "
                          f"without checking); {hint}")
