"""Tokenizers round-trip, data order is fixed by the seed alone, bad input names its file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import make_config

from archbench.train.data import (
    DataError,
    PathCorpus,
    StdlibCorpus,
    WindowOrder,
    build_corpus,
    is_validation,
    tokenize_corpus,
)
from archbench.train.tokenizer import ByteTokenizer, build_tokenizer, from_json, train_bpe


def test_byte_tokenizer_round_trips_arbitrary_bytes() -> None:
    tok = ByteTokenizer()
    rng = random.Random(0)
    for _ in range(50):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        ids = tok.encode_bytes(data)
        assert tok.decode_bytes(ids.tolist()) == data
    text = "naïve café — 日本語 🚀\x00"
    assert tok.decode(tok.encode(text)) == text
    assert tok.token_bytes().sum() == 256


def test_bpe_round_trips_and_counts_bytes() -> None:
    texts = ["def foo(x):\n    return x * 2\n", "héllo wörld ✓ " * 20, "class A: pass\n"] * 30
    tok = train_bpe(texts, 300)
    sample = "def héllo(): return '✓ 日本' \x01"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    table = tok.token_bytes()
    assert int(table[ids].sum()) == len(sample.encode("utf-8"))
    again = from_json(tok.to_json())
    assert again.identity == tok.identity and again.encode(sample) == ids


def test_bpe_is_cached_by_corpus_hash(cache_env: Path, tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    for i in range(5):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i} " * 100)
    cfg = make_config("tokenizer=bpe", "tokenizer.vocab_size=300", "data=text",
                      f"data.path={tmp_path / 'docs'}")
    corpus = build_corpus(cfg.data)
    first = build_tokenizer(cfg.tokenizer, corpus)
    cached = list((cache_env / "tokenizers").glob("*.json"))
    assert len(cached) == 1 and corpus.content_hash[:16] in cached[0].name
    assert build_tokenizer(cfg.tokenizer, corpus).identity == first.identity


def test_stdlib_corpus_is_sorted_and_described() -> None:
    corpus = StdlibCorpus(max_bytes=300_000)
    ids = [Path(doc_id) for doc_id, _ in corpus.documents()]
    assert len(ids) > 10 and ids == sorted(ids)
    described = corpus.describe()
    assert described["python"] and len(described["hash"]) == 64


def test_bad_input_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt is not valid UTF-8"):
        list(PathCorpus(bad).documents())
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt holds no text"):
        list(PathCorpus(empty).documents())
    with pytest.raises(DataError, match="does not exist"):
        PathCorpus(tmp_path / "missing")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="rows.jsonl:1: expected a JSON object with a 'text'"):
        list(PathCorpus(rows).documents())


def test_jsonl_parquet_and_text_sources(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(3)))
    pq.write_table(pa.table({"text": ["pq one", "pq two"]}), tmp_path / "c.parquet")
    texts = [t for _, t in PathCorpus(tmp_path).documents()]
    assert texts == ["plain text", "row 0", "row 1", "row 2", "pq one", "pq two"]


def test_hf_datasets_source_offline_on_local_files(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"hf row {i}"}) for i in range(4)))
    cfg = make_config("data=hf", "data.hf_path=json", f"data.path={rows}")
    texts = [t for _, t in build_corpus(cfg.data).documents()]
    assert texts == [f"hf row {i}" for i in range(4)]


def test_shards_hold_every_document_with_eos_and_a_document_level_split(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i:02d}.txt").write_text(f"doc {i}\n" * (i + 1))
    tok = ByteTokenizer()
    data = tokenize_corpus(PathCorpus(docs), tok, 0.2, tmp_path / "cache")
    assert data.train.n_docs + data.val.n_docs == 40 and data.val.n_docs > 0
    for split in (data.train, data.val):
        arr = np.asarray(split.tokens)
        assert (arr == tok.eos_id).sum() == split.n_docs
        assert len(arr) == split.n_bytes + split.n_docs
    val_docs = [i for i in range(40) if is_validation(str(docs / f"{i:02d}.txt") + "#0", 0.2)]
    assert data.val.n_bytes == sum(len(f"doc {i}\n") * (i + 1) for i in val_docs)
    again = tokenize_corpus(PathCorpus(docs), tok, 0.2, tmp_path / "cache")
    assert again.meta["cache"] == data.meta["cache"]


def test_holdout_tail_splits_a_single_document(tmp_path: Path) -> None:
    one = tmp_path / "one.txt"
    one.write_text("abcdefghij" * 100)
    data = tokenize_corpus(PathCorpus(one), ByteTokenizer(), 0.0, tmp_path / "c", 0.1)
    assert data.train.n_bytes == 900 and data.val.n_bytes == 100


def test_window_order_is_fixed_by_seed_and_shared_by_ranks() -> None:
    a, b = WindowOrder(1000, 8, seed=3), WindowOrder(1000, 8, seed=3)
    for step in (0, 5, 124, 125, 300):  # 125 steps = one epoch: crossing it stays seeded
        assert a.batch(step).tolist() == b.batch(step).tolist()
        halves = np.concatenate([a.batch(step, 0, 2), a.batch(step, 1, 2)])
        assert halves.tolist() == a.batch(step).tolist()
    epoch0 = np.concatenate([a.batch(s) for s in range(125)])
    assert sorted(epoch0.tolist()) == list(range(1000))
    assert a.batch(0).tolist() != WindowOrder(1000, 8, seed=4).batch(0).tolist()


def test_data_order_is_the_same_for_every_backbone(cache_env: Path) -> None:
    """The windows a run reads depend on data and train settings, never on the arch."""
    from archbench.train.trainer import prepare_data

    seen = []
    for arch in ("transformer", "gpt2"):
        cfg = make_config(f"arch={arch}", "data.max_bytes=200000")
        _, data = prepare_data(cfg)
        order = WindowOrder(data.train.n_windows(cfg.train.seq_len), cfg.train.batch_size,
                            cfg.train.seed)
        seen.append(data.train.windows(order.batch(7), cfg.train.seq_len))
    assert seen[0].equal(seen[1])
