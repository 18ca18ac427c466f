"""The one shape of an evaluation record, so the report builder reads every evaluator the same way.

Every evaluator appends JSON lines to `<run dir>/records.jsonl` (or the file given by
`eval.records`), one line per (evaluation, metric, setting). Fields:

    kind        "eval" (training writes "train" records to the same file)
    eval        which evaluation: "bpb", "extrapolation", "mqar", "mad", "induction",
                "selective_copying", "passkey", "lm_eval", ... (for synthetic tasks: the task name)
    metric      what `value` measures:
                  bpb / extrapolation: "loss" (nats per token), "bpb" (bits per UTF-8 byte),
                                       "loss_bucket" (one record per position bucket),
                                       "loss_beyond_train" (positions past the training context)
                  synthetic tasks:     "accuracy" (argmax on answer positions, token level),
                                       "exact_match" (all answers of an example right),
                                       "loss" (nats per answer token)
                  lm_eval:             the harness's metric name ("acc", "bits_per_byte", ...)
    value       a float, or null when `status` is not "ok"
    status      "ok" | "not_supported" (e.g. learned positions past their limit) | "oom" |
                "nonfinite" (the harness returned inf / nan, e.g. an overflowing perplexity) |
                "failed" (the evaluation raised; metric "error", reason holds the error)
    reason      why, when status is not "ok"
    params      the setting: task parameters (seq_len, num_kv_pairs, vocab_size, depth, ...),
                the evaluation context (`context`, `multiple`), position bucket (`start`, `end`),
                lm-eval task and filter, MAD setting id; everything a plot groups by
    n           how many examples / tokens / answer positions the value averages over
    stderr      standard error of `value` where it is known (accuracy, lm-eval), else absent
    primary     synthetic tasks: True on the task's headline metric (accuracy for MQAR / MAD /
                induction / copying, exact_match for passkey)
    windows     bpb/bpb only: {"nats", "tokens", "bytes"}, one entry per validation window in
                order (the same first windows for every backbone), so the report can pair
                backbones window by window (evaluate/stats.py paired bootstrap)
    correct     synthetic accuracy only: right answers of each test example, in order (the same
                examples for every backbone), for the same pairing
    ckpt        checkpoint folder that was evaluated
    run         run name (the run directory's name)
    arch        backbone name (arch.name)
    tokenizer   tokenizer identity (a content hash; fairness rule 1)
    train       what the report groups best-of-sweep by: {"d_model", "n_layers", "lr", "seed",
                "seq_len", "size", "step", "params_non_embedding", "task", "task_params"}
    provenance  archbench.provenance.provenance(device): code version, libraries, device, command

Grouping helpers (`best_per_group`) implement "best run per cell": the MQAR grid takes the best
learning rate per (arch, seq_len, num_kv_pairs, d_model), the MAD score the best per setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from archbench.io import append_jsonl
from archbench.provenance import provenance

STATUSES = ("ok", "not_supported", "oom", "nonfinite", "failed")


class EvalContext:
    """What every record of one evaluated checkpoint shares (who, what, where)."""

    def __init__(self, ckpt: str | Path | None, run: str | None, arch: str | None,
                 tokenizer: str | None, train: dict[str, Any] | None = None,
                 device: Any = None) -> None:
        self.ckpt = None if ckpt is None else str(ckpt)
        self.run, self.arch, self.tokenizer = run, arch, tokenizer
        self.train = dict(train or {})
        self.provenance = provenance(device)

    @classmethod
    def from_checkpoint(cls, ckpt: Path, state: dict[str, Any], device: Any = None) -> EvalContext:
        """Fill run, arch and the training settings from a checkpoint's saved state."""
        config = state.get("config") or {}
        train = config.get("train") or {}
        data = config.get("data") or {}
        arch = state.get("arch") or {}
        counts = state.get("param_counts") or {}
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
        task = data.get("task") if data.get("source") == "task" else None
        info = {
            "d_model": arch.get("d_model"), "n_layers": arch.get("n_layers"),
            "lr": train.get("lr"), "seed": train.get("seed"), "seq_len": train.get("seq_len"),
            "weight_decay": train.get("weight_decay"),
            "size": (config.get("size") or {}).get("name"), "step": state.get("step"),
            "params_non_embedding": counts.get("non_embedding"),
            "task": task.get("name") if task else None,
            "task_params": task.get("params") if task else None,
        }
        return cls(ckpt, run_dir.name, arch.get("name"), state.get("tokenizer"), info, device)


def make_record(ctx: EvalContext | None, eval_name: str, metric: str, value: float | None, *,
                params: dict[str, Any] | None = None, n: int | None = None,
                stderr: float | None = None, status: str = "ok", reason: str | None = None,
                **extra: Any) -> dict[str, Any]:
    """One record in the documented shape; a non-finite value is refused (it would plot as 0)."""
    if status not in STATUSES:
        raise ValueError(f"record status {status!r} is not one of {STATUSES}")
    if status == "ok":
        if value is None or not math.isfinite(float(value)):
            raise ValueError(f"{eval_name}/{metric}: value {value!r} is not a finite number")
        value = float(value)
    elif reason is None:
        raise ValueError(f"{eval_name}/{metric}: status {status!r} needs a reason")
    record: dict[str, Any] = {
        "kind": "eval", "eval": eval_name, "metric": metric, "value": value, "status": status,
        "params": dict(params or {}),
        "ckpt": ctx.ckpt if ctx else None, "run": ctx.run if ctx else None,
        "arch": ctx.arch if ctx else None, "tokenizer": ctx.tokenizer if ctx else None,
        "train": ctx.train if ctx else {},
        "provenance": ctx.provenance if ctx else provenance(),
    }
    if n is not None:
        record["n"] = int(n)
    if stderr is not None:
        record["stderr"] = float(stderr)
    if reason is not None:
        record["reason"] = reason
    record.update(extra)
    return record


def write_records(records: Iterable[dict[str, Any]], path: str | Path) -> int:
    count = 0
    for record in records:
        append_jsonl(path, record)
        count += 1
    return count


def _key(record: dict[str, Any], field: str) -> Any:
    """A dotted field ("params.seq_len", "train.d_model") of a record, hashable."""
    value: Any = record
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return tuple(value) if isinstance(value, list) else value


def best_per_group(records: Iterable[dict[str, Any]], group_by: list[str], metric: str,
                   better: Callable[[float, float], bool] = lambda a, b: a > b,
                   ) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The best record (by `better`) of `metric` in each group: "best run per cell" of a sweep,
    where the runs of one group differ only in what was swept over (learning rate, seed)."""
    best: dict[tuple[Any, ...], dict[str, Any]] = {}
    for record in records:
        if record.get("kind") != "eval" or record.get("metric") != metric:
            continue
        if record.get("status", "ok") != "ok":
            continue
        key = tuple(_key(record, f) for f in group_by)
        if key not in best or better(record["value"], best[key]["value"]):
            best[key] = record
    return best
