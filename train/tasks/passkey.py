"""Passkey / needle-in-a-haystack retrieval over context length and depth, with real filler text.

Single key (n_keys=1, the passkey test of Mohtashami & Jaggi, 2023): a sentence "The pass key is
N. Remember it. N is the pass key." hides at `depth` (0 = start, 1 = end) of filler text taken
from a corpus of the data layer; the prompt ends "What is the pass key? The pass key is" and the
answer is " N". Multi-key (n_keys > 1, RULER's multikey needle, Hsieh et al., 2024): n_keys
needles "The special magic number for KEY is: N." with distinct random keys; the one at `depth` is
asked for, the others are distractors at random depths.

Examples are built at token level with the model's tokenizer and hold exactly `seq_len` input
tokens; the answer tokens are the scored positions, so `exact_match` (every answer token is the
argmax given the true prefix) is exactly "greedy decoding returns the number".
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, ClassVar, TypeVar

import numpy as np

from archbench.train.tasks.base import IGNORE, Example, Task

SINGLE_INTRO = "There is a pass key hidden in the text below. Find it and remember it.\n"
SINGLE_NEEDLE = "\nThe pass key is {value}. Remember it. {value} is the pass key.\n"
SINGLE_QUESTION = "\nWhat is the pass key? The pass key is"
MULTI_INTRO = ("Some special magic numbers are hidden in the text below. Remember them; "
               "you will be asked about one of them.\n")
MULTI_NEEDLE = "\nThe special magic number for {key} is: {value}.\n"
MULTI_QUESTION = ("\nWhat is the special magic number for {key}? "
                  "The special magic number for {key} is")

Filler = TypeVar("Filler", str, np.ndarray)


def draw_needles(rng: np.random.Generator, n_keys: int, digits: int
                 ) -> tuple[list[str], list[str]]:
    """(keys, values): `n_keys` distinct 8-letter keys and their `digits`-digit numbers. The
    values are drawn first; the lm-eval task files and the token-level task depend on that order
    for reproducible data."""
    values = [str(int(rng.integers(10 ** (digits - 1), 10 ** digits))) for _ in range(n_keys)]
    keys: list[str] = []
    while len(keys) < n_keys:
        word = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, size=8))
        if word not in keys:
            keys.append(word)
    return keys, values


def needle_texts(keys: list[str], values: list[str], target: int) -> tuple[str, list[str], str]:
    """(intro, one needle per key, the question about key `target`): the single-key passkey
    wording for one key, RULER's multi-key wording for several."""
    if len(keys) == 1:
        return SINGLE_INTRO, [SINGLE_NEEDLE.format(value=values[0])], SINGLE_QUESTION
    needles = [MULTI_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    return MULTI_INTRO, needles, MULTI_QUESTION.format(key=keys[target])


def hide_needles(fill: Filler, needles: Sequence[Filler], depth: float,
                 rng: np.random.Generator) -> list[Filler]:
    """`fill` cut into pieces with the needles between them: the first needle at `depth` of the
    filler (0 = start, 1 = end), the distractors at random depths. Works on text (lm-eval's
    documents) and on token arrays (the task), so both place needles the same way."""
    n_fill = len(fill)
    cuts = [round(float(depth) * n_fill)]
    cuts += [int(c) for c in rng.integers(0, n_fill + 1, size=len(needles) - 1)]
    pieces: list[Filler] = []
    prev = 0
    for i in np.argsort(cuts, kind="stable"):
        pieces += [fill[prev:cuts[i]], needles[i]]
        prev = cuts[i]
    pieces.append(fill[prev:])
    return pieces


@lru_cache(maxsize=4)
def filler_tokens(source: str, max_bytes: int | None, tokenizer_json: str) -> np.ndarray:
    """The filler token stream: a corpus of the data layer (`stdlib` or a path), tokenized once
    through the data layer's cache, every document in order (no held-out split: the needle,
    not the filler, is what is tested)."""
    from omegaconf import OmegaConf

    from archbench.config import DataConfig
    from archbench.train.data import build_corpus, tokenize_corpus
    from archbench.train.tokenizer import from_json

    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig),
                          {"source": "stdlib" if source == "stdlib" else "path",
                           "path": None if source == "stdlib" else source,
                           "max_bytes": max_bytes})
    data = tokenize_corpus(build_corpus(cfg), from_json(tokenizer_json), 0.0, cfg.cache_dir)
    return np.asarray(data.train.tokens)


class Passkey(Task):
    name = "passkey"
    defaults: ClassVar[dict[str, Any]] = {"seq_len": 1024, "depth": 0.5, "n_keys": 1,
                                          "digits": 5, "filler": "stdlib",
                                          "filler_max_bytes": None}
    needs_tokenizer = True
    primary_metric = "exact_match"

    def check(self) -> None:
        p = self.params
        if not 0.0 <= float(p["depth"]) <= 1.0:
            raise ValueError(f"passkey: depth={p['depth']} must be in [0, 1]")
        if int(p["n_keys"]) < 1:
            raise ValueError(f"passkey: n_keys={p['n_keys']} must be >= 1")
        if not 1 <= int(p["digits"]) <= 12:
            raise ValueError(f"passkey: digits={p['digits']} must be in 1..12")
        tok = self.tokenizer
        self.filler = filler_tokens(str(p["filler"]), p["filler_max_bytes"], tok.to_json())
        longest = self._fixed_tokens("k" * 8, "9" * int(p["digits"]))
        need = longest + 64
        if int(p["seq_len"]) < need:
            raise ValueError(f"passkey: seq_len={p['seq_len']} cannot hold the needles and the "
                             f"question (about {longest} tokens) plus filler; use >= {need}")
        if len(self.filler) < int(p["seq_len"]):
            raise ValueError(f"passkey: the filler corpus {p['filler']!r} holds "
                             f"{len(self.filler)} tokens, fewer than seq_len={p['seq_len']}")

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def _fixed_tokens(self, key: str, value: str) -> int:
        n = int(self.params["n_keys"])
        intro, needles, question = needle_texts([key] * n, [value] * n, 0)
        enc = self.tokenizer.encode
        return (len(enc(intro)) + sum(len(enc(t)) for t in needles) + len(enc(question))
                + len(enc(" " + value)) + 4)

    def example(self, rng: np.random.Generator) -> Example:
        p = self.params
        n, digits, length = int(p["n_keys"]), int(p["digits"]), int(p["seq_len"])
        enc = self.tokenizer.encode
        keys, values = draw_needles(rng, n, digits)
        target = 0
        intro, needles, question = needle_texts(keys, values, target)
        intro_ids, question_ids = enc(intro), enc(question)
        needle_ids = [enc(t) for t in needles]
        answer_ids = enc(" " + values[target])
        fixed = len(intro_ids) + sum(map(len, needle_ids)) + len(question_ids) + len(answer_ids)
        n_fill = length + 1 - fixed  # inputs are the first `length` tokens of the sequence
        if n_fill < 1:
            raise ValueError(f"passkey: seq_len={length} is too short for the needles")
        start = int(rng.integers(0, len(self.filler) - n_fill + 1))
        fill = np.asarray(self.filler[start:start + n_fill], dtype=np.int64)
        hidden = hide_needles(fill, [np.asarray(ids, dtype=np.int64) for ids in needle_ids],
                              float(p["depth"]), rng)
        seq = np.concatenate([np.asarray(intro_ids, dtype=np.int64), *hidden,
                              np.asarray(question_ids + answer_ids, dtype=np.int64)])
        answer = np.full(len(seq), IGNORE, dtype=np.int64)
        answer[len(seq) - len(answer_ids):] = answer_ids
        return Example(inputs=seq[:-1], targets=answer[1:])
