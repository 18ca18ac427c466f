"""Loss, bits per byte, loss by position, length extrapolation, and exact scoring of sequences.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the predicted tokens, so
models with different tokenizers can be compared (docs/design.md, fairness rule 6). Windows of
synthetic tasks ((B, 2, T+1), see train/tasks/base.py) are scored on their answer positions only.

`score_continuations` is the one primitive behind lm-eval's loglikelihood, rolling perplexity and
our own document scoring: batches are right-padded, and a causal model never looks right, so a
padded batch gives each row exactly what it would get alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from archbench.train.data import PathCorpus, TokenSplit
from archbench.train.metrics import autocast_for, split_metrics
from archbench.train.tasks.base import position_limit

LOGITS_BUDGET = 1 << 30  # bytes of fp32 logits one forward may hold; batches shrink to fit


def file_split(path: str | Path, tokenizer: Any, text_field: str = "text") -> TokenSplit:
    """All of a text / JSONL / Parquet file (or folder) as one split: EOS after every document,
    as the data layer lays out corpora."""
    corpus = PathCorpus(path, text_field)
    parts: list[np.ndarray] = []
    n_bytes = n_docs = 0
    for _, text in corpus.documents():
        parts.append(np.asarray(tokenizer.encode(text) + [tokenizer.eos_id], dtype=np.int64))
        n_bytes += len(text.encode("utf-8", "surrogatepass"))
        n_docs += 1
    return TokenSplit(np.concatenate(parts), n_bytes, n_docs)


def extrapolation_metrics(
    model: torch.nn.Module,
    split: TokenSplit,
    train_seq_len: int,
    multiples: Sequence[int],
    batch_size: int,
    token_bytes: np.ndarray,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    position_buckets: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """Loss and bpb at k x the training context, about the same number of tokens at every k.

    A model with learned absolute positions cannot read past its table: that multiple is
    reported as status "not_supported", never as a crash. `loss_beyond_train` is the loss on the
    positions past the training context (k > 1 only): the part that extrapolates.
    """
    out = []
    limit = position_limit(model)
    windows_at_1 = (max_batches or 32) * batch_size
    for k in multiples:
        context = int(k) * int(train_seq_len)
        entry: dict[str, Any] = {"multiple": int(k), "context": context}
        if limit is not None and context > limit:
            entry.update(status="not_supported",
                         reason=f"learned absolute positions end at {limit} tokens")
            out.append(entry)
            continue
        rows = max(1, batch_size // int(k))
        n_win = max(1, windows_at_1 // int(k))
        available = split.n_windows(context)
        if available == 0:
            entry.update(status="not_supported",
                         reason=f"the split holds fewer than {context + 1} tokens")
            out.append(entry)
            continue
        buckets = max(position_buckets, 0)
        if k > 1:  # a bucket edge at the training context gives the beyond-train loss exactly
            buckets = max(buckets, 1)
        try:
            metrics = split_metrics(model, split, context, rows, token_bytes, None, device,
                                    _aligned_buckets(buckets, int(k)), autocast_dtype,
                                    max_windows=n_win)
        except torch.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            entry.update(status="oom", reason=str(exc).splitlines()[0])
            out.append(entry)
            continue
        entry.update(status="ok", **metrics)
        if k > 1:
            beyond = [b for b in metrics["position_buckets"] if b["start"] >= train_seq_len]
            nats, count = sum(b["nats"] for b in beyond), sum(b["tokens"] for b in beyond)
            entry["loss_beyond_train"] = nats / count if count else None
        out.append(entry)
    return out


def _aligned_buckets(requested: int, multiple: int) -> int:
    """A bucket count that puts an edge on the training context (a multiple of k)."""
    if requested <= 0:
        return 0
    return int(math.ceil(requested / multiple) * multiple)


# ---- exact scoring of given sequences ----------------------------------------------------------
@torch.no_grad()
def score_continuations(
    model: torch.nn.Module,
    items: Sequence[tuple[Sequence[int], int]],
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    pad_id: int = 0,
) -> list[tuple[float, bool, int]]:
    """For each (tokens, n): the summed log-probability of the last n tokens given everything
    before them, whether each of them is the argmax (greedy), and n.

    Rows are sorted by length and right-padded into batches; results come back in input order.
    """
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    results: list[tuple[float, bool, int]] = [(0.0, False, 0)] * len(items)
    vocab = getattr(model, "vocab_size", 1)
    was_training = model.training
    model.eval()
    i = 0
    while i < len(order):
        longest = len(items[order[i]][0]) - 1
        rows = max(1, min(batch_size, LOGITS_BUDGET // max(1, longest * vocab * 4)))
        chunk = order[i:i + rows]
        i += rows
        x = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        for r, idx in enumerate(chunk):
            tokens, n = items[idx]
            if n < 1 or n >= len(tokens):
                raise ValueError(f"cannot score the last {n} of {len(tokens)} tokens: the first "
                                 "token has no prediction")
            x[r, :len(tokens) - 1] = torch.as_tensor(tokens[:-1], dtype=torch.long)
        with autocast_for(device, autocast_dtype):
            logits = model(x.to(device))
        logp = torch.log_softmax(logits.float(), dim=-1)
        for r, idx in enumerate(chunk):
            tokens, n = items[idx]
            length = len(tokens) - 1
            gold = torch.as_tensor(tokens[-n:], dtype=torch.long, device=logp.device)
            rows_lp = logp[r, length - n:length]
            total = float(rows_lp.gather(-1, gold[:, None]).sum())
            greedy = bool((rows_lp.argmax(-1) == gold).all())
            results[idx] = (total, greedy, n)
    model.train(was_training)
    return results


def rolling_windows(tokens: Sequence[int], prefix_id: int,
                    max_length: int | None) -> list[tuple[list[int], int]]:
    """Every token of a document predicted exactly once, each with as much context as fits:
    (window, number of scored tokens at its end). The first token is predicted from `prefix_id`
    (EOS: the document boundary the model saw in training)."""
    full = [prefix_id, *tokens]
    n = len(tokens)
    if max_length is None or n <= max_length:
        return [(full, n)] if n else []
    out = []
    for a in range(0, n, max_length):
        b = min(a + max_length, n)
        out.append((full[max(0, b - max_length):b + 1], b - a))
    return out


def document_logprobs(model: torch.nn.Module, docs: Sequence[Sequence[int]], prefix_id: int,
                      max_length: int | None = None, batch_size: int = 8,
                      device: torch.device | str = "cpu",
                      autocast_dtype: torch.dtype | None = None) -> list[float]:
    """Summed log-probability (nats) of each document, scored on its own (lm-eval's rolling
    log-likelihood)."""
    items: list[tuple[list[int], int]] = []
    owner: list[int] = []
    for d, tokens in enumerate(docs):
        for window in rolling_windows(tokens, prefix_id, max_length):
            items.append(window)
            owner.append(d)
    scores = score_continuations(model, items, batch_size, device, autocast_dtype)
    totals = [0.0] * len(docs)
    for d, (lp, _, _) in zip(owner, scores):
        totals[d] += lp
    return totals


def text_bpb(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str],
             max_length: int | None = None, batch_size: int = 8,
             device: torch.device | str = "cpu") -> dict[str, Any]:
    """Bits per UTF-8 byte of documents each scored alone from an EOS prefix (the same number the
    lm-eval `bits_per_byte` metric gives for a loglikelihood_rolling task)."""
    docs = [tokenizer.encode(t) for t in texts]
    lps = document_logprobs(model, docs, tokenizer.eos_id, max_length, batch_size, device)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(d) for d in docs)
    nats = -sum(lps)
    return {"bpb": nats / math.log(2) / n_bytes, "loss": nats / max(n_tokens, 1),
            "bytes": n_bytes, "tokens": n_tokens, "docs": len(texts)}
