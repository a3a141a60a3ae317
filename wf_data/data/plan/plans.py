"""Row plans as Grain datasets: which document pieces fill each packed row, from lengths only.

A *row plan* is a flat dict of small arrays, one entry per piece of document in row order:

    {"doc_ids": (P,) int64, "offsets": (P,) int64, "lengths": (P,) int64, "epoch": int}

(`offsets` is where the piece starts in its document). Mixing adds `"domain": int`. Plans
carry no tokens: they are cheap to make, to filter, to ship to a worker and to keep in a
checkpoint; `wf_data.data.read.rows.read_rows` turns them into token rows.

- `plan_concat(lengths, seq_len)`: a `MapDataset`. Documents laid end to end (per epoch, in a
  seeded order) and cut every `seq_len` tokens: 100% fill, row `i` is random access.
- `plan_best_fit(lengths, seq_len, window_size)`: an `IterDataset`. Best-fit-decreasing over
  windows of `window_size` documents; its iterator state is `(epoch, window, row)` and a
  restore replans one window. The next window is planned a slice at a time while the current
  one is served, so no call pays for a whole window.

Both iterators also hand over many rows at once as a `RowBlock` (`next_block`, see
`wf_data.data.plan.blocks`), which is how the mixer and the batcher take them.

Every token of every document is planned exactly once per epoch; a document longer than
`seq_len` is cut into pieces. Epoch `e` visits documents in the order of a `LazyPermutation`
keyed by `(seed, e)` (`seed=None`: source order), computed only where it is needed: a window of
documents for best_fit, chunks of `ORDER_CHUNK` documents for concat (whose row offsets need
the running token count of the epoch's order). Start-up costs one window or chunk whatever
the number of documents.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import numbers
import sys
import threading
from collections.abc import Generator
from typing import Any

import grain
import numpy as np

from wf_data.data.plan.blocks import RowBlock
from wf_data.data.plan.permutation import LazyPermutation
from wf_data.data.shards.documents import read_documents

# Documents per best-fit window: >= 99% fill on lognormal document lengths with seq_len 2048
# (see tools/bench.py); planning cost grows only linearly with it.
DEFAULT_WINDOW_SIZE = 4096
# Tokens (of rows) a concat iterator plans per vectorised call, at most 512 rows: small enough
# that the first call stays well under 100 ms at any corpus size.
CONCAT_BLOCK_TOKENS = 1 << 17
# Documents per chunk of an epoch's order whose token offsets concat computes at a time.
ORDER_CHUNK = 1 << 16
# Runs of equal-length items best-fit places in one slice of a window planned ahead (tens of
# microseconds of work).
BEST_FIT_RUNS_PER_SLICE = 64

__all__ = [
    "BestFitPlans",
    "ConcatPlans",
    "DEFAULT_WINDOW_SIZE",
    "best_fit_decreasing",
    "plan_best_fit",
    "plan_concat",
]


def plan_concat(
    lengths: Any,
    seq_len: int,
    *,
    seed: int | None = None,
    num_epochs: int | None = 1,
    source_fingerprint: Any = None,
) -> ConcatPlans:
    """Concat row plans of documents with `lengths` ((N,) int token counts): a `MapDataset`."""
    return ConcatPlans(
        lengths, seq_len, seed=seed, num_epochs=num_epochs, source_fingerprint=source_fingerprint
    )


def plan_best_fit(
    lengths: Any,
    seq_len: int,
    window_size: int = DEFAULT_WINDOW_SIZE,
    *,
    seed: int | None = None,
    num_epochs: int | None = 1,
    source_fingerprint: Any = None,
) -> BestFitPlans:
    """Best-fit row plans: an `IterDataset`. `lengths` is (N,) int, or a document source
    without lengths (its windows are read, e.g. tokenized, to measure them)."""
    return BestFitPlans(
        lengths,
        seq_len,
        window_size,
        seed=seed,
        num_epochs=num_epochs,
        source_fingerprint=source_fingerprint,
    )


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _is_lengths(value: Any) -> bool:
    """Whether `value` is token counts rather than a document source.

    Fails on numbers that are not ints (floats, bools): they are meant as lengths, and read as
    a document source they would fail later with an error about documents.
    """
    if hasattr(value, "lengths") or hasattr(value, "__getitems__"):
        return False
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biufc" and (value.ndim != 1 or value.dtype.kind not in "iu"):
            if value.ndim != 1 and value.dtype.kind in "iu":
                return False  # a 2-D int array: rows of tokens, a document source
            raise ValueError(
                f"lengths must be an (N,) integer array of token counts, got dtype "
                f"{value.dtype} and shape {value.shape}: cast whole numbers with "
                ".astype(np.int64)"
            )
        return value.ndim == 1 and value.dtype.kind in "iu"
    if not isinstance(value, list | tuple):
        return False
    is_int = [isinstance(v, int | np.integer) and not isinstance(v, bool) for v in value]
    if not all(is_int) and all(isinstance(v, numbers.Number | np.bool_) for v in value):
        bad = is_int.index(False)
        raise ValueError(
            f"lengths must be int token counts, got lengths[{bad}] = {value[bad]!r} "
            f"({type(value[bad]).__name__}): pass ints, or an np.int64 array"
        )
    return all(is_int)


class _Plans:
    """What both planners share: lengths, seq_len, seed, epochs, epoch order, state check."""

    method: str

    def _configure(self, lengths, seq_len, seed, num_epochs, source_fingerprint) -> None:
        self.seq_len = _check_int("seq_len", seq_len, 1)
        if seed is not None:
            seed = _check_int("seed", seed, 0)
        if num_epochs is not None and (
            isinstance(num_epochs, bool) or not isinstance(num_epochs, int) or num_epochs < 1
        ):
            raise ValueError(
                f"num_epochs must be None (forever) or an int >= 1, got {num_epochs!r}"
            )
        self.seed = seed
        self.num_epochs = num_epochs
        self.docs = None
        self._num_tokens = None
        if not _is_lengths(lengths):
            self.docs = lengths  # a source: use its lengths, or measure windows by reading
            if not hasattr(lengths, "__len__") or not hasattr(lengths, "__getitem__"):
                raise TypeError(
                    "lengths must be an (N,) int array or a random-access document source "
                    f"(__len__, __getitem__), got {type(lengths)}"
                )
            if source_fingerprint is None:
                source_fingerprint = getattr(lengths, "fingerprint", None)
                if callable(source_fingerprint):
                    source_fingerprint = source_fingerprint()
            num_docs = len(lengths)
            self._num_tokens = getattr(lengths, "num_tokens", None)
            lengths = getattr(lengths, "lengths", None)
        else:
            num_docs = len(lengths)
        if lengths is not None:
            # No scan here (100M lengths cost ~100 ms each): signs are checked per window as
            # it is planned (`_check_lengths`), the total only when a fingerprint needs it.
            lengths = np.asarray(lengths, dtype=np.int64)
            if lengths.shape != (num_docs,):
                raise ValueError(f"lengths has shape {lengths.shape}, expected ({num_docs},)")
        self.lengths = lengths
        self.num_docs = num_docs
        self.source_fingerprint = source_fingerprint
        self._lock = threading.Lock()  # Grain may read a MapDataset from threads

    def permutation(self, epoch: int) -> LazyPermutation | _Identity:
        """Epoch `epoch`'s document order: `.take(positions)` -> (n,) int64 document indices."""
        if self.seed is None:
            return _Identity(self.num_docs)
        key = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
        return LazyPermutation(self.num_docs, int(key))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(N,) int64 document indices in epoch `epoch`'s order (materialised: O(N))."""
        return self.permutation(epoch).take(np.arange(self.num_docs))

    @property
    def num_tokens(self) -> int | None:
        """Tokens per epoch: the source's own count if it has one, else summed once."""
        if self._num_tokens is None and self.lengths is not None:
            self._num_tokens = int(self.lengths.sum())
        return self._num_tokens

    def fingerprint(self) -> dict:
        """Configuration that determines the plans: method, sizes, seed and source."""
        return {
            "method": self.method,
            "seq_len": self.seq_len,
            "window_size": getattr(self, "window_size", None),
            "seed": self.seed,
            "num_docs": self.num_docs,
            "num_tokens": self.num_tokens,
            "source": self.source_fingerprint,
        }

    def state_check(self) -> dict[str, str]:
        """The part of an iterator state that must match on restore: method and a config hash."""
        check = self.__dict__.get("_check")
        if check is None:
            digest = hashlib.sha256(
                json.dumps(self.fingerprint(), sort_keys=True, default=str).encode()
            )
            check = self._check = {"method": self.method, "config": digest.hexdigest()[:16]}
        return dict(check)

    def verify_state(self, state: dict[str, Any]) -> None:
        for key, value in self.state_check().items():
            if state.get(key) != value:
                raise ValueError(
                    f"plan iterator state does not match this dataset: {key}={state.get(key)!r} "
                    f"in the state, {value!r} here ({self}); the method, seq_len, window_size, "
                    "seed and source must be unchanged"
                )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_offsets", None)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        if isinstance(self, ConcatPlans):
            self._offsets = {}


class _Identity:
    """The source order, with `LazyPermutation`'s `take`."""

    def __init__(self, size: int):
        self.size = size

    def take(self, positions: np.ndarray) -> np.ndarray:
        return np.asarray(positions, dtype=np.int64)


class _EpochOffsets:
    """Token offsets of one epoch's documents in visiting order, a chunk at a time.

    `window(lo, hi)` returns consecutive documents covering tokens `[lo, hi)` with their
    absolute offsets, computing chunk sums only up to `hi`.
    """

    def __init__(self, lengths: np.ndarray, order: LazyPermutation | _Identity):
        self._lengths = lengths
        self._order = order
        self._num_docs = len(lengths)
        self._num_chunks = -(-self._num_docs // ORDER_CHUNK)
        self._chunk_starts = [0]  # token offset of chunk c, known for c < len
        self._chunks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(doc ids (n,), absolute token offsets (n + 1,)) of chunk `c` (needs its start)."""
        chunk = self._chunks.get(c)
        if chunk is None:
            positions = np.arange(c * ORDER_CHUNK, min((c + 1) * ORDER_CHUNK, self._num_docs))
            doc_ids = self._order.take(positions)
            offsets = np.empty(doc_ids.size + 1, dtype=np.int64)
            offsets[0] = self._chunk_starts[c]
            np.cumsum(self._lengths[doc_ids], out=offsets[1:])
            offsets[1:] += offsets[0]
            if len(self._chunks) >= 4:
                self._chunks.pop(next(iter(self._chunks)))
            chunk = self._chunks[c] = (doc_ids, offsets)
        return chunk

    def window(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(doc ids (m,), offsets (m + 1,)) of consecutive documents covering `[lo, hi)`."""
        starts = self._chunk_starts
        while starts[-1] < hi and len(starts) <= self._num_chunks:
            starts.append(int(self._chunk(len(starts) - 1)[1][-1]))
        first = max(int(np.searchsorted(starts, lo, side="right")) - 1, 0)
        first = min(first, self._num_chunks - 1)
        last = min(max(int(np.searchsorted(starts, hi, side="left")), first + 1), self._num_chunks)
        chunks = [self._chunk(c) for c in range(first, last)]
        doc_ids = np.concatenate([ids for ids, _ in chunks])
        offsets = np.concatenate([chunks[0][1][:1]] + [offs[1:] for _, offs in chunks])
        return doc_ids, offsets


class ConcatPlans(_Plans, grain.MapDataset):
    """Documents laid end to end and cut every `seq_len` tokens: 100% fill, random access.

    Row `i` covers tokens `[i * L, (i + 1) * L)` of the stream epoch 0, epoch 1, ...; only the
    very last row (finite `num_epochs`) is short. A piece continuing from the previous row
    starts a new segment when read. Iterating plans `CONCAT_BLOCK_TOKENS` worth of rows per call.
    """

    method = "concat"

    def __init__(self, lengths, seq_len: int, *, seed=None, num_epochs=1, source_fingerprint=None):
        super().__init__()
        self._configure(lengths, seq_len, seed, num_epochs, source_fingerprint)
        if self.lengths is None:
            raise ValueError(
                f"concat packing needs document lengths, and {type(self.docs).__name__} has no "
                "`.lengths` (text tokenized on the fly?): pre-tokenize with "
                "`wf-data prepare --tokenizer ...` or use method='best_fit'"
            )
        # Concat needs every offset anyway, so it checks and sums all lengths up front.
        _check_lengths(self.lengths)
        self.tokens_per_epoch = int(self.lengths.sum())
        self._offsets: dict[int, _EpochOffsets] = {}

    def __len__(self) -> int:
        if self.tokens_per_epoch == 0:
            return 0
        if self.num_epochs is None:
            return sys.maxsize
        return -(-self.num_epochs * self.tokens_per_epoch // self.seq_len)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        length = len(self)
        if not length:
            raise IndexError(f"{self} has no rows (no tokens)")
        # Indices wrap around, as in Grain's sources: `.repeat()` and negative indices rely on it.
        return self.plan_block(np.array([index % length])).row(0)

    def __iter__(self) -> ConcatPlansIterator:
        return ConcatPlansIterator(self)

    def __str__(self) -> str:
        return f"ConcatPlans(seq_len={self.seq_len}, seed={self.seed}, docs={self.num_docs})"

    def _epoch_offsets(self, epoch: int) -> _EpochOffsets:
        """The epoch's offsets cache (two epochs kept); call with `_lock` held."""
        offsets = self._offsets.get(epoch)
        if offsets is None:
            if len(self._offsets) >= 2:
                self._offsets.pop(next(iter(self._offsets)))
            offsets = self._offsets[epoch] = _EpochOffsets(self.lengths, self.permutation(epoch))
        return offsets

    def plan_rows(self, rows: np.ndarray) -> list[dict[str, Any]]:
        """Row plans of rows `rows` ((n,) int, any order), vectorised over all of them."""
        block = self.plan_block(rows)
        return [block.row(i) for i in range(len(block))]

    def plan_block(self, rows: np.ndarray) -> RowBlock:
        """The plans of rows `rows` ((n,) int, any order) as one block."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        length = len(self)
        if rows.size and (rows.min() < 0 or rows.max() >= length):
            bad = int(rows[(rows < 0) | (rows >= length)][0])
            raise IndexError(f"row {bad} out of range for {self} with {length} rows")
        if not rows.size:
            return RowBlock.empty()
        return RowBlock.from_counts(*self._pieces(rows))

    def _pieces(self, rows: np.ndarray):
        """(doc_ids, offsets, lengths, row_pieces, epochs) of `rows`: flat piece arrays in row
        order, and the epoch of each row's first token."""
        tokens, seq_len = self.tokens_per_epoch, self.seq_len
        # Row r starts at token r * seq_len of the stream of epochs, past int64 for an endless
        # plan's last rows: with r = q * tokens + rest, it is token rest * seq_len % tokens of
        # epoch q * seq_len + rest * seq_len // tokens, each term well inside int64.
        whole, rest = np.divmod(rows, tokens)
        epoch, span_start = np.divmod(rest * seq_len, tokens)
        epoch += whole * seq_len
        row_epochs = epoch
        remaining = np.full(rows.size, seq_len, dtype=np.int64)
        if self.num_epochs is not None:  # the stream ends after num_epochs * tokens tokens
            np.minimum(remaining, (self.num_epochs - epoch) * tokens - span_start, out=remaining)
        # Cut each row's tokens at epoch boundaries into (row, epoch, lo, hi) spans.
        spans = []
        span_rows = np.arange(rows.size)
        while span_rows.size:
            cut = np.minimum(span_start + remaining, tokens)
            spans.append((span_rows, epoch, span_start, cut))
            remaining = remaining - (cut - span_start)
            more = remaining > 0
            span_rows, epoch, remaining = span_rows[more], epoch[more] + 1, remaining[more]
            span_start = np.zeros(span_rows.size, dtype=np.int64)
        span_rows, span_epochs, span_lo, span_hi = (
            np.concatenate(part) for part in zip(*spans, strict=True)
        )
        piece_rows, piece_docs, piece_offsets, piece_stops = [], [], [], []
        epochs = np.unique(span_epochs).tolist()
        for epoch in epochs:
            select = np.flatnonzero(span_epochs == epoch)
            lo, hi = span_lo[select], span_hi[select]
            with self._lock:  # the chunk cache is shared by Grain's reader threads
                doc_ids, cumsum = self._epoch_offsets(epoch).window(int(lo.min()), int(hi.max()))
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
            piece_docs.append(doc_ids[k[keep]])
            piece_offsets.append(starts[keep])
            piece_stops.append(stops[keep])
        piece_rows = np.concatenate(piece_rows)
        docs, offsets, stops = (
            np.concatenate(part) for part in (piece_docs, piece_offsets, piece_stops)
        )
        if len(epochs) > 1:  # pieces came epoch by epoch, a row's in its epochs' order
            by_row = np.argsort(piece_rows, kind="stable")
            docs, offsets, stops = docs[by_row], offsets[by_row], stops[by_row]
        return (
            docs,
            offsets,
            stops - offsets,
            np.bincount(piece_rows, minlength=rows.size),
            row_epochs,
        )


class ConcatPlansIterator(grain.DatasetIterator):
    """Concat plans in order, `CONCAT_BLOCK_TOKENS` worth of rows planned per vectorised call.

    State: `{"row": next row, "method", "config"}`.
    """

    def __init__(self, plans: ConcatPlans):
        super().__init__()
        self._plans = plans
        self._row = 0
        self._block = RowBlock.empty()
        self._block_start = 0

    def _block_index(self, rows: int) -> int:
        """Index of the next row in `_block`, planning at least `rows` rows from it if the
        block does not hold it. Raises `StopIteration` at the end."""
        index = self._row - self._block_start
        if not 0 <= index < len(self._block):
            default = min(512, max(1, CONCAT_BLOCK_TOKENS // self._plans.seq_len))
            stop = min(self._row + max(rows, default), len(self._plans))
            if self._row >= stop:
                raise StopIteration
            self._block = self._plans.plan_block(np.arange(self._row, stop))
            self._block_start, index = self._row, 0
        return index

    def __next__(self) -> dict[str, Any]:
        index = self._block_index(1)  # first: it may plan the next block
        self._row += 1
        return self._block.row(index)

    def next_block(self, max_rows: int) -> RowBlock:
        """The next 1 to `max_rows` rows (see `wf_data.data.plan.blocks.BlockIterator`)."""
        index = self._block_index(max_rows)
        stop = min(index + max_rows, len(self._block))
        self._row += stop - index
        return self._block.slice(index, stop)

    def get_state(self) -> dict[str, Any]:
        return {**self._plans.state_check(), "row": self._row}

    def set_state(self, state: dict[str, Any]) -> None:
        self._plans.verify_state(state)
        row = int(state["row"])
        if not 0 <= row <= len(self._plans):
            raise ValueError(f"row {row} out of range for {self._plans}")
        self._row = row

    def __str__(self) -> str:
        return f"ConcatPlansIterator({self._plans}, row={self._row})"


class BestFitPlans(_Plans, grain.IterDataset):
    """Best-fit-decreasing plans over windows of `window_size` documents (an IterDataset).

    Windows follow the epoch's document order and never cross an epoch; pieces of documents
    longer than `seq_len` are packed as items of their own. Rows of a window come out in a
    seeded order, so every batch mixes long and short rows. Without lengths, the window's
    documents are read to measure them.
    """

    method = "best_fit"

    def __init__(
        self,
        lengths,
        seq_len: int,
        window_size: int = DEFAULT_WINDOW_SIZE,
        *,
        seed=None,
        num_epochs=1,
        source_fingerprint=None,
    ):
        super().__init__()
        self.window_size = _check_int("window_size", window_size, 1)
        self._configure(lengths, seq_len, seed, num_epochs, source_fingerprint)
        self.windows_per_epoch = -(-self.num_docs // self.window_size)

    def __iter__(self) -> BestFitPlansIterator:
        return BestFitPlansIterator(self)

    def __str__(self) -> str:
        return (
            f"BestFitPlans(seq_len={self.seq_len}, window_size={self.window_size}, "
            f"seed={self.seed}, docs={self.num_docs})"
        )

    def window_docs(self, epoch: int, window: int) -> np.ndarray:
        """Document indices of window `window` of epoch `epoch`, in epoch order."""
        start = window * self.window_size
        stop = min(start + self.window_size, self.num_docs)
        return self.permutation(epoch).take(np.arange(start, stop))

    def window_lengths(self, doc_ids: np.ndarray) -> np.ndarray:
        """(n,) int64 lengths of documents `doc_ids` (read from the source if unknown)."""
        if self.lengths is not None:
            return _check_lengths(self.lengths[doc_ids], doc_ids)
        tokens, _ = read_documents(self.docs, doc_ids.tolist())
        return np.fromiter((len(tokens[i]) for i in doc_ids.tolist()), np.int64, len(doc_ids))

    def plan_window(self, epoch: int, window: int) -> RowBlock:
        """Row plans of one window, in their seeded order."""
        return _run(self.window_steps(epoch, window))

    def window_steps(self, epoch: int, window: int) -> Generator[int, None, RowBlock]:
        """`plan_window` a slice at a time: a generator that yields (an estimate of) the
        slices left, each some tens of microseconds of work, and returns the rows."""
        # Slices left, roughly: the order, a run of items for about every 2 documents, the rest.
        estimate = self.window_size // (2 * BEST_FIT_RUNS_PER_SLICE) + 4
        yield estimate
        # One call: a permutation's fixed cost is most of it, smaller slices would cost more.
        doc_ids = self.window_docs(epoch, window)
        yield estimate - 1
        lengths = self.window_lengths(doc_ids)
        items_doc, items_start, items_stop = _split_pieces(doc_ids, lengths, self.seq_len)
        items_length = items_stop - items_start
        bins, placed = yield from _best_fit_slices(items_length, self.seq_len)
        yield 2
        num_bins = int(bins.max()) + 1 if bins.size else 0
        row_pieces = np.bincount(bins, minlength=num_bins)
        # Rows come out in the bins' order, or a seeded one: bins come out largest item
        # first, and shuffled every batch mixes long and short rows. Within a row, items keep
        # the (decreasing size) order they were placed in.
        row_of_bin = bins
        if self.seed is not None and num_bins:
            order = np.random.default_rng([self.seed, epoch, window]).permutation(num_bins)
            row_pieces = row_pieces[order]
            row_of_bin = np.empty(num_bins, dtype=np.int64)
            row_of_bin[order] = np.arange(num_bins)
            row_of_bin = row_of_bin[bins]
        yield 1
        by_row = placed[np.argsort(row_of_bin[placed], kind="stable")]
        return RowBlock.from_counts(
            items_doc[by_row],
            items_start[by_row],
            items_length[by_row],
            row_pieces,
            np.full(num_bins, epoch, dtype=np.int64),
        )


class _PlanningAhead:
    """The next window planned a slice at a time while the current one is served, so that no
    single call pays for a whole window (the rows are those of `plan_window`)."""

    def __init__(self, plans: BestFitPlans, key: tuple[int, int]):
        self.key = key
        self._plans = plans
        self._steps: Generator[int, None, RowBlock] | None = plans.window_steps(*key)
        self._left = next(self._steps)
        self._rows: RowBlock | None = None

    def advance(self, rows_served: int, rows_left: int) -> None:
        """Does the share of the work left that `rows_served` of `rows_served + rows_left`
        rows of the current window call for."""
        slices = -(-max(self._left, 1) * rows_served // max(rows_served + rows_left, 1))
        for _ in range(slices):
            if self._rows is not None or self._steps is None:
                return
            try:
                self._left = next(self._steps)
            except StopIteration as done:
                self._rows = done.value
            except Exception:  # e.g. a negative length: raised when the window is due
                self._steps = None

    def rows(self) -> RowBlock:
        """The window's rows (finishing what is left of its planning)."""
        if self._rows is None:
            if self._steps is None:
                return self._plans.plan_window(*self.key)
            self._rows = _run(self._steps)
        return self._rows


def _run(steps: Generator[int, None, RowBlock]) -> RowBlock:
    """The value a planning generator returns, run to its end."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class BestFitPlansIterator(grain.DatasetIterator):
    """Best-fit plans window by window. State: `{"epoch", "window", "row", "method", "config"}`;
    `set_state` replans only the window it lands in."""

    def __init__(self, plans: BestFitPlans):
        super().__init__()
        self._plans = plans
        self._epoch = self._window = self._row = 0
        self._key: tuple[int, int] | None = None
        self._rows = RowBlock.empty()
        self._ahead: _PlanningAhead | None = None

    def _exhausted(self) -> bool:
        plans = self._plans
        return plans.windows_per_epoch == 0 or (
            plans.num_epochs is not None and self._epoch >= plans.num_epochs
        )

    def _window_rows(self) -> RowBlock:
        key = (self._epoch, self._window)
        if self._key != key:
            ahead, self._ahead = self._ahead, None
            if ahead is not None and ahead.key == key:
                self._rows = ahead.rows()
            else:
                self._rows = self._plans.plan_window(*key)
            self._key = key
        return self._rows

    def _plan_ahead(self, rows_served: int) -> None:
        """Plans a share of the next window (none at the last one of the last epoch)."""
        if self._ahead is None:
            plans, epoch, window = self._plans, self._epoch, self._window + 1
            if window >= plans.windows_per_epoch:
                epoch, window = epoch + 1, 0
            if plans.num_epochs is not None and epoch >= plans.num_epochs:
                return
            self._ahead = _PlanningAhead(plans, (epoch, window))
        self._ahead.advance(rows_served, len(self._rows) - self._row)

    def _advance_window(self) -> None:
        self._key = None  # the planned rows are of the window left behind
        self._window += 1
        self._row = 0
        if self._window >= self._plans.windows_per_epoch:
            self._epoch += 1
            self._window = 0

    def _take(self, max_rows: int) -> tuple[int, int]:
        """Moves past the next 1 to `max_rows` rows of one window: their [start, stop) in
        `_rows`. Raises `StopIteration` at the end."""
        # Fast path: the next row of the window already planned (all but one call per window).
        switched = self._key is None or self._row >= len(self._rows)
        if switched:
            empty_windows = 0
            while True:
                if self._exhausted():
                    raise StopIteration
                rows = self._window_rows()
                if self._row < len(rows):
                    break
                empty_windows += 1 if not len(rows) else 0
                if empty_windows >= self._plans.windows_per_epoch:
                    # Every window of an epoch empty (every document empty): so is every
                    # epoch, and with `num_epochs=None` this loop would never end.
                    raise StopIteration
                epoch = self._epoch
                self._advance_window()
                if self._epoch != epoch:
                    empty_windows = 0  # count the windows of one epoch only
        start = self._row
        self._row = min(start + max_rows, len(self._rows))
        # A call that moved to the next window has just finished planning it: the window after
        # starts with the next call.
        self._plan_ahead(0 if switched else self._row - start)
        return start, self._row

    def __next__(self) -> dict[str, Any]:
        start, _ = self._take(1)  # first: it may plan the next window
        return self._rows.row(start)

    def next_block(self, max_rows: int) -> RowBlock:
        """The next 1 to `max_rows` rows of the current window (see
        `wf_data.data.plan.blocks.BlockIterator`)."""
        start, stop = self._take(max_rows)
        return self._rows.slice(start, stop)

    def get_state(self) -> dict[str, Any]:
        return {
            **self._plans.state_check(),
            "epoch": self._epoch,
            "window": self._window,
            "row": self._row,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        plans = self._plans
        plans.verify_state(state)
        epoch, window, row = (int(state[key]) for key in ("epoch", "window", "row"))
        if epoch < 0 or not 0 <= window < max(plans.windows_per_epoch, 1) or row < 0:
            raise ValueError(f"invalid best_fit position {(epoch, window, row)} for {plans}")
        self._epoch, self._window, self._row = epoch, window, row
        if self._exhausted():
            self._key = None  # no window here: nothing planned may be served
        elif row > len(self._window_rows()):
            raise ValueError(
                f"row {row} out of range for window {window} of epoch {epoch} in {plans}"
            )

    def __str__(self) -> str:
        return f"BestFitPlansIterator({self._plans}, {(self._epoch, self._window, self._row)})"


def _check_lengths(lengths: np.ndarray, doc_ids: np.ndarray | None = None) -> np.ndarray:
    """Returns `lengths` ((n,) of documents `doc_ids`, default all), failing on a negative one."""
    if lengths.size and lengths.min() < 0:
        bad = int(np.flatnonzero(lengths < 0)[0])
        doc = bad if doc_ids is None else int(doc_ids[bad])
        raise ValueError(f"lengths[{doc}] is {int(lengths[bad])}: lengths must be >= 0")
    return lengths


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
    still fits (ties: lowest bin), else a new bin. Returns (n,) int64, bins numbered in order of
    creation.
    """
    return _best_fit_bins(item_lengths, capacity)[0]


def _best_fit_bins(item_lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(bins (n,) int64 of `best_fit_decreasing`, the items in the order they were placed)."""
    return _run(_best_fit_slices(item_lengths, capacity))


def _best_fit_slices(
    item_lengths: np.ndarray, capacity: int
) -> Generator[int, None, tuple[np.ndarray, np.ndarray]]:
    """`_best_fit_bins` as a generator yielding the slices left after each slice of
    `BEST_FIT_RUNS_PER_SLICE` runs of items, returning its result.

    Open bins live in one sorted list of keys `remaining * K + bin`, so a search costs one
    bisect. Items of equal length (consecutive in the placement order) are placed a bin at a
    time: the bin with the smallest room that fits one takes as many as fit, since what it has
    left is then the smallest room that fits the next (nothing lies between), and a new bin
    takes `capacity // length` of them. This places every item exactly as one by one.
    """
    item_lengths = np.asarray(item_lengths, dtype=np.int64)
    if item_lengths.size and (item_lengths.max() > capacity or item_lengths.min() < 1):
        raise ValueError(f"items must have lengths in [1, {capacity}]")
    order = np.argsort(-item_lengths, kind="stable")
    yield -(-item_lengths.size // (2 * BEST_FIT_RUNS_PER_SLICE)) + 1
    sorted_lengths = item_lengths[order]
    bins = np.empty(item_lengths.size, dtype=np.int64)
    # Items longer than half a bin never share one: each opens its own bin, no search needed.
    num_big = int(np.searchsorted(-sorted_lengths, -(capacity // 2), side="left"))
    bins[order[:num_big]] = np.arange(num_big)
    key_base = item_lengths.size + 1
    remaining = capacity - sorted_lengths[:num_big]
    has_room = np.flatnonzero(remaining)
    open_keys = np.sort(remaining[has_room] * key_base + has_room).tolist()
    small = sorted_lengths[num_big:]
    run_starts = np.flatnonzero(np.diff(small, prepend=0))  # runs of equal lengths
    run_counts = np.diff(run_starts, append=small.size).tolist()
    placed_bins, placed_counts = [], []  # runs of consecutive items placed in one bin
    add_bin, add_count, pop = placed_bins.append, placed_counts.append, open_keys.pop
    bisect_left, insort = bisect.bisect_left, bisect.insort
    num_bins = num_big
    run_lengths, num_runs = small[run_starts].tolist(), len(run_counts)
    for first in range(0, num_runs, BEST_FIT_RUNS_PER_SLICE):
        yield -(-(num_runs - first) // BEST_FIT_RUNS_PER_SLICE) + 1
        last = first + BEST_FIT_RUNS_PER_SLICE
        for length, count in zip(run_lengths[first:last], run_counts[first:last], strict=True):
            probe = length * key_base  # the smallest key of a bin with room for one
            while count:
                j = bisect_left(open_keys, probe)
                if j == len(open_keys):
                    b = num_bins
                    num_bins += 1
                    room = capacity
                else:
                    room, b = divmod(pop(j), key_base)
                take = room // length
                if take > count:
                    take = count
                room -= take * length
                add_bin(b)
                add_count(take)
                count -= take
                if room:
                    insort(open_keys, room * key_base + b)
    bins[order[num_big:]] = np.repeat(np.array(placed_bins, dtype=np.int64), placed_counts)
    return bins, order
