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
"""

from __future__ import annotations

import bisect
import hashlib
import json
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

METHODS = ("best_fit", "concat")
# Documents per best-fit window: >= 99% fill on lognormal document lengths with seq_len 2048
# (see tools/bench.py); planning cost grows only linearly with it.
DEFAULT_WINDOW_SIZE = 4096
# Rows materialized per read when iterating row by row: batched reads amortise the per-call
# cost of the record reader.
CHUNK_ROWS = 64
# Documents longer than seq_len feed several rows; keep up to this many of their tokens in
# memory so each is read once per window rather than once per piece.
LONG_DOC_CACHE_TOKENS = 1 << 23
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
            raise ValueError(f"num_epochs must be None (forever) or an int >= 1, got {num_epochs!r}")
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

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(N,) int64 document indices in the order epoch `epoch` visits them."""
        order = self._orders.get(epoch)
        if order is None:
            if self.seed is None:
                order = np.arange(self.num_docs, dtype=np.int64)
            else:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_docs)
            order.setflags(write=False)
            if len(self._orders) >= 4:
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
        """The part of an iterator state that must match on restore (a few short fields)."""
        fingerprint = self.fingerprint()
        fingerprint.pop("pad_id")
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode())
        return {"method": self.method, "config": digest.hexdigest()[:16]}

    def __iter__(self) -> PackedRowsIterator:
        return PackedRowsIterator(self)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_orders"] = {}
        state.pop("_stats", None)
        return state


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
        return _row(self._getitems([index]), 0)

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
        span_rows, span_epochs, span_lo, span_hi = (np.concatenate(part) for part in zip(*spans))
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

    `__next__` returns one row dict of (L,) int32 arrays; internally rows are planned and read
    `CHUNK_ROWS` at a time. `next_plans(n)` / `materialize(plans)` expose the two halves for
    mixing and the multi-rank loader. `get_state()` is a small dict of ints (position plus a
    configuration check); `set_state` costs at most one window's planning.
    """

    def __init__(self, packed: PackedDataset, chunk_rows: int = CHUNK_ROWS):
        super().__init__()
        self._packed = packed
        self._chunk_rows = chunk_rows
        self._reader = _DocumentReader(packed, cache=True)
        if isinstance(packed, ConcatPackedDataset):
            self._planner: _Planner = _ConcatPlanner(packed)
        else:
            self._planner = _WindowPlanner(packed, self._reader)
        # Planned (and possibly materialized) rows not yet returned, with the planner position
        # before each: get_state reports the position of the first one.
        self._pending_plans: list[RowPlan] = []
        self._pending_positions: list[tuple] = []
        self._pending_rows: dict[str, np.ndarray] | None = None
        self._pending_index = 0

    def __str__(self) -> str:
        return f"PackedRowsIterator({self._packed})"

    def next_plans(self, n: int) -> list[RowPlan]:
        """Advances by up to `n` rows and returns their plans; fewer (or []) at the end."""
        plans = self._pending_plans[self._pending_index : self._pending_index + n]
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
        if self._pending_rows is None:
            plans, positions = self._planner.next_plans(self._chunk_rows)
            if not plans:
                raise StopIteration
            self._pending_rows = self._reader.materialize(plans)
            self._pending_plans, self._pending_positions = plans, positions
            self._pending_index = 0
        row = _row(self._pending_rows, self._pending_index)
        self._pending_index += 1
        self._drop_consumed()
        return row

    def _drop_consumed(self) -> None:
        if self._pending_index >= len(self._pending_plans):
            self._pending_plans, self._pending_positions = [], []
            self._pending_rows, self._pending_index = None, 0

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
        self._pending_plans, self._pending_positions = [], []
        self._pending_rows, self._pending_index = None, 0
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
            raise ValueError(f"row {row} out of range for {self._packed} ({len(self._packed)} rows)")
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

    With `cache=True` it keeps the documents of the last two planned windows (sources without
    lengths: they were read to plan) and, up to `LONG_DOC_CACHE_TOKENS`, documents longer than
    `seq_len` (they feed several rows, possibly in different reads).
    """

    def __init__(self, packed: PackedDataset, cache: bool):
        self._packed = packed
        self._docs = packed.docs
        self._seq_len = seq_len = packed.seq_len
        self._cache = cache
        self._window_docs: dict[tuple[int, int], dict[int, tuple]] = {}
        self._long_docs: dict[int, tuple] = {}
        self._long_tokens = 0
        # Rows are assembled by concatenating views of these (L,) blocks: one copy per output.
        self._pad_tokens = np.full(seq_len, packed.pad_id, dtype=np.int32)
        self._zeros = np.zeros(seq_len, dtype=np.int32)
        self._ones = np.ones(seq_len, dtype=np.uint8)
        self._arange = np.arange(seq_len, dtype=np.int32)
        self._segment_blocks = self._make_segment_blocks(64)

    def _make_segment_blocks(self, count: int) -> list[np.ndarray]:
        """Block k is (L,) int32 filled with k: the segment ids of the k-th piece of a row."""
        return list(np.repeat(np.arange(count, dtype=np.int32)[:, None], self._seq_len, axis=1))

    def _read(self, indices: list[int]) -> list[tuple]:
        if not indices:
            return []
        getitems = getattr(self._docs, "__getitems__", None)
        raw = getitems(indices) if getitems is not None else [self._docs[i] for i in indices]
        if len(raw) != len(indices):
            raise ValueError(
                f"{type(self._docs).__name__}.__getitems__ returned {len(raw)} documents for "
                f"{len(indices)} indices"
            )
        return [_as_document(doc, index) for doc, index in zip(raw, indices, strict=True)]

    def window_lengths(self, key: tuple[int, int], doc_ids: np.ndarray) -> np.ndarray:
        """(n,) int64 lengths of a window's documents; reads (and keeps) them if needed."""
        lengths = self._packed.lengths
        if lengths is not None:
            return lengths[doc_ids]
        doc_list = doc_ids.tolist()
        documents = self._read(doc_list)
        if len(self._window_docs) >= 2:
            self._window_docs.pop(next(iter(self._window_docs)))
        self._window_docs[key] = dict(zip(doc_list, documents, strict=True))
        return np.fromiter((len(doc[0]) for doc in documents), np.int64, len(documents))

    def fetch(self, indices: list[int]) -> dict[int, tuple]:
        """Documents by index: cached ones plus one batched read of the rest."""
        caches = [self._long_docs, *self._window_docs.values()]
        found: dict[int, tuple] = {}
        missing = indices
        for cache in caches:
            if cache:
                hits = [i for i in missing if i in cache]
                if hits:
                    found.update((i, cache[i]) for i in hits)
                    missing = [i for i in missing if i not in found]
        seq_len = self._seq_len
        for index, doc in zip(missing, self._read(missing), strict=True):
            found[index] = doc
            if self._cache and len(doc[0]) > seq_len:
                self._keep_long(index, doc)
        return found

    def _keep_long(self, index: int, doc: tuple) -> None:
        self._long_docs[index] = doc
        self._long_tokens += len(doc[0])
        while self._long_tokens > LONG_DOC_CACHE_TOKENS and len(self._long_docs) > 1:
            oldest = next(iter(self._long_docs))
            self._long_tokens -= len(self._long_docs.pop(oldest)[0])

    def materialize(self, plans: Sequence[RowPlan]) -> dict[str, np.ndarray]:
        """Batch dict of (n, L) int32 arrays for `plans` (the keys of `ROW_KEYS`).

        Per piece, Python only appends views (token slice, position and segment-id blocks);
        each output array is then one `np.concatenate`, and labels one copy plus fixes.
        """
        seq_len, n = self._seq_len, len(plans)
        docs = self.fetch(list(dict.fromkeys(d for plan in plans for d, _, _ in plan.pieces)))
        with_mask = any(doc[1] is not None for doc in docs.values())
        most_pieces = max((len(plan.pieces) for plan in plans), default=0)
        if most_pieces >= len(self._segment_blocks):
            self._segment_blocks = self._make_segment_blocks(2 * most_pieces)
        arange, segment_blocks = self._arange, self._segment_blocks
        token_parts, position_parts, segment_parts, mask_parts = [], [], [], []
        first_tokens: list[int] = []  # flat index of every segment's first token
        padded: list[tuple[int, int]] = []  # (row, real tokens) of rows with padding
        row_start = 0
        for row, plan in enumerate(plans):
            used = 0
            for segment, (d, start, stop) in enumerate(plan.pieces, 1):
                tokens, mask = docs[d]
                size = stop - start
                token_parts.append(tokens[start:stop])
                position_parts.append(arange[:size])
                segment_parts.append(segment_blocks[segment][:size])
                if with_mask:
                    mask_parts.append(self._ones[:size] if mask is None else mask[start:stop])
                first_tokens.append(row_start + used)
                used += size
            if used != seq_len:
                if used > seq_len:
                    self._raise_bad_plan(plan, docs)
                token_parts.append(self._pad_tokens[: seq_len - used])
                position_parts.append(self._zeros[: seq_len - used])
                segment_parts.append(self._zeros[: seq_len - used])
                if with_mask:
                    mask_parts.append(self._zeros[: seq_len - used])
                padded.append((row, used))
            row_start += seq_len
        if not n:
            empty = np.empty((0, seq_len), dtype=np.int32)
            return {key: empty.copy() for key in ROW_KEYS}
        input_ids = np.concatenate(token_parts, dtype=np.int32, casting="unsafe")
        if input_ids.size != n * seq_len:  # a document shorter than its plan says
            for plan in plans:
                self._raise_bad_plan(plan, docs)
            raise ValueError("the documents do not match their plans")
        labels = input_ids.copy()
        labels[first_tokens] = IGNORE_INDEX
        input_ids = input_ids.reshape(n, seq_len)
        labels = labels.reshape(n, seq_len)
        for row, used in padded:
            labels[row, used:] = IGNORE_INDEX
        if with_mask:
            labels[np.concatenate(mask_parts).reshape(n, seq_len) == 0] = IGNORE_INDEX
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": np.concatenate(position_parts).reshape(n, seq_len),
            "segment_ids": np.concatenate(segment_parts).reshape(n, seq_len),
        }

    def _raise_bad_plan(self, plan: RowPlan, docs: dict[int, tuple]) -> None:
        for d, start, stop in plan.pieces:
            if not 0 <= start < stop <= len(docs[d][0]):
                raise ValueError(
                    f"document {d} has {len(docs[d][0])} tokens but the plan needs "
                    f"[{start}, {stop}): the source's lengths do not match its records"
                )
        if plan.num_tokens > self._seq_len:
            raise ValueError(f"{plan} holds more than seq_len={self._seq_len} tokens")


def _as_document(doc: Any, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens (n,) int, loss_mask (n,) or None) from a token array or an SFT dict."""
    if type(doc) is np.ndarray and doc.ndim == 1 and doc.dtype.kind in "iu":
        return doc, None
    if isinstance(doc, dict):
        if "input_ids" not in doc:
            raise ValueError(
                f"document {index}: dict without 'input_ids' (keys: {sorted(doc)}); expected "
                "{'input_ids': ..., 'loss_mask': ...}"
            )
        tokens, _ = _as_document(doc["input_ids"], index)
        mask = doc.get("loss_mask")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != tokens.shape:
                raise ValueError(
                    f"document {index}: loss_mask has shape {mask.shape}, input_ids "
                    f"{tokens.shape}"
                )
        return tokens, mask
    if isinstance(doc, str | bytes):
        raise TypeError(
            f"document {index} is text ({type(doc).__name__}), packing needs token ids: "
            "tokenize it (PretrainDataset(..., tokenizer=...)) or pre-tokenize with "
            "`wf-data prepare --tokenizer ...`"
        )
    array = np.asarray(doc)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise TypeError(
            f"document {index}: expected a 1-D integer token array or a dict with 'input_ids', "
            f"got {type(doc).__name__} with shape {array.shape} and dtype {array.dtype}"
        )
    return array.astype(np.int64, copy=False) if array.dtype.kind not in "iu" else array, None
