"""Checkpoints that are never torn, never unpickled, and checked before they are trusted.

Layout of a run directory:
    checkpoints/step_000200/{model.safetensors, optimizer.safetensors, state.json, tokenizer.json,
                             manifest.json}
    checkpoints/latest.json  -> {"step": 200, "path": "step_000200"}
A checkpoint folder is written under a temporary name (`.step_000200.tmp<PID>`) and renamed when
complete; `latest.json` is replaced atomically after that. `manifest.json`, written last, records
the size and SHA-256 of every other file, so a file truncated or altered later (a full disk, a
copy that stopped half-way, bit rot) is caught before its bytes reach a model. Discovery takes the
newest folder whose files match their manifest: a kill, a lost or garbled `latest.json` or one
corrupt file costs at most the steps since the previous checkpoint, never the run, and the folder
used and the reason are said in one line. Tensors go to safetensors, everything else to JSON:
loading executes no pickle.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from archbench.io import write_json_atomic
from archbench.train.tokenizer import Tokenizer, load_tokenizer

LATEST = "latest.json"
MANIFEST = "manifest.json"
KEEP = 2
STEP_FOLDER = re.compile(r"^step_(\d+)$")
# Left behind only by a process that died while writing (a kill, a crash of the machine).
TEMP_ENTRY = re.compile(r"^\.(?:step_\d+|latest\.json)\.tmp(\d+)$")
REQUIRED = ("model.safetensors", "state.json", "tokenizer.json")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or does not fit the model or tokenizer."""

    one_line = True  # the message names the file and what is wrong: the CLI prints it alone


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path, step: int) -> None:
    """Sizes and checksums as written: the reference every later reader checks against."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    write_json_atomic(folder / MANIFEST, {"step": step, "files": files})


def _write_folder(folder: Path, step: int, model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer | None, tokenizer: Tokenizer,
                  meta: dict[str, Any]) -> None:
    folder.mkdir(parents=True)
    save_file(_model_tensors(model), str(folder / "model.safetensors"))
    state = {**meta, "step": step, "rng_cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["rng_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    if optimizer is not None:
        tensors, groups = _optimizer_tensors(optimizer)
        save_file(tensors, str(folder / "optimizer.safetensors"))
        state["optimizer_param_groups"] = groups
    tokenizer.save(folder / "tokenizer.json")
    write_json_atomic(folder / "state.json", state)
    _write_manifest(folder, step)
    for path in folder.iterdir():  # make the contents durable before the folder becomes visible
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, tokenizer: Tokenizer,
                    meta: dict[str, Any]) -> Path:
    """Write checkpoints/step_N atomically, point latest.json at it, keep the last KEEP.

    A write that fails (a full disk, a file-size limit) removes its temporary folder and raises
    CheckpointError; the checkpoints written before stay as they were."""
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:07d}"
    final = root / name
    tmp = root / f".{name}.tmp{os.getpid()}"
    remove_stale_temp(root)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_folder(tmp, step, model, optimizer, tokenizer, meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_json_atomic(root / LATEST, {"step": step, "path": name})
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):  # safetensors wraps its I/O errors
            raise CheckpointError(f"could not write checkpoint {name} in {root}: "
                                  f"{_write_failure(exc)}; the checkpoints written before are "
                                  "kept") from exc
        raise
    kept = _step_folders(root)
    for old in kept[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_failure(exc: BaseException) -> str:
    """The reason in a few words, with "disk full" said for every way a full disk shows up."""
    full = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    code = getattr(exc, "errno", None)
    text = os.strerror(code) if isinstance(exc, OSError) and code else str(exc)
    if code in full or any(f"os error {c})" in text for c in full):
        text += " (disk full or file-size limit)"
    return text


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_temp(root: str | Path) -> list[Path]:
    """Delete the temporary folders and files of writers that died mid-write (their PID is no
    longer running); a live writer's are left alone. Returns what was removed."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for entry in sorted(root.iterdir()):
        match = TEMP_ENTRY.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        print(f"archbench: removed {entry}, left by process {match.group(1)} that died while "
              "writing a checkpoint", file=sys.stderr)
    return removed


def _step_folders(root: Path) -> list[Path]:
    """Step folders, newest first (by step number, not by name)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := STEP_FOLDER.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


_VERIFIED: dict[tuple[str, int, int], str] = {}


def _file_digest_cached(path: Path) -> str:
    """A file is hashed once per process while its size and mtime stay the same (eval and
    generate look a checkpoint up more than once)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = _sha256(path)
    return _VERIFIED[key]


def _unlisted_problem(folder: Path) -> str | None:
    """Folders written before manifests existed: the files must be present and parse."""
    for name in REQUIRED:
        if not (folder / name).is_file():
            return f"{folder / name} is missing"
    try:
        json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as exc:
        return f"{folder / 'state.json'} is not valid JSON ({exc})"
    for name in ("model.safetensors", "optimizer.safetensors"):
        if (folder / name).is_file():
            try:
                with safe_open(str(folder / name), "pt"):
                    pass
            except (SafetensorError, OSError) as exc:
                return f"{folder / name} is unreadable ({exc})"
    return None


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` cannot be trusted (naming the file), or None when every file is present with
    the size and checksum it was written with."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return _unlisted_problem(folder)
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path} is unreadable ({type(exc).__name__})"
    for name in REQUIRED:
        if name not in files:
            return f"{manifest_path} does not list {name}"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{path} is truncated or altered ({size} bytes; {entry['bytes']} were written)"
        if _file_digest_cached(path) != entry["sha256"]:
            return f"{path} does not match the checksum recorded when it was written"
    return None


def _read_latest(root: Path) -> tuple[str | None, str | None]:
    """(the folder latest.json names, or None; why it could not be used, or None)."""
    latest = root / LATEST
    if not latest.is_file():
        return None, f"{latest} is missing"
    try:
        return str(json.loads(latest.read_text())["path"]), None
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"{latest} is not valid JSON"


@dataclass
class FoundCheckpoint:
    path: Path
    note: str | None  # why this folder and not the one latest.json names; None when the same


def discover_checkpoint(path: str | Path) -> FoundCheckpoint | None:
    """The newest intact checkpoint of a run directory, its checkpoints/ folder, or a step folder;
    None when there is none at all. Raises CheckpointError when checkpoints exist but none is
    intact (each one's problem named)."""
    path = Path(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    folders = _step_folders(root)
    if not folders:
        if (path / "model.safetensors").is_file() or (path / MANIFEST).is_file():
            if (problem := checkpoint_problem(path)) is not None:
                raise CheckpointError(problem)
            return FoundCheckpoint(path, None)
        if (root / LATEST).is_file():
            raise CheckpointError(f"{root / LATEST} exists but {root} holds no step folder")
        return None
    skipped = []
    for folder in folders:
        problem = checkpoint_problem(folder)
        if problem is None:
            reasons = [*skipped, *_pointer_reasons(root, folder, bool(skipped))]
            note = f"using checkpoint {folder}: {'; '.join(reasons)}" if reasons else None
            return FoundCheckpoint(folder, note)
        skipped.append(problem)
    raise CheckpointError(f"no intact checkpoint in {root}: {'; '.join(skipped)}")


def _pointer_reasons(root: Path, used: Path, skipped_newer: bool) -> list[str]:
    """What was wrong with latest.json, when the folder used is not the one it names."""
    named, pointer_problem = _read_latest(root)
    if pointer_problem is not None:
        return [pointer_problem]
    if named == used.name or skipped_newer:  # the skipped folder's problem says it all
        return []
    if not (root / str(named)).is_dir():
        return [f"{root / LATEST} names {named}, which is missing"]
    return [f"{root / LATEST} names {named}, but the newer {used.name} is complete (the writer "
            "stopped before updating latest.json)"]


_SAID: set[str] = set()


def find_checkpoint(path: str | Path) -> Path | None:
    """`discover_checkpoint`'s folder; a fallback is said once on stderr, in one line."""
    found = discover_checkpoint(path)
    if found is None:
        return None
    if found.note and found.note not in _SAID:
        _SAID.add(found.note)
        print(f"archbench: {found.note}", file=sys.stderr)
    return found.path


def load_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ckpt / 'state.json'} is unreadable ({exc})") from exc


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc})") from exc


def restore_training(ckpt: Path, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    state = load_state(ckpt)
    load_weights(ckpt, model)
    if optimizer is not None and (ckpt / "optimizer.safetensors").is_file():
        _restore_optimizer(optimizer, _load_tensors(ckpt / "optimizer.safetensors"),
                           state["optimizer_param_groups"])
    torch.set_rng_state(torch.tensor(state["rng_cpu"], dtype=torch.uint8))
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8)
                                      for s in state["rng_cuda"]])
    return state


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    tensors = _load_tensors(ckpt / "model.safetensors")
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shapes differ: another size or architecture
        mismatches = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        first = mismatches[0] if mismatches else str(exc).splitlines()[0]
        raise CheckpointError(f"{ckpt}: weights do not fit the model ({len(mismatches)} shapes "
                              f"differ, e.g. {first}); the model configured is not the one "
                              "trained") from None
    tied = {"lm_head.weight"} if getattr(model, "arch", None) is not None and \
        model.arch.tie_embeddings else set()
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not fit the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")


def check_tokenizer(ckpt: Path, tokenizer: Tokenizer) -> None:
    """Fairness rule 1: a checkpoint is only ever used with the tokenizer it was trained with."""
    try:
        saved = load_tokenizer(ckpt / "tokenizer.json")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ckpt / 'tokenizer.json'} is unreadable ({exc})") from exc
    if saved.identity != tokenizer.identity:
        raise CheckpointError(
            f"{ckpt} was trained with tokenizer {saved.identity}, but tokenizer "
            f"{tokenizer.identity} is configured; use the checkpoint's tokenizer.json"
        )


def check_configured_tokenizer(tokenizer_cfg: Any, ckpt: Path) -> None:
    """eval / generate always read the checkpoint's own tokenizer.json; a tokenizer given on
    their command line must be that one, or the command is refused (it used to be ignored)."""
    from archbench.train.tokenizer import ByteTokenizer

    if tokenizer_cfg.kind == "byte":
        configured: Tokenizer = ByteTokenizer()
    elif tokenizer_cfg.kind == "file":
        try:
            configured = load_tokenizer(tokenizer_cfg.path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"tokenizer.path={tokenizer_cfg.path}: {exc}") from exc
    else:
        raise CheckpointError(
            f"tokenizer.kind={tokenizer_cfg.kind!r}: evaluation and generation use the "
            "checkpoint's own tokenizer.json, and a BPE tokenizer cannot be compared without "
            "training it; drop the tokenizer override, or give tokenizer=file tokenizer.path=")
    check_tokenizer(ckpt, configured)


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
