"""Validation metrics of the training loop, shared with the quality evaluators.

The trainer's periodic validation and `archbench eval`'s bits per byte must be the same
computation, or a run's logged bpb and its evaluated bpb would disagree; so the one loss / bits
per byte / loss-by-position routine lives here, in the training package, and evaluation imports
it (never the other way round). Bits per byte divides the summed loss in bits by the UTF-8 bytes
of the predicted tokens, so models with different tokenizers can be compared.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from archbench.train.data import TokenSplit
from archbench.train.tasks.base import IGNORE, split_windows


def padded_token_bytes(tokenizer: Any, vocab_size: int) -> np.ndarray:
    """The UTF-8 byte length of every token id up to `vocab_size`. A synthetic task's ids beyond
    the tokenizer's vocabulary are not text; each counts as one unit, so bits per byte stays
    defined (it is then bits per task token)."""
    table = tokenizer.token_bytes()
    extra = vocab_size - len(table)
    return np.concatenate([table, np.ones(extra, dtype=np.int64)]) if extra > 0 else table


def autocast_for(device: torch.device | str, dtype: torch.dtype | None) -> Any:
    """Autocast to `dtype` on `device`, or a no-op context when `dtype` is None (full precision)."""
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype,
                          enabled=dtype is not None)


@torch.no_grad()
def split_metrics(
    model: torch.nn.Module,
    split: TokenSplit,
    seq_len: int,
    batch_size: int,
    token_bytes: np.ndarray,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    position_buckets: int = 0,
    autocast_dtype: torch.dtype | None = None,
    max_windows: int | None = None,
    per_window: bool = False,
) -> dict[str, Any]:
    """Mean loss (nats/token), bits per byte and, optionally, loss per position bucket over the
    first windows of `split` in order (deterministic, the same for every backbone).

    Buckets split the window positions into `position_buckets` equal ranges; their `nats` sum to
    the total and their `tokens` to the count. On task splits, only answer positions count and
    `accuracy` (argmax on the answers) is added.

    `per_window=True` adds `window_nats`, `window_tokens` and `window_bytes` (one entry per
    window, in order): two models scored on the same windows can then be compared window by
    window (a paired bootstrap, evaluate/stats.py), which sees far smaller gaps than two means.
    """
    n_windows = split.n_windows(seq_len)
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"the split holds fewer than {seq_len + 1} tokens: no window to score")
    was_training = model.training
    model.eval()
    byte_table = torch.as_tensor(token_bytes, dtype=torch.float64)
    total_nats, total_tokens, total_bytes, correct = 0.0, 0, 0.0, 0
    masked = False
    edges = ((np.arange(position_buckets + 1) * seq_len) // position_buckets
             if position_buckets else None)
    bucket_nats = np.zeros(max(position_buckets, 0))
    bucket_count = np.zeros(max(position_buckets, 0), dtype=np.int64)
    window_nats: list[float] = []
    window_tokens: list[int] = []
    window_bytes: list[float] = []
    for start in range(0, n_windows, batch_size):
        windows = split.windows(range(start, min(start + batch_size, n_windows)), seq_len)
        inputs, targets = split_windows(windows.to(device))
        masked = masked or windows.ndim == 3
        with autocast_for(device, autocast_dtype):
            logits = model(inputs)
        flat = logits.float().flatten(0, 1)
        nats = F.cross_entropy(flat, targets.flatten(), reduction="none",
                               ignore_index=IGNORE).view_as(targets).double().cpu()
        keep = (targets != IGNORE).cpu()
        total_nats += float(nats.sum())
        total_tokens += int(keep.sum())
        gold = targets.cpu()[keep]
        if per_window:
            window_nats += nats.sum(1).tolist()
            window_tokens += keep.sum(1).tolist()
            window_bytes += (byte_table[targets.cpu().clamp(0, max(len(byte_table) - 1, 0))]
                             * keep).sum(1).tolist() if len(byte_table) else [0.0] * len(keep)
        if len(byte_table) and len(gold):
            if int(gold.max()) >= len(byte_table):
                raise ValueError(f"token {int(gold.max())} has no byte length: token_bytes covers "
                                 f"{len(byte_table)} ids")
            total_bytes += float(byte_table[gold].sum())
        if masked:
            correct += int((flat.argmax(-1).view_as(targets) == targets)[targets != IGNORE].sum())
        if edges is not None:
            per_pos = nats.sum(0).numpy()
            per_count = keep.sum(0).numpy()
            for b in range(position_buckets):
                lo, hi = edges[b], edges[b + 1]
                bucket_nats[b] += per_pos[lo:hi].sum()
                bucket_count[b] += per_count[lo:hi].sum()
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("no scored positions in the windows")
    out: dict[str, Any] = {
        "loss": total_nats / total_tokens,
        "bpb": total_nats / math.log(2) / max(total_bytes, 1.0),
        "tokens": total_tokens,
        "bytes": int(total_bytes),
        "nats": total_nats,
        "windows": n_windows,
    }
    if masked:
        out["accuracy"] = correct / total_tokens
    if per_window:
        out.update(window_nats=window_nats, window_tokens=window_tokens,
                   window_bytes=window_bytes)
    if edges is not None:
        out["position_buckets"] = [
            {"start": int(edges[b]), "end": int(edges[b + 1]),
             "loss": float(bucket_nats[b] / bucket_count[b]) if bucket_count[b] else None,
             "nats": float(bucket_nats[b]), "tokens": int(bucket_count[b])}
            for b in range(position_buckets)
        ]
    return out
