"""The one training loop every backbone goes through (fairness rule 2: same tokens, same order).

A run directory holds `checkpoints/`, `metrics.jsonl` (one line per logged step), `records.jsonl`
(records the report builder reads) and, when the run ends, `summary.json` with provenance.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from archbench.archs.base import ForwardContext, summarise_layer_stats
from archbench.archs.model import resolve_kernels
from archbench.archs.sizing import build_model
from archbench.config import to_container, validate
from archbench.device import pick_device
from archbench.io import append_jsonl, read_jsonl, write_json_atomic, write_text_atomic
from archbench.provenance import provenance
from archbench.train import distributed as dist_utils
from archbench.train.data import TokenData, WindowOrder, build_corpus, load_data
from archbench.train.loggers import make_logger
from archbench.train.metrics import split_metrics
from archbench.train.optim import build_optimizer, lr_at
from archbench.train.tokenizer import Tokenizer, build_tokenizer

IGNORE_INDEX = -100


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint stays in place."""




def pick_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on CUDA, none (fp32) on CPU by default."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def token_budget(cfg: Any, params: int) -> int:
    if cfg.tokens == "chinchilla":
        return 20 * params
    return int(float(cfg.tokens))


def prepare_data(cfg: Any) -> tuple[Tokenizer, TokenData]:
    """The tokenizer and token data of a config (BPE is trained on the same corpus)."""
    corpus = build_corpus(cfg.data) if cfg.data.source != "task" else None
    tokenizer = build_tokenizer(cfg.tokenizer, corpus)
    return tokenizer, load_data(cfg.data, tokenizer, corpus)


def _sequence_length(configured: int, meta: dict[str, Any]) -> int:
    """Synthetic tasks fix their own example length; text data uses train.seq_len."""
    task_len = meta.get("seq_len")
    if task_len is None:
        return configured
    if configured < task_len:
        raise ValueError(f"train.seq_len={configured} is shorter than the task's examples "
                         f"({task_len} tokens); set train.seq_len={task_len}")
    return int(task_len)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE_INDEX)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """After a resume, drop lines logged past the checkpoint so the curve has no duplicates."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def record_failure(cfg: DictConfig, run_dir: str | Path, exc: BaseException) -> None:
    """A run that failed before its training loop (bad data, a model that cannot be built, a
    config error in a sweep) still leaves summary.json and a record saying why, so a sweep goes
    on and the report lists it; re-running the sweep retries it (only finished runs are skipped).
    """
    if int(os.environ.get("RANK", 0)) != 0:
        return
    run_dir = Path(run_dir)
    error = error_text(exc)
    summary = {"status": "failed", "error": error, "run": run_dir.name,
               "arch": cfg.arch.name, "size": cfg.size.name, "seed": cfg.train.seed,
               "traceback": traceback.format_exception(exc)[-8:],
               "config": OmegaConf.to_container(cfg, resolve=False)}
    write_json_atomic(run_dir / "summary.json", summary)
    append_jsonl(run_dir / "records.jsonl", {
        "kind": "train", "status": "failed", "error": error, "run": run_dir.name,
        "arch": cfg.arch.name, "size": cfg.size.name, "seed": cfg.train.seed})


def run_training(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train `cfg` into `run_dir`; a failure is recorded there (status "failed" and the error, in
    summary.json and records.jsonl) and then raised."""
    outcome = {"recorded": False}
    try:
        return _run_training(cfg, run_dir, outcome)
    except Exception as exc:
        if not outcome["recorded"]:
            record_failure(cfg, run_dir, exc)
        raise


def _run_training(cfg: DictConfig, run_dir: str | Path, outcome: dict[str, bool]
                  ) -> dict[str, Any]:
    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.train
    ctx_dist = dist_utils.setup(tcfg.distributed)
    rank, world, is_main = ctx_dist.rank, ctx_dist.world, ctx_dist.rank == 0
    run_dir = Path(dist_utils.broadcast_object(str(run_dir), ctx_dist))  # rank 0's, everywhere
    device = ctx_dist.device or pick_device(tcfg.device, "train.device")
    amp_dtype = pick_dtype(tcfg.dtype, device)
    if tcfg.batch_size % (tcfg.grad_accum * world):
        raise ValueError(f"train.batch_size={tcfg.batch_size} must be divisible by "
                         f"train.grad_accum={tcfg.grad_accum} x world size {world}")
    torch.manual_seed(tcfg.seed)

    with dist_utils.main_first(ctx_dist):  # rank 0 fills the token caches, the others read them
        tokenizer, data = prepare_data(cfg)
    seq_len = _sequence_length(tcfg.seq_len, data.meta)
    if data.val.n_windows(seq_len) == 0:
        raise ValueError(
            f"the validation split holds {len(data.val)} tokens, fewer than one window of "
            f"train.seq_len={seq_len}; raise data.val_fraction (now "
            f"{cfg.data.val_fraction}) or data.holdout_tail")
    vocab_size = max(tokenizer.vocab_size, int(data.meta.get("vocab_size", 0)))
    model, fit = build_model(cfg.arch, cfg.size, vocab_size)
    kernel_paths = resolve_kernels(model, device)
    model.to(device)
    model.activation_checkpointing = tcfg.activation_checkpointing
    counts = model.param_counts()
    arch_resolved = OmegaConf.to_container(model.arch, resolve=True)

    tokens_per_step = tcfg.batch_size * seq_len
    budget = token_budget(tcfg, counts["total"])
    total_steps = max(1, math.ceil(budget / tokens_per_step))
    last_step = min(total_steps, tcfg.max_steps) if tcfg.max_steps else total_steps
    order = WindowOrder(data.train.n_windows(seq_len), tcfg.batch_size, tcfg.seed)

    train_model = dist_utils.wrap(model, ctx_dist, tcfg.distributed)
    forward = torch.compile(train_model) if tcfg.compile else train_model
    optimizer = build_optimizer(model, tcfg)  # after wrap: FSDP2 swaps parameters for shards
    step = 0
    metrics_path = run_dir / "metrics.jsonl"
    # Checkpoints hold full state, so a run saved on N ranks resumes on any number of them.
    if tcfg.resume and (state := dist_utils.restore(run_dir, model, optimizer,
                                                   ctx_dist)) is not None:
        step = state["step"]
        if is_main:
            _truncate_metrics(metrics_path, step)
            print(f"resumed from {state['checkpoint']} at step {step}")
    elif is_main and metrics_path.exists():
        metrics_path.unlink()

    meta = {
        "arch": arch_resolved, "vocab_size": vocab_size, "config": to_container(cfg),
        "tokenizer": tokenizer.identity, "param_counts": counts, "size_fit": fit.as_dict(),
        "kernel_paths": kernel_paths, "data": data.meta,
    }
    run_name = run_dir.name
    logger = make_logger(cfg.logger, run_dir, run_name) if is_main else make_logger(
        OmegaConf.create({"kind": "none"}), run_dir, run_name)
    logger.log_params(to_container(cfg))
    token_bytes = tokenizer.token_bytes()
    if len(token_bytes) < vocab_size:  # task tokens beyond the tokenizer count one unit each
        token_bytes = np.concatenate(
            [token_bytes, np.ones(vocab_size - len(token_bytes), dtype=np.int64)])

    def evaluate_now() -> dict[str, Any]:
        return split_metrics(model, data.val, seq_len, tcfg.batch_size, token_bytes,
                             tcfg.eval_batches, device, autocast_dtype=amp_dtype)

    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else nullcontext())
    micro = tcfg.batch_size // (tcfg.grad_accum * world)
    started = time.time()
    tokens_seen_start = step * tokens_per_step
    status = "running"
    error: str | None = None
    summary: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    bar = tqdm(total=last_step, initial=step, disable=not (tcfg.progress and is_main),
               desc=f"{cfg.arch.name}", dynamic_ncols=True)
    window_time = time.time()
    window_tokens = 0
    model.train()
    try:
        while step < last_step:
            lr = lr_at(step, total_steps, tcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            windows = data.train.windows(order.batch(step, rank, world), seq_len)
            if data.meta.get("targets_masked"):
                from archbench.train.tasks import task_targets

                inputs, targets = task_targets(data, windows)
            else:
                inputs, targets = windows[:, :-1], windows[:, 1:]
            inputs, targets = inputs.to(device), targets.to(device)
            loss_sum = 0.0
            aux_sums: dict[str, float] = {}
            layer_stats: dict[str, list[torch.Tensor]] = {}
            for m in range(tcfg.grad_accum):
                sl = slice(m * micro, (m + 1) * micro)
                fwd_ctx = ForwardContext()
                with autocast, dist_utils.maybe_no_sync(train_model, m < tcfg.grad_accum - 1):
                    logits = forward(inputs[sl], ctx=fwd_ctx)
                    loss = lm_loss(logits, targets[sl])
                    aux = fwd_ctx.aux_loss_terms()
                    total = loss + sum(aux.values()) if aux else loss
                for key, value in aux.items():  # read before backward (recompute may overwrite)
                    aux_sums[key] = aux_sums.get(key, 0.0) + float(value.detach()) / tcfg.grad_accum
                for name, values in fwd_ctx.stats_by_name().items():
                    layer_stats.setdefault(name, []).extend(values)
                (total / tcfg.grad_accum).backward()
                loss_sum += float(loss.detach()) / tcfg.grad_accum
            loss_value = dist_utils.mean_across(loss_sum, ctx_dist)
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"non-finite loss ({loss_value}) at step {step}; the last good checkpoint is "
                    f"kept in {run_dir / 'checkpoints'}; lower train.lr or check the data")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip) \
                if tcfg.grad_clip > 0 else torch.tensor(0.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_tokens += tokens_per_step
            bar.update(1)
            if is_main and (step % tcfg.log_every == 0 or step == last_step):
                elapsed = time.time() - window_time
                record = {"step": step, "tokens": step * tokens_per_step, "loss": loss_value,
                          "lr": lr, "grad_norm": float(grad_norm),
                          "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                          "flops": step * tokens_per_step * model.flops_per_token(
                              seq_len)["train"], **aux_sums}
                record.update(summarise_layer_stats(layer_stats))
                append_jsonl(metrics_path, record)
                logger.log_metrics(step, {k: v for k, v in record.items() if k != "step"})
                bar.set_postfix(loss=f"{loss_value:.3f}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                window_time, window_tokens = time.time(), 0
            # Under FSDP2 every forward gathers shards, so all ranks evaluate; rank 0 records.
            if (is_main or ctx_dist.sharded) and (step % tcfg.eval_every == 0
                                                  or step == last_step):
                last_eval = evaluate_now()
            if is_main and (step % tcfg.eval_every == 0 or step == last_step):
                val = {"step": step, "tokens": step * tokens_per_step,
                       "val_loss": last_eval["loss"], "val_bpb": last_eval["bpb"]}
                if "accuracy" in last_eval:  # synthetic tasks: exact accuracy on the answers
                    val["val_accuracy"] = last_eval["accuracy"]
                append_jsonl(metrics_path, val)
                logger.log_metrics(step, {k: v for k, v in val.items() if k.startswith("val_")})
            if step % tcfg.ckpt_every == 0 or step == last_step:
                dist_utils.save(run_dir, step, model, optimizer, tokenizer, meta, ctx_dist)
        status = "finished"
    except TrainingDiverged as exc:
        status, error = "diverged", error_text(exc)
        raise
    except Exception as exc:
        status, error = "failed", error_text(exc)
        raise
    finally:
        bar.close()
        if is_main:
            wall = time.time() - started
            summary = {
                **meta, "arch_config": meta["arch"],
                "status": status, "run": run_name, "arch": cfg.arch.name, "size": cfg.size.name,
                "step": step, "total_steps": total_steps, "tokens_seen": step * tokens_per_step,
                "tokens_budget": budget, "wall_time_s": wall,
                "tokens_per_s": (step * tokens_per_step - tokens_seen_start) / max(wall, 1e-9),
                "final": last_eval, "dtype": str(amp_dtype or torch.float32),
                "seed": tcfg.seed, "layer_plan": [list(p) for p in model.plan],
                "flops_per_token": model.flops_per_token(seq_len),
                "provenance": provenance(device),
            }
            if error is not None:
                summary["error"] = error
            if status != "running":
                write_json_atomic(run_dir / "summary.json", summary)
                record = {"kind": "train", **{k: summary[k] for k in (
                    "run", "arch", "size", "status", "tokens_seen", "wall_time_s", "tokens_per_s",
                    "param_counts", "kernel_paths", "seed", "tokenizer", "dtype")},
                    "val_loss": last_eval.get("loss"), "val_bpb": last_eval.get("bpb"),
                    "val_accuracy": last_eval.get("accuracy"), "seq_len": seq_len,
                    "provenance": summary["provenance"]}
                if error is not None:
                    record["error"] = error
                append_jsonl(run_dir / "records.jsonl", record)
                outcome["recorded"] = True
            for name in ("summary.json", "metrics.jsonl", "records.jsonl"):
                if (run_dir / name).is_file():
                    logger.log_artifact(run_dir / name)
            logger.close("FINISHED" if status == "finished" else "FAILED")
        dist_utils.teardown(ctx_dist)
    return summary
