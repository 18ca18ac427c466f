"""Single-query associative recall, the task of the H3 paper's synthetic comparison (Fu et al.,
2022, table 1; after Ba et al., 2016).

A sequence lists key-value pairs, then repeats one of the keys as its last token; the answer is
the value that key was paired with. Keys are distinct within a sequence (drawn from the lower
half of the vocabulary, 0 .. V/2 - 1) and values come from the upper half (V/2 .. V - 1, with
repetition), so the answer is always one token and unambiguous. Unlike MQAR (mqar.py) there is
one question per sequence, asked at the end: a model must hold every pair until then, and the
score is the accuracy of that one prediction.

`seq_len` counts every token: (seq_len - 1) / 2 pairs and the query, so it must be odd. The
defaults (vocabulary 20, 21 tokens: 10 pairs) are at the scale of the H3 paper's task.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from archbench.train.tasks.base import IGNORE, Example, Task


class AssociativeRecall(Task):
    name = "assoc_recall"
    defaults: ClassVar[dict[str, Any]] = {"vocab_size": 20, "seq_len": 21}

    def check(self) -> None:
        vocab, length = int(self.params["vocab_size"]), int(self.params["seq_len"])
        if vocab < 4 or vocab % 2:
            raise ValueError(f"assoc_recall: vocab_size={vocab} must be even and >= 4 (a half "
                             "of keys, a half of values)")
        if length < 3 or length % 2 == 0:
            raise ValueError(f"assoc_recall: seq_len={length} must be odd and >= 3 (pairs, "
                             "then the query)")
        if (length - 1) // 2 > vocab // 2:
            raise ValueError(f"assoc_recall: seq_len={length} holds {(length - 1) // 2} pairs "
                             f"with distinct keys; vocab_size={vocab} has only {vocab // 2} "
                             f"keys (seq_len <= vocab_size + 1)")

    def example(self, rng: np.random.Generator) -> Example:
        vocab, length = int(self.params["vocab_size"]), int(self.params["seq_len"])
        pairs, half = (length - 1) // 2, vocab // 2
        keys = rng.choice(half, size=pairs, replace=False)
        values = rng.integers(half, vocab, size=pairs)
        inputs = np.empty(length, dtype=np.int64)
        inputs[0 : 2 * pairs : 2] = keys
        inputs[1 : 2 * pairs : 2] = values
        asked = int(rng.integers(pairs))
        inputs[-1] = keys[asked]
        targets = np.full(length, IGNORE, dtype=np.int64)
        targets[-1] = values[asked]
        return Example(inputs=inputs, targets=targets)
