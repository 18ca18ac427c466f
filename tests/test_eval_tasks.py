"""Synthetic tasks: seeded and deterministic, answers right by construction (checked against
independent brute-force solvers written here), the data-layer split, and exact scoring (an oracle
scores 1, a constant predictor scores chance)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from archbench.train.data import DataError
from archbench.train.tasks import (
    IGNORE,
    TASKS,
    make_task,
    score_examples,
    task_targets,
    task_token_data,
)
from archbench.train.tasks.mad import MAD_SUITE, mad_scores, mad_settings, resolve_setting
from archbench.train.tasks.mqar import MQAR
from archbench.train.tokenizer import ByteTokenizer

TEXT = ("Tokens are counted in bytes here. " * 40 + "def f(x):\n    return x * 2\n" * 60)


@pytest.fixture(scope="module")
def filler(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("filler") / "filler.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    return str(path)


def task_of(name: str, filler: str, split: str = "val", **params: object):
    if name == "passkey":
        params = {"seq_len": 300, "filler": filler, **params}
        return make_task(name, params, ByteTokenizer(), split=split)
    small = {"mqar": {"vocab_size": 256, "seq_len": 64, "num_kv_pairs": 8}}
    return make_task(name, {**small.get(name, {}), **params}, split=split)


# ---- determinism ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TASKS))
def test_examples_are_fixed_by_seed_and_index(name: str, filler: str) -> None:
    task = task_of(name, filler)
    a_in, a_tg = task.batch(range(4), seed=7)
    b_in, b_tg = task.batch(range(4), seed=7)
    assert np.array_equal(a_in, b_in) and np.array_equal(a_tg, b_tg)
    c_in, _ = task.batch([2, 3], seed=7)  # example i does not depend on how many are drawn
    assert np.array_equal(c_in, a_in[2:])
    d_in, _ = task.batch(range(4), seed=8)
    assert not np.array_equal(a_in, d_in)
    train_in, _ = task_of(name, filler, split="train").batch(range(4), seed=7)
    assert not np.array_equal(train_in, a_in)  # the splits never share a stream
    assert a_in.shape == (4, task.seq_len) and (a_tg != IGNORE).any(1).all()
    assert a_in.min() >= 0 and a_in.max() < task.vocab_size


# ---- brute-force solvers -------------------------------------------------------------------------
def solve_mqar(inputs: np.ndarray, pairs: int, vocab: int) -> dict[int, int]:
    """Position of every query -> the value bound to its key in the opening block."""
    block = {int(inputs[j]): int(inputs[j + 1]) for j in range(0, 2 * pairs, 2)}
    assert len(block) == pairs
    assert all(1 <= k < vocab // 2 <= v < vocab for k, v in block.items())
    queries = {}
    for t in range(2 * pairs, len(inputs), 2):
        if int(inputs[t]) in block:
            queries[t] = block[int(inputs[t])]
    return queries


def test_mqar_answers_are_the_bound_values() -> None:
    task = MQAR({"vocab_size": 128, "seq_len": 64, "num_kv_pairs": 6,
                 "random_non_queries": False}, split="test")
    inputs, targets = task.batch(range(50), seed=0)
    for x, y in zip(inputs, targets):
        expected = solve_mqar(x, 6, 128)
        got = {int(t): int(y[t]) for t in np.flatnonzero(y != IGNORE)}
        assert got == expected and len(got) == 6  # every key queried once, nothing else scored


def test_mqar_random_fill_keeps_answers_and_power_law_prefers_near_queries() -> None:
    task = MQAR({"vocab_size": 512, "seq_len": 128, "num_kv_pairs": 4}, split="test")
    inputs, targets = task.batch(range(400), seed=1)
    slots = []
    for x, y in zip(inputs, targets):
        answers = np.flatnonzero(y != IGNORE)
        block = {int(x[j]): int(x[j + 1]) for j in range(0, 8, 2)}
        assert [block[int(x[t])] for t in answers] == [int(y[t]) for t in answers]
        slots += [(t - 8) // 2 for t in answers]
    counts = np.bincount(slots, minlength=60)
    p = MQAR.gap_distribution(60, 0.01)
    assert counts[:5].sum() > counts[-30:].sum()  # near the block is far more likely
    assert p[0] > p[1] > p[-1] and math.isclose(p.sum(), 1.0)
    assert (inputs[:, 8:] != 0).mean() > 0.95  # the free positions hold random tokens


def solve_recall(inputs: np.ndarray, last_target: int, n_keys: int) -> dict[int, int]:
    """Multi-query recall: at each key that was seen before, the value that followed it."""
    seq = np.append(inputs, last_target)
    bound: dict[int, int] = {}
    answers = {}
    for t in range(0, len(seq) - 1, 2):
        k, v = int(seq[t]), int(seq[t + 1])
        if k >= n_keys:  # a noise pair
            continue
        if k in bound:
            answers[t] = bound[k]
        bound.setdefault(k, v)
        assert bound[k] == v  # one key, one value within a sequence
    return answers


@pytest.mark.parametrize("name", ["in_context_recall", "noisy_recall"])
def test_recall_answers_follow_the_sequence(name: str, filler: str) -> None:
    task = task_of(name, filler)
    n_keys = task._vocab()[1]
    for i in range(40):
        ex = task.draw(i, seed=3)
        expected = solve_recall(ex.inputs, int(ex.lm_targets[-1]), n_keys)
        got = {int(t): int(ex.targets[t]) for t in np.flatnonzero(ex.targets != IGNORE)}
        assert got == expected and len(got) >= 1
        assert np.array_equal(ex.lm_targets[:-1], ex.inputs[1:])  # training: every next token


def test_fuzzy_recall_values_follow_their_multi_token_keys(filler: str) -> None:
    task = task_of("fuzzy_recall", filler, split="train")
    half = (task.vocab_size - 1) // 2
    for i in range(30):
        ex = task.draw(i, seed=5)
        lm = ex.lm_targets
        seq = np.append(ex.inputs, lm[-1])
        pad = task.vocab_size - 1
        real = seq[np.argmax(seq != pad):]
        # runs of key tokens and value tokens alternate (the vocabularies are disjoint)
        runs, start = [], 0
        for t in range(1, len(real) + 1):
            if t == len(real) or (real[t] < half) != (real[t - 1] < half):
                runs.append(tuple(int(v) for v in real[start:t]))
                start = t
        offset = len(seq) - len(real)
        spans = np.flatnonzero(ex.targets != IGNORE) + 1 - offset  # positions in `real`
        assert len(spans) >= 1
        pos, pairs = 0, []
        for r in runs:
            pairs.append((pos, r))
            pos += len(r)
        for k in range(0, len(pairs) - 1, 2):
            key_start, key = pairs[k]
            val_start, val = pairs[k + 1]
            scored = [s for s in spans if val_start <= s < val_start + len(val)]
            if not scored:
                continue
            assert scored == list(range(val_start, val_start + len(val)))
            earlier = [pairs[j + 1][1] for j in range(0, k, 2) if pairs[j][1] == key]
            assert earlier and all(v == val for v in earlier)


def test_selective_copying_emits_the_data_tokens_in_order(filler: str) -> None:
    task = task_of("selective_copying", filler, vocab_size=12, seq_len=64, num_tokens_to_copy=8)
    inputs, targets = task.batch(range(30), seed=0)
    for x, y in zip(inputs, targets):
        copy = int(np.flatnonzero(x == 11)[0])
        data = x[:copy][x[:copy] != 10]
        assert list(y[y != IGNORE]) == list(data) and len(data) == 8
        assert np.all(x[copy + 1:] == 10) and np.all(y[:copy + 1] == IGNORE)


def test_induction_answer_follows_the_first_special_token(filler: str) -> None:
    task = task_of("induction", filler, vocab_size=10, seq_len=40)
    inputs, targets = task.batch(range(50), seed=0)
    for x, y in zip(inputs, targets):
        specials = np.flatnonzero(x == 9)
        assert len(specials) == 2 and specials[-1] == 39
        assert np.flatnonzero(y != IGNORE).tolist() == [39]
        assert y[39] == x[specials[0] + 1]


def test_memorization_facts_are_the_same_in_every_sequence(filler: str) -> None:
    task = task_of("memorization", filler, vocab_size=64, seq_len=16)
    facts: dict[int, int] = {}
    inputs, targets = task.batch(range(200), seed=0)
    for x, y in zip(inputs, targets):
        assert np.all(x[1::2] == 63) and np.all(y[0::2] == IGNORE)
        for k, v in zip(x[0::2], y[1::2]):
            assert facts.setdefault(int(k), int(v)) == int(v)
            assert k < 31 <= v < 63
    other = task_of("memorization", filler, split="train", vocab_size=64, seq_len=16)
    x, y = other.batch(range(50), seed=9)
    for k, v in zip(x[:, 0::2].ravel(), y[:, 1::2].ravel()):
        assert facts.get(int(k), int(v)) == int(v)  # the same facts in the training split


def test_compression_reconstructs_the_sequence(filler: str) -> None:
    task = task_of("compression", filler, vocab_size=10, seq_len=20)
    inputs, targets = task.batch(range(20), seed=0)
    for x, y in zip(inputs, targets):
        assert x[10] == 9 and list(y[10:]) == list(x[:10]) and np.all(y[:10] == IGNORE)


@pytest.mark.parametrize("n_keys", [1, 3])
def test_passkey_answer_is_the_number_in_the_needle_at_its_depth(n_keys: int, filler: str) -> None:
    tok = ByteTokenizer()
    for depth in (0.0, 0.5, 1.0):
        task = task_of("passkey", filler, n_keys=n_keys, depth=depth, seq_len=500)
        for i in range(5):
            ex = task.draw(i, seed=0)
            assert len(ex.inputs) == 500
            answer_pos = np.flatnonzero(ex.targets != IGNORE)
            answer = tok.decode(ex.targets[answer_pos].tolist())
            text = tok.decode(ex.inputs.tolist())
            if n_keys == 1:
                found = re.findall(r"The pass key is (\d+)\. Remember", text)
                assert len(found) == 1 and answer == " " + found[0]
                needle = r"\nThe pass key is \d+\. Remember it\. \d+ is the pass key\.\n"
                at = text.index("\nThe pass key is")
            else:
                asked = re.search(r"magic number for (\w+)\? The", text).group(1)
                table = dict(re.findall(r"magic number for (\w+) is: (\d+)\.", text))
                assert len(table) == 3 and answer == " " + table[asked]
                needle = r"\nThe special magic number for \w+ is: \d+\.\n"
                at = text.index(f"\nThe special magic number for {asked} is:")
            intro = text.index("\n") + 1
            question = text.rindex("\nWhat is")
            before = len(re.sub(needle, "", text[intro:at]))
            total = len(re.sub(needle, "", text[intro:question]))
            assert abs(before - depth * total) <= 1  # filler tokens before the needle


# ---- scoring -------------------------------------------------------------------------------------
class Oracle(torch.nn.Module):
    """Knows every answer of the examples it was shown: an upper bound for the evaluator."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, vocab: int) -> None:
        super().__init__()
        self.table = {x.tobytes(): y for x, y in zip(inputs, targets)}
        self.vocab_size = vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*x.shape, self.vocab_size)
        for r, row in enumerate(x.numpy()):
            y = self.table[row.astype(np.int64).tobytes()]
            for t in np.flatnonzero(y != IGNORE):
                out[r, t, y[t]] = 50.0
        return out


class Constant(torch.nn.Module):
    """Always the same logits: `token` first, or a uniform distribution when token is None."""

    def __init__(self, vocab: int, token: int | None) -> None:
        super().__init__()
        self.vocab_size, self.token = vocab, token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*x.shape, self.vocab_size)
        if self.token is not None:
            out[..., self.token] = 1.0
        return out


@pytest.mark.parametrize("name", ["mqar", "selective_copying", "memorization", "passkey"])
def test_an_oracle_scores_one(name: str, filler: str) -> None:
    task = task_of(name, filler)
    inputs, targets = task.batch(range(12), seed=0)
    s = score_examples(Oracle(inputs, targets, task.vocab_size), inputs, targets, batch_size=5)
    assert s["accuracy"] == 1.0 and s["exact_match"] == 1.0 and s["loss"] < 1e-6
    assert s["n_answers"] == int((targets != IGNORE).sum()) and s["n_examples"] == 12
    assert s["correct_per_example"] == (targets != IGNORE).sum(1).tolist()


def test_a_constant_predictor_scores_chance(filler: str) -> None:
    task = task_of("selective_copying", filler, vocab_size=16, seq_len=64, num_tokens_to_copy=16)
    inputs, targets = task.batch(range(400), seed=0)
    uniform = score_examples(Constant(16, None), inputs, targets, batch_size=64)
    assert math.isclose(uniform["loss"], math.log(16), rel_tol=1e-6)
    fixed = score_examples(Constant(16, 3), inputs, targets, batch_size=64)
    assert sum(fixed["correct_per_example"]) == round(fixed["accuracy"] * fixed["n_answers"])
    assert len(fixed["correct_per_example"]) == 400
    chance, n = 1 / 14, fixed["n_answers"]  # data tokens are uniform over 14 ids
    assert abs(fixed["accuracy"] - chance) < 4 * math.sqrt(chance * (1 - chance) / n)
    assert fixed["exact_match"] == 0.0


# ---- the data layer ------------------------------------------------------------------------------
def test_task_token_data_gives_masked_windows_and_the_task_vocab() -> None:
    cfg = OmegaConf.create({"name": "mqar", "params": {"vocab_size": 300, "seq_len": 32,
                                                       "num_kv_pairs": 4},
                            "n_train": 50, "n_val": 10, "seed": 3})
    data = task_token_data(cfg, ByteTokenizer())
    assert data.meta["vocab_size"] == 300 and data.meta["seq_len"] == 32
    assert data.meta["targets_masked"] and data.meta["ignore_index"] == IGNORE
    assert data.train.n_windows(32) == 50 and data.val.n_windows(32) == 10
    windows = data.train.windows([4, 7], 32)
    inputs, targets = task_targets(data, windows)
    want_in, want_tg = data.train.task.batch([4, 7], seed=3)
    assert torch.equal(inputs, torch.from_numpy(want_in))
    assert torch.equal(targets, torch.from_numpy(want_tg))
    longer_in, longer_tg = task_targets(data, data.train.windows([4, 7], 40))
    assert torch.equal(longer_in[:, :32], inputs) and torch.all(longer_tg[:, 32:] == IGNORE)
    with pytest.raises(DataError, match="train.seq_len=32"):
        data.train.windows([0], 16)


def test_mad_settings_pick_task_params_and_training_size() -> None:
    settings = mad_settings()
    assert len(settings) == sum(1 + sum(len(v) for v in s["changes"].values())
                                for s in MAD_SUITE.values()) == 66
    for setting in settings:
        task, params, n_train = resolve_setting(setting)
        ex = make_task(task, params, split="val").draw(0, seed=0)
        assert len(ex.inputs) <= params["seq_len"] and n_train > 0
    assert resolve_setting("noisy_recall/frac_noise:0.6")[1]["frac_noise"] == 0.6
    assert resolve_setting("memorization/baseline")[2] == 256
    cfg = OmegaConf.create({"name": "mad", "params": {"setting": "in_context_recall/n_train:800"},
                            "n_train": 5, "n_val": 5, "seed": 0})
    data = task_token_data(cfg, ByteTokenizer())
    assert data.train.n == 800 and data.val.n == 1280
    train_in, train_tg = task_targets(data, data.train.windows([0], 128))
    assert torch.equal(train_tg[0, :-2], train_in[0, 1:-1])  # MAD trains on every next token
    _, val_tg = task_targets(data, data.val.windows([0], 128))
    assert (val_tg != IGNORE).sum() < (train_tg != IGNORE).sum()
    with pytest.raises(ValueError, match="not a MAD setting"):
        resolve_setting("in_context_recall/vocab_size:17")


def test_mad_score_is_best_per_setting_then_means(filler: str) -> None:
    def rec(task: str, setting: str, lr: float, value: float) -> dict:
        return {"kind": "eval", "eval": "mad", "metric": "accuracy", "value": value,
                "status": "ok", "arch": "mamba", "params": {"task": task, "setting": setting},
                "train": {"d_model": 128, "n_layers": 2, "lr": lr}}

    records = [rec("compression", "compression/baseline", 1e-3, 0.5),
               rec("compression", "compression/baseline", 1e-4, 0.9),
               rec("compression", "compression/seq_len:64", 1e-3, 0.3),
               rec("memorization", "memorization/baseline", 1e-3, 0.2)]
    scores = mad_scores(records)["mamba-d128-l2"]
    assert scores["tasks"] == {"compression": pytest.approx(0.6), "memorization": 0.2}
    assert scores["mad_score"] == pytest.approx(0.4) and not scores["complete"]


def test_bad_parameters_are_clear_errors(filler: str) -> None:
    with pytest.raises(ValueError, match="unknown parameter"):
        make_task("mqar", {"n_pairs": 4})
    with pytest.raises(ValueError, match="num_kv_pairs=20"):
        make_task("mqar", {"seq_len": 64, "num_kv_pairs": 20})
    with pytest.raises(ValueError, match="unknown task"):
        make_task("nope", {})
    with pytest.raises(ValueError, match="needs a tokenizer"):
        make_task("passkey", {"filler": filler})
    with pytest.raises(ValueError, match="too short|cannot hold"):
        make_task("passkey", {"filler": filler, "seq_len": 64}, ByteTokenizer())
    assert Path(filler).is_file()
