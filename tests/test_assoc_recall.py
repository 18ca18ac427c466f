"""Single-query associative recall (train/tasks/recall.py): the answer is the value bound to the
key repeated last, keys are distinct, and bad settings name the parameter."""

from __future__ import annotations

import numpy as np
import pytest

from archbench.train.tasks import IGNORE, make_task


def test_the_answer_is_the_value_bound_to_the_last_key() -> None:
    task = make_task("assoc_recall", {"vocab_size": 30, "seq_len": 29}, split="test")
    inputs, targets = task.batch(range(200), seed=3)
    asked = []
    for row, answer in zip(inputs, targets, strict=True):
        keys, values = row[0:28:2], row[1:28:2]
        assert len(set(keys.tolist())) == 14 and (keys < 15).all() and (values >= 15).all()
        assert (answer[:-1] == IGNORE).all()
        bound = dict(zip(keys.tolist(), values.tolist(), strict=True))
        assert answer[-1] == bound[int(row[-1])]
        asked.append(int(np.flatnonzero(keys == row[-1])[0]))
    assert len(set(asked)) > 10  # every pair may be asked, not only the first or last


@pytest.mark.parametrize(("params", "message"), [
    ({"vocab_size": 21}, "vocab_size=21 must be even"),
    ({"seq_len": 20}, "seq_len=20 must be odd"),
    ({"vocab_size": 10, "seq_len": 13}, r"seq_len=13 holds 6 pairs"),
    ({"pairs": 3}, r"unknown parameter\(s\) \['pairs'\]"),
])
def test_bad_settings_name_the_parameter(params: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_task("assoc_recall", params)
