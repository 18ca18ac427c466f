"""Synthetic tasks: a registry, training data for the data layer, and what the trainer needs.

Training on a task (`data.source=task`, `data.task.name=NAME`, `data.task.params={...}`):
`task_token_data` returns a TokenData whose splits are `TaskSplit`s and whose meta says

    vocab_size       the task's own token ids run up to this; the model is built with
                     max(tokenizer.vocab_size, meta["vocab_size"])
    seq_len          every example fits this many input tokens: train.seq_len must be >= it
                     (equal is exact; longer windows are right-padded and masked)
    targets_masked   True: windows are (B, 2, T+1) and `task_targets` splits them into inputs
                     and targets, with targets = -100 (ignore_index) off the answer positions
    ignore_index     -100
    train_on         "answers" (loss on answers only) or "all" (every next token, MAD recall)
    task             name, params, n_train, n_val, seed, setting: what made the data

The "mad" name reaches the MAD suite's settings: `params.setting="noisy_recall/frac_noise:0.4"`
picks the task, its parameters and its training-set size (train/tasks/mad.py).
"""

from __future__ import annotations

from typing import Any

import torch

from archbench.train.data import TokenData
from archbench.train.tasks.base import (
    IGNORE,
    Example,
    Task,
    TaskSplit,
    position_limit,
    score_examples,
    split_windows,
)
from archbench.train.tasks.copying import InductionHeads, SelectiveCopying
from archbench.train.tasks.mad import (
    MAD_TEST_EXAMPLES,
    Compression,
    FuzzyRecall,
    InContextRecall,
    Memorization,
    NoisyRecall,
    resolve_setting,
)
from archbench.train.tasks.mqar import MQAR
from archbench.train.tasks.passkey import Passkey
from archbench.train.tasks.recall import AssociativeRecall

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (MQAR, InContextRecall, NoisyRecall, FuzzyRecall, SelectiveCopying, Compression,
                Memorization, InductionHeads, Passkey, AssociativeRecall)
}
SUITES = ("mad",)


def task_names() -> list[str]:
    return [*TASKS, *SUITES]


def resolve(name: str, params: dict[str, Any] | None) -> tuple[str, dict[str, Any], int | None]:
    """(task name, its params, training-set size from a suite setting or None)."""
    params = dict(params or {})
    if name == "mad":
        setting = params.pop("setting", None)
        if setting is None:
            raise ValueError("data.task.name=mad needs params.setting, e.g. "
                             "'in_context_recall/baseline' (see train/tasks/mad.py)")
        task, base, n_train = resolve_setting(setting)
        return task, {**base, **params}, n_train
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks are {task_names()}")
    return name, params, None


def make_task(name: str, params: dict[str, Any] | None = None, tokenizer: Any = None,
              split: str = "train") -> Task:
    task, resolved, _ = resolve(name, params)
    return TASKS[task](resolved, tokenizer=tokenizer, split=split)


def _plain(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(params):
            return OmegaConf.to_container(params, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(params)


def task_token_data(task_cfg: Any, tokenizer: Any) -> TokenData:
    """Training and validation splits of a synthetic task, drawn lazily per example."""
    params = _plain(task_cfg.params)
    name, resolved, suite_n_train = resolve(task_cfg.name, params)
    seed = int(getattr(task_cfg, "seed", 0) or 0)
    n_train = suite_n_train if suite_n_train is not None else int(task_cfg.n_train)
    n_val = MAD_TEST_EXAMPLES if task_cfg.name == "mad" else int(task_cfg.n_val)
    train_task = TASKS[name](resolved, tokenizer=tokenizer, split="train")
    val_task = TASKS[name](resolved, tokenizer=tokenizer, split="val")
    train = TaskSplit(train_task, n_train, seed, use_lm_targets=train_task.train_on == "all")
    val = TaskSplit(val_task, n_val, seed, use_lm_targets=False)
    meta = {
        "vocab_size": train_task.vocab_size, "seq_len": train_task.seq_len,
        "targets_masked": True, "ignore_index": IGNORE, "train_on": train_task.train_on,
        "task": {"name": name, "suite": task_cfg.name if task_cfg.name in SUITES else None,
                 "setting": params.get("setting"), "params": train_task.params,
                 "n_train": n_train, "n_val": n_val, "seed": seed},
    }
    return TokenData(train=train, val=val, meta=meta)


def task_targets(data: TokenData | None,
                 windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a batch of task windows; targets are -100 where no loss applies."""
    if windows.ndim != 3 or windows.shape[1] != 2:
        raise ValueError(f"task windows are (B, 2, T+1); got shape {tuple(windows.shape)}")
    return split_windows(windows)


__all__ = ["IGNORE", "TASKS", "Example", "Task", "TaskSplit", "make_task", "position_limit",
           "resolve", "score_examples", "split_windows", "task_names", "task_targets",
           "task_token_data"]
