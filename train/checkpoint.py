"""Checkpoints that are never torn and never unpickled.

Layout of a run directory:
    checkpoints/step_000200/{model.safetensors, optimizer.safetensors, state.json, tokenizer.json}
    checkpoints/latest.json  -> {"step": 200, "path": "step_000200"}
A checkpoint folder is written under a temporary name and renamed when complete; `latest.json` is
replaced atomically after that. A kill at any moment leaves `latest.json` naming a whole
checkpoint. Tensors go to safetensors, everything else to JSON: loading executes no pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from archbench.io import write_json_atomic
from archbench.train.tokenizer import Tokenizer, load_tokenizer

LATEST = "latest.json"
KEEP = 2


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or does not fit the model or tokenizer."""


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the tied head duplicate (safetensors refuses shared storage)."""
    state = model.state_dict()
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in state.items():
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel() > 0:
            continue
        seen[ptr] = name
        out[name] = tensor.detach().contiguous().cpu()
    return out


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    state = optimizer.state_dict()
    tensors = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
    return tensors, state["param_groups"]


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       groups: Any) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, tokenizer: Tokenizer,
                    meta: dict[str, Any]) -> Path:
    """Write checkpoints/step_N atomically, point latest.json at it, keep the last KEEP."""
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:07d}"
    final = root / name
    tmp = root / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_model_tensors(model), str(tmp / "model.safetensors"))
    state = {**meta, "step": step, "rng_cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["rng_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    if optimizer is not None:
        tensors, groups = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state["optimizer_param_groups"] = groups
    tokenizer.save(tmp / "tokenizer.json")
    write_json_atomic(tmp / "state.json", state)
    for path in tmp.iterdir():  # make the contents durable before the folder becomes visible
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json_atomic(root / LATEST, {"step": step, "path": name})
    kept = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in kept[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path | None:
    """Accept a run directory, its checkpoints/ folder, or a step folder."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        latest = root / LATEST
        if latest.is_file():
            target = root / json.loads(latest.read_text())["path"]
            if (target / "model.safetensors").is_file():
                return target
            raise CheckpointError(f"{latest} names {target}, which is incomplete or missing")
    if (path / "model.safetensors").is_file():
        return path
    return None


def load_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "state.json").read_text())


def restore_training(ckpt: Path, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    state = load_state(ckpt)
    load_weights(ckpt, model)
    if optimizer is not None and (ckpt / "optimizer.safetensors").is_file():
        _restore_optimizer(optimizer, load_file(str(ckpt / "optimizer.safetensors")),
                           state["optimizer_param_groups"])
    torch.set_rng_state(torch.tensor(state["rng_cpu"], dtype=torch.uint8))
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8)
                                      for s in state["rng_cuda"]])
    return state


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(model, "arch", None) is not None and \
        model.arch.tie_embeddings else set()
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not fit the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")


def check_tokenizer(ckpt: Path, tokenizer: Tokenizer) -> None:
    """Fairness rule 1: a checkpoint is only ever used with the tokenizer it was trained with."""
    saved = load_tokenizer(ckpt / "tokenizer.json")
    if saved.identity != tokenizer.identity:
        raise CheckpointError(
            f"{ckpt} was trained with tokenizer {saved.identity}, but tokenizer "
            f"{tokenizer.identity} is configured; use the checkpoint's tokenizer.json"
        )


def load_model(path: str | Path, device: str | torch.device = "cpu",
               kernels: dict[str, str] | None = None) -> tuple[Any, Tokenizer, dict[str, Any]]:
    """(model in eval mode, its tokenizer, its saved state) from a run dir or checkpoint.

    `kernels` overrides the kernel choice per mixer (e.g. {"mamba": "cuda"}): the weights do not
    depend on the path.
    """
    from archbench.archs.model import LanguageModel, resolve_kernels

    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint found at {path}")
    state = load_state(ckpt)
    arch = state["arch"]
    for mixer, choice in (kernels or {}).items():
        arch[mixer]["kernels"] = choice
    tokenizer = load_tokenizer(ckpt / "tokenizer.json")
    model = LanguageModel(arch, state["vocab_size"])
    load_weights(ckpt, model)
    model.to(device).eval()
    resolve_kernels(model, device)
    return model, tokenizer, state
