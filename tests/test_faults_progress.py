"""Long steps say where they are: a line per unit with a count and the time left, never a
redrawn bar in a log (stderr here is a pipe, as under Slurm or `| tee`)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import make_config

from archbench.progress import Progress
from archbench.train.trainer import prepare_data, run_training

TINY = ("size=micro", "data.max_bytes=300000", "data.val_fraction=0.1", "train.batch_size=4",
        "train.seq_len=64", "train.tokens=2048", "train.eval_every=4", "train.eval_batches=2",
        "train.log_every=2")


def test_progress_lines_count_and_estimate_the_rest() -> None:
    out = io.StringIO()
    progress = Progress(4, "eval X", stream=out, min_interval=0.0)
    progress.advance("bpb")
    progress.advance("mqar")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("eval X: 1/4 bpb (0:00 elapsed, about 0:00 left)")
    assert lines[1].startswith("eval X: 2/4 mqar")


def test_fast_units_are_merged_into_few_lines() -> None:
    out = io.StringIO()
    progress = Progress(10_000, "tokenizing", stream=out, min_interval=60.0)
    for _ in range(10_000):
        progress.advance()
    assert len(out.getvalue().splitlines()) == 2  # the first unit and the last


def test_training_in_a_log_prints_lines_and_names_the_final_evaluation(
        cache_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_training(make_config(*TINY, "train.progress=true"), tmp_path / "run")
    err = capsys.readouterr().err
    assert "\r" not in err  # no bar redrawn into the log
    assert "tokenizing stdlib" in err and "MB" in err  # the corpus, tokenized once
    assert "transformer: 0/8 steps" in err or "transformer: 1/8 steps" in err
    assert "step 8/8, final evaluation on 2 validation batches" in err


def test_bpe_training_says_what_it_reads_and_when_it_merges(
        cache_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_config("tokenizer=bpe", "tokenizer.vocab_size=300", "data.max_bytes=200000",
                      "tokenizer.train_bytes=100000")
    prepare_data(cfg)
    err = capsys.readouterr().err
    assert "training a BPE tokenizer of 300 tokens" in err and "merging pairs now" in err
