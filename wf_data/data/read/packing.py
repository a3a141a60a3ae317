"""Packed rows of one document source: `pack(docs, seq_len, method)` = plans + `read_rows`.

`pack` composes a planner of `wf_data.data.plan.plans` (`concat`: a `MapDataset`; `best_fit`: an
`IterDataset`) with the reader of `wf_data.data.read.rows`. The result is a Grain dataset of rows
(`input_ids`, `labels`, `position_ids`, `segment_ids`, each `(L,)` int32) that also exposes its
two halves, `.plans` and `.reader`, for mixing and the loader. Every token of every document
appears exactly once per epoch.

Iterating reads up to `READ_TOKENS` worth of rows per batched read (one row first, then twice
as many each read), so that a read's fixed cost is amortised; the iterator state is the plan
iterator's state before the next row to return (a few ints).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from wf_data.data.plan.plans import (
    DEFAULT_WINDOW_SIZE,
    BestFitPlans,
    ConcatPlans,
    best_fit_decreasing,
)
from wf_data.data.read.rows import IGNORE_INDEX, ROW_KEYS, RowReader

METHODS = ("best_fit", "concat")
READ_TOKENS = 1 << 20

__all__ = [
    "BestFitPackedDataset",
    "ConcatPackedDataset",
    "DEFAULT_WINDOW_SIZE",
    "IGNORE_INDEX",
    "METHODS",
    "PackedDataset",
    "ROW_KEYS",
    "best_fit_decreasing",
    "pack",
]


def pack(
    docs: Any,
    seq_len: int,
    method: str = "best_fit",
    *,
    pad_id: int = 0,
    window_size: int = DEFAULT_WINDOW_SIZE,
    seed: int | None = None,
    num_epochs: int | None = 1,
) -> PackedDataset:
    """Packs the documents of `docs` into rows of `seq_len` tokens.

    `docs` has `__len__`, `__getitem__`, optionally `__getitems__` (batched reads) and
    `.lengths` ((N,) int64 token counts). A document is a 1-D int array or a dict
    {"input_ids": (n,) int, "loss_mask": (n,) bool} (labels are -100 where the mask is 0).
    `seed=None` keeps the source order; an int seed permutes the documents differently and
    deterministically each epoch. `num_epochs=None` repeats forever. `window_size` (documents
    per best-fit window) is ignored by `concat`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown packing method {method!r}; valid: {METHODS}")
    if method == "concat":
        return ConcatPackedDataset(docs, seq_len, pad_id=pad_id, seed=seed, num_epochs=num_epochs)
    return BestFitPackedDataset(
        docs, seq_len, pad_id=pad_id, window_size=window_size, seed=seed, num_epochs=num_epochs
    )


def _check_docs(docs: Any) -> None:
    if not hasattr(docs, "__len__") or not hasattr(docs, "__getitem__"):
        raise TypeError(
            f"docs must be a random-access source (__len__, __getitem__), got {type(docs)}"
        )


class PackedDataset:
    """What both packed datasets share: `.plans`, `.reader`, configuration and the iterator.

    Attributes: `docs`, `seq_len`, `method`, `pad_id`, `window_size` (None for concat), `seed`,
    `num_epochs`, `lengths` ((N,) int64 or None when the source has none).
    """

    plans: ConcatPlans | BestFitPlans
    reader: RowReader

    def _set_reader(self, docs: Any, pad_id: int) -> None:
        if isinstance(pad_id, bool) or not isinstance(pad_id, int | np.integer):
            raise TypeError(f"pad_id must be an int, got {type(pad_id).__name__}")
        self.docs = docs
        self.pad_id = int(pad_id)
        self.reader = RowReader([docs], self.plans.seq_len, self.pad_id)

    method = property(lambda self: self.plans.method)
    seq_len = property(lambda self: self.plans.seq_len)
    seed = property(lambda self: self.plans.seed)
    num_epochs = property(lambda self: self.plans.num_epochs)
    lengths = property(lambda self: self.plans.lengths)
    window_size = property(lambda self: getattr(self.plans, "window_size", None))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(N,) document indices in epoch `epoch`'s order (see `plans`)."""
        return self.plans.epoch_order(epoch)

    def fingerprint(self) -> dict:
        """Configuration that determines the rows: the plans' fingerprint and the pad id."""
        return {**self.plans.fingerprint(), "pad_id": self.pad_id}

    def __iter__(self) -> PackedRowsIterator:
        return PackedRowsIterator(self)

    def __str__(self) -> str:
        return f"{type(self).__name__}({self.plans}, pad_id={self.pad_id})"


def _in_memory_lengths(docs: Any) -> np.ndarray | None:
    """(N,) int64 token counts of a Python list or tuple of documents (token arrays or lists,
    or dicts with "input_ids"), measured here; None for any other source (or document)."""
    if hasattr(docs, "lengths") or not isinstance(docs, list | tuple):
        return None
    lengths = np.empty(len(docs), dtype=np.int64)
    for index, doc in enumerate(docs):
        tokens = doc.get("input_ids") if isinstance(doc, dict) else doc
        if not isinstance(tokens, np.ndarray | list | tuple):
            return None
        lengths[index] = len(tokens)
    return lengths


class ConcatPackedDataset(PackedDataset, grain.MapDataset):
    """Concat-packed rows: random access (`packed[i]`), 100% fill. Needs `docs.lengths`, or
    `docs` a Python list of documents (measured)."""

    def __init__(self, docs, seq_len: int, *, pad_id: int = 0, seed=None, num_epochs=1):
        super().__init__()
        _check_docs(docs)
        lengths = _in_memory_lengths(docs)
        self.plans = ConcatPlans(
            docs if lengths is None else lengths, seq_len, seed=seed, num_epochs=num_epochs
        )
        self._set_reader(docs, pad_id)

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self.reader(self.plans[index])


class BestFitPackedDataset(PackedDataset, grain.IterDataset):
    """Best-fit-decreasing packed rows over windows of `window_size` documents."""

    def __init__(
        self,
        docs,
        seq_len: int,
        *,
        pad_id: int = 0,
        window_size: int = DEFAULT_WINDOW_SIZE,
        seed=None,
        num_epochs=1,
    ):
        super().__init__()
        _check_docs(docs)
        self.plans = BestFitPlans(docs, seq_len, window_size, seed=seed, num_epochs=num_epochs)
        self._set_reader(docs, pad_id)


class PackedRowsIterator(grain.DatasetIterator):
    """Rows of a packed dataset, read up to `READ_TOKENS` worth of rows at a time.

    `get_state()` is the plan iterator's state before the next row to return; `set_state`
    restores it (and costs at most one best-fit window's planning).
    """

    def __init__(self, packed: PackedDataset):
        super().__init__()
        self._packed = packed
        self._plans = iter(packed.plans)
        # Reads start at one row and double up to `READ_TOKENS` worth: a first row (or a few
        # rows of an endless tiny source) needs no large plan.
        self._max_block_rows = max(1, READ_TOKENS // packed.seq_len)
        self._block_rows = 1
        self._states: list[dict] = []  # plan iterator state before each buffered row
        self._rows: dict[str, np.ndarray] = {}
        self._index = 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self._index >= len(self._states):
            self._fill()
        row = {key: value[self._index] for key, value in self._rows.items()}
        self._index += 1
        return row

    def _fill(self) -> None:
        states, plans = [], []
        while len(plans) < self._block_rows:
            state = self._plans.get_state()
            try:
                plans.append(next(self._plans))
            except StopIteration:
                break
            states.append(state)
        if not plans:
            self._states, self._index = [], 0
            raise StopIteration
        self._block_rows = min(2 * self._block_rows, self._max_block_rows)
        batch = _batch_of_rows(plans)
        rows = self._packed.reader(batch)
        self._rows = {key: rows[key] for key in ROW_KEYS}
        self._states, self._index = states, 0

    def get_state(self) -> dict[str, Any]:
        if self._index < len(self._states):
            return dict(self._states[self._index])
        return self._plans.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._plans.set_state(state)
        self._states, self._rows, self._index = [], {}, 0

    def __str__(self) -> str:
        return f"PackedRowsIterator({self._packed})"


def _batch_of_rows(plans: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """One batch plan (no domains) from row plans."""
    return {
        "doc_ids": np.concatenate([p["doc_ids"] for p in plans]),
        "offsets": np.concatenate([p["offsets"] for p in plans]),
        "lengths": np.concatenate([p["lengths"] for p in plans]),
        "row_pieces": np.fromiter((len(p["doc_ids"]) for p in plans), np.int64, len(plans)),
    }
