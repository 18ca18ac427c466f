"""Multi-query associative recall (MQAR), as defined in Zoology (Arora, Eyuboglu et al., 2023).

A sequence opens with `num_kv_pairs` key-value pairs (keys drawn without repetition from the lower
half of the vocabulary, 1 .. V/2 - 1, values from the upper half), then every key is queried once
later on. The distance of a query from the key-value block follows a power law (exponent
`power_a`, small = mostly near), like the gap between repeated bigrams in text. The model is
scored on the token it predicts at each query: the value bound to that key. Only those positions
carry a loss, in training as in evaluation. Positions that are neither a pair nor a query hold 0,
or random tokens with `random_non_queries`.

Zoology's figure 2 (the reference experiment, `settings`): vocabulary 8192, (seq_len, pairs) in
{(64, 4), (128, 8), (256, 16), (512, 64)}, two layers of width 64..512, a few learning rates,
best run per cell (conf/experiment/mqar.yaml).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from archbench.train.tasks.base import IGNORE, Example, Task

# Zoology's figure-2 cells; that experiment fills the non-query positions with zeros.
ZOOLOGY_FIGURE2 = {
    f"L{seq_len}_kv{pairs}": {"seq_len": seq_len, "num_kv_pairs": pairs, "vocab_size": 8192,
                              "power_a": 0.01, "random_non_queries": False}
    for seq_len, pairs in ((64, 4), (128, 8), (256, 16), (512, 64))
}


# num_kv_pairs="zoology" picks the figure-2 pairing for seq_len, so a sweep over seq_len alone
# walks the figure-2 cells (Hydra's basic sweeper only forms products).
ZOOLOGY_PAIRS = {64: 4, 128: 8, 256: 16, 512: 64}


class MQAR(Task):
    name = "mqar"
    defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 8192, "seq_len": 64, "num_kv_pairs": 4, "power_a": 0.01,
        "random_non_queries": True,
    }
    settings = ZOOLOGY_FIGURE2

    def check(self) -> None:
        p = self.params
        if p["num_kv_pairs"] == "zoology":
            if int(p["seq_len"]) not in ZOOLOGY_PAIRS:
                raise ValueError(f"mqar: num_kv_pairs=zoology is defined for seq_len in "
                                 f"{sorted(ZOOLOGY_PAIRS)}, not {p['seq_len']}")
            p["num_kv_pairs"] = ZOOLOGY_PAIRS[int(p["seq_len"])]
        vocab, length, pairs = int(p["vocab_size"]), int(p["seq_len"]), int(p["num_kv_pairs"])
        if length % 2:
            raise ValueError(f"mqar: seq_len={length} must be even (pairs and queries are "
                             "two tokens each)")
        if pairs < 1 or 4 * pairs > length:
            raise ValueError(f"mqar: num_kv_pairs={pairs} needs 1 <= 4 * num_kv_pairs <= "
                             f"seq_len={length} (the block, then a free slot for every query)")
        if pairs > vocab // 2 - 1:
            raise ValueError(f"mqar: vocab_size={vocab} holds only {vocab // 2 - 1} distinct "
                             f"keys; num_kv_pairs={pairs} needs more")
        if not 0 < float(p["power_a"]) <= 1:
            raise ValueError(f"mqar: power_a={p['power_a']} must be in (0, 1]")
        space = (length - 2 * pairs) // 2
        self._gap_p = self.gap_distribution(space, float(p["power_a"]))

    @staticmethod
    def gap_distribution(space: int, power_a: float) -> np.ndarray:
        """P(query slot = j) for j = 0 .. space-1, proportional to (j + 1) ** (power_a - 1)."""
        weights = np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1.0)
        return weights / weights.sum()

    def example(self, rng: np.random.Generator) -> Example:
        p = self.params
        vocab, length, pairs = int(p["vocab_size"]), int(p["seq_len"]), int(p["num_kv_pairs"])
        half = vocab // 2
        keys = rng.choice(np.arange(1, half), size=pairs, replace=False)
        values = rng.choice(np.arange(half, vocab), size=pairs, replace=False)
        block = 2 * pairs
        seq = np.zeros(length + 1, dtype=np.int64)
        seq[0:block:2] = keys
        seq[1:block:2] = values
        slots = rng.choice(len(self._gap_p), size=pairs, replace=False, p=self._gap_p)
        query_pos = block + 2 * slots
        seq[query_pos] = keys
        answer = np.full(length + 1, IGNORE, dtype=np.int64)
        answer[query_pos + 1] = values  # the value is predicted at the query, never shown there
        inputs = seq[:-1].copy()
        if p["random_non_queries"]:
            free = inputs == 0
            inputs[free] = rng.integers(0, vocab, size=int(free.sum()))
        return Example(inputs=inputs, targets=answer[1:])
