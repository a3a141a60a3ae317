"""Packing documents into fixed-length rows: `concat` and `best_fit`, lossless and resumable.

`pack(docs, seq_len, method)` turns a random-access source of token documents into rows of the
batch schema (`input_ids`, `labels`, `position_ids`, `segment_ids`, each `(L,)` int32). Every
token of every document appears exactly once per epoch; a document longer than `seq_len` is cut
into pieces, each its own segment (positions restart at 0, first token not predicted).

Work is split in two so that data-parallel ranks can share one plan:

- *planning* (`next_plans`) decides which `(doc, start, stop)` pieces fill each row, from the
  documents' lengths only (no token reads when the source has `.lengths`);
- *materializing* (`materialize`) reads just the documents those rows need, in one batched
  `__getitems__` call, and builds the `(n, L)` arrays with whole-row numpy operations.

`concat` is a Grain `MapDataset` (row `i` is located by `searchsorted` over the cumulative
lengths of its epoch's document order). `best_fit` is an `IterDataset`: best-fit-decreasing over
windows of `window_size` documents; its state is `(epoch, window, row)`, and a resume replans a
single window.

Row layout (all `(L,)` int32): `labels` are the tokens with -100 on padding and on the first
token of every segment (and, for dict documents with a `loss_mask`, wherever the mask is 0);
`position_ids` restart at 0 per segment and are 0 on padding; `segment_ids` number the row's
segments 1, 2, ... and are 0 on padding, which always ends the row.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import operator
import sys
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

METHODS = ("best_fit", "concat")
# Documents per best-fit window: >= 99% fill on lognormal document lengths with seq_len 2048
# (see tools/bench.py); planning cost grows only linearly with it.
DEFAULT_WINDOW_SIZE = 4096
# Iterating row by row reads the documents of READ_TOKENS worth of rows in one batched call
# (amortising the record reader's per-call cost: ArrayRecord's batched read dispatches to a
# thread pool) and builds rows BUILD_TOKENS at a time into reused buffers (~0.5 MiB per array:
# they stay in cache, and fresh allocations of that size cost page faults).
READ_TOKENS = 1 << 21
BUILD_TOKENS = 1 << 17
# Documents longer than seq_len feed several rows; an iterator keeps up to this many of their
# tokens so each is read once per window rather than once per piece. Same bound for the
# documents that planning read from a source without lengths (beyond the last two windows).
CACHE_TOKENS = 1 << 23
IGNORE_INDEX = -100
ROW_KEYS = ("input_ids", "labels", "position_ids", "segment_ids")

__all__ = [
    "BestFitPackedDataset",
    "ConcatPackedDataset",
    "DEFAULT_WINDOW_SIZE",
    "IGNORE_INDEX",
    "METHODS",
    "PackedDataset",
    "PackedRowsIterator",
    "RowPlan",
    "best_fit_decreasing",
    "pack",
]


class RowPlan(NamedTuple):
    """Which document pieces fill one row: `pieces` = ((doc_index, start, stop), ...) in row order.

    `epoch` is the epoch of the row's first piece. Small and picklable: mixing and the loader
    plan every row of a global batch and ship plans to the process that materializes them.
    """

    epoch: int
    pieces: tuple[tuple[int, int, int], ...]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the row."""
        return sum(stop - start for _, start, stop in self.pieces)


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
        return ConcatPackedDataset(
            docs, seq_len, pad_id=pad_id, seed=seed, num_epochs=num_epochs
        )
    return BestFitPackedDataset(
        docs, seq_len, pad_id=pad_id, window_size=window_size, seed=seed, num_epochs=num_epochs
    )


# --------------------------------------------------------------------------- datasets


class PackedDataset:
    """What both packers share: configuration, epoch order, fingerprint and the iterator.

    Attributes: `docs`, `seq_len`, `method`, `pad_id`, `window_size` (None for concat), `seed`,
    `num_epochs`, `lengths` ((N,) int64 or None when the source has none).
    """

    method: str

    def _configure(self, docs, seq_len, pad_id, window_size, seed, num_epochs) -> None:
        for name, value in (("seq_len", seq_len), ("pad_id", pad_id)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if window_size is not None and (not isinstance(window_size, int) or window_size < 1):
            raise ValueError(f"window_size must be an int >= 1, got {window_size!r}")
        if seed is not None and (not isinstance(seed, int | np.integer) or seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {seed!r}")
        if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
            raise ValueError(
                f"num_epochs must be None (forever) or an int >= 1, got {num_epochs!r}"
            )
        if not hasattr(docs, "__len__") or not hasattr(docs, "__getitem__"):
            raise TypeError(
                f"docs must be a random-access source (__len__, __getitem__), got {type(docs)}"
            )
        self.docs = docs
        self.seq_len = int(seq_len)
        self.pad_id = int(pad_id)
        self.window_size = window_size
        self.seed = None if seed is None else int(seed)
        self.num_epochs = num_epochs
        self.num_docs = len(docs)
        lengths = getattr(docs, "lengths", None)
        if lengths is not None:
            lengths = np.asarray(lengths, dtype=np.int64)
            if lengths.shape != (self.num_docs,):
                raise ValueError(
                    f"docs.lengths has shape {lengths.shape}, expected ({self.num_docs},)"
                )
            if self.num_docs and lengths.min() < 0:
                raise ValueError("docs.lengths has negative entries")
        self.lengths = lengths
        self._orders: dict[int, np.ndarray] = {}
        self._cache_lock = threading.Lock()  # Grain may read a MapDataset from threads

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(N,) int32 (int64 beyond 2**31 documents) document indices in epoch `epoch`'s order.

        `seed=None`: the source order; else `default_rng([seed, epoch]).permutation(N)`.
        """
        order = self._orders.get(epoch)
        if order is None:
            if self.seed is None:
                order = np.arange(self.num_docs, dtype=np.int64)
            else:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_docs)
            if self.num_docs < 2**31:
                order = order.astype(np.int32)  # half the memory for big corpora
            order.setflags(write=False)
            with self._cache_lock:
                if len(self._orders) >= 2:
                    self._orders.pop(next(iter(self._orders)))
                self._orders[epoch] = order
        return order

    def fingerprint(self) -> dict:
        """Configuration that determines the rows: method, sizes, seed, pad id and source."""
        source = getattr(self.docs, "fingerprint", None)
        if callable(source):
            source = source()
        return {
            "method": self.method,
            "seq_len": self.seq_len,
            "window_size": self.window_size,
            "seed": self.seed,
            "pad_id": self.pad_id,
            "num_docs": self.num_docs,
            "source": source,
        }

    def _state_check(self) -> dict:
        """The part of an iterator state that must match on restore (a few short fields).

        A hash of the fingerprint without `pad_id` (which does not move rows around).
        """
        check = self.__dict__.get("_state_check_cache")
        if check is None:
            fingerprint = self.fingerprint()
            fingerprint.pop("pad_id")
            digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode())
            check = {"method": self.method, "config": digest.hexdigest()[:16]}
            self._state_check_cache = check
        return dict(check)

    def __iter__(self) -> PackedRowsIterator:
        return PackedRowsIterator(self)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_orders"] = {}
        del state["_cache_lock"]
        state.pop("_stats", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache_lock = threading.Lock()


class ConcatPackedDataset(PackedDataset, grain.MapDataset):
    """Documents laid end to end and cut every `seq_len` tokens: 100% fill, random access.

    Row `i` covers tokens `[i * L, (i + 1) * L)` of the stream epoch 0, epoch 1, ...; only the
    very last row (finite `num_epochs`) is padded. A piece continuing from the previous row
    starts a new segment. Needs `docs.lengths`.
    """

    method = "concat"

    def __init__(self, docs, seq_len: int, *, pad_id: int = 0, seed=None, num_epochs=1):
        super().__init__()
        self._configure(docs, seq_len, pad_id, None, seed, num_epochs)
        if self.lengths is None:
            raise ValueError(
                f"concat packing needs document lengths, and {type(docs).__name__} has no "
                "`.lengths` (text tokenized on the fly?): pre-tokenize with "
                "`wf-data prepare --tokenizer ...` or use method='best_fit'"
            )
        self.tokens_per_epoch = int(self.lengths.sum())
        self._cumsums: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        if self.tokens_per_epoch == 0:
            return 0
        if self.num_epochs is None:
            return sys.maxsize
        return -(-self.num_epochs * self.tokens_per_epoch // self.seq_len)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._getitems([index])[0]

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        batch = self.materialize_rows(indices)
        return [_row(batch, i) for i in range(len(indices))]

    def materialize_rows(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Rows `indices` as a batch dict of (n, L) int32 arrays (one batched read)."""
        return _DocumentReader(self, cache=False).materialize(self.plan_rows(indices))

    def __str__(self) -> str:
        return f"ConcatPackedDataset(seq_len={self.seq_len}, seed={self.seed})"

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_cumsums"] = {}
        return state

    def _cumsum(self, epoch: int) -> np.ndarray:
        """(N + 1,) int64 token offsets of the documents of `epoch` in visiting order."""
        cumsum = self._cumsums.get(epoch)
        if cumsum is None:
            cumsum = np.zeros(self.num_docs + 1, dtype=np.int64)
            np.cumsum(self.lengths[self.epoch_order(epoch)], out=cumsum[1:])
            with self._cache_lock:
                if len(self._cumsums) >= 2:
                    self._cumsums.pop(next(iter(self._cumsums)))
                self._cumsums[epoch] = cumsum
        return cumsum

    def plan_rows(self, indices: Sequence[int]) -> list[RowPlan]:
        """The pieces of rows `indices` (from lengths only; no token reads)."""
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        length = len(self)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= length):
            bad = wanted[(wanted < 0) | (wanted >= length)][0]
            raise IndexError(f"row {bad} out of range for {self} with {length} rows")
        if not wanted.size:
            return []
        rows, wanted_at = np.unique(wanted, return_inverse=True)
        tokens, seq_len = self.tokens_per_epoch, self.seq_len
        span_start = rows * seq_len
        span_stop = span_start + seq_len
        if self.num_epochs is not None:
            np.minimum(span_stop, self.num_epochs * tokens, out=span_stop)
        # Cut each row's token span at epoch boundaries into (row, epoch, lo, hi) spans.
        spans = []
        span_rows = np.arange(rows.size)
        while span_rows.size:
            epoch = span_start // tokens
            base = epoch * tokens
            cut = np.minimum(span_stop, base + tokens)
            spans.append((span_rows, epoch, span_start - base, cut - base))
            more = cut < span_stop
            span_rows, span_start, span_stop = span_rows[more], cut[more], span_stop[more]
        span_rows, span_epochs, span_lo, span_hi = (
            np.concatenate(part) for part in zip(*spans, strict=True)
        )
        piece_rows, piece_docs, piece_starts, piece_stops = [], [], [], []
        for epoch in np.unique(span_epochs).tolist():
            select = np.flatnonzero(span_epochs == epoch)
            cumsum = self._cumsum(epoch)
            lo, hi = span_lo[select], span_hi[select]
            # Documents k with cumsum[k] <= lo < cumsum[k + 1] up to the last starting before hi.
            first = np.searchsorted(cumsum, lo, side="right") - 1
            count = np.searchsorted(cumsum, hi, side="left") - first
            span_of = np.repeat(np.arange(select.size), count)
            k = np.arange(span_of.size) - np.repeat(np.cumsum(count) - count - first, count)
            doc_start, doc_stop = cumsum[k], cumsum[k + 1]
            starts = np.maximum(lo[span_of] - doc_start, 0)
            stops = np.minimum(hi[span_of], doc_stop) - doc_start
            keep = stops > starts  # drops empty documents
            piece_rows.append(span_rows[select][span_of[keep]])
            piece_docs.append(self.epoch_order(epoch)[k[keep]])
            piece_starts.append(starts[keep])
            piece_stops.append(stops[keep])
        # A row's spans were added in epoch order, which a stable sort by row keeps.
        piece_rows = np.concatenate(piece_rows)
        by_row = np.argsort(piece_rows, kind="stable")
        bounds = np.searchsorted(piece_rows[by_row], np.arange(rows.size + 1)).tolist()
        pieces = list(zip(
            np.concatenate(piece_docs)[by_row].tolist(),
            np.concatenate(piece_starts)[by_row].tolist(),
            np.concatenate(piece_stops)[by_row].tolist(),
            strict=True,
        ))
        row_epochs = (rows * seq_len // tokens).tolist()
        plans = [
            RowPlan(row_epochs[i], tuple(pieces[bounds[i] : bounds[i + 1]]))
            for i in range(rows.size)
        ]
        return [plans[i] for i in wanted_at.tolist()]


class BestFitPackedDataset(PackedDataset, grain.IterDataset):
    """Best-fit-decreasing packing over windows of `window_size` documents (an IterDataset).

    Windows follow the epoch's document order and never cross an epoch; pieces of documents
    longer than `seq_len` are packed as items of their own. Without `docs.lengths` the window's
    documents are read (e.g. tokenized) to learn their lengths and kept for materializing.
    """

    method = "best_fit"

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
        self._configure(docs, seq_len, pad_id, window_size, seed, num_epochs)
        self.windows_per_epoch = -(-self.num_docs // self.window_size)

    def __str__(self) -> str:
        return (
            f"BestFitPackedDataset(seq_len={self.seq_len}, window_size={self.window_size}, "
            f"seed={self.seed})"
        )

    def window_docs(self, epoch: int, window: int) -> np.ndarray:
        """Document indices of window `window` of epoch `epoch`, in epoch order."""
        start = window * self.window_size
        return self.epoch_order(epoch)[start : start + self.window_size]

    def plan_window(self, epoch: int, window: int, lengths: np.ndarray) -> list[RowPlan]:
        """Rows of one window, given the (n,) lengths of its documents (`window_docs` order)."""
        doc_ids = self.window_docs(epoch, window)
        items_doc, items_start, items_stop = _split_pieces(doc_ids, lengths, self.seq_len)
        bins = best_fit_decreasing(items_stop - items_start, self.seq_len)
        num_bins = int(bins.max()) + 1 if bins.size else 0
        # Group items by bin; within a bin keep the (decreasing size) order they were placed in.
        placed = np.argsort(items_start - items_stop, kind="stable")  # best_fit_decreasing's order
        by_bin = placed[np.argsort(bins[placed], kind="stable")]
        bounds = np.searchsorted(bins[by_bin], np.arange(num_bins + 1)).tolist()
        pieces = list(zip(
            items_doc[by_bin].tolist(), items_start[by_bin].tolist(),
            items_stop[by_bin].tolist(), strict=True,
        ))
        row_order = range(num_bins)
        if self.seed is not None:
            # Bins come out largest-item first; shuffle so every batch mixes long and short rows.
            row_order = np.random.default_rng([self.seed, epoch, window]).permutation(num_bins)
            row_order = row_order.tolist()
        return [RowPlan(epoch, tuple(pieces[bounds[b] : bounds[b + 1]])) for b in row_order]


def _split_pieces(doc_ids: np.ndarray, lengths: np.ndarray, seq_len: int):
    """Cut documents into pieces of at most `seq_len`: (doc, start, stop) int64 arrays."""
    lengths = np.asarray(lengths, dtype=np.int64)
    num_pieces = -(-lengths // seq_len)
    items_doc = np.repeat(np.asarray(doc_ids, dtype=np.int64), num_pieces)
    first_item = np.cumsum(num_pieces) - num_pieces
    piece_index = np.arange(items_doc.size, dtype=np.int64) - np.repeat(first_item, num_pieces)
    items_start = piece_index * seq_len
    items_stop = np.minimum(items_start + seq_len, np.repeat(lengths, num_pieces))
    return items_doc, items_start, items_stop


def best_fit_decreasing(item_lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Bin index for each item (all `<= capacity`): best-fit-decreasing bin packing.

    Items are placed largest first into the open bin whose remaining space is the smallest that
    still fits (ties: lowest bin), else a new bin. Open bins live in one sorted list of keys
    `remaining * K + bin`, so each item costs one bisect. Returns (n,) int64, bins numbered in
    order of creation.
    """
    item_lengths = np.asarray(item_lengths, dtype=np.int64)
    if item_lengths.size and (item_lengths.max() > capacity or item_lengths.min() < 1):
        raise ValueError(f"items must have lengths in [1, {capacity}]")
    order = np.argsort(-item_lengths, kind="stable")
    sorted_lengths = item_lengths[order]
    bins = np.empty(item_lengths.size, dtype=np.int64)
    # Items longer than half a bin never share one: each opens its own bin, no search needed.
    num_big = int(np.searchsorted(-sorted_lengths, -(capacity // 2), side="left"))
    bins[order[:num_big]] = np.arange(num_big)
    key_base = item_lengths.size + 1
    remaining = capacity - sorted_lengths[:num_big]
    has_room = np.flatnonzero(remaining)
    open_keys = np.sort(remaining[has_room] * key_base + has_room).tolist()
    assigned: list[int] = []
    num_bins = num_big
    bisect_left, insort = bisect.bisect_left, bisect.insort
    for length in sorted_lengths[num_big:].tolist():
        j = bisect_left(open_keys, length * key_base)
        if j == len(open_keys):
            b = num_bins
            num_bins += 1
            room = capacity - length
        else:
            room, b = divmod(open_keys.pop(j), key_base)
            room -= length
        assigned.append(b)
        if room:
            insort(open_keys, room * key_base + b)
    bins[order[num_big:]] = assigned
    return bins


# --------------------------------------------------------------------------- iterator


class PackedRowsIterator(grain.DatasetIterator):
    """Iterator over packed rows with cheap planning and batched materialization.

    `__next__` returns one row dict of (L,) int32 arrays (its own copies); internally it plans
    and reads `READ_TOKENS` worth of rows at a time and builds them `BUILD_TOKENS` at a time.
    `next_plans(n)` / `materialize(plans)` expose the two halves for mixing and the multi-rank
    loader (rows planned ahead by `__next__` come first). `get_state()` is a small JSON-able
    dict (the position of the next row to return, plus a configuration check); `set_state`
    costs at most one window's planning.
    """

    def __init__(self, packed: PackedDataset):
        super().__init__()
        self._packed = packed
        self._reader = _DocumentReader(packed, cache=True)
        if isinstance(packed, ConcatPackedDataset):
            self._planner: _Planner = _ConcatPlanner(packed)
        else:
            self._planner = _WindowPlanner(packed, self._reader)
        # Rows planned by `__next__` but not yet returned, the planner position before each
        # (get_state reports the first one's), their documents, and the built block of rows.
        self._pending_plans: list[RowPlan] = []
        self._pending_positions: list[tuple] = []
        self._pending_docs: _Fetched | None = None
        self._pending_index = 0
        self._block_start = self._block_end = 0
        self._build_rows = min(max(1, BUILD_TOKENS // packed.seq_len), 256)
        self._read_rows = min(max(self._build_rows, READ_TOKENS // packed.seq_len), 4096)
        self._buffers: np.ndarray | None = None  # (4, build rows, L) int32: the rows to return

    def __str__(self) -> str:
        return f"PackedRowsIterator({self._packed})"

    def next_plans(self, n: int) -> list[RowPlan]:
        """Advances by up to `n` rows and returns their plans; fewer (or []) at the end."""
        plans = self._pending_plans[self._pending_index : self._pending_index + n]
        if plans:
            self._pending_index += len(plans)
            self._drop_consumed()
        if len(plans) < n:
            more, _ = self._planner.next_plans(n - len(plans))
            plans.extend(more)
        return plans

    def materialize(self, plans: Sequence[RowPlan]) -> dict[str, np.ndarray]:
        """Rows of `plans` as a batch dict of (n, L) int32 arrays; reads only their documents."""
        return self._reader.materialize(plans)

    def __next__(self) -> dict[str, np.ndarray]:
        index = self._pending_index
        if index >= self._block_end:
            if index >= len(self._pending_plans):
                plans, positions = self._planner.next_plans(self._read_rows)
                if not plans:
                    raise StopIteration
                self._pending_plans, self._pending_positions = plans, positions
                self._pending_docs = self._reader.fetch(needed_documents(plans))
                index = self._pending_index = 0
            block_end = min(index + self._build_rows, len(self._pending_plans))
            if self._buffers is None:
                shape = (len(ROW_KEYS), self._build_rows, self._packed.seq_len)
                self._buffers = np.empty(shape, dtype=np.int32)
            self._reader.build(
                self._pending_plans[index:block_end], self._pending_docs,
                out=dict(zip(ROW_KEYS, self._buffers, strict=True)),
            )
            self._block_start, self._block_end = index, block_end
        row = index - self._block_start
        self._pending_index = index + 1
        # A copy (one (4, L) block per row): the buffers are rebuilt in place for the next block.
        result = dict(zip(ROW_KEYS, self._buffers[:, row].copy(), strict=True))
        if self._pending_index >= len(self._pending_plans):
            self._drop_consumed()
        return result

    def _drop_consumed(self) -> None:
        if self._pending_index >= len(self._pending_plans):
            self._pending_plans, self._pending_positions, self._pending_docs = [], [], None
            self._pending_index = self._block_end = 0
        elif self._pending_index > self._block_end:
            self._block_end = 0  # next_plans skipped past the built block

    def get_state(self) -> dict[str, Any]:
        if self._pending_index < len(self._pending_plans):
            position = self._pending_positions[self._pending_index]
        else:
            position = self._planner.position()
        return {**self._packed._state_check(), **self._planner.state(position)}

    def set_state(self, state: dict[str, Any]) -> None:
        expected = self._packed._state_check()
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"packed iterator state does not match this dataset: {key}="
                    f"{state.get(key)!r} in the state, {value!r} here ({self._packed}); the "
                    "method, seq_len, window_size, seed and source must be unchanged"
                )
        self._pending_index = len(self._pending_plans)
        self._drop_consumed()
        self._planner.seek(state)


def _row(batch: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {key: value[i] for key, value in batch.items()}


class _Planner:
    """Cursor over rows: `next_plans(n) -> (plans, positions before each)`, state, seek."""

    def next_plans(self, n: int) -> tuple[list[RowPlan], list[tuple]]:
        raise NotImplementedError

    def position(self) -> tuple:
        raise NotImplementedError

    def state(self, position: tuple) -> dict[str, int]:
        raise NotImplementedError

    def seek(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class _ConcatPlanner(_Planner):
    """Position = the next row index."""

    def __init__(self, packed: ConcatPackedDataset):
        self._packed = packed
        self._row = 0

    def next_plans(self, n):
        stop = min(self._row + n, len(self._packed))
        rows = range(self._row, stop)
        plans = self._packed.plan_rows(rows) if len(rows) else []
        self._row = stop
        return plans, [(r,) for r in rows]

    def position(self):
        return (self._row,)

    def state(self, position):
        return {"row": position[0]}

    def seek(self, state):
        row = int(state["row"])
        if not 0 <= row <= len(self._packed):
            raise ValueError(
                f"row {row} out of range for {self._packed} ({len(self._packed)} rows)"
            )
        self._row = row


class _WindowPlanner(_Planner):
    """Position = (epoch, window, row in window); the current window's plan is cached."""

    def __init__(self, packed: BestFitPackedDataset, reader: _DocumentReader):
        self._packed = packed
        self._reader = reader
        self._epoch = self._window = self._row = 0
        self._plans_key: tuple[int, int] | None = None
        self._plans: list[RowPlan] = []

    def _exhausted(self) -> bool:
        packed = self._packed
        return packed.windows_per_epoch == 0 or (
            packed.num_epochs is not None and self._epoch >= packed.num_epochs
        )

    def _window_plans(self) -> list[RowPlan]:
        key = (self._epoch, self._window)
        if self._plans_key != key:
            doc_ids = self._packed.window_docs(*key)
            lengths = self._reader.window_lengths(key, doc_ids)
            self._plans = self._packed.plan_window(*key, lengths)
            self._plans_key = key
        return self._plans

    def _advance_window(self) -> None:
        self._window += 1
        self._row = 0
        if self._window >= self._packed.windows_per_epoch:
            self._epoch += 1
            self._window = 0

    def next_plans(self, n):
        plans: list[RowPlan] = []
        positions: list[tuple] = []
        while len(plans) < n and not self._exhausted():
            window_plans = self._window_plans()
            take = window_plans[self._row : self._row + n - len(plans)]
            positions.extend((self._epoch, self._window, self._row + i) for i in range(len(take)))
            plans.extend(take)
            self._row += len(take)
            if self._row >= len(window_plans):
                self._advance_window()
        return plans, positions

    def position(self):
        return (self._epoch, self._window, self._row)

    def state(self, position):
        epoch, window, row = position
        return {"epoch": epoch, "window": window, "row": row}

    def seek(self, state):
        epoch, window, row = (int(state[key]) for key in ("epoch", "window", "row"))
        packed = self._packed
        if epoch < 0 or not 0 <= window < max(packed.windows_per_epoch, 1) or row < 0:
            raise ValueError(f"invalid best_fit position {(epoch, window, row)} for {packed}")
        self._epoch, self._window, self._row = epoch, window, row
        if not self._exhausted():
            window_rows = len(self._window_plans())
            if row > window_rows:
                raise ValueError(
                    f"row {row} out of range for window {window} of epoch {epoch} "
                    f"({window_rows} rows) in {packed}"
                )
            if row == window_rows:
                self._advance_window()


# --------------------------------------------------------------------------- reading rows


class _DocumentReader:
    """Reads documents in batches and builds rows from plans (vectorised over whole rows).

    With `cache=True` it keeps the documents of recently planned windows (sources without
    lengths: they were read to plan) and, up to `CACHE_TOKENS`, documents longer than `seq_len`
    (they feed several rows, possibly in different reads).
    """

    def __init__(self, packed: PackedDataset, cache: bool):
        self._packed = packed
        self._docs = packed.docs
        self._seq_len = seq_len = packed.seq_len
        self._cache = cache
        # Caches map document index -> tokens; loss masks (SFT documents) sit in `.masks`.
        self._window_docs: dict[tuple[int, int], _Fetched] = {}
        self._window_tokens: dict[tuple[int, int], int] = {}
        self._long_docs = _Fetched({}, {})
        self._long_tokens = 0
        self._pad_tokens = np.full(seq_len, packed.pad_id, dtype=np.int32)
        self._ones = np.ones(seq_len, dtype=np.uint8)

    @functools.cached_property
    def _name(self) -> str:
        """The source, for error messages: its path when it has one."""
        docs = self._docs
        path = getattr(docs, "path", None)
        if path is not None:
            return f"{type(docs).__name__}({path})"
        if isinstance(docs, list | tuple):
            return f"{type(docs).__name__} of {len(docs)} documents"
        text = repr(docs)
        return text if len(text) <= 160 else text[:157] + "..."

    def _read(self, indices: list[int]) -> _Fetched:
        """One batched read of `indices` (validated and normalised)."""
        if not indices:
            return _Fetched({}, {})
        getitems = getattr(self._docs, "__getitems__", None)
        raw = getitems(indices) if getitems is not None else [self._docs[i] for i in indices]
        if len(raw) != len(indices):
            raise ValueError(
                f"{type(self._docs).__name__}.__getitems__ returned {len(raw)} documents for "
                f"{len(indices)} indices"
            )
        if _plain_token_arrays(raw):
            return _Fetched(dict(zip(indices, raw, strict=True)), {})
        fetched = _Fetched({}, {})
        for index, doc in zip(indices, raw, strict=True):
            tokens, mask = _as_document(doc, index, self._name)
            fetched.tokens[index] = tokens
            if mask is not None:
                fetched.masks[index] = mask
        return fetched

    def window_lengths(self, key: tuple[int, int], doc_ids: np.ndarray) -> np.ndarray:
        """(n,) int64 lengths of a window's documents; reads (and keeps) them if needed."""
        lengths = self._packed.lengths
        if lengths is not None:
            return lengths[doc_ids]
        fetched = self._read(doc_ids.tolist())
        lengths = np.fromiter(map(len, fetched.tokens.values()), np.int64, len(doc_ids))
        self._window_docs[key] = fetched
        self._window_tokens[key] = int(lengths.sum())
        # Keep the last two windows, and more while they are small: rows planned ahead of
        # their materialization (a read-ahead spanning windows) then need no second read.
        while len(self._window_docs) > 2 and sum(self._window_tokens.values()) > CACHE_TOKENS:
            oldest = next(iter(self._window_docs))
            del self._window_docs[oldest], self._window_tokens[oldest]
        return lengths

    def fetch(self, indices: list[int]) -> _Fetched:
        """Documents `indices`: cached ones plus one batched read of the rest."""
        found = _Fetched({}, {})
        missing = indices
        for cache in (self._long_docs, *self._window_docs.values()):
            if cache.tokens and missing:
                hits = [i for i in missing if i in cache.tokens]
                if hits:
                    found.tokens.update((i, cache.tokens[i]) for i in hits)
                    found.masks.update((i, cache.masks[i]) for i in hits if i in cache.masks)
                    missing = [i for i in missing if i not in found.tokens]
        read = self._read(missing)
        found.tokens.update(read.tokens)
        found.masks.update(read.masks)
        if self._cache and read.tokens:
            lengths = self._packed.lengths
            if lengths is not None:
                is_long = lengths[np.asarray(missing)] > self._seq_len
                long_docs = np.asarray(missing)[is_long].tolist()
            else:
                long_docs = [i for i in missing if len(read.tokens[i]) > self._seq_len]
            for index in long_docs:
                self._keep_long(index, read)
        return found

    def _keep_long(self, index: int, read: _Fetched) -> None:
        cache = self._long_docs
        cache.tokens[index] = read.tokens[index]
        if index in read.masks:
            cache.masks[index] = read.masks[index]
        self._long_tokens += len(read.tokens[index])
        while self._long_tokens > CACHE_TOKENS and len(cache.tokens) > 1:
            oldest = next(iter(cache.tokens))
            self._long_tokens -= len(cache.tokens.pop(oldest))
            cache.masks.pop(oldest, None)

    def materialize(self, plans: Sequence[RowPlan]) -> dict[str, np.ndarray]:
        """Batch dict of (n, L) int32 arrays for `plans` (the keys of `ROW_KEYS`)."""
        return self.build(plans, self.fetch(needed_documents(plans)))

    def build(
        self,
        plans: Sequence[RowPlan],
        fetched: _Fetched,
        out: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Rows of `plans` from `fetched` documents: whole-batch numpy, Python per piece/row.

        Tokens are one `np.concatenate` of piece slices (and padding blocks); positions and
        segment ids are in-place row-wise cumulative sums of increments scattered at segment
        starts. `out` (arrays of >= len(plans) rows) receives the rows instead of new arrays:
        reusing memory avoids the page faults of fresh allocations.
        """
        seq_len, n = self._seq_len, len(plans)
        docs = fetched.tokens
        counts = np.fromiter((len(plan.pieces) for plan in plans), np.int64, n)
        pieces = np.fromiter(
            itertools.chain.from_iterable(itertools.chain.from_iterable(
                plan.pieces for plan in plans)),
            np.int64,
        ).reshape(-1, 3)
        sizes = pieces[:, 2] - pieces[:, 1]
        ends = np.cumsum(sizes)
        row_first = np.cumsum(counts) - counts  # index of each row's first piece
        row_ends = np.concatenate([[0], ends])
        used = row_ends[row_first + counts] - row_ends[row_first]
        if n and (used.max() > seq_len or (sizes.size and sizes.min() < 1)):
            for plan in plans:
                self._raise_bad_plan(plan, docs)
        piece_rows = np.repeat(np.arange(n), counts)
        in_row = ends - sizes - row_ends[row_first][piece_rows]
        first_tokens = piece_rows * seq_len + in_row

        if out is None:
            rows = {key: np.empty((n, seq_len), dtype=np.int32) for key in ROW_KEYS}
        else:
            rows = {key: out[key][:n] for key in ROW_KEYS}
        input_ids, labels = rows["input_ids"], rows["labels"]
        position_ids, segment_ids = rows["position_ids"], rows["segment_ids"]
        token_parts: list[np.ndarray] = [self._pad_tokens[:0]]
        append, pad_tokens = token_parts.append, self._pad_tokens
        used_list = used.tolist()
        for plan, row_used in zip(plans, used_list, strict=True):
            for d, start, stop in plan.pieces:
                append(docs[d][start:stop])
            if row_used != seq_len:
                append(pad_tokens[: seq_len - row_used])
        try:
            np.concatenate(token_parts, out=input_ids.reshape(-1), casting="unsafe")
        except ValueError:  # a document is shorter than its plan says
            for plan in plans:
                self._raise_bad_plan(plan, docs)
            raise
        np.copyto(labels, input_ids)
        flat_labels = labels.reshape(-1)
        flat_labels[first_tokens] = IGNORE_INDEX

        position_ids.fill(1)
        position_ids[:, 0] = 0
        continuing = in_row > 0  # a segment start after another segment of the same row
        position_ids.reshape(-1)[first_tokens[continuing]] = (
            1 - sizes[np.flatnonzero(continuing) - 1]
        )
        np.cumsum(position_ids, axis=1, out=position_ids)
        segment_ids.fill(0)
        segment_ids.reshape(-1)[first_tokens] = 1
        np.cumsum(segment_ids, axis=1, out=segment_ids)
        for row in np.flatnonzero(used != seq_len).tolist():
            row_used = used_list[row]
            labels[row, row_used:] = IGNORE_INDEX
            position_ids[row, row_used:] = 0
            segment_ids[row, row_used:] = 0
        if fetched.masks:
            self._mask_labels(plans, fetched.masks, used_list, flat_labels)
        return rows

    def _mask_labels(self, plans, masks, used_list, flat_labels) -> None:
        """labels = -100 where a dict document's loss_mask is 0 (padding is already -100)."""
        seq_len, ones = self._seq_len, self._ones
        mask_parts = []
        for plan, row_used in zip(plans, used_list, strict=True):
            for d, start, stop in plan.pieces:
                mask = masks.get(d)
                mask_parts.append(ones[: stop - start] if mask is None else mask[start:stop])
            if row_used != seq_len:
                mask_parts.append(ones[: seq_len - row_used])
        flat_labels[np.concatenate(mask_parts) == 0] = IGNORE_INDEX

    def _raise_bad_plan(self, plan: RowPlan, docs: dict[int, np.ndarray]) -> None:
        for d, start, stop in plan.pieces:
            if not 0 <= start < stop <= len(docs[d]):
                raise ValueError(
                    f"{self._name} document {d} has {len(docs[d])} tokens but the plan "
                    f"needs [{start}, {stop}): the source's lengths do not match its records"
                )
        if plan.num_tokens > self._seq_len:
            raise ValueError(f"{plan} holds more than seq_len={self._seq_len} tokens")


class _Fetched(NamedTuple):
    """Documents read for some rows: index -> (n,) tokens, and index -> (n,) loss mask."""

    tokens: dict[int, np.ndarray]
    masks: dict[int, np.ndarray]


def needed_documents(plans: Sequence[RowPlan]) -> list[int]:
    """Distinct document indices the rows of `plans` read, in first-use order."""
    return list(dict.fromkeys(d for plan in plans for d, _, _ in plan.pieces))


def _plain_token_arrays(docs: list) -> bool:
    """Whether every document is a 1-D integer numpy array (checked with C-level maps)."""
    if set(map(type, docs)) != {np.ndarray} or set(map(_NDIM, docs)) != {1}:
        return False
    return set(map(_DTYPE_KIND, docs)) <= {"i", "u"}  # kinds: hashing dtypes is slow


_NDIM, _DTYPE_KIND = operator.attrgetter("ndim"), operator.attrgetter("dtype.kind")


def _as_document(doc: Any, index: int, source: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens (n,) int, loss_mask (n,) or None) from a token array or an SFT dict.

    `source` and `index` name the document in errors.
    """
    if type(doc) is np.ndarray and doc.ndim == 1 and doc.dtype.kind in "iu":
        return doc, None
    where = f"{source} document {index}"
    if isinstance(doc, dict):
        if "input_ids" not in doc:
            raise ValueError(
                f"{where}: dict without 'input_ids' (keys: {sorted(doc)}); expected "
                "{'input_ids': ..., 'loss_mask': ...}"
            )
        tokens = np.asarray(doc["input_ids"])
        if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
            raise TypeError(
                f"{where}: field 'input_ids' must be a 1-D integer array, got shape "
                f"{tokens.shape} and dtype {tokens.dtype}"
            )
        mask = doc.get("loss_mask")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != tokens.shape:
                raise ValueError(
                    f"{where}: field 'loss_mask' has shape {mask.shape}, 'input_ids' "
                    f"{tokens.shape}"
                )
        return tokens, mask
    if isinstance(doc, str | bytes):
        raise TypeError(
            f"{where} is text ({type(doc).__name__}), packing needs token ids: "
            "tokenize it (PretrainDataset(..., tokenizer=...)) or pre-tokenize with "
            "`wf-data prepare --tokenizer ...`"
        )
    array = np.asarray(doc)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise TypeError(
            f"{where}: expected a 1-D integer token array or a dict with 'input_ids', "
            f"got {type(doc).__name__} with shape {array.shape} and dtype {array.dtype}"
        )
    return array.astype(np.int64, copy=False) if array.dtype.kind not in "iu" else array, None
