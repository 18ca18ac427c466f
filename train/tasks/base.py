"""What every synthetic task shares: seeded examples, answer masks, a data-layer split, scoring.

An example is (inputs, targets, lm_targets), three aligned int arrays of one length <= seq_len:
the model reads `inputs`; at position t it is scored against `targets[t]` when that is not
IGNORE (-100): the answer positions. `lm_targets` is what training fits when the reference
trains on every next token (MAD's recall tasks); otherwise training fits `targets` as well.

Example i of a split is drawn from its own generator, seeded by (seed, split, i): it does not
depend on how many examples are drawn, the splits never share a stream, and any example can be
made again alone (the data layer draws them lazily, so a 100k-example task costs no memory).
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from archbench.train.data import DataError, TokenSplit

IGNORE = -100
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass
class Example:
    inputs: np.ndarray
    targets: np.ndarray
    lm_targets: np.ndarray | None = None


class Task:
    """A seeded generator of one synthetic task at fixed parameters.

    Subclasses set `name`, `defaults` (every parameter a user may set), optionally `settings`
    (named parameter sets: a reference grid), and implement `check` and `example`.
    """

    name: ClassVar[str] = "task"
    defaults: ClassVar[dict[str, Any]] = {}
    settings: ClassVar[dict[str, dict[str, Any]]] = {}
    train_on: ClassVar[str] = "answers"  # "answers" | "all" (every next token, as MAD's recall)
    primary_metric: ClassVar[str] = "accuracy"
    needs_tokenizer: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any] | None = None, tokenizer: Any = None,
                 split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
        params = dict(params or {})
        setting = params.pop("setting", None)
        merged = dict(self.defaults)
        if setting is not None:
            if setting not in self.settings:
                raise ValueError(f"task {self.name}: unknown setting {setting!r}; "
                                 f"choose one of {sorted(self.settings)}")
            merged.update(self.settings[setting])
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(f"task {self.name}: unknown parameter(s) {unknown}; "
                             f"parameters are {sorted(self.defaults)}")
        merged.update(params)
        if self.needs_tokenizer and tokenizer is None:
            raise ValueError(f"task {self.name} is made of text and needs a tokenizer")
        self.params = merged
        self.setting = setting
        self.tokenizer = tokenizer
        self.split = split
        self.check()

    # ---- what subclasses provide -----------------------------------------------------------------
    def check(self) -> None:
        """Raise ValueError naming the parameter when the setting cannot make valid examples."""

    def example(self, rng: np.random.Generator) -> Example:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return int(self.params["vocab_size"])

    # ---- shared ----------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        """Inputs of every example fit in this many tokens (shorter ones are right-padded)."""
        return int(self.params["seq_len"])

    def describe(self) -> dict[str, Any]:
        out = {"task": self.name, **self.params}
        if self.setting is not None:
            out["setting"] = self.setting
        return out

    def draw(self, index: int, seed: int, split: str | None = None) -> Example:
        rng = np.random.default_rng([int(seed), SPLITS[split or self.split], int(index)])
        ex = self.example(rng)
        if len(ex.inputs) > self.seq_len:
            raise AssertionError(f"{self.name}: example of {len(ex.inputs)} tokens exceeds "
                                 f"seq_len={self.seq_len}")
        return ex

    def batch(self, indices: range | list[int] | np.ndarray, seed: int, length: int | None = None,
              lm: bool = False, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each (len(indices), length), right-padded with token 0 / IGNORE.

        Right padding never changes an answer: a causal model does not look right.
        """
        length = self.seq_len if length is None else length
        inputs = np.zeros((len(indices), length), dtype=np.int64)
        targets = np.full((len(indices), length), IGNORE, dtype=np.int64)
        for row, index in enumerate(indices):
            ex = self.draw(int(index), seed, split)
            n = len(ex.inputs)
            if n > length:
                raise DataError(f"task {self.name} makes sequences of up to {self.seq_len} "
                                f"tokens; a window of {length} cannot hold them")
            inputs[row, :n] = ex.inputs
            use = ex.lm_targets if lm and ex.lm_targets is not None else ex.targets
            targets[row, :n] = use
        return inputs, targets


def parse_value(text: str) -> Any:
    """'32' -> 32, '0.4' -> 0.4, 'true' -> True, anything else stays a string."""
    lowered = {"true": "True", "false": "False", "null": "None"}.get(text.lower(), text)
    try:
        return ast.literal_eval(lowered)
    except (ValueError, SyntaxError):
        return text


class TaskSplit(TokenSplit):
    """A split of a synthetic task, seen by the data layer as windows of token ids.

    `windows(indices, seq_len)` gives (B, 2, seq_len + 1): row 0 holds the inputs, row 1 the
    targets one step to the right, so `inputs = w[:, 0, :-1]` and `targets = w[:, 1, 1:]` line
    up exactly as `w[:, :-1], w[:, 1:]` do for text (see `task_targets`). Targets are IGNORE
    (-100) wherever the loss must not look.
    """

    def __init__(self, task: Task, n: int, seed: int, use_lm_targets: bool) -> None:
        super().__init__(tokens=np.zeros(0, dtype=np.int64), n_bytes=0, n_docs=int(n))
        if n < 1:
            raise DataError(f"task {task.name}: a split needs at least one example (got {n})")
        self.task, self.n, self.seed = task, int(n), int(seed)
        self.use_lm_targets = use_lm_targets

    def __len__(self) -> int:
        return self.n * self.task.seq_len

    def n_windows(self, seq_len: int) -> int:
        if seq_len < self.task.seq_len:
            raise DataError(f"task {self.task.name} makes sequences of {self.task.seq_len} "
                            f"tokens; set train.seq_len={self.task.seq_len} (got {seq_len})")
        return self.n

    def window(self, index: int, seq_len: int) -> np.ndarray:
        return self.windows([index], seq_len)[0].numpy()

    def windows(self, indices: list[int] | np.ndarray | range, seq_len: int) -> torch.Tensor:
        self.n_windows(seq_len)
        if len(indices) and (min(indices) < 0 or max(indices) >= self.n):
            raise IndexError(f"task split holds {self.n} examples; asked for {list(indices)[:4]}")
        inputs, targets = self.task.batch(indices, self.seed, seq_len, lm=self.use_lm_targets)
        out = torch.full((len(indices), 2, seq_len + 1), IGNORE, dtype=torch.long)
        out[:, 0, :-1] = torch.from_numpy(inputs)
        out[:, 0, -1] = 0
        out[:, 1, 1:] = torch.from_numpy(targets)
        return out


def split_windows(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of text windows (B, T+1) or task windows (B, 2, T+1)."""
    if windows.ndim == 3:
        return windows[:, 0, :-1], windows[:, 1, 1:]
    return windows[:, :-1], windows[:, 1:]


def position_limit(model: torch.nn.Module) -> int | None:
    """The longest context the model can read: learned absolute positions end somewhere."""
    pos = getattr(model, "pos_embed", None)
    return None if pos is None else int(pos.num_embeddings)


@torch.no_grad()
def score_examples(model: torch.nn.Module, inputs: np.ndarray | torch.Tensor,
                   targets: np.ndarray | torch.Tensor, batch_size: int = 16,
                   device: torch.device | str = "cpu",
                   autocast_dtype: torch.dtype | None = None,
                   logits_budget_bytes: int = 1 << 30) -> dict[str, Any]:
    """Exact accuracy and loss on the answer positions only (targets != IGNORE).

    `accuracy` is token level (the argmax equals the answer), `exact_match` counts examples whose
    every answer is right (equivalently: greedy decoding of the answers from the true prefix
    reproduces them), `loss` is nats per answer token. `correct_per_example` (right answers of
    each example, in order) lets two models scored on the same examples be compared example by
    example (a paired bootstrap in the report).
    """
    inputs = torch.as_tensor(inputs, dtype=torch.long)
    targets = torch.as_tensor(targets, dtype=torch.long)
    n, length = inputs.shape
    vocab = getattr(model, "vocab_size", None)
    if vocab is not None and int(inputs.max()) >= vocab:
        raise ValueError(f"task token {int(inputs.max())} is outside the model's vocabulary of "
                         f"{vocab}; train with the task's vocab_size")
    per_row = max(1, length * (vocab or 1) * 4)
    rows = max(1, min(batch_size, logits_budget_bytes // per_row))
    was_training = model.training
    model.eval()
    correct = answers = 0
    nll = 0.0
    exact = with_answers = 0
    per_example: list[int] = []
    dev = torch.device(device)
    for start in range(0, n, rows):
        x = inputs[start:start + rows].to(dev)
        y = targets[start:start + rows].to(dev)
        with torch.autocast(device_type=dev.type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            logits = model(x)
        mask = y != IGNORE
        picked = logits[mask].float()
        gold = y[mask]
        nll += float(F.cross_entropy(picked, gold, reduction="sum"))
        hit = picked.argmax(-1) == gold
        correct += int(hit.sum())
        answers += int(mask.sum())
        per_row_hits = torch.zeros_like(y, dtype=torch.bool)
        per_row_hits[mask] = hit
        per_example += per_row_hits.sum(1).tolist()
        row_has = mask.any(1)
        row_ok = (per_row_hits | ~mask).all(1) & row_has
        exact += int(row_ok.sum())
        with_answers += int(row_has.sum())
    model.train(was_training)
    if answers == 0:
        raise ValueError("no answer positions to score (every target is IGNORE)")
    acc = correct / answers
    em = exact / with_answers
    return {
        "accuracy": acc, "accuracy_stderr": math.sqrt(acc * (1 - acc) / answers),
        "exact_match": em, "exact_match_stderr": math.sqrt(em * (1 - em) / with_answers),
        "loss": nll / answers, "n_answers": answers, "n_examples": with_answers,
        "correct_per_example": per_example,
    }
