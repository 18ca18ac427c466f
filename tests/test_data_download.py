"""Downloaded corpora (data=shakespeare): fetched once into the cache, pinned by SHA-256, a
local copy by data.path; no network here: file:// URLs stand in for the download."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import make_config

from archbench.train.data import SHAKESPEARE, DataError, Download, build_corpus, fetch


def _download_of(tmp_path: Path, text: str, sha256: str | None = None) -> Download:
    source = tmp_path / "served" / "input.txt"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(text, encoding="utf-8")
    digest = sha256 or hashlib.sha256(text.encode()).hexdigest()
    return Download("toy", source.as_uri(), digest, len(text.encode()), "toy.txt")


def test_fetch_downloads_once_and_checks_the_checksum(tmp_path: Path) -> None:
    download = _download_of(tmp_path, "First Citizen:\nBefore we proceed any further.\n")
    path = fetch(download, tmp_path / "cache")
    assert path == tmp_path / "cache" / "downloads" / "toy.txt"
    assert path.read_text(encoding="utf-8").startswith("First Citizen:")
    (tmp_path / "served" / "input.txt").unlink()  # the cached, checked copy needs no source
    assert fetch(download, tmp_path / "cache") == path


def test_fetch_refuses_bytes_that_do_not_match(tmp_path: Path) -> None:
    download = _download_of(tmp_path, "not the pinned text\n", sha256="0" * 64)
    with pytest.raises(DataError, match="SHA-256 .* expected .*data.path="):
        fetch(download, tmp_path / "cache")
    assert not (tmp_path / "cache" / "downloads" / "toy.txt").exists()


def test_a_corrupted_cached_copy_is_fetched_again(tmp_path: Path) -> None:
    download = _download_of(tmp_path, "the true text\n")
    path = fetch(download, tmp_path / "cache")
    path.write_text("tampered\n")
    assert fetch(download, tmp_path / "cache").read_text() == "the true text\n"


def test_an_unreachable_source_says_to_pass_data_path(tmp_path: Path) -> None:
    missing = Download("toy", (tmp_path / "nowhere.txt").as_uri(), "0" * 64, 1, "toy.txt")
    with pytest.raises(DataError, match=r"cannot download .*data\.path=/path/to/toy\.txt"):
        fetch(missing, tmp_path / "cache")


def test_shakespeare_config_reads_a_local_copy_by_path(tmp_path: Path) -> None:
    local = tmp_path / "tinyshakespeare.txt"
    local.write_text("ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 50)
    cfg = make_config("data=shakespeare", f"data.path={local}",
                      f"data.cache_dir={tmp_path / 'cache'}")
    corpus = build_corpus(cfg.data)
    texts = [t for _, t in corpus.documents()]
    assert texts == [local.read_text()]
    described = corpus.describe()
    assert described["name"] == "shakespeare" and described["path"] == str(local)
    assert described["expected_sha256"] == SHAKESPEARE.sha256
    assert not (tmp_path / "cache" / "downloads").exists()  # nothing fetched
    assert cfg.data.holdout_tail == 0.1 and cfg.data.val_fraction == 0.0
