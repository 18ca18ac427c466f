"""Bits per byte by hand, position buckets, extrapolation limits, and exact sequence scoring:
a right-padded batch gives every backbone's rows what they get alone."""

from __future__ import annotations

import math
from math import lcm
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import archbench.conf
from archbench.archs.model import LanguageModel
from archbench.archs.registry import mixer_names, mlp_names
from archbench.config import expand_period
from archbench.evaluate.quality.perplexity import (
    document_logprobs,
    extrapolation_metrics,
    rolling_windows,
    score_continuations,
    split_metrics,
)
from archbench.train.data import TokenSplit
from archbench.train.tasks import IGNORE, make_task
from archbench.train.tasks.base import TaskSplit
from archbench.train.tokenizer import ByteTokenizer, train_bpe

CONF = Path(archbench.conf.__file__).parent
ARCHS = sorted(p.stem for p in (CONF / "arch").glob("*.yaml"))
TEXT = ("The quick brown fox jumps over the lazy dog; naïve café façade. " * 6
        + "def add(a, b):\n    return a + b\n" * 8)


def tiny(name: str, vocab: int, **changes: object) -> LanguageModel:
    """The arch yaml at test size (one full period of its layer pattern)."""
    arch = OmegaConf.load(CONF / "arch" / f"{name}.yaml")
    period = lcm(len(expand_period(list(arch.pattern.mixers), "m", mixer_names())),
                 len(expand_period(list(arch.pattern.mlps), "m", mlp_names())))
    small = {"d_model": 32, "n_layers": max(2, period), "init_std": 0.1,
             "attention": {"head_dim": 16}, "rwkv7": {"head_size": 16},
             "mamba": {"chunk_size": 8}, "mamba2": {"head_dim": 16, "d_state": 16,
                                                    "chunk_size": 8},
             "moe": {"n_experts": 4, "top_k": 2}}
    torch.manual_seed(0)
    return LanguageModel(OmegaConf.merge(arch, small, changes), vocab).eval()


def text_split(tokenizer, text: str = TEXT) -> TokenSplit:
    ids = tokenizer.encode(text) + [tokenizer.eos_id] + tokenizer.encode(text[::-1])
    return TokenSplit(np.asarray(ids, dtype=np.int64), len(text.encode()) * 2, 2)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_bits_per_byte_by_hand(kind: str) -> None:
    # The count by hand decodes the predicted range as text; with BPE, ASCII text keeps a window
    # edge from cutting a character in two (the byte tokenizer counts raw bytes instead).
    text = TEXT if kind == "byte" else TEXT.encode("ascii", "ignore").decode()
    tok = ByteTokenizer() if kind == "byte" else train_bpe([text] * 3, 300)
    model = tiny("transformer", tok.vocab_size)
    split = text_split(tok, text)
    seq_len, batch = 24, 3
    m = split_metrics(model, split, seq_len, batch, tok.token_bytes(), max_batches=None)
    nats = n_tokens = 0.0
    with torch.no_grad():
        for i in range(split.n_windows(seq_len)):
            w = torch.as_tensor(split.tokens[i * seq_len:i * seq_len + seq_len + 1])
            logp = torch.log_softmax(model(w[None, :-1])[0].double(), -1)
            for t in range(seq_len):
                nats -= float(logp[t, w[t + 1]])
                n_tokens += 1
    # the predicted tokens are tokens[1 : n * seq_len + 1]; their text, in UTF-8 bytes
    predicted = [int(t) for t in split.tokens[1:split.n_windows(seq_len) * seq_len + 1]]
    n_bytes = (len(tok.decode_bytes(predicted)) if kind == "byte"
               else len(tok.decode(predicted).encode("utf-8")))
    assert m["tokens"] == n_tokens and m["bytes"] == n_bytes
    assert m["loss"] == pytest.approx(nats / n_tokens, rel=1e-6)
    assert m["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)
    if kind == "bpe":
        assert m["tokens"] < m["bytes"]  # merged tokens carry several bytes each


@pytest.mark.parametrize("buckets", [4, 5])
def test_position_buckets_sum_to_the_total(buckets: int) -> None:
    tok = ByteTokenizer()
    model = tiny("transformer", tok.vocab_size)
    m = split_metrics(model, text_split(tok), 32, 4, tok.token_bytes(), None,
                      position_buckets=buckets)
    b = m["position_buckets"]
    assert len(b) == buckets and b[0]["start"] == 0 and b[-1]["end"] == 32
    assert all(x["end"] == y["start"] for x, y in zip(b, b[1:]))
    assert sum(x["tokens"] for x in b) == m["tokens"]
    assert sum(x["nats"] for x in b) == pytest.approx(m["nats"], rel=1e-9)
    assert sum(x["nats"] for x in b) / m["tokens"] == pytest.approx(m["loss"], rel=1e-9)


def test_task_windows_score_answers_only() -> None:
    task = make_task("mqar", {"vocab_size": 64, "seq_len": 16, "num_kv_pairs": 2}, split="val")
    model = tiny("transformer", 64)
    split = TaskSplit(task, 10, seed=0, use_lm_targets=False)
    m = split_metrics(model, split, 16, 4, np.ones(64, dtype=np.int64), None)
    inputs, targets = task.batch(range(10), seed=0)
    with torch.no_grad():
        logits = model(torch.as_tensor(inputs))
    mask = torch.as_tensor(targets) != IGNORE
    gold = torch.as_tensor(targets)[mask]
    nll = torch.nn.functional.cross_entropy(logits[mask], gold, reduction="sum")
    assert m["tokens"] == int(mask.sum()) == 20
    assert m["loss"] == pytest.approx(float(nll) / 20, rel=1e-5)
    assert m["accuracy"] == pytest.approx(float((logits[mask].argmax(-1) == gold).float().mean()))


def test_extrapolation_reports_learned_positions_as_not_supported() -> None:
    tok = ByteTokenizer()
    split = text_split(tok, TEXT * 3)
    gpt2 = tiny("gpt2", tok.vocab_size, attention={"head_dim": 16, "max_position": 64})
    out = extrapolation_metrics(gpt2, split, 32, [1, 2, 4], 4, tok.token_bytes(), 2)
    assert [r["status"] for r in out] == ["ok", "ok", "not_supported"]
    assert "64" in out[2]["reason"]
    rope = tiny("transformer", tok.vocab_size)
    out = extrapolation_metrics(rope, split, 32, [1, 2, 4], 4, tok.token_bytes(), 2)
    assert [r["status"] for r in out] == ["ok"] * 3
    two = out[1]
    beyond = [b for b in two["position_buckets"] if b["start"] >= 32]
    assert beyond and two["loss_beyond_train"] == pytest.approx(
        sum(b["nats"] for b in beyond) / sum(b["tokens"] for b in beyond))
    with torch.no_grad():  # the same number, computed directly
        nats = count = 0.0
        for i in range(two["windows"]):
            w = torch.as_tensor(split.tokens[i * 64:i * 64 + 65])
            logp = torch.log_softmax(rope(w[None, :-1])[0], -1)
            nats -= float(logp[32:].gather(-1, w[33:, None]).sum())
            count += 32
    assert two["loss_beyond_train"] == pytest.approx(nats / count, rel=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_padded_scoring_equals_one_at_a_time_and_the_direct_log_softmax(name: str) -> None:
    model = tiny(name, 40)
    gen = torch.Generator().manual_seed(1)
    items = []
    for length, n in ((5, 2), (11, 4), (3, 1), (16, 7), (8, 8 - 1)):
        items.append((torch.randint(0, 40, (length,), generator=gen).tolist(), n))
    batched = score_continuations(model, items, batch_size=8)
    for (tokens, n), (lp, greedy, count) in zip(items, batched):
        alone = score_continuations(model, [(tokens, n)], batch_size=1)[0]
        assert lp == pytest.approx(alone[0], abs=1e-4) and greedy == alone[1] and count == n
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([tokens[:-1]]))[0], -1)
        direct = sum(float(logp[t - 1, tokens[t]]) for t in range(len(tokens) - n, len(tokens)))
        argmax = all(int(logp[t - 1].argmax()) == tokens[t]
                     for t in range(len(tokens) - n, len(tokens)))
        assert lp == pytest.approx(direct, abs=1e-4) and greedy == argmax


def test_rolling_windows_predict_every_token_once_with_full_context() -> None:
    tokens = list(range(1, 12))
    windows = rolling_windows(tokens, 0, 4)
    predicted = []
    for window, n in windows:
        assert len(window) - 1 <= 4
        predicted += window[-n:]
    assert predicted == tokens
    assert windows[-1][0] == [7, 8, 9, 10, 11] and windows[-1][1] == 3  # the last keeps context
    assert rolling_windows(tokens, 0, None) == [([0, *tokens], 11)]
    model = tiny("transformer", 20)
    short = document_logprobs(model, [tokens], 0, max_length=4)[0]
    with torch.no_grad():
        direct = 0.0
        for window, n in windows:
            logp = torch.log_softmax(model(torch.tensor([window[:-1]]))[0], -1)
            direct += sum(float(logp[t - 1, window[t]])
                          for t in range(len(window) - n, len(window)))
    assert short == pytest.approx(direct, abs=1e-4)
