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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from archbench.archs.compiling import compile_module
from archbench.archs.model import resolve_kernels
from archbench.archs.sizing import build_model
from archbench.config import to_container, validate
from archbench.device import autocast_dtype, pick_device
from archbench.io import append_jsonl, read_jsonl, write_json_atomic, write_text_atomic
from archbench.progress import progress_bar
from archbench.provenance import portable_paths, provenance
from archbench.train import distributed as dist_utils
from archbench.train.data import TokenData, WindowOrder, build_corpus, load_data
from archbench.train.loggers import make_logger
from archbench.train.metrics import padded_token_bytes, split_metrics
from archbench.train.optim import build_optimizer, group_lr, lr_at
from archbench.train.step import StepLosses, TrainStep
from archbench.train.tasks import task_targets
from archbench.train.tokenizer import Tokenizer, build_tokenizer


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint stays in place."""




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


def _truncate_metrics(path: Path, last_step: int) -> None:
    """After a resume, drop lines logged past the checkpoint so the curve has no duplicates."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def error_text(exc: BaseException) -> str:
    return portable_paths(f"{type(exc).__name__}: {exc}")


def record_failure(cfg: DictConfig, run_dir: str | Path, exc: BaseException) -> None:
    """A run that failed before its training loop (bad data, a model that cannot be built, a
    config error in a sweep) still leaves summary.json and a record saying why, so a sweep goes
    on and the report lists it; re-running the sweep retries it (only finished runs are skipped).
    """
    from archbench.train.resume import holds_a_run

    run_dir = Path(run_dir)
    if int(os.environ.get("RANK", 0)) != 0 or holds_a_run(run_dir):
        return  # a failed start (or resume) leaves the record of the run already there as it was
    error = error_text(exc)
    summary = {"status": "failed", "error": error, "run": run_dir.name,
               "arch": cfg.arch.name, "size": cfg.size.name, "seed": cfg.train.seed,
               "traceback": [portable_paths(line) for line in traceback.format_exception(exc)[-8:]],
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


@dataclass
class _Run:
    """One training run's fixed parts (built once by `_setup`) and its progress (`step`,
    `last_eval`), passed between the phases: setup, resume, loop, evaluation, finish."""

    cfg: DictConfig
    run_dir: Path
    dist: dist_utils.DistContext
    device: torch.device
    amp_dtype: torch.dtype | None
    tokenizer: Tokenizer
    data: TokenData
    seq_len: int
    model: Any
    train_step: TrainStep
    order: WindowOrder
    budget: int
    total_steps: int
    last_step: int
    meta: dict[str, Any]
    step: int = 0
    last_eval: dict[str, Any] = field(default_factory=dict)
    logger: Any = None
    token_bytes: np.ndarray | None = None
    stopped_early: dict[str, Any] | None = None  # train.stop_when met: where and at what value

    @property
    def tcfg(self) -> Any:
        return self.cfg.train

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    @property
    def tokens_per_step(self) -> int:
        return self.tcfg.batch_size * self.seq_len

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def _load_run_data(cfg: DictConfig, dist: dist_utils.DistContext
                   ) -> tuple[Tokenizer, TokenData, int]:
    """Tokenizer, token data and window length, with a validation split of at least one window."""
    with dist_utils.main_first(dist):  # rank 0 fills the token caches, the others read them
        tokenizer, data = prepare_data(cfg)
    seq_len = _sequence_length(cfg.train.seq_len, data.meta)
    if data.val.n_windows(seq_len) == 0:
        raise ValueError(
            f"the validation split holds {len(data.val)} tokens, fewer than one window of "
            f"train.seq_len={seq_len}; raise data.val_fraction (now "
            f"{cfg.data.val_fraction}) or data.holdout_tail")
    return tokenizer, data, seq_len


def _setup(cfg: DictConfig, run_dir: Path) -> _Run:
    """Distributed context, data, model (sized, kernels resolved, wrapped) and optimizer."""
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.train
    dist = dist_utils.setup(tcfg.distributed)
    run_dir = Path(dist_utils.broadcast_object(str(run_dir), dist))  # rank 0's, everywhere
    device = dist.device or pick_device(tcfg.device, "train.device")
    amp_dtype = autocast_dtype(tcfg.dtype, device, "train.dtype")
    if tcfg.batch_size % (tcfg.grad_accum * dist.world):
        raise ValueError(f"train.batch_size={tcfg.batch_size} must be divisible by "
                         f"train.grad_accum={tcfg.grad_accum} x world size {dist.world}")
    torch.manual_seed(tcfg.seed)
    tokenizer, data, seq_len = _load_run_data(cfg, dist)
    vocab_size = max(tokenizer.vocab_size, int(data.meta.get("vocab_size", 0)))
    model, fit = build_model(cfg.arch, cfg.size, vocab_size)
    kernel_paths = resolve_kernels(model, device)
    model.to(device)
    model.activation_checkpointing = tcfg.activation_checkpointing
    counts = model.param_counts()
    budget = token_budget(tcfg, counts["total"])
    total_steps = max(1, math.ceil(budget / (tcfg.batch_size * seq_len)))
    train_model = dist_utils.wrap(model, dist, tcfg.distributed)
    # train.compile: static shapes (archs/compiling.py): one graph for the step's (batch, length)
    forward = compile_module(train_model, device) if tcfg.compile else train_model
    optimizer = build_optimizer(model, tcfg)  # after wrap: FSDP2 swaps parameters for shards
    train_step = TrainStep(
        lambda inputs, ctx: forward(inputs, ctx=ctx), model.parameters, optimizer,
        grad_clip=tcfg.grad_clip, grad_accum=tcfg.grad_accum, autocast_dtype=amp_dtype,
        device_type=device.type, no_sync=lambda skip: dist_utils.maybe_no_sync(train_model, skip))
    meta = {
        "arch": OmegaConf.to_container(model.arch, resolve=True), "vocab_size": vocab_size,
        "config": to_container(cfg), "tokenizer": tokenizer.identity, "param_counts": counts,
        "size_fit": fit.as_dict(), "kernel_paths": kernel_paths, "data": data.meta,
    }
    return _Run(cfg=cfg, run_dir=run_dir, dist=dist, device=device, amp_dtype=amp_dtype,
                tokenizer=tokenizer, data=data, seq_len=seq_len, model=model,
                train_step=train_step,
                order=WindowOrder(data.train.n_windows(seq_len), tcfg.batch_size, tcfg.seed),
                budget=budget, total_steps=total_steps,
                last_step=min(total_steps, tcfg.max_steps) if tcfg.max_steps else total_steps,
                meta=meta)


def _resume(run: _Run) -> None:
    """Continue from the run's last checkpoint (train.resume), else start a fresh metrics file.
    Checkpoints hold full state, so a run saved on N ranks resumes on any number of them."""
    if run.tcfg.resume and run.is_main:  # a checkpoint of another tokenizer or model: refused
        from archbench.train.resume import check_checkpoint_fits

        check_checkpoint_fits(run.run_dir, run.tokenizer, run.meta["arch"])
    if run.tcfg.resume and (state := dist_utils.restore(
            run.run_dir, run.model, run.train_step.optimizer, run.dist)) is not None:
        run.step = state["step"]
        _restore_stop(run, state)
        if run.is_main:
            _truncate_metrics(run.metrics_path, run.step)
            print(f"resumed from {state['checkpoint']} at step {run.step}")
    elif run.is_main and run.metrics_path.exists():
        run.metrics_path.unlink()


def _start_logging(run: _Run) -> None:
    """The experiment logger (rank 0 only) and the byte length of every token id for bpb."""
    name = run.run_dir.name
    run.logger = make_logger(run.cfg.logger, run.run_dir, name) if run.is_main else make_logger(
        OmegaConf.create({"kind": "none"}), run.run_dir, name)
    run.logger.log_params(to_container(run.cfg))
    run.token_bytes = padded_token_bytes(run.tokenizer, run.meta["vocab_size"])


def _batch(run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (inputs, targets) of the current step, in the seed's window order."""
    windows = run.data.train.windows(run.order.batch(run.step, run.dist.rank, run.dist.world),
                                     run.seq_len)
    if run.data.meta.get("targets_masked"):
        inputs, targets = task_targets(run.data, windows)
    else:
        inputs, targets = windows[:, :-1], windows[:, 1:]
    return inputs.to(run.device), targets.to(run.device)


def _log_step(run: _Run, losses: StepLosses, loss: float, lr: float, grad_norm: torch.Tensor,
              throughput: float) -> None:
    """One metrics.jsonl line (and the logger's metrics) for the step just taken."""
    step, tokens_per_step = run.step, run.tokens_per_step
    record = {"step": step, "tokens": step * tokens_per_step, "loss": loss, "lr": lr,
              "grad_norm": float(grad_norm), "tokens_per_s": throughput,
              "flops": step * tokens_per_step * run.model.flops_per_token(run.seq_len)["train"],
              **losses.aux_means()}
    record.update(losses.layer_stat_summary())  # e.g. MoE expert_fraction_max / _min
    append_jsonl(run.metrics_path, record)
    run.logger.log_metrics(step, {k: v for k, v in record.items() if k != "step"})


def _evaluate(run: _Run) -> None:
    """Validation loss / bpb (and task accuracy) on the first validation windows. Under FSDP2
    every forward gathers shards, so all ranks evaluate; rank 0 records."""
    if run.is_main or run.dist.sharded:
        run.last_eval = split_metrics(run.model, run.data.val, run.seq_len,
                                      run.tcfg.batch_size, run.token_bytes,
                                      run.tcfg.eval_batches, run.device,
                                      autocast_dtype=run.amp_dtype)
    if run.is_main:
        val = {"step": run.step, "tokens": run.step * run.tokens_per_step,
               "val_loss": run.last_eval["loss"], "val_bpb": run.last_eval["bpb"]}
        if "accuracy" in run.last_eval:  # synthetic tasks: exact accuracy on the answers
            val["val_accuracy"] = run.last_eval["accuracy"]
        append_jsonl(run.metrics_path, val)
        run.logger.log_metrics(run.step, {k: v for k, v in val.items() if k.startswith("val_")})


# Keys of split_metrics' result behind the names train.stop_when.metric accepts.
STOP_KEYS = {"val_accuracy": "accuracy", "val_loss": "loss", "val_bpb": "bpb"}


def stop_reached(stop: Any, last_eval: dict[str, Any]) -> float | None:
    """The metric's value when the evaluation just made meets train.stop_when, else None."""
    if stop.metric is None:
        return None
    value = last_eval.get(STOP_KEYS[stop.metric])
    if value is None or not math.isfinite(float(value)):
        return None
    value = float(value)
    if stop.at_least is not None and value >= float(stop.at_least):
        return value
    if stop.at_most is not None and value <= float(stop.at_most):
        return value
    return None


def _check_stop(run: _Run) -> None:
    """After an evaluation: mark the run as stopped when train.stop_when is met. Rank 0 decides
    (it holds the evaluation) and every rank follows, so all leave the loop at the same step.
    The mark goes into the checkpoint's state, so a resume does not train on past it."""
    stop = run.tcfg.stop_when
    if stop.metric is None:
        return
    value = stop_reached(stop, run.last_eval) if run.is_main else None
    value = dist_utils.broadcast_object(value, run.dist)
    if value is None:
        return
    bound = "at_least" if stop.at_least is not None else "at_most"
    run.stopped_early = {
        "metric": stop.metric, "value": value, "rule": bound, "threshold": float(stop[bound]),
        "step": run.step, "tokens": run.step * run.tokens_per_step,
        "budget_tokens": run.last_step * run.tokens_per_step, "eval": dict(run.last_eval)}
    run.meta["stopped_early"] = run.stopped_early
    if run.is_main:
        print(f"{run.cfg.arch.name}: stopped early at step {run.step} "
              f"({run.stopped_early['tokens']} of {run.stopped_early['budget_tokens']} tokens): "
              f"{stop.metric}={value:.4g}, train.stop_when.{bound}={float(stop[bound]):g}")


def _restore_stop(run: _Run, state: dict[str, Any]) -> None:
    """A checkpoint written where the run stopped early ends the run there on resume too."""
    stopped = state.get("stopped_early")
    if stopped and int(stopped.get("step", -1)) == run.step:
        run.stopped_early = stopped
        run.meta["stopped_early"] = stopped
        run.last_eval = dict(stopped.get("eval") or {})


def _loop(run: _Run, bar: Any) -> None:
    """Train from `run.step` to `run.last_step`: log, evaluate and checkpoint on schedule."""
    tcfg = run.tcfg
    window_time, window_tokens = time.time(), 0
    run.model.train()
    while run.step < run.last_step and run.stopped_early is None:
        lr = lr_at(run.step, run.total_steps, tcfg)
        for group in run.train_step.optimizer.param_groups:
            group["lr"] = group_lr(group, lr)
        losses = run.train_step.accumulate(*_batch(run))
        loss = dist_utils.mean_across(losses.loss(), run.dist)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"non-finite loss ({loss}) at step {run.step}; the last good checkpoint is "
                f"kept in {run.run_dir / 'checkpoints'}; lower train.lr or check the data")
        grad_norm = run.train_step.update()
        run.step += 1
        window_tokens += run.tokens_per_step
        bar.update(1)
        final = run.step == run.last_step
        if run.is_main and (run.step % tcfg.log_every == 0 or final):
            throughput = window_tokens / max(time.time() - window_time, 1e-9)
            _log_step(run, losses, loss, lr, grad_norm, throughput)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{throughput:.0f}")
            window_time, window_tokens = time.time(), 0
        if run.step % tcfg.eval_every == 0 or final:
            if final and run.is_main and tcfg.progress:  # the bar reads 100%: say what runs now
                bar.write(f"{run.cfg.arch.name}: step {run.step}/{run.last_step}, final "
                          f"evaluation on {tcfg.eval_batches} validation batches, then the "
                          "checkpoint ...")
            _evaluate(run)
            if not final:
                _check_stop(run)
        if run.step % tcfg.ckpt_every == 0 or final or run.stopped_early is not None:
            dist_utils.save(run.run_dir, run.step, run.model, run.train_step.optimizer,
                            run.tokenizer, run.meta, run.dist)


def _summary(run: _Run, status: str, error: str | None, wall: float, tokens_seen_start: int
             ) -> dict[str, Any]:
    """summary.json: the run's metadata, outcome, throughput and provenance."""
    step, tokens_per_step = run.step, run.tokens_per_step
    summary = {
        **run.meta, "arch_config": run.meta["arch"],
        "status": status, "run": run.run_dir.name, "arch": run.cfg.arch.name,
        "size": run.cfg.size.name, "step": step, "total_steps": run.total_steps,
        "tokens_seen": step * tokens_per_step, "tokens_budget": run.budget, "wall_time_s": wall,
        "stopped_early": run.stopped_early,
        "tokens_per_s": (step * tokens_per_step - tokens_seen_start) / max(wall, 1e-9),
        "final": run.last_eval, "dtype": str(run.amp_dtype or torch.float32),
        "seed": run.tcfg.seed, "layer_plan": [list(p) for p in run.model.plan],
        "flops_per_token": run.model.flops_per_token(run.seq_len),
        "provenance": provenance(run.device),
    }
    if error is not None:
        summary["error"] = error
    return summary


def _finish(run: _Run, summary: dict[str, Any], outcome: dict[str, bool]) -> None:
    """Write summary.json and the run's train record (once the run ended), ship the artifacts
    to the logger and close it. Rank 0 only."""
    status, error, last_eval = summary["status"], summary.get("error"), run.last_eval
    if status != "running":
        write_json_atomic(run.run_dir / "summary.json", summary)
        record = {"kind": "train", **{k: summary[k] for k in (
            "run", "arch", "size", "status", "tokens_seen", "wall_time_s", "tokens_per_s",
            "param_counts", "kernel_paths", "seed", "tokenizer", "dtype", "tokens_budget",
            "stopped_early")},
            "val_loss": last_eval.get("loss"), "val_bpb": last_eval.get("bpb"),
            "val_accuracy": last_eval.get("accuracy"), "seq_len": run.seq_len,
            "provenance": summary["provenance"]}
        if error is not None:
            record["error"] = error
        append_jsonl(run.run_dir / "records.jsonl", record)
        outcome["recorded"] = True
    for name in ("summary.json", "metrics.jsonl", "records.jsonl"):
        if (run.run_dir / name).is_file():
            run.logger.log_artifact(run.run_dir / name)
    run.logger.close("FINISHED" if status == "finished" else "FAILED")


def _run_training(cfg: DictConfig, run_dir: str | Path, outcome: dict[str, bool]
                  ) -> dict[str, Any]:
    run = _setup(cfg, Path(run_dir))
    _resume(run)
    _start_logging(run)
    started = time.time()
    tokens_seen_start = run.step * run.tokens_per_step
    status, error = "running", None
    summary: dict[str, Any] = {}
    bar = progress_bar(run.last_step, run.step, cfg.arch.name, run.tcfg.progress and run.is_main)
    try:
        _loop(run, bar)
        status = "finished"
    except TrainingDiverged as exc:
        status, error = "diverged", error_text(exc)
        raise
    except Exception as exc:
        status, error = "failed", error_text(exc)
        raise
    finally:
        bar.close()
        if run.is_main:
            summary = _summary(run, status, error, time.time() - started, tokens_seen_start)
            _finish(run, summary, outcome)
        dist_utils.teardown(run.dist)
    return summary
