"""Data parallelism with PyTorch's own engine, launched by torchrun.

Each rank reads its contiguous slice of every global batch (see data.WindowOrder), so the union
over ranks is the token stream of a single process. Only rank 0 logs and writes records.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device | None = None
    active: bool = False


def setup(kind: str) -> DistContext:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE)."""
    if kind == "none":
        return DistContext()
    if "RANK" not in os.environ:
        raise RuntimeError(f"train.distributed={kind!r} needs a torchrun launch "
                           "(RANK/WORLD_SIZE are not set)")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = None
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return DistContext(rank, world, device, active=True)


def wrap(model: torch.nn.Module, ctx: DistContext, kind: str) -> torch.nn.Module:
    if not ctx.active:
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"train.distributed={kind!r} is not one of none, ddp, fsdp")


def maybe_no_sync(model: torch.nn.Module, skip: bool) -> Any:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()


def mean_across(value: float, ctx: DistContext) -> float:
    if not ctx.active:
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device=ctx.device if ctx.device is not None else "cpu")
    dist.all_reduce(t)
    return float(t) / ctx.world



def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         tokenizer: Any, meta: dict[str, Any], ctx: DistContext) -> None:
    """Rank 0 writes the (replicated) weights and optimizer; the others wait for it."""
    from archbench.train.checkpoint import save_checkpoint

    if ctx.rank == 0:
        save_checkpoint(run_dir, step, model, optimizer, tokenizer, meta)
    if ctx.active:
        dist.barrier()


def teardown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
