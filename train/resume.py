"""What a training command may do with a run folder that already holds a run.

A run folder is the record of one experiment, so a later command may only continue it, skip it,
or be refused; it never trains something else into it:
- `train.resume=true` continues the run with the run's own stored config (the newest intact
  checkpoint's `state.json`, else the first start's `.hydra/config.yaml`). The command line may
  only change keys that cannot change the numbers (RESUME_MAY_CHANGE); any other key that it sets
  to another value is an error naming the key and both values. So the README's
  `archbench train hydra.run.dir=runs/X train.resume=true` works without repeating the original
  overrides, and `tokenizer=file tokenizer.path=other.json` on a byte-tokenizer run is refused.
- a finished run is skipped only when its stored config equals the one asked for (up to those
  same keys); otherwise the error names the keys that differ.
- a folder with checkpoints but no `train.resume=true` is refused: starting over would truncate
  its metrics and overwrite its checkpoints.
A refused start writes nothing into the folder, and Hydra's record of the first command
(`.hydra/`) is never overwritten: later starts record theirs under `.hydra/starts/`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from archbench.config import ConfigError

# Keys a resumed or re-run command may set to another value: progress display, logging and
# checkpoint cadence, where the run stops, where it runs (as long as the precision stays the same,
# see _precision), parallelism (N ranks x b trains exactly like 1 rank x N*b), recomputation
# (bitwise-identical gradients), kernel paths (same weights, same math), and the settings of the
# other commands (eval, bench, generate, compare), which training never reads.
RESUME_MAY_CHANGE = (
    "train.resume", "train.progress", "train.log_every", "train.eval_every", "train.ckpt_every",
    "train.max_steps", "train.device", "train.distributed", "train.activation_checkpointing",
    "logger.*", "out_dir", "data.cache_dir", "tokenizer.cache_dir", "tokenizer.path",
    "arch.*.kernels", "eval.*", "bench.*", "generate.*", "compare.*", "ckpt", "prompt",
)
# Where this machine keeps things: always the current command's values, never the stored ones.
FROM_THIS_MACHINE = ("train.resume", "out_dir", "data.cache_dir", "tokenizer.cache_dir")
_ABSENT = "<absent>"


class RunFolderConflict(ConfigError):
    """The command asks for something else than the run its folder holds."""


def _may_change(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUME_MAY_CHANGE)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 0.001, ...}; lists are leaves (compared whole)."""
    if not isinstance(tree, dict) or (not tree and prefix):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def differences(stored: dict[str, Any], requested: dict[str, Any],
                keys: set[str] | None = None) -> list[tuple[str, Any, Any]]:
    """(key, stored value, requested value) for keys that differ and may not, sorted. Without
    `keys` (the keys a command set), a key only one side has is no difference: the schema grew
    or shrank since that run, and its value was the default then."""
    a, b = flatten(stored), flatten(requested)
    names = set(a) & set(b) if keys is None else keys
    return sorted((k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in names
                  if a.get(k, _ABSENT) != b.get(k, _ABSENT) and not _may_change(k))


def describe(diffs: list[tuple[str, Any, Any]], limit: int = 8) -> str:
    shown = "; ".join(f"{k}: the run has {a!r}, this command {b!r}" for k, a, b in diffs[:limit])
    return shown + (f"; and {len(diffs) - limit} more" if len(diffs) > limit else "")


def stored_config(run_dir: Path) -> tuple[dict[str, Any], str] | None:
    """The run's own resolved config and where it was read, or None for an empty folder."""
    from archbench.train.checkpoint import discover_checkpoint, load_state

    found = discover_checkpoint(run_dir)
    if found is not None:
        state = load_state(found.path)
        if state.get("config"):
            return state["config"], str(found.path / "state.json")
    record = run_dir / ".hydra" / "config.yaml"
    if record.is_file():
        loaded = OmegaConf.load(record)
        try:
            return OmegaConf.to_container(loaded, resolve=True), str(record)
        except Exception:  # an interpolation that only resolves inside Hydra: keep it as written
            return OmegaConf.to_container(loaded, resolve=False), str(record)
    return None


def _command_keys(overrides: list[str], cfg: dict[str, Any]) -> set[str] | None:
    """Full keys this command set; None when an override replaced keys it does not name (a
    group with a global package such as +experiment=...): then every key counts as set."""
    flat = set(flatten(cfg))
    keys: set[str] = set()
    for override in overrides:
        name = override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]
        if name.startswith("hydra.") or "/" in name:
            continue
        under = {k for k in flat if k == name or k.startswith(name + ".")}
        if not under and "." not in name and name not in cfg:
            return None  # a config group that writes elsewhere
        keys |= under | {name}
    return keys


def _precision(train: dict[str, Any]) -> str:
    """The precision a train config runs in: dtype=auto is bf16 on CUDA and fp32 on CPU, so a
    device change under auto changes the numerics."""
    if train.get("dtype", "auto") != "auto":
        return str(train["dtype"])
    device = str(train.get("device", "auto"))
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bf16" if device.startswith("cuda") else "fp32"


@dataclass
class StartPlan:
    cfg: DictConfig | None  # None: nothing to do (finished)
    message: str


def resumed_config(cfg: DictConfig, stored: dict[str, Any], source: str,
                   overrides: list[str]) -> DictConfig:
    """The run's stored config with the allowed changes of this command applied."""
    requested = OmegaConf.to_container(cfg, resolve=True)
    set_here = _command_keys(overrides, requested)
    stored_flat = flatten(stored)
    conflicts = differences(stored, requested, set_here)
    if conflicts:
        raise RunFolderConflict(f"train.resume=true continues the run as it was configured "
                                f"({source}); {describe(conflicts)}. Drop those overrides, or "
                                "train into another folder")
    try:
        merged = OmegaConf.merge(cfg, OmegaConf.create(stored))
    except Exception as exc:
        raise RunFolderConflict(f"the stored config ({source}) does not fit this version's "
                                f"schema: {str(exc).splitlines()[0]}") from None
    for key, value in flatten(requested).items():
        given = set_here is None or key in set_here
        if key in FROM_THIS_MACHINE or (_may_change(key) and given):
            OmegaConf.update(merged, key, value, merge=False, force_add=True)
        elif key not in stored_flat:  # a key added to the schema after the run started
            OmegaConf.update(merged, key, value, merge=False, force_add=True)
    before, after = _precision(stored.get("train", {})), _precision(dict(merged.train))
    if before != after:
        raise RunFolderConflict(f"train.device: the run trained in {before}, this command would "
                                f"continue in {after} (train.dtype=auto follows the device); "
                                f"set train.dtype={before} or resume on the same kind of device")
    return merged


def _read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunFolderConflict(f"{path} is unreadable ({exc}); move it away to resume or "
                                "re-run this folder") from None


def is_finished(summary: dict[str, Any], cfg: DictConfig) -> bool:
    """Nothing left to train (resume still continues a finished run whose train.max_steps was
    raised)."""
    if summary.get("status") != "finished":
        return False
    if not cfg.train.resume or summary.get("stopped_early"):
        return True  # a run that met train.stop_when is done (that key may not change)
    planned = summary.get("total_steps", 0)
    if cfg.train.max_steps:
        planned = min(planned, cfg.train.max_steps)
    return summary.get("step", 0) >= planned


def has_checkpoints(run_dir: Path) -> bool:
    from archbench.train.checkpoint import _step_folders

    return bool(_step_folders(Path(run_dir) / "checkpoints"))


def holds_a_run(run_dir: Path) -> bool:
    """A folder with checkpoints or a summary: a failed start must leave it as it is."""
    return (Path(run_dir) / "summary.json").is_file() or has_checkpoints(run_dir)


def plan_start(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> StartPlan:
    """Resume with the stored config, skip a finished identical run, or refuse (RunFolderConflict)
    before anything is written."""
    from archbench.train.checkpoint import remove_stale_temp

    run_dir = Path(run_dir)
    remove_stale_temp(run_dir / "checkpoints")  # a writer killed mid-checkpoint (we hold the lock)
    message = ""
    if cfg.train.resume and (stored := stored_config(run_dir)) is not None:
        cfg = resumed_config(cfg, *stored, overrides)
        message = f"resuming {run_dir} with its stored config ({stored[1]})"
    summary = _read_summary(run_dir)
    if summary is not None and summary.get("status") == "finished":
        diffs = differences(summary.get("config") or {}, OmegaConf.to_container(cfg, resolve=True))
        if diffs:
            raise RunFolderConflict(f"{run_dir} holds a finished run of another config: "
                                    f"{describe(diffs)}. Train into another folder "
                                    "(hydra.run.dir= or out_dir=)")
        if is_finished(summary, cfg):
            return StartPlan(None, f"skipping {run_dir}: already finished with this config")
    if not cfg.train.resume and has_checkpoints(run_dir):
        raise RunFolderConflict(f"{run_dir} already holds checkpoints of a run; add "
                                "train.resume=true to continue it, or train into another folder")
    return StartPlan(cfg, message)


def check_checkpoint_fits(run_dir: Path, tokenizer: Any, arch: dict[str, Any]) -> None:
    """Before a resume loads anything: the checkpoint was trained with this tokenizer (fairness
    rule 1) and this model. Kernel choices may differ (same weights, same math). Raises
    CheckpointError naming what differs; the Python API gets the same refusal as the CLI."""
    from archbench.train.checkpoint import (
        CheckpointError,
        check_tokenizer,
        find_checkpoint,
        load_state,
    )

    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        return
    check_tokenizer(ckpt, tokenizer)
    saved = load_state(ckpt).get("arch") or {}
    diffs = differences({"arch": saved}, {"arch": arch})
    if diffs:
        raise CheckpointError(f"{ckpt} holds another model: {describe(diffs)}")


def record_subdir(output_dir: str) -> str:
    """Hydra's `output_subdir`: `.hydra` for the first start of a folder, a new folder under
    `.hydra/starts/` for every later one, so the first command's record is never overwritten."""
    if not (Path(output_dir) / ".hydra" / "overrides.yaml").exists():
        return ".hydra"
    return f".hydra/starts/{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"
