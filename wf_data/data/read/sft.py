"""SFTDataset: chat records -> chat template -> assistant-only loss mask -> best_fit packed rows.

Packing plans rows from document lengths, and dropping overlong conversations changes the
document set, so every conversation is rendered once at construction to learn its token count
(a batched render + Rust tokenization, with a progress bar on large sources). The documents are
then a random-access view (`ChatDocuments`) with known `.lengths`; a document is re-rendered,
deterministically, only when a packed row needs it, so memory stays O(records) integers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from tqdm.auto import tqdm

from wf_data.data.read.packing import DEFAULT_WINDOW_SIZE, BestFitPackedDataset
from wf_data.data.text.chat import (
    render_many_with_masks,
    rendered_lengths,
    resolve_chat_template,
    to_messages,
)
from wf_data.data.text.tokenization import TokenizerWrapper
from wf_data.extras import requires

with requires("hf", feature="SFTDataset (chat templates)"):
    import jinja2

OVERLONG_POLICIES = ("error", "truncate", "drop")
# Show a progress bar for the length pass from this many records on (~1 s of rendering).
PROGRESS_MIN_RECORDS = 5000
_READ_CHUNK = 512
# Records fully rendered (masks included) at construction to fail fast on a template that
# cannot produce masks, before training starts.
_CHECKED_RECORDS = 8


def _source_name(source: Any) -> str:
    path = getattr(source, "path", None)
    return str(path) if path is not None else type(source).__name__


def _read_records(source: Any, indices: Sequence[int]) -> list:
    """Records at `indices` with one batched read when the source offers it."""
    if hasattr(source, "__getitems__"):
        return list(source.__getitems__(indices))
    return [source[int(i)] for i in indices]


def _hf_tokenizer(tokenizer: Any) -> tuple[Any, Any]:
    """`(tokenizer to keep, transformers tokenizer)` from a wrapper, name/path/None or HF object."""
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = TokenizerWrapper.from_pretrained(tokenizer, add_eos=False)
    if isinstance(tokenizer, TokenizerWrapper):
        return tokenizer, tokenizer.hf_tokenizer
    if not hasattr(tokenizer, "apply_chat_template"):
        raise TypeError(
            "tokenizer must be a TokenizerWrapper, a transformers fast tokenizer, a name or path, "
            f"or None (the shipped tokenizer); got {type(tokenizer).__name__}"
        )
    return tokenizer, tokenizer


def _tokenizer_fingerprint(tokenizer: Any, hf_tokenizer: Any) -> str:
    if isinstance(tokenizer, TokenizerWrapper):
        return tokenizer.fingerprint()
    return hashlib.sha256(hf_tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


class ChatDocuments(grain.MapDataset):
    """Random-access SFT documents of a chat source: `{"input_ids": (T,) int32, "loss_mask":
    (T,) uint8}` with `T <= seq_len`, loss only on assistant tokens.

    `lengths` ((M,) int64) is known without reading a document, so best_fit plans rows from it.
    Overlong conversations (more than `seq_len` tokens) raise (`overlong="error"`), keep their
    first `seq_len` tokens (`"truncate"`) or are left out (`"drop"`); `overlong_counts` says how
    many. Document `i` is source record `record_indices[i]`.
    """

    def __init__(
        self,
        source: Any,
        *,
        tokenizer: Any,
        seq_len: int,
        chat_template: str | None = None,
        overlong: str = "error",
        progress: bool | None = None,
    ):
        super().__init__()
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        source_format = getattr(source, "format", None)
        if source_format is not None and source_format != "chat":
            raise TypeError(
                f"{_source_name(source)} holds {source_format!r} records; SFTDataset needs a "
                "'chat' source (records with 'messages'); use PretrainDataset for text or tokens"
            )
        self._source = source
        self._name = _source_name(source)
        self._tokenizer, self._hf = _hf_tokenizer(tokenizer)
        self._template = resolve_chat_template(self._hf, chat_template)
        self.seq_len = int(seq_len)
        self.overlong = overlong
        self._record_lengths, content_digest = self._measure(progress)
        self._check_masks()
        self.record_indices, self.lengths, self.overlong_counts = self._apply_overlong()
        self.fingerprint = self._fingerprint(content_digest)

    # ------------------------------------------------------------------ construction

    def _measure(self, progress: bool | None) -> tuple[np.ndarray, str | None]:
        """Rendered token count of every record, `(N,) int64`; a content hash when the source
        has no fingerprint of its own."""
        num_records = len(self._source)
        if num_records == 0:
            raise ValueError(f"{self._name}: the source has no records")
        digest = None if getattr(self._source, "fingerprint", None) else hashlib.sha256()
        lengths = np.empty(num_records, dtype=np.int64)
        show = num_records >= PROGRESS_MIN_RECORDS if progress is None else progress
        with tqdm(
            total=num_records, desc="SFT: rendering conversations", unit="conv", disable=not show
        ) as bar:
            for start in range(0, num_records, _READ_CHUNK):
                stop = min(start + _READ_CHUNK, num_records)
                records = _read_records(self._source, range(start, stop))
                conversations = [
                    self._messages(record, start + j) for j, record in enumerate(records)
                ]
                if digest is not None:
                    for messages in conversations:
                        digest.update(json.dumps(messages, sort_keys=True, default=str).encode())
                lengths[start:stop] = self._lengths_of(conversations, start)
                bar.update(stop - start)
        return lengths, None if digest is None else digest.hexdigest()

    def _messages(self, record: Any, index: int) -> list[dict]:
        try:
            return to_messages(record, record_index=index)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{self._name}: {err}") from err

    def _lengths_of(self, conversations: list, first_index: int) -> np.ndarray:
        try:
            return rendered_lengths(conversations, self._hf, self._template)
        except jinja2.TemplateError:
            pass  # find the record that fails, to name it
        for j, messages in enumerate(conversations):
            try:
                rendered_lengths([messages], self._hf, self._template)
            except jinja2.TemplateError as err:
                raise ValueError(
                    f"{self._name} record {first_index + j}: the chat template failed: {err}"
                ) from err
        raise AssertionError("a batch failed to render while each record renders")

    def _check_masks(self) -> None:
        """Render a few records with their masks, so a template that breaks the mask method
        fails here rather than mid-training."""
        indices = list(range(min(_CHECKED_RECORDS, len(self._record_lengths))))
        self._render(_read_records(self._source, indices), indices)

    def _apply_overlong(self) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        lengths = self._record_lengths
        overlong = np.flatnonzero(lengths > self.seq_len)
        counts = {"truncated": 0, "dropped": 0, "truncated_tokens": 0}
        if overlong.size and self.overlong == "error":
            first = int(overlong[0])
            raise ValueError(
                f"{self._name} record {first}: conversation renders to {int(lengths[first])} "
                f"tokens > seq_len {self.seq_len} ({overlong.size} of {len(lengths)} records are "
                "overlong); pass overlong='truncate' or overlong='drop'"
            )
        record_indices = np.arange(len(lengths), dtype=np.int64)
        if self.overlong == "truncate":
            counts["truncated"] = int(overlong.size)
            counts["truncated_tokens"] = int((lengths[overlong] - self.seq_len).sum())
            kept_lengths = np.minimum(lengths, self.seq_len)
        else:
            counts["dropped"] = int(overlong.size)
            record_indices = np.flatnonzero(lengths <= self.seq_len).astype(np.int64)
            kept_lengths = lengths[record_indices]
            if record_indices.size == 0:
                raise ValueError(
                    f"{self._name}: all {len(lengths)} conversations are longer than seq_len "
                    f"{self.seq_len} and were dropped"
                )
        for array in (record_indices, kept_lengths):
            array.setflags(write=False)
        return record_indices, kept_lengths, counts

    def _fingerprint(self, content_digest: str | None) -> str:
        source_fingerprint = getattr(self._source, "fingerprint", None)
        if callable(source_fingerprint):
            source_fingerprint = source_fingerprint()
        parts = [
            "sft-chat-documents/1",
            f"source={source_fingerprint or content_digest}",
            f"tokenizer={_tokenizer_fingerprint(self._tokenizer, self._hf)}",
            f"template={hashlib.sha256(self._template.encode()).hexdigest()}",
            f"seq_len={self.seq_len}",
            f"overlong={self.overlong}",
        ]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    # ------------------------------------------------------------------ reading

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id, else its eos id, else 0."""
        for token_id in (self._hf.pad_token_id, self._hf.eos_token_id):
            if token_id is not None:
                return int(token_id)
        return 0

    @property
    def stats(self) -> dict[str, int]:
        """Records, documents kept, their tokens, and the overlong counts."""
        return {
            "records": int(len(self._record_lengths)),
            "documents": int(len(self.lengths)),
            "tokens": int(self.lengths.sum()),
            "max_tokens": int(self.lengths.max()),
            **self.overlong_counts,
        }

    def __len__(self) -> int:
        return len(self.record_indices)

    def __str__(self) -> str:
        return (
            f"ChatDocuments(source={self._name}, seq_len={self.seq_len}, "
            f"overlong={self.overlong}, documents={len(self)})"
        )

    def _render(self, records: list, record_indices: list[int]) -> list[dict[str, np.ndarray]]:
        """Documents of `records` (source records `record_indices`), rendered in one batch."""
        conversations = [self._messages(r, i) for r, i in zip(records, record_indices, strict=True)]
        try:
            rendered = render_many_with_masks(
                conversations, self._hf, self._template, record_indices=record_indices
            )
        except (TypeError, ValueError) as err:
            raise type(err)(f"{self._name}: {err}") from err
        documents = []
        for (input_ids, loss_mask), index in zip(rendered, record_indices, strict=True):
            if len(input_ids) != self._record_lengths[index]:
                raise ValueError(
                    f"{self._name} record {index}: renders to {len(input_ids)} tokens now but "
                    f"{int(self._record_lengths[index])} at construction (the source or the "
                    "tokenizer changed underneath the dataset)"
                )
            documents.append(
                {"input_ids": input_ids[: self.seq_len], "loss_mask": loss_mask[: self.seq_len]}
            )
        return documents

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        record_index = int(self.record_indices[int(index) % len(self)])
        return self._render([self._source[record_index]], [record_index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Documents at `indices`, with one batched read of the source."""
        positions = np.asarray(indices, dtype=np.int64) % len(self)
        record_indices = self.record_indices[positions].tolist()
        return self._render(_read_records(self._source, record_indices), record_indices)


class SFTDataset(BestFitPackedDataset):
    """Chat records packed into `(seq_len,)` rows with best_fit, loss on assistant tokens only.

    A `PackedDataset` (Grain `IterDataset`) over `ChatDocuments`: rows have the batch schema
    (`input_ids`, `labels`, `position_ids`, `segment_ids`, int32) with `labels` -100 on padding,
    on each segment's first token and on every non-assistant token. Documents are reshuffled
    each epoch from `seed`; `num_epochs=None` repeats forever. `tokenizer` is a
    `TokenizerWrapper`, a transformers fast tokenizer, or a name/path (None: the shipped one);
    `chat_template` overrides its template. `pad_id` defaults to the tokenizer's pad (else eos).
    """

    def __init__(
        self,
        source: Any,
        *,
        tokenizer: Any,
        seq_len: int,
        chat_template: str | None = None,
        overlong: str = "error",
        seed: int = 0,
        num_epochs: int | None = None,
        window_size: int = DEFAULT_WINDOW_SIZE,
        pad_id: int | None = None,
        progress: bool | None = None,
    ):
        documents = ChatDocuments(
            source,
            tokenizer=tokenizer,
            seq_len=seq_len,
            chat_template=chat_template,
            overlong=overlong,
            progress=progress,
        )
        super().__init__(
            documents,
            seq_len,
            pad_id=documents.pad_id if pad_id is None else pad_id,
            window_size=window_size,
            seed=seed,
            num_epochs=num_epochs,
        )
        self.documents = documents

    @property
    def overlong_counts(self) -> dict[str, int]:
        """Conversations longer than seq_len: `truncated`, `dropped`, `truncated_tokens`."""
        return dict(self.documents.overlong_counts)

    @property
    def stats(self) -> dict[str, int]:
        """Records, documents kept, their tokens, and the overlong counts."""
        return self.documents.stats

    def __str__(self) -> str:
        return f"SFTDataset({self.documents}, window_size={self.window_size}, seed={self.seed})"
