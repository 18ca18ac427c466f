"""Selective copying and induction heads, the two synthetic tasks of the Mamba paper (Gu & Dao,
2023, section 4.1), which MAD (Poli et al., 2024) also uses for selective copying.

Selective copying: `num_tokens_to_copy` data tokens sit at random positions among blank tokens;
after a copy token, the model must emit the data tokens in order, one per following blank
position (the answers). Content-aware selection is needed: the positions are random, so a fixed
convolution cannot do it. Vocabulary: data tokens 0 .. V-3, blank V-2, copy V-1. The Mamba paper
uses seq_len 4096 with 16 tokens (setting "mamba"); MAD's baseline is seq_len 256 (the default).

Induction heads: random tokens, a special token (V-1) somewhere, and the special token again as
the last input; the answer is the token that followed its first occurrence. The Mamba paper
trains at length 256 and tests at longer lengths for extrapolation (the evaluator's grid).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from archbench.train.tasks.base import IGNORE, Example, Task


class SelectiveCopying(Task):
    name = "selective_copying"
    defaults: ClassVar[dict[str, Any]] = {"vocab_size": 16, "seq_len": 256,
                                          "num_tokens_to_copy": 16}
    settings: ClassVar[dict[str, dict[str, Any]]] = {
        "mad": {"vocab_size": 16, "seq_len": 256, "num_tokens_to_copy": 16},
        "mamba": {"vocab_size": 16, "seq_len": 4096, "num_tokens_to_copy": 16},
    }

    def check(self) -> None:
        vocab, length = int(self.params["vocab_size"]), int(self.params["seq_len"])
        n = int(self.params["num_tokens_to_copy"])
        if vocab < 3:
            raise ValueError(f"selective_copying: vocab_size={vocab} must be >= 3 "
                             "(data tokens, blank, copy)")
        if n < 1 or length <= 2 * n + 1:
            raise ValueError(f"selective_copying: seq_len={length} must exceed "
                             f"2 * num_tokens_to_copy + 1 = {2 * n + 1}")

    def example(self, rng: np.random.Generator) -> Example:
        vocab, length = int(self.params["vocab_size"]), int(self.params["seq_len"])
        n = int(self.params["num_tokens_to_copy"])
        blank, copy = vocab - 2, vocab - 1
        region = length - n - 1  # data tokens and blanks before the copy token
        data = rng.integers(0, vocab - 2, size=n)
        where = np.sort(rng.choice(region, size=n, replace=False))
        inputs = np.full(length, blank, dtype=np.int64)
        inputs[where] = data
        inputs[region] = copy
        targets = np.full(length, IGNORE, dtype=np.int64)
        targets[region + 1:] = data  # the i-th blank after the copy token emits the i-th token
        return Example(inputs=inputs, targets=targets)


class InductionHeads(Task):
    name = "induction"
    defaults: ClassVar[dict[str, Any]] = {"vocab_size": 16, "seq_len": 256}

    def check(self) -> None:
        vocab, length = int(self.params["vocab_size"]), int(self.params["seq_len"])
        if vocab < 3:
            raise ValueError(f"induction: vocab_size={vocab} must be >= 3")
        if length < 4:
            raise ValueError(f"induction: seq_len={length} must be >= 4")

    def example(self, rng: np.random.Generator) -> Example:
        vocab, length = int(self.params["vocab_size"]), int(self.params["seq_len"])
        special = vocab - 1
        inputs = rng.integers(0, vocab - 1, size=length)
        first = int(rng.integers(0, length - 2))  # the special token and its successor fit
        inputs[first] = special
        inputs[-1] = special
        targets = np.full(length, IGNORE, dtype=np.int64)
        targets[-1] = inputs[first + 1]
        return Example(inputs=inputs.astype(np.int64), targets=targets)
