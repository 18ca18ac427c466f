"""Loss, bits per byte and loss by position over token windows.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the predicted tokens, so
models with different tokenizers can be compared (DESIGN.md fairness rule 6).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from archbench.train.data import TokenSplit


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
) -> dict[str, Any]:
    """Mean loss (nats/token), bits per byte and, optionally, loss per position bucket over the
    first windows of `split` in order (deterministic, the same for every backbone)."""
    n_windows = split.n_windows(seq_len)
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    if n_windows == 0:
        raise ValueError(f"the split holds fewer than {seq_len + 1} tokens: no window to score")
    was_training = model.training
    model.eval()
    byte_table = torch.as_tensor(token_bytes, dtype=torch.float64)
    total_nats = 0.0
    total_tokens = 0
    total_bytes = 0.0
    bucket_edges = np.linspace(0, seq_len, position_buckets + 1).astype(int) if position_buckets \
        else None
    bucket_nats = np.zeros(max(position_buckets, 0))
    bucket_count = np.zeros(max(position_buckets, 0))
    for start in range(0, n_windows, batch_size):
        windows = split.windows(range(start, min(start + batch_size, n_windows)), seq_len)
        windows = windows.to(device)
        inputs, targets = windows[:, :-1], windows[:, 1:]
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            logits = model(inputs)
        nats = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                               reduction="none").view_as(targets).double().cpu()
        total_nats += float(nats.sum())
        total_tokens += targets.numel()
        total_bytes += float(byte_table[targets.cpu()].sum())
        if bucket_edges is not None:
            per_pos = nats.sum(0).numpy()
            for b in range(position_buckets):
                lo, hi = bucket_edges[b], bucket_edges[b + 1]
                bucket_nats[b] += per_pos[lo:hi].sum()
                bucket_count[b] += (hi - lo) * targets.shape[0]
    model.train(was_training)
    out: dict[str, Any] = {
        "loss": total_nats / total_tokens,
        "bpb": total_nats / math.log(2) / max(total_bytes, 1.0),
        "tokens": total_tokens,
        "bytes": int(total_bytes),
    }
    if bucket_edges is not None:
        out["position_buckets"] = [
            {"start": int(bucket_edges[b]), "end": int(bucket_edges[b + 1]),
             "loss": float(bucket_nats[b] / max(bucket_count[b], 1)),
             "nats": float(bucket_nats[b]), "tokens": int(bucket_count[b])}
            for b in range(position_buckets)
        ]
    return out
