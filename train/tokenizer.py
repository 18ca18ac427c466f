"""One tokenizer shared by every backbone of a comparison (docs/design.md, fairness rule 1).

Byte level is the default: 256 byte tokens plus special tokens, nothing to train. Byte-level BPE
is trained locally with Hugging Face `tokenizers`, cached by corpus hash and vocabulary size. Any
`tokenizer.json` can be given by path. Every tokenizer has an `identity` (a content hash) that is
stored in checkpoints and records, so evaluation can refuse a mismatch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from archbench.io import write_text_atomic

SPECIAL_TOKENS = ("<|eos|>", "<|pad|>")


class Tokenizer:
    """The interface the data layer, evaluators and generation use."""

    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte length of every token (0 for specials): bits per byte needs it."""
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    @property
    def identity(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_json())


class ByteTokenizer(Tokenizer):
    """Token i < 256 is byte i; then <|eos|>, <|pad|>. Round-trips any bytes exactly."""

    def __init__(self) -> None:
        self.eos_id, self.pad_id = 256, 257
        self.vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return bytes(i for i in ids if i < 256)

    def token_bytes(self) -> np.ndarray:
        out = np.ones(self.vocab_size, dtype=np.int64)
        out[256:] = 0
        return out

    def to_json(self) -> str:
        return json.dumps({"archbench_tokenizer": "byte", "specials": list(SPECIAL_TOKENS)})


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` model (byte-level BPE trained here, or a given file)."""

    def __init__(self, json_text: str) -> None:
        from tokenizers import Tokenizer as RawTokenizer

        self.raw = RawTokenizer.from_str(json_text)
        self._json = json_text
        self.vocab_size = self.raw.get_vocab_size()
        eos = self.raw.token_to_id(SPECIAL_TOKENS[0])
        if eos is None:  # a foreign tokenizer.json: add our specials at the end
            self.raw.add_special_tokens(list(SPECIAL_TOKENS))
            self._json = self.raw.to_str()
            self.vocab_size = self.raw.get_vocab_size()
            eos = self.raw.token_to_id(SPECIAL_TOKENS[0])
        self.eos_id = eos
        self.pad_id = self.raw.token_to_id(SPECIAL_TOKENS[1])

    def encode(self, text: str) -> list[int]:
        return self.raw.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.raw.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.raw.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """Byte-level BPE spells every byte as one character, so a token's byte count is its
        length; decoding single tokens would count a split UTF-8 character as U+FFFD."""
        specials = {self.raw.token_to_id(t) for t in SPECIAL_TOKENS}
        byte_level = (json.loads(self._json).get("decoder") or {}).get("type") == "ByteLevel"
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i in specials:
                continue
            if byte_level:
                out[i] = len(self.raw.id_to_token(i))
            else:
                out[i] = len(self.raw.decode([i], skip_special_tokens=False).encode("utf-8"))
        return out

    def to_json(self) -> str:
        return self._json


class PublishedTokenizer(HFTokenizer):
    """A published model's own tokenizer.json, kept exactly (no tokens added: the model's
    embedding has no rows for them), with the end-of-text and padding tokens it names.

    Stored as {"archbench_tokenizer": "published", "eos_token", "pad_token", "tokenizer_json"}
    so the identity covers the choice of EOS; `inner_json` is the original file, byte for byte
    (an export writes it back unchanged).
    """

    def __init__(self, json_text: str, eos_token: str, pad_token: str | None = None) -> None:
        from tokenizers import Tokenizer as RawTokenizer

        self.raw = RawTokenizer.from_str(json_text)
        self.inner_json = json_text
        self.vocab_size = self.raw.get_vocab_size()
        self.eos_token, self.pad_token = eos_token, pad_token or eos_token
        ids = {t: self.raw.token_to_id(t) for t in (self.eos_token, self.pad_token)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer.json has no token {missing[0]!r} (named as eos/pad)")
        self.eos_id, self.pad_id = ids[self.eos_token], ids[self.pad_token]
        self._json = json.dumps({"archbench_tokenizer": "published", "eos_token": self.eos_token,
                                 "pad_token": self.pad_token, "tokenizer_json": json_text},
                                ensure_ascii=False)

    def token_bytes(self) -> np.ndarray:
        """As HFTokenizer, but the model's own specials count 0 bytes, SentencePiece's word
        marker one space, and byte-fallback tokens (<0xAB>) one byte."""
        specials = {self.raw.token_to_id(t.content) for t in
                    self.raw.get_added_tokens_decoder().values() if t.special}
        byte_level = (json.loads(self.inner_json).get("decoder") or {}).get("type") == "ByteLevel"
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            token = self.raw.id_to_token(i)
            if i in specials or token is None:
                continue
            if byte_level:
                out[i] = len(token)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                out[i] = 1
            else:
                out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return out


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(raw.to_str())


def from_json(json_text: str) -> Tokenizer:
    data = json.loads(json_text)
    if data.get("archbench_tokenizer") == "byte":
        return ByteTokenizer()
    if data.get("archbench_tokenizer") == "published":
        return PublishedTokenizer(data["tokenizer_json"], data["eos_token"], data.get("pad_token"))
    return HFTokenizer(json_text)


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    return from_json(path.read_text(encoding="utf-8"))


def vocab_size_of(cfg: Any) -> tuple[int, str | None]:
    """The vocabulary size of `cfg.tokenizer` without a corpus (`archbench info`, benchmarks and
    the size solver need no more), and a note when it is the configured rather than a built size:
    a BPE tokenizer would have to be trained on the corpus first, so its configured size is used.
    """
    if cfg.kind == "bpe":
        return int(cfg.vocab_size), "BPE tokenizer: vocab size taken from tokenizer.vocab_size"
    return build_tokenizer(cfg).vocab_size, None


def _with_progress(texts: Iterable[str], cfg: Any, cache: Path) -> Iterator[str]:
    """Training BPE on tens of MB takes a minute: say how much was read, then that merges run."""
    from archbench.progress import Progress

    progress = Progress(cfg.train_bytes, f"training a BPE tokenizer of {cfg.vocab_size} tokens "
                        f"(once; cached as {cache})", unit="MB", scale=1e6, min_interval=5.0)
    for text in texts:
        progress.advance("read", units=len(text))
        yield text
    progress.say(progress.line("read; merging pairs now"))


def build_tokenizer(cfg: Any, corpus: Any | None = None) -> Tokenizer:
    """The tokenizer of `cfg.tokenizer`; BPE needs the corpus (trained once, then cached)."""
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "file":
        return load_tokenizer(cfg.path)
    if corpus is None:
        raise ValueError("tokenizer.kind='bpe' needs a corpus to train on")
    cache = Path(cfg.cache_dir) / f"bpe-{corpus.content_hash[:16]}-{cfg.vocab_size}.json"
    if cache.is_file():
        return load_tokenizer(cache)
    tok = train_bpe(_with_progress(corpus.iter_texts(max_bytes=cfg.train_bytes), cfg, cache),
                    cfg.vocab_size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tok.save(cache)
    return tok
