"""The MAD suite (Poli et al., 2024, "Mechanistic Design and Scaling of Hybrid Architectures").

Six tasks, each with a baseline setting and one-at-a-time variations of vocabulary, length,
training-set size (and noise, number of tokens to copy): `MAD_SUITE`. A model is trained on every
setting at a few learning rates and weight decays; the MAD score of a task is the mean over its
settings of the best test accuracy per setting, and the overall score the mean over tasks
(`mad_scores`). Settings are named "task/baseline" or "task/key:value" and reached through the
task name "mad" with `params.setting` (`data.task.name=mad data.task.params.setting=...`).

The recall tasks follow MAD's generators: keys from the lower half and values from the upper half
of the non-special vocabulary, a per-sequence key->value map, multi-query targets (a value is an
answer whenever its key was seen before), a final probe; training fits every next token, as MAD
does. Noisy recall inserts noise tokens from their own vocabulary; fuzzy recall uses keys and
values of 1..k tokens (test keys always have k tokens). Memorization uses one fixed key->value map
across all sequences (it must live in the weights). Selective copying is in copying.py.

Compression differs from MAD by necessity: MAD decodes the sequence from the last position's
embedding with a separate MLP decoder (an autoencoder); the shared LanguageModel has no such head,
so archbench uses the causal-LM form: random tokens, a compression token, then the sequence again
(teacher-forced), scored on the reconstruction. A recurrent model must hold the sequence in its
state; attention can look back, so for it this is closer to copying. Reported under this name with
this caveat.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import numpy as np

from archbench.train.tasks.base import IGNORE, Example, Task, parse_value


class InContextRecall(Task):
    name = "in_context_recall"
    defaults: ClassVar[dict[str, Any]] = {"vocab_size": 16, "seq_len": 128, "multi_query": True,
                                          "noise_vocab_size": 0, "frac_noise": 0.0}
    train_on = "all"

    def _vocab(self) -> tuple[int, int, int]:
        """(size of the key and value vocabulary, number of keys, first noise token)."""
        vocab = int(self.params["vocab_size"])
        usable = vocab - (0 if self.params["multi_query"] else 1)
        usable -= int(self.params["noise_vocab_size"])
        return usable, usable // 2, usable

    def check(self) -> None:
        usable, n_keys, _ = self._vocab()
        frac = float(self.params["frac_noise"])
        if n_keys < 1 or usable - n_keys < 1:
            raise ValueError(f"{self.name}: vocab_size={self.params['vocab_size']} leaves no room "
                             "for keys and values after special and noise tokens")
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{self.name}: frac_noise={frac} must be in [0, 1)")
        if frac > 0 and int(self.params["noise_vocab_size"]) < 1:
            raise ValueError(f"{self.name}: frac_noise > 0 needs noise_vocab_size >= 1")
        if int(self.params["seq_len"]) % 2 or int(self.params["seq_len"]) < 4:
            raise ValueError(f"{self.name}: seq_len={self.params['seq_len']} must be even, >= 4")

    def example(self, rng: np.random.Generator) -> Example:
        usable, n_keys, noise0 = self._vocab()
        multi = bool(self.params["multi_query"])
        frac = float(self.params["frac_noise"])
        noise_n = int(self.params["noise_vocab_size"])
        n_pairs = int(self.params["seq_len"]) // 2
        keep = int(rng.integers(0, n_pairs - 1))  # one slot is always a pair: a key to probe
        seq: list[int] = []
        tgt: list[int] = []
        bound: dict[int, int] = {}
        for i in range(n_pairs - 1):
            if frac > 0 and i != keep and rng.random() < frac:
                seq += [int(t) for t in rng.integers(noise0, noise0 + noise_n, size=2)]
                tgt += [IGNORE, IGNORE]
                continue
            key = int(rng.integers(0, n_keys))
            seen = key in bound
            if not seen:
                bound[key] = int(rng.integers(n_keys, usable))
            seq += [key, bound[key]]
            tgt += [IGNORE, bound[key] if (seen and multi) else IGNORE]
        probe = int(rng.choice(sorted(bound)))
        if not multi:
            seq.append(int(self.params["vocab_size"]) - 1)  # the copy prefix
            tgt.append(IGNORE)
        seq += [probe, bound[probe]]
        tgt += [IGNORE, bound[probe]]
        arr, ans = np.array(seq, dtype=np.int64), np.array(tgt, dtype=np.int64)
        return Example(inputs=arr[:-1], targets=ans[1:], lm_targets=arr[1:])


class NoisyRecall(InContextRecall):
    name = "noisy_recall"
    defaults: ClassVar[dict[str, Any]] = {"vocab_size": 32, "seq_len": 128, "multi_query": True,
                                          "noise_vocab_size": 16, "frac_noise": 0.2}


class FuzzyRecall(Task):
    """Keys and values are runs of 1..k distinct tokens; test keys always have k tokens."""

    name = "fuzzy_recall"
    defaults: ClassVar[dict[str, Any]] = {"vocab_size": 16, "seq_len": 128, "multi_query": True,
                                          "k_motif_size": 3, "v_motif_size": 3}
    train_on = "all"

    def check(self) -> None:
        vocab, multi = int(self.params["vocab_size"]), bool(self.params["multi_query"])
        usable = vocab - (1 if multi else 2)
        k, v = int(self.params["k_motif_size"]), int(self.params["v_motif_size"])
        if k < 1 or v < 1 or usable // 2 < k or usable - usable // 2 < v:
            raise ValueError(f"fuzzy_recall: vocab_size={vocab} is too small for keys of {k} and "
                             f"values of {v} distinct tokens")
        if int(self.params["seq_len"]) < 4 * (k + v) + 1:
            raise ValueError(f"fuzzy_recall: seq_len={self.params['seq_len']} must be at least "
                             f"4 * (k_motif_size + v_motif_size) + 1")

    def example(self, rng: np.random.Generator) -> Example:
        vocab, multi = int(self.params["vocab_size"]), bool(self.params["multi_query"])
        length = int(self.params["seq_len"])
        kmax, vmax = int(self.params["k_motif_size"]), int(self.params["v_motif_size"])
        usable = vocab - (1 if multi else 2)
        pad = vocab - 1 if multi else vocab - 2
        half = usable // 2
        training = self.split == "train"

        def key_of(size: int) -> tuple[int, ...]:
            return tuple(int(t) for t in rng.choice(half, size=size, replace=False))

        def value_of(size: int) -> tuple[int, ...]:
            return tuple(int(t) for t in half + rng.choice(usable - half, size=size,
                                                          replace=False))

        def key_size() -> int:
            return int(rng.integers(1, kmax + 1)) if training else kmax

        probe_k = key_of(key_size())
        probe_v = value_of(int(rng.integers(1, vmax + 1)))
        probe_len = len(probe_k) + len(probe_v)
        # Room for: pairs up to `stop` (+ one pair past it), the probe pair if not yet placed,
        # the copy prefix and the final probe: the probed key is always in the context.
        stop = length - 2 * probe_len - (kmax + vmax) - 1
        probe_at = int(rng.integers(0, stop))
        seq: list[int] = []
        tgt: list[int] = []
        bound: dict[tuple[int, ...], tuple[int, ...]] = {}
        placed = False
        while len(seq) < stop or not placed:
            if (len(seq) >= probe_at or len(seq) >= stop) and not placed:
                key, value, placed = probe_k, probe_v, True
            else:
                key = key_of(key_size())
                if key == probe_k:
                    value, placed = probe_v, True
                else:
                    value = bound.get(key) or value_of(int(rng.integers(1, vmax + 1)))
            seen = key in bound
            bound[key] = value
            seq += [*key, *value]
            tgt += [IGNORE] * len(key) + (list(value) if seen and multi else [IGNORE] * len(value))
        if not multi:
            seq.append(vocab - 1)
            tgt.append(IGNORE)
        seq += [*probe_k, *probe_v]
        tgt += [IGNORE] * len(probe_k) + list(probe_v)
        n_pad = length + 1 - len(seq)
        arr = np.array([pad] * n_pad + seq, dtype=np.int64)
        ans = np.array([IGNORE] * n_pad + tgt, dtype=np.int64)
        lm = arr[1:].copy()
        lm[: max(n_pad - 1, 0)] = IGNORE  # padding is not something to learn
        return Example(inputs=arr[:-1], targets=ans[1:], lm_targets=lm)


class Compression(Task):
    """Causal-LM form of MAD's compression (see the module docstring)."""

    name = "compression"
    defaults: ClassVar[dict[str, Any]] = {"vocab_size": 16, "seq_len": 32}

    def check(self) -> None:
        if int(self.params["vocab_size"]) < 2:
            raise ValueError("compression: vocab_size must be >= 2")
        if int(self.params["seq_len"]) < 4:
            raise ValueError("compression: seq_len must be >= 4")

    def example(self, rng: np.random.Generator) -> Example:
        vocab, length = int(self.params["vocab_size"]), int(self.params["seq_len"])
        m = length // 2
        data = rng.integers(0, vocab - 1, size=m)
        inputs = np.concatenate([data, [vocab - 1], data[:-1]]).astype(np.int64)
        targets = np.full(len(inputs), IGNORE, dtype=np.int64)
        targets[m:] = data
        return Example(inputs=inputs, targets=targets)


class Memorization(Task):
    """Key -> value facts fixed across the whole data set (seeded by `map_seed`): recalled from
    the weights, not from the context."""

    name = "memorization"
    defaults: ClassVar[dict[str, Any]] = {"vocab_size": 256, "seq_len": 32, "map_seed": 12345}

    def check(self) -> None:
        vocab, length = int(self.params["vocab_size"]), int(self.params["seq_len"])
        if vocab < 5:
            raise ValueError(f"memorization: vocab_size={vocab} must be >= 5")
        if length < 2 or length % 2:
            raise ValueError(f"memorization: seq_len={length} must be even and >= 2")
        self.keys, self.values = self.fact_table(vocab, int(self.params["map_seed"]))

    @staticmethod
    def fact_table(vocab_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys from the lower half of the non-special vocabulary, each bound to a value from the
        upper half (a fixed random matching). Token V-1 is the 'insert' token after a key."""
        rng = np.random.default_rng(seed)
        usable = vocab_size - 1
        keys = rng.permutation(usable // 2)
        values = usable // 2 + rng.permutation(usable - usable // 2)
        n = min(len(keys), len(values))
        return keys[:n].astype(np.int64), values[:n].astype(np.int64)

    def example(self, rng: np.random.Generator) -> Example:
        vocab, length = int(self.params["vocab_size"]), int(self.params["seq_len"])
        pick = rng.integers(0, len(self.keys), size=length // 2)
        inputs = np.empty(length, dtype=np.int64)
        inputs[0::2] = self.keys[pick]
        inputs[1::2] = vocab - 1
        targets = np.full(length, IGNORE, dtype=np.int64)
        targets[1::2] = self.values[pick]
        return Example(inputs=inputs, targets=targets)


# ---- the suite ---------------------------------------------------------------------------------
_SIZES = {"n_train": [6400, 3200, 1600, 800]}
MAD_SUITE: dict[str, dict[str, Any]] = {
    "in_context_recall": {
        "baseline": {"vocab_size": 16, "seq_len": 128, "n_train": 12800},
        "changes": {"vocab_size": [32, 64, 128], "seq_len": [256, 512, 1024], **_SIZES}},
    "fuzzy_recall": {
        "baseline": {"vocab_size": 16, "seq_len": 128, "n_train": 12800,
                     "k_motif_size": 3, "v_motif_size": 3},
        "changes": {"vocab_size": [32, 64, 128], "seq_len": [256, 512, 1024], **_SIZES}},
    "noisy_recall": {
        "baseline": {"vocab_size": 32, "noise_vocab_size": 16, "frac_noise": 0.2,
                     "seq_len": 128, "n_train": 12800},
        "changes": {"vocab_size": [48, 80, 144], "seq_len": [256, 512, 1024], **_SIZES,
                    "frac_noise": [0.4, 0.6, 0.8]}},
    "selective_copying": {
        "baseline": {"vocab_size": 16, "seq_len": 256, "num_tokens_to_copy": 16, "n_train": 12800},
        "changes": {"vocab_size": [32, 64, 128], "seq_len": [512, 1024], **_SIZES,
                    "num_tokens_to_copy": [32, 64, 96]}},
    "compression": {
        "baseline": {"vocab_size": 16, "seq_len": 32, "n_train": 12800},
        "changes": {"vocab_size": [32, 64, 128], "seq_len": [64, 128, 256], **_SIZES}},
    "memorization": {
        "baseline": {"vocab_size": 256, "seq_len": 32, "n_train": 256},
        "changes": {"vocab_size": [512, 1024, 2048, 4096, 8192]}},
}
MAD_TEST_EXAMPLES = 1280
MAD_LEARNING_RATES = (1e-4, 5e-4, 1e-3)
MAD_WEIGHT_DECAYS = (0.0, 0.1)


def mad_settings() -> list[str]:
    """Every setting id of the suite: the baseline and each one-at-a-time change."""
    out = []
    for task, spec in MAD_SUITE.items():
        out.append(f"{task}/baseline")
        for key, values in spec["changes"].items():
            out += [f"{task}/{key}:{v}" for v in values]
    return out


def resolve_setting(setting: str) -> tuple[str, dict[str, Any], int]:
    """'noisy_recall/frac_noise:0.4' -> ('noisy_recall', its task params, training examples)."""
    task, _, change = str(setting).partition("/")
    if task not in MAD_SUITE:
        raise ValueError(f"mad: unknown task in setting {setting!r}; tasks are {list(MAD_SUITE)}")
    params = dict(MAD_SUITE[task]["baseline"])
    if change and change != "baseline":
        key, sep, raw = change.partition(":")
        if not sep or key not in MAD_SUITE[task]["changes"]:
            raise ValueError(f"mad: bad setting {setting!r}; write TASK/baseline or TASK/KEY:VALUE "
                             f"with KEY in {list(MAD_SUITE[task]['changes'])}")
        value = parse_value(raw)
        if value not in MAD_SUITE[task]["changes"][key]:
            raise ValueError(f"mad: {setting!r} is not a MAD setting; {key} takes "
                             f"{MAD_SUITE[task]['changes'][key]}")
        params[key] = value
    n_train = int(params.pop("n_train"))
    return task, params, n_train


def mad_scores(records: list[dict[str, Any]], metric: str = "accuracy") -> dict[str, Any]:
    """MAD scores per model: best run per setting (over learning rate, weight decay, seed), the
    mean over a task's settings, then the mean over tasks. A model is (arch, d_model, n_layers).

    Returns {model: {"tasks": {task: score}, "mad_score": mean, "settings": n, "complete": bool}}
    where complete says every setting of the suite was found.
    """
    best: dict[tuple[Any, ...], float] = {}
    for r in records:
        if r.get("kind") != "eval" or r.get("eval") != "mad" or r.get("metric") != metric:
            continue
        if r.get("status", "ok") != "ok":
            continue
        train = r.get("train") or {}
        model = f"{r.get('arch')}-d{train.get('d_model')}-l{train.get('n_layers')}"
        key = (model, r["params"]["task"], r["params"]["setting"])
        best[key] = max(best.get(key, float("-inf")), float(r["value"]))
    per_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (model, task, _), value in best.items():
        per_task[model][task].append(value)
    expected = defaultdict(int)
    for setting in mad_settings():
        expected[setting.split("/")[0]] += 1
    out = {}
    for model, tasks in per_task.items():
        scores = {task: float(np.mean(v)) for task, v in tasks.items()}
        complete = set(scores) == set(MAD_SUITE) and all(
            len(tasks[t]) == expected[t] for t in MAD_SUITE)
        out[model] = {"tasks": scores, "mad_score": float(np.mean(list(scores.values()))),
                      "settings": sum(len(v) for v in tasks.values()), "complete": complete}
    return out
