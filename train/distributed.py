"""Data parallelism with PyTorch's own engine: DDP, or FSDP2 (`fully_shard`) for models that do not
fit replicated. Launched by torchrun (or by a submitit job with several tasks, e.g. Slurm).

Each rank reads its contiguous slice of every global batch (see data.WindowOrder), so the union
over ranks is the token stream of a single process, and the averaged gradient of N ranks with batch
b equals that of one rank with batch N * b. Only rank 0 logs and writes records.

Checkpoints hold the full, unsharded state in the single-process layout of train/checkpoint.py,
whatever wrapped the model: a run saved on N ranks resumes on M ranks (or on one). Under FSDP2 the
sharded DTensors are gathered onto rank 0's CPU to save, and on resume rank 0 alone reads the
files and broadcasts them, each rank keeping only its own shards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from archbench.config import require_choice

KINDS = ("none", "ddp", "fsdp")


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device | None = None
    active: bool = False
    kind: str = "none"

    @property
    def sharded(self) -> bool:
        """Parameters are FSDP2 shards: every forward is a collective all ranks must join."""
        return self.active and self.kind == "fsdp"


def _export_submitit_env() -> None:
    """A submitit job with several tasks (Slurm srun, or submitit's local executor) describes the
    group in its own variables; export the torchrun ones so a single code path serves both."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    from submitit.helpers import TorchDistributedEnvironment

    # Every task sees all of the node's GPUs and picks its own by LOCAL_RANK, as under torchrun.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def process_rank() -> int:
    """This process's rank before any process group exists (torchrun, or submitit's tasks, whose
    variables are exported first): decides who writes the run folder."""
    _export_submitit_env()
    return int(os.environ.get("RANK", 0))


def setup(kind: str) -> DistContext:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE)."""
    require_choice("train.distributed", kind, KINDS)
    if kind == "none":
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world > 1:
            raise RuntimeError(f"launched as {world} processes but train.distributed='none': "
                               "every process would train the same model alone; set "
                               "train.distributed=ddp or fsdp")
        return DistContext()
    _export_submitit_env()
    if "RANK" not in os.environ:
        raise RuntimeError(f"train.distributed={kind!r} needs a torchrun launch "
                           "(RANK/WORLD_SIZE are not set): torchrun --nproc_per_node N "
                           "$(which archbench) train ... (see README, 'Multi-GPU training')")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return DistContext(rank, world, device, active=True, kind=kind)


def wrap(model: torch.nn.Module, ctx: DistContext, kind: str) -> torch.nn.Module:
    """The module the training step calls. Build the optimizer after this: fully_shard swaps the
    parameters for DTensor shards (the module object itself stays the same)."""
    if not ctx.active:
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Experts that no token of this rank's batch picked get no gradient: DDP must look for
        # them or it waits forever for their all-reduce.
        sparse = any(getattr(m, "leaves_params_unused", False) for m in model.modules())
        device_ids = [ctx.device.index] if ctx.device is not None and ctx.device.type == "cuda" \
            else None
        return DistributedDataParallel(model, device_ids=device_ids,
                                       find_unused_parameters=sparse)
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Every rank built the same initial weights from train.seed; each keeps its slice.
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)  # embeddings, final norm and (tied) head
        return model
    require_choice("train.distributed", kind, KINDS)
    raise AssertionError(f"train.distributed={kind!r} is in KINDS but has no wrapper")


@contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def maybe_no_sync(model: torch.nn.Module, skip: bool) -> Any:
    """Skip the gradient reduction on all but the last micro-batch of an accumulation."""
    if not skip:
        return nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: keep unsharded grads until the end
        return _fsdp_no_sync(model)
    return nullcontext()


def mean_across(value: float, ctx: DistContext) -> float:
    if not ctx.active:
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device=ctx.device if ctx.device is not None else "cpu")
    dist.all_reduce(t)
    return float(t) / ctx.world


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's value on every rank (e.g. the run directory, so all ranks agree on one folder)."""
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the body first (tokenizing, filling caches), the others then read its output
    instead of all ranks racing to build the same files."""
    if ctx.active and ctx.rank != 0:
        dist.barrier()
    yield
    if ctx.active and ctx.rank == 0:
        dist.barrier()


class _Gathered:
    """A gathered full state dict shown as an object with `state_dict()`, the only call
    checkpoint.save_checkpoint makes on a model or an optimizer."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """{second name: first name} of parameters that appear twice (the tied head): checkpoints
    store a tied tensor once, under its first name."""
    first = {id(p): name for name, p in model.named_parameters()}
    return {name: first[id(p)] for name, p in model.named_parameters(remove_duplicate=False)
            if name != first[id(p)]}


def _positional_optimizer_state(named: dict[str, Any]) -> dict[str, Any]:
    """DCP's optimizer state is keyed by parameter name; torch.optim's (and our checkpoints') by
    position across the param groups. Convert name -> position."""
    position: dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        ids = []
        for fqn in group["params"]:
            position.setdefault(fqn, len(position))
            ids.append(position[fqn])
        groups.append({**group, "params": ids})
    state = {position[fqn]: value for fqn, value in named["state"].items()}
    return {"state": state, "param_groups": groups}


def _named_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                           tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]
                           ) -> dict[str, Any]:
    """The inverse of `_positional_optimizer_state`, for this optimizer's parameter order (the
    optimizer is built the same way from the same module names on every world size)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, field = key.split(".", 1)
        state.setdefault(order[int(pid)], {})[field] = value
    named_groups = [{**g, "params": [order[i] for i in g["params"]]} for g in groups]
    return {"state": state, "param_groups": named_groups}


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         tokenizer: Any, meta: dict[str, Any], ctx: DistContext) -> None:
    """Rank 0 writes the full weights and optimizer state; every rank must call this (under FSDP2
    gathering the shards is a collective)."""
    from archbench.train.checkpoint import save_checkpoint

    if ctx.sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)  # empty on ranks > 0
        optim = get_optimizer_state_dict(model, optimizer, options=options)
        if ctx.rank == 0:
            aliases = _aliases(model)
            weights = {k: v for k, v in weights.items() if k not in aliases}
            save_checkpoint(run_dir, step, _Gathered(weights),  # type: ignore[arg-type]
                            _Gathered(_positional_optimizer_state(optim)),  # type: ignore[arg-type]
                            tokenizer, meta)
    elif ctx.rank == 0:
        save_checkpoint(run_dir, step, model, optimizer, tokenizer, meta)
    if ctx.active:
        dist.barrier()


def restore(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            ctx: DistContext) -> dict[str, Any] | None:
    """Load the latest checkpoint of `run_dir` into the (already wrapped) model and its optimizer,
    whatever world size saved it; return its state (with `checkpoint`, the folder), or None when
    there is no checkpoint. Only rank 0 reads the files; the others receive the tensors."""
    from archbench.train.checkpoint import find_checkpoint, restore_training

    if not ctx.active:
        ckpt = find_checkpoint(run_dir)
        if ckpt is None:
            return None
        return {**restore_training(ckpt, model, optimizer), "checkpoint": str(ckpt)}
    found = find_checkpoint(run_dir) if ctx.rank == 0 else None
    path = broadcast_object(str(found) if found is not None else None, ctx)
    if path is None:
        return None
    if ctx.sharded:
        state = _restore_sharded(Path(path), model, optimizer, ctx)
    else:
        state = _restore_replicated(Path(path), model, optimizer, ctx)
    torch.set_rng_state(torch.tensor(state["rng_cpu"], dtype=torch.uint8))
    return {**state, "checkpoint": path}


def _restore_replicated(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        ctx: DistContext) -> dict[str, Any]:
    """DDP: rank 0 loads the files, then its weights and optimizer state are copied everywhere
    (in place, so the buckets DDP built keep pointing at the same tensors)."""
    from archbench.train.checkpoint import restore_training

    module = getattr(model, "module", model)
    state = restore_training(ckpt, module, optimizer) if ctx.rank == 0 else None
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)
    optim_state = None
    if ctx.rank == 0:  # via the CPU: a CUDA tensor would arrive on rank 0's device everywhere
        optim_state = optimizer.state_dict()
        optim_state["state"] = {pid: {k: v.cpu() if torch.is_tensor(v) else v
                                      for k, v in s.items()}
                                for pid, s in optim_state["state"].items()}
    optim_state = broadcast_object(optim_state, ctx)
    if ctx.rank != 0:
        optimizer.load_state_dict(optim_state)
    return broadcast_object(state, ctx)


def _restore_sharded(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     ctx: DistContext) -> dict[str, Any]:
    """FSDP2: rank 0 reads the full tensors; DCP broadcasts them and each rank keeps its shards."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from archbench.train.checkpoint import CheckpointError, load_state

    weights: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    state = None
    if ctx.rank == 0:
        state = load_state(ckpt)
        weights = load_file(str(ckpt / "model.safetensors"))
        aliases = _aliases(model)
        expected = set(model.state_dict()) - aliases.keys()
        missing, unexpected = expected - weights.keys(), weights.keys() - expected
        if missing or unexpected:
            raise CheckpointError(f"{ckpt}: weights do not fit the model (missing "
                                  f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
        weights.update({alias: weights[name] for alias, name in aliases.items()})
        if (ckpt / "optimizer.safetensors").is_file():
            optim = _named_optimizer_state(optimizer, model,
                                           load_file(str(ckpt / "optimizer.safetensors")),
                                           state["optimizer_param_groups"])
    has_optim = broadcast_object(bool(optim), ctx)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    if has_optim:
        set_optimizer_state_dict(model, optimizer, optim, options=options)
    return broadcast_object(state, ctx)


def teardown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
