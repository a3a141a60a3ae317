"""Documents to record bytes: batched tokenization (long texts in pieces), and the
tokenizer `prepare` and its worker processes encode with (`BackendEncoder`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

BATCH_DOCS = 512  # documents per encode_batch call


BATCH_CHARS = 4 << 20  # and at most this many characters (bounds the tokenizer's memory)


# Long documents are tokenized in pieces of about this many characters (see `_text_pieces`).
PIECE_CHARS = 1 << 16


def _batches(documents: Iterator[Any], size: int, max_chars: int) -> Iterator[list[Any]]:
    """Lists of up to `size` documents holding up to `max_chars` characters (or one document)."""
    batch: list[Any] = []
    chars = 0
    for document in documents:
        length = len(document) if isinstance(document, str) else 0
        if batch and chars + length > max_chars:
            yield batch
            batch, chars = [], 0
        batch.append(document)
        chars += length
        if len(batch) == size:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# A single whitespace character between two non-space ones: where byte-level BPE and whitespace
# pre-tokenizers begin a new pre-token anyway.
_PIECE_CUT = re.compile(r"(?<=\S)\s(?=\S)")


def _text_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of about `size` characters (a text up to `2 * size` stays whole).

    Each cut falls before a single whitespace character between two non-space characters, so
    the tokens of the pieces, concatenated, equal those of the whole text for byte-level BPE
    and whitespace pre-tokenizers (tested with the shipped tokenizer). Only a stretch of
    `16 * size` characters without such a place is cut at its end, where the tokens may differ.
    """
    if len(text) <= 2 * size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > 2 * size:
        match = _PIECE_CUT.search(text, start + size, start + 16 * size)
        cut = match.start() if match else start + 16 * size
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
    """`tokenizer.encode_batch(texts)`, long texts encoded piece by piece (`_text_pieces`).

    Pieces go to the tokenizer at most `BATCH_CHARS` characters a call, which bounds its
    memory whatever the document length; bos/eos added per text by the tokenizer's flags are
    kept only at the start and end of each whole text.
    """
    pieces, counts = [], []  # counts: pieces per text
    for text in texts:
        split = _text_pieces(text)
        pieces += split
        counts.append(len(split))
    if len(pieces) == len(texts):
        return tokenizer.encode_batch(texts)
    encoded: list[np.ndarray] = []
    for group in _batches(iter(pieces), len(pieces), BATCH_CHARS):
        encoded += tokenizer.encode_batch(group)
    head = int(bool(getattr(tokenizer, "add_bos", False)))
    tail = int(bool(getattr(tokenizer, "add_eos", False)))
    result, start = [], 0
    for count in counts:
        parts = encoded[start : start + count]
        start += count
        result.append(
            np.concatenate(
                [
                    ids[(head if k else 0) : len(ids) - (tail if k < count - 1 else 0)]
                    for k, ids in enumerate(parts)
                ]
            )
        )
    return result


def _encode_flat(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """`_encode_batch(tokenizer, texts)` back to back: (token ids `(T,) int64`, lengths `(n,)
    int64`); one array per batch, not per text, where the tokenizer can (`encode_batch_flat`)."""
    flat = getattr(tokenizer, "encode_batch_flat", None)
    if flat is not None and all(len(text) <= 2 * PIECE_CHARS for text in texts):
        return flat(texts)
    encoded = _encode_batch(tokenizer, texts)
    lengths = np.fromiter((len(ids) for ids in encoded), np.int64, len(encoded))
    ids = np.concatenate(encoded).astype(np.int64) if encoded else np.zeros(0, np.int64)
    return ids, lengths


def token_records(
    tokenizer: Any, texts: list[str], dtype: np.dtype, append_eos: bool, where: str
) -> tuple[bytes, np.ndarray]:
    """The token records of `texts`: their ids as `dtype`, back to back, and their lengths
    `(m,) int64`, empty documents left out (`len(texts) - m` of them). With `append_eos`,
    each document ends with the tokenizer's eos. A token id that does not fit `dtype` is a
    ValueError naming `where` (the input)."""
    ids, lengths = _encode_flat(tokenizer, texts)
    eos_id = tokenizer.eos_id
    if append_eos:
        if eos_id is None:
            raise ValueError(f"append_eos needs an eos token; tokenizer {tokenizer.name} has none")
        ends = np.cumsum(lengths)
        last = ids[np.maximum(ends - 1, 0)] if ids.size else np.full(len(texts), -1)
        missing = (lengths == 0) | (last != eos_id)
        ids = np.insert(ids, ends[missing], eos_id)
        lengths = lengths + missing
    limit = np.iinfo(dtype).max
    if ids.size and (ids.max() > limit or ids.min() < 0):
        raise ValueError(
            f"{where}: token id {int(ids.max())} does not fit {dtype.name} "
            f"(tokenizer {tokenizer.name} vocab_size {tokenizer.vocab_size})"
        )
    return ids.astype(dtype).tobytes(), lengths[lengths > 0]


@contextlib.contextmanager
def one_tokenizer_thread() -> Iterator[None]:
    """`tokenizers` encodes on one thread inside: prepare's parallelism is its processes, and
    `workers=1` means one core (it reads the variable at each call)."""
    old = os.environ.get(_PARALLELISM)
    os.environ[_PARALLELISM] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_PARALLELISM, None)
        else:
            os.environ[_PARALLELISM] = old


_PARALLELISM = "TOKENIZERS_PARALLELISM"


class _BackendEncoder:
    """`TokenizerWrapper.encode_batch` for worker processes, over the bare `tokenizers` backend.

    It pickles as the backend's JSON, so a spawned worker starts in a fraction of a second
    without reading the tokenizer files again (or importing transformers for a Hub tokenizer).
    It applies the wrapper's bos/eos flags the same way; the tests check it equals
    `encode_batch`.
    """

    def __init__(self, tokenizer: Any):
        self.backend = tokenizer.backend
        self.name, self.vocab_size = tokenizer.name, tokenizer.vocab_size
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        self.add_bos = bool(getattr(tokenizer, "add_bos", False))
        self.add_eos = bool(getattr(tokenizer, "add_eos", False))
        self._fingerprint = tokenizer.fingerprint()
        self._vocab_fingerprint = tokenizer.vocab_fingerprint()

    @classmethod
    def of(cls, tokenizer: Any) -> _BackendEncoder:
        """`tokenizer` itself if it is one, else one built from the `TokenizerWrapper`."""
        return tokenizer if isinstance(tokenizer, cls) else cls(tokenizer)

    def save(self, path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
        """Writes the backend's JSON to `path`; returns what `load` takes: the path and the
        other fields (a few ids and names)."""
        self.backend.save(os.fspath(path))
        fields = {key: value for key, value in vars(self).items() if key != "backend"}
        return os.fspath(path), fields

    @classmethod
    def load(cls, path: str, fields: dict[str, Any]) -> _BackendEncoder:
        """The encoder `save` wrote (JSON only: nothing read from disk is unpickled)."""
        from tokenizers import Tokenizer

        encoder = cls.__new__(cls)
        encoder.backend = Tokenizer.from_file(path)
        vars(encoder).update(fields)
        return encoder

    def fingerprint(self) -> str:
        """The wrapped tokenizer's `fingerprint()`, taken at construction."""
        return self._fingerprint

    def vocab_fingerprint(self) -> str:
        """The wrapped tokenizer's `vocab_fingerprint()`, taken at construction."""
        return self._vocab_fingerprint

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """One `(n_i,) int32` array per text, bos/eos added per the flags."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        head = [self.bos_id] if self.add_bos else []
        tail = [self.eos_id] if self.add_eos else []
        return [
            np.array(head + encoding.ids + tail, dtype=np.int32)
            for encoding in encode(texts, add_special_tokens=False)
        ]

    def encode_batch_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """`encode_batch(texts)` back to back: (ids `(T,) int64`, lengths `(n,) int64`),
        built in one pass over the encodings rather than one array per text."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        encodings = encode(texts, add_special_tokens=False)
        head = [self.bos_id] if self.add_bos else []
        tail = [self.eos_id] if self.add_eos else []
        lengths = np.fromiter((len(e) for e in encodings), np.int64, len(encodings))
        if head or tail:
            pieces = (piece for e in encodings for piece in (head, e.ids, tail))
            lengths += len(head) + len(tail)
        else:
            pieces = (e.ids for e in encodings)
        total = int(lengths.sum())
        return np.fromiter(itertools.chain.from_iterable(pieces), np.int64, total), lengths


def _load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer name or path loaded as a `_BackendEncoder`; anything else unchanged."""
    if tokenizer is None or not isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    from wf_data.data.text.tokenization import TokenizerWrapper

    return _BackendEncoder(
        TokenizerWrapper.from_pretrained(os.fspath(tokenizer), add_bos=False, add_eos=False)
    )


def _tokenizer_identity(tokenizer: Any) -> dict | None:
    if tokenizer is None:
        return None
    return {
        "name": str(tokenizer.name),
        "vocab_size": int(tokenizer.vocab_size),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "sha256": tokenizer.fingerprint(),
        "vocab_fingerprint": tokenizer.vocab_fingerprint(),
    }
