"""PretrainDataset: source -> shuffle per epoch -> tokenize (text sources) -> pack.

The shuffle is the packer's own (`pack(..., seed=...)`): a different deterministic permutation
of the documents each epoch, so a resume needs no more state than the packer's position.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from wf_data.data.read.packing import DEFAULT_WINDOW_SIZE, PackedDataset, pack
from wf_data.data.text.tokenization import check_source_tokenizer

__all__ = ["PretrainDataset", "TokenizedDocuments"]

# Tokens a `TokenizedDocuments` keeps at least (int32: 64 MB), whatever is pinned.
CACHE_TOKENS = 1 << 24


class TokenizedDocuments:
    """Random-access view of a `text` source as `(n,) int32` token arrays, tokenized on read.

    One `encode_batch` per batched read. Lengths are unknown up front (`lengths = None`), so
    `best_fit` learns them a window at a time (`__getitems__`) and `concat` refuses the source.
    `fingerprint` covers the source and the tokenizer, so a saved state refuses a restore
    under another one.

    Each document is tokenized once: the tokens `__getitems__` makes (the planner measuring a
    window) stay until `read_pieces` has read every one of them (the rows), then go. What is
    kept is bounded by `cache_tokens` (default `CACHE_TOKENS`) or twice the largest batched
    read, oldest first beyond it (a reader in another process never reads this copy's
    tokens). A pickled copy starts empty.
    """

    lengths = None
    format = "tokens"

    def __init__(self, source: Any, tokenizer: Any, *, cache_tokens: int | None = None):
        self.source = source
        self.tokenizer = tokenizer
        digest = hashlib.sha256()
        digest.update(str(_source_fingerprint(source)).encode())
        digest.update(str(tokenizer.fingerprint()).encode())
        self.fingerprint = digest.hexdigest()
        self.cache_tokens = CACHE_TOKENS if cache_tokens is None else int(cache_tokens)
        self._kept = _KeptTokens(self.cache_tokens)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_kept": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._kept = _KeptTokens(self.cache_tokens)

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"TokenizedDocuments({self.source!r}, {self.tokenizer!r})"

    def __getitem__(self, index: int) -> np.ndarray:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[np.ndarray]:
        """Token arrays of records `indices` (one batched read and encode of those not kept);
        they are kept until `read_pieces` has read all their tokens."""
        indices = [int(i) for i in indices]
        return self._kept.get_or_make(indices, self._tokenize)

    def read_pieces(
        self, indices: Sequence[int], offsets: np.ndarray, sizes: np.ndarray
    ) -> np.ndarray:
        """(T,) int32 tokens of pieces `[offsets[i], offsets[i] + sizes[i])` of documents
        `indices`, back to back; documents not kept are tokenized (once, whole)."""
        indices = np.asarray(indices, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        sizes = np.asarray(sizes, dtype=np.int64)
        documents = self._kept.get_or_make(indices.tolist(), self._tokenize, read=sizes.tolist())
        lengths = np.fromiter(map(len, documents), np.int64, len(documents))
        stops = offsets + sizes
        if (stops > lengths).any():
            bad = int(np.flatnonzero(stops > lengths)[0])
            raise ValueError(
                f"{self.source!r} document {int(indices[bad])} has {int(lengths[bad])} tokens "
                f"but the plan needs [.., {int(stops[bad])}): it tokenizes differently now "
                "(another tokenizer?)"
            )
        if not documents:
            return np.zeros(0, dtype=np.int32)
        spans = zip(documents, offsets.tolist(), stops.tolist(), strict=True)
        return np.concatenate([tokens[start:stop] for tokens, start, stop in spans])

    def _tokenize(self, indices: list[int]) -> list[np.ndarray]:
        getitems = getattr(self.source, "__getitems__", None)
        texts = getitems(indices) if getitems is not None else [self.source[i] for i in indices]
        for index, text in zip(indices, texts, strict=True):
            if not isinstance(text, str):
                raise TypeError(
                    f"{self.source!r} record {index}: expected text (str) to tokenize, got "
                    f"{type(text).__name__}; token arrays need a 'tokens' format source "
                    "(no tokenizer)"
                )
        arrays = [np.asarray(ids, dtype=np.int32) for ids in self.tokenizer.encode_batch(texts)]
        for tokens in arrays:
            tokens.setflags(write=False)  # shared with every later reader
        return arrays


class _KeptTokens:
    """Token arrays by record index, each with the count of its tokens not read yet; an array
    goes when all are read, or (oldest first) when more than the capacity is kept: the larger
    of `minimum` and twice the largest batch made. Safe to share between reader threads."""

    def __init__(self, minimum: int):
        self.minimum = self.capacity = minimum
        self._arrays: collections.OrderedDict[int, list] = collections.OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    def get_or_make(self, indices, make, read=None) -> list[np.ndarray]:
        """Arrays of `indices`, those not kept made by `make(missing)`; `read[i]` tokens of
        `indices[i]` are counted as read (default none)."""
        with self._lock:
            found = [self._arrays.get(index) for index in indices]
        missing = list(
            dict.fromkeys(i for i, entry in zip(indices, found, strict=True) if not entry)
        )
        made = dict(zip(missing, make(missing), strict=True)) if missing else {}
        with self._lock:
            if missing:
                batch = sum(tokens.size for tokens in made.values())
                self.capacity = max(self.capacity, self.minimum, 2 * batch)
            arrays = []
            for position, (index, entry) in enumerate(zip(indices, found, strict=True)):
                entry = self._arrays.get(index) if entry is None else entry
                if entry is None:
                    entry = [made[index], made[index].size]
                    if entry[1]:  # an empty document has nothing to read
                        self._arrays[index] = entry
                        self._tokens += entry[1]
                arrays.append(entry[0])
                if read is not None:
                    entry[1] -= read[position]
                    if entry[1] <= 0 and self._arrays.pop(index, None) is not None:
                        self._tokens -= entry[0].size
            while self._tokens > self.capacity:
                self._tokens -= self._arrays.popitem(last=False)[1][0].size
        return arrays


def PretrainDataset(  # noqa: N802 - a dataset constructor, named like SFTDataset
    source: Any,
    *,
    seq_len: int,
    tokenizer: Any = None,
    packing: str = "best_fit",
    seed: int | None = 0,
    num_epochs: int | None = None,
    window_size: int = DEFAULT_WINDOW_SIZE,
    pad_id: int | None = None,
    allow_tokenizer_mismatch: bool = False,
) -> PackedDataset:
    """Packed pre-training rows of `seq_len` tokens from a prepared `source`.

    `source` is a `DocumentSource` / `InMemorySource` of format `tokens` (read as is) or `text`
    (tokenized on the fly with `tokenizer`: a `TokenizerWrapper` or a name/path for
    `TokenizerWrapper.from_pretrained`). Documents are visited in a different deterministic
    permutation each epoch (`seed`; None keeps the source order); `num_epochs=None` repeats
    forever. `packing` is "best_fit" (an `IterDataset`) or "concat" (a `MapDataset`, which needs
    the lengths of a pre-tokenized source). `pad_id` defaults to the tokenizer's pad id, then
    the manifest tokenizer's, then 0. Rows have the batch schema of `wf_data.data.read.packing`.
    A `tokens` source prepared with a tokenizer whose ids differ from `tokenizer`'s raises
    `TokenizerMismatchError` unless `allow_tokenizer_mismatch`.
    """
    source_format = getattr(source, "format", None) or "tokens"
    if isinstance(tokenizer, str):
        from wf_data.data.text.tokenization import TokenizerWrapper

        tokenizer = TokenizerWrapper.from_pretrained(tokenizer)
    if source_format == "text":
        if tokenizer is None:
            raise ValueError(
                f"{_describe(source)} holds text: pass tokenizer=... to tokenize it on the fly, "
                "or pre-tokenize it with `wf-data prepare --tokenizer NAME`"
            )
        if packing == "concat":
            raise ValueError(
                f"{_describe(source)} holds text, whose token counts are unknown until it is "
                "tokenized: concat packing needs them up front. Pre-tokenize it with "
                "`wf-data prepare --tokenizer NAME`, or use packing='best_fit'"
            )
        documents = TokenizedDocuments(source, tokenizer)
    elif source_format == "tokens":
        check_source_tokenizer(source, tokenizer, allow_mismatch=allow_tokenizer_mismatch)
        documents = source
    else:
        raise ValueError(
            f"{_describe(source)} has format {source_format!r}; PretrainDataset reads 'tokens' "
            "or 'text' sources (chat records go to SFTDataset)"
        )
    if pad_id is None:
        pad_id = _default_pad_id(source, tokenizer)
    return pack(
        documents,
        seq_len,
        packing,
        pad_id=pad_id,
        window_size=window_size,
        seed=seed,
        num_epochs=num_epochs,
    )


def _default_pad_id(source: Any, tokenizer: Any) -> int:
    """Tokenizer pad id, else the manifest tokenizer's pad id, else 0."""
    if tokenizer is not None:
        return int(tokenizer.pad_id)
    identity = (getattr(source, "manifest", None) or {}).get("tokenizer") or {}
    pad_id = identity.get("pad_id")
    return 0 if pad_id is None else int(pad_id)


def _source_fingerprint(source: Any) -> Any:
    fingerprint = getattr(source, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else fingerprint


def _describe(source: Any) -> str:
    path = getattr(source, "path", None)
    return f"source {path}" if path is not None else repr(source)
