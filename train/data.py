"""Corpora -> token shards (tokenized once, memory-mapped, cached) -> seeded fixed-length windows.

Fairness rule 2 lives here: the window order depends only on the seed, the sequence length and the
token stream, never on the model, so every backbone sees the same tokens in the same order, and a
resumed run continues from the exact batch where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from archbench.io import write_atomic, write_json_atomic
from archbench.progress import Progress
from archbench.train.tokenizer import ByteTokenizer, Tokenizer

TEXT_SUFFIXES_SKIPPED = {".parquet", ".jsonl"}


class DataError(ValueError):
    """Bad input data, reported with the file it came from."""


class Corpus:
    """An ordered collection of documents with a content hash (for caching and records)."""

    name: str = "corpus"

    def documents(self) -> Iterator[tuple[str, str]]:
        """(document id, text) in a fixed order."""
        raise NotImplementedError

    @cached_property
    def content_hash(self) -> str:
        h = hashlib.sha256()
        for doc_id, text in self.documents():
            h.update(doc_id.encode())
            h.update(b"\0")
            h.update(text.encode("utf-8", errors="surrogatepass"))
            h.update(b"\0")
        return h.hexdigest()

    def iter_texts(self, max_bytes: int | None = None) -> Iterator[str]:
        seen = 0
        for _, text in self.documents():
            if max_bytes is not None and seen >= max_bytes:
                return
            seen += len(text)
            yield text

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "hash": self.content_hash}


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid UTF-8 (byte {exc.start}); convert it or remove it"
        ) from exc


class StdlibCorpus(Corpus):
    """The running Python's standard-library sources: real text and code, on every machine.

    Files that are not UTF-8 (a few encoding test fixtures) are skipped and counted, so the
    content hash and the record say exactly what was used.
    """

    name = "stdlib"

    def __init__(self, max_bytes: int | None = None) -> None:
        self.root = Path(sysconfig.get_paths()["stdlib"])
        self.max_bytes = max_bytes
        self.skipped: list[str] = []

    def files(self) -> list[Path]:
        return sorted(
            p for p in self.root.rglob("*.py")
            if "site-packages" not in p.parts and "dist-packages" not in p.parts
        )

    def documents(self) -> Iterator[tuple[str, str]]:
        total = 0
        self.skipped = []
        for path in self.files():
            if self.max_bytes is not None and total >= self.max_bytes:
                return
            try:
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                self.skipped.append(str(path.relative_to(self.root)))
                continue
            if text.strip():
                total += len(text)
                yield str(path.relative_to(self.root)), text

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "python": sys.version.split()[0], "root": str(self.root),
                "skipped_non_utf8": len(self.skipped), "max_bytes": self.max_bytes}


class PathCorpus(Corpus):
    """Plain text, JSONL (one JSON object per line, text under `text_field`) and Parquet files,
    given as one file or a folder (all files below it, sorted)."""

    name = "path"

    def __init__(self, path: str | Path, text_field: str = "text",
                 max_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.text_field = text_field
        self.max_bytes = max_bytes
        if not self.path.exists():
            raise DataError(f"data.path={str(self.path)!r} does not exist")
        if self.path.is_dir() and not self.files():
            raise DataError(f"data.path={str(self.path)!r} is a folder with no files")

    def files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.startswith("."))

    def _file_docs(self, path: Path) -> Iterator[str]:
        if path.suffix == ".jsonl":
            for lineno, line in enumerate(_read_utf8(path).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    yield str(obj[self.text_field])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise DataError(
                        f"{path}:{lineno}: expected a JSON object with a {self.text_field!r} "
                        f"field (data.text_field)"
                    ) from exc
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if self.text_field not in table.column_names:
                raise DataError(f"{path}: no column {self.text_field!r} (data.text_field); "
                                f"columns are {table.column_names}")
            yield from (str(t) for t in table.column(self.text_field).to_pylist())
        else:
            yield _read_utf8(path)

    def documents(self) -> Iterator[tuple[str, str]]:
        total = 0
        for path in self.files():
            found = False
            for i, text in enumerate(self._file_docs(path)):
                if self.max_bytes is not None and total >= self.max_bytes:
                    return
                if text.strip():
                    found = True
                    total += len(text)
                    yield f"{path}#{i}", text
            if not found:
                raise DataError(f"{path} holds no text (empty file or no documents)")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.path)}


class HFDatasetCorpus(Corpus):
    """A Hugging Face `datasets` dataset (a hub name where reachable, or a local builder such as
    'json' / 'text' with data files)."""

    name = "hf"

    def __init__(self, hf_path: str, hf_name: str | None, split: str, text_field: str,
                 data_files: str | None = None, max_bytes: int | None = None) -> None:
        import datasets

        self.dataset = datasets.load_dataset(hf_path, hf_name, split=split, data_files=data_files)
        if text_field not in self.dataset.column_names:
            raise DataError(f"dataset {hf_path!r} has no column {text_field!r} (data.text_field); "
                            f"columns are {self.dataset.column_names}")
        self.hf_path, self.text_field, self.max_bytes = hf_path, text_field, max_bytes

    def documents(self) -> Iterator[tuple[str, str]]:
        total = 0
        for i, row in enumerate(self.dataset):
            if self.max_bytes is not None and total >= self.max_bytes:
                return
            text = str(row[self.text_field])
            if text.strip():
                total += len(text)
                yield f"{self.hf_path}#{i}", text

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "hf_path": self.hf_path}


@dataclass(frozen=True)
class Download:
    """A corpus file fetched once into the cache folder and pinned by its SHA-256, so every
    machine that trains on it trains on the same bytes."""

    name: str
    url: str
    sha256: str
    n_bytes: int
    filename: str


# tinyshakespeare from char-rnn's repository, the file nanoGPT's shakespeare_char downloads.
SHAKESPEARE = Download(
    name="shakespeare",
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    n_bytes=1_115_394,
    filename="tinyshakespeare.txt",
)


def _sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(download: Download, cache_dir: str | Path, timeout_s: float = 60.0) -> Path:
    """The downloaded file in `cache_dir`/downloads, fetched on first use and checked against
    its SHA-256 (a cached copy that no longer matches is fetched again). Without network, or when
    the bytes differ, the error says how to pass a local copy instead (`data.path=`)."""
    import urllib.request

    target = Path(cache_dir) / "downloads" / download.filename
    if target.is_file() and _sha256_of(target) == download.sha256:
        return target
    offline = f"pass a local copy of the file with data.path=/path/to/{download.filename}"
    try:
        with urllib.request.urlopen(download.url, timeout=timeout_s) as response:
            data = response.read()
    except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors
        raise DataError(f"data={download.name}: cannot download {download.url} ({exc}); "
                        f"{offline}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != download.sha256:
        raise DataError(
            f"data={download.name}: {download.url} gave {len(data)} bytes with SHA-256 {digest}, "
            f"expected {download.n_bytes} bytes with SHA-256 {download.sha256} (the file changed "
            f"or the transfer was cut); {offline}")
    write_atomic(target, data)
    return target


class DownloadedCorpus(PathCorpus):
    """A pinned download (see `Download`), or the local copy given by `data.path`."""

    def __init__(self, download: Download, path: str | Path | None, cache_dir: str | Path,
                 max_bytes: int | None = None) -> None:
        self.download = download
        self.name = download.name
        super().__init__(path if path else fetch(download, cache_dir), max_bytes=max_bytes)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": self.download.url,
                "expected_sha256": self.download.sha256}


DOWNLOADS = {SHAKESPEARE.name: SHAKESPEARE}


def build_corpus(cfg: Any) -> Corpus:
    if cfg.source == "stdlib":
        return StdlibCorpus(cfg.max_bytes)
    if cfg.source in DOWNLOADS:
        return DownloadedCorpus(DOWNLOADS[cfg.source], cfg.path, cfg.cache_dir, cfg.max_bytes)
    if cfg.source == "path":
        return PathCorpus(cfg.path, cfg.text_field, cfg.max_bytes)
    if cfg.source == "hf":
        if not cfg.hf_path:
            raise DataError("data.hf_path is required when data.source='hf'")
        return HFDatasetCorpus(cfg.hf_path, cfg.hf_name, cfg.hf_split, cfg.text_field,
                               cfg.path, cfg.max_bytes)
    raise DataError(f"data.source={cfg.source!r} does not give a text corpus")


def is_validation(doc_id: str, fraction: float) -> bool:
    """Held out by document, by a hash of its id: stable when other documents come and go."""
    digest = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return digest / 2**64 < fraction


@dataclass
class TokenSplit:
    """One split's tokens, memory-mapped, with EOS after every document."""

    tokens: np.ndarray
    n_bytes: int
    n_docs: int

    def __len__(self) -> int:
        return len(self.tokens)

    def n_windows(self, seq_len: int) -> int:
        return max(0, (len(self.tokens) - 1) // seq_len)

    def window(self, index: int, seq_len: int) -> np.ndarray:
        start = index * seq_len
        return np.asarray(self.tokens[start : start + seq_len + 1], dtype=np.int64)

    def windows(self, indices: list[int] | np.ndarray, seq_len: int) -> torch.Tensor:
        """(len(indices), seq_len + 1) token ids: inputs are [:, :-1], targets [:, 1:]."""
        return torch.from_numpy(np.stack([self.window(int(i), seq_len) for i in indices]))


@dataclass
class TokenData:
    train: TokenSplit
    val: TokenSplit
    meta: dict[str, Any]


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def split_documents(corpus: Corpus, val_fraction: float,
                    holdout_tail: float) -> Iterator[tuple[str, str, str]]:
    """(split, doc id, text): whole documents by hash, plus each document's tail if asked."""
    for doc_id, text in corpus.documents():
        if is_validation(doc_id, val_fraction):
            yield "val", doc_id, text
            continue
        cut = len(text) - int(len(text) * holdout_tail)
        yield "train", doc_id, text[:cut]
        if cut < len(text):
            yield "val", f"{doc_id}#tail", text[cut:]


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer, val_fraction: float,
                    cache_dir: str | Path, holdout_tail: float = 0.0) -> TokenData:
    """Tokenize once into `cache_dir/<corpus hash>-<tokenizer id>-<split>/{train,val}.bin`."""
    key = f"{corpus.content_hash[:16]}-{tokenizer.identity}-{val_fraction:g}-{holdout_tail:g}"
    folder = Path(cache_dir) / key
    index_path = folder / "index.json"
    dtype = _dtype_for(tokenizer.vocab_size)
    if not index_path.is_file():
        buffers: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        stats = {s: {"bytes": 0, "docs": 0} for s in buffers}
        eos = np.array([tokenizer.eos_id], dtype=dtype)
        pending: list[tuple[str, str, str]] = []
        # Minutes on a large corpus with BPE: a line every few seconds says it is not a hang.
        progress = Progress(getattr(corpus, "max_bytes", None), f"tokenizing {corpus.name} "
                            f"(once; cached in {folder})", unit="MB", scale=1e6,
                            min_interval=5.0)

        def flush() -> None:
            texts = [t for _, _, t in pending]
            if isinstance(tokenizer, ByteTokenizer):
                encoded = [tokenizer.encode_bytes(t.encode("utf-8", "surrogatepass"))
                           for t in texts]
            else:
                encoded = [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch(texts)]
            for (split, _, text), ids in zip(pending, encoded):
                buffers[split] += [ids.astype(dtype, copy=False), eos]
                size = len(text.encode("utf-8", "surrogatepass"))
                stats[split]["bytes"] += size
                stats[split]["docs"] += 1
                progress.advance(units=size)
            pending.clear()

        for doc in split_documents(corpus, val_fraction, holdout_tail):
            pending.append(doc)
            if len(pending) >= 512:
                flush()
        flush()
        progress.done(f"{stats['train']['docs'] + stats['val']['docs']} documents")
        if stats["train"]["docs"] == 0:
            raise DataError(f"corpus {corpus.name!r} gave no training documents")
        for split, parts in buffers.items():
            arr = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
            write_atomic(folder / f"{split}.bin", arr.tobytes())
        write_json_atomic(index_path, {
            "corpus": corpus.describe(), "tokenizer": tokenizer.identity,
            "dtype": dtype.name, "val_fraction": val_fraction,
            "splits": {s: {**stats[s], "tokens": int(sum(len(p) for p in buffers[s]))}
                       for s in buffers},
        })
    meta = json.loads(index_path.read_text())
    splits = {}
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        size = path.stat().st_size
        arr = (np.memmap(path, dtype=meta["dtype"], mode="r") if size
               else np.zeros(0, dtype=meta["dtype"]))
        info = meta["splits"][split]
        splits[split] = TokenSplit(arr, info["bytes"], info["docs"])
    meta["cache"] = str(folder)
    return TokenData(splits["train"], splits["val"], meta)


class WindowOrder:
    """The global order of training windows: a fresh seeded permutation every epoch.

    Global batch `step` holds positions [step * batch, (step + 1) * batch) of that order; under
    data parallelism rank r takes its contiguous slice of each global batch, so the union over
    ranks is the same stream a single process would read.
    """

    def __init__(self, n_windows: int, batch_size: int, seed: int) -> None:
        if n_windows < 1:
            raise DataError("the training split is shorter than one window; lower train.seq_len")
        self.n_windows, self.batch_size, self.seed = n_windows, batch_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng([self.seed, epoch])
            self._perms = {epoch: rng.permutation(self.n_windows)}
        return self._perms[epoch]

    def batch(self, step: int, rank: int = 0, world: int = 1) -> np.ndarray:
        if self.batch_size % world:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by the "
                             f"world size {world}")
        local = self.batch_size // world
        positions = step * self.batch_size + rank * local + np.arange(local)
        return np.array([self._perm(int(p // self.n_windows))[p % self.n_windows]
                         for p in positions])

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n_windows


def load_data(data_cfg: Any, tokenizer: Tokenizer, corpus: Corpus | None = None) -> TokenData:
    """Token data of `data_cfg` for `tokenizer` (synthetic tasks come from train.tasks)."""
    if data_cfg.source == "task":
        from archbench.train.tasks import task_token_data

        return task_token_data(data_cfg.task, tokenizer)
    corpus = corpus or build_corpus(data_cfg)
    return tokenize_corpus(corpus, tokenizer, data_cfg.val_fraction, data_cfg.cache_dir,
                           data_cfg.holdout_tail)
