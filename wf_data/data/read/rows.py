"""Reading rows from plans: `read_rows(sources, seq_len)`, a stateless, picklable map.

`read_rows(...)(plan)` reads the documents a plan names (one batched `__getitems__` per
domain) and builds the rows with whole-batch numpy operations:

- a row plan (see `wf_data.data.plan.plans`) gives one row: `input_ids`, `labels`, `position_ids`,
  `segment_ids`, each `(L,)` int32 (plus a 0-d `domain_ids` when the plan has a `domain`);
- a batch plan (see `wf_data.data.plan.batching`, it has `row_pieces`) gives `(B, L)` int32 arrays
  plus `domain_ids` `(B,)` int32; `ReadSlice` reads one rank's rows of a global batch plan
  (the loader's worker function).

Row layout: `labels` are the tokens with -100 on padding and on the first token of every
segment (and, for dict documents with a `loss_mask`, wherever the mask is 0); `position_ids`
restart at 0 per segment and are 0 on padding; `segment_ids` number the row's segments 1, 2,
... and are 0 on padding, which always ends the row. The output is a pure function of the plan,
so rows read in a worker process equal rows read inline. This module imports no Grain: worker
processes import it to unpickle their function.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from wf_data.data import IGNORE_INDEX
from wf_data.data.plan import PLAN_KEYS
from wf_data.data.shards.documents import describe_source, read_documents
from wf_data.data.shards.sources import take_pieces

ROW_KEYS = ("input_ids", "labels", "position_ids", "segment_ids")

__all__ = [
    "IGNORE_INDEX",
    "PLAN_KEYS",
    "ROW_KEYS",
    "ReadSlice",
    "RowReader",
    "SliceRows",
    "read_documents",
    "read_rows",
    "rename_domains",
]


def read_rows(sources: Any, seq_len: int, pad_id: int | Sequence[int] = 0) -> RowReader:
    """The map from plans to rows of `seq_len` tokens.

    `sources` is one random-access document source (`__len__`, `__getitem__`, optionally
    `__getitems__`), or a sequence / mapping of them indexed by the plans' domain (mapping
    values in domain order). A document is a 1-D int array or a dict {"input_ids": (n,) int,
    "loss_mask": (n,) bool}. `pad_id` is one int or one per domain.
    """
    return RowReader(sources, seq_len, pad_id)


def _is_document(value: Any) -> bool:
    """Whether `value` is a document (tokens or a dict), not a source: the first element of a
    list that `read_rows` takes for one source's documents. A list of ints, empty included,
    is a document (an empty source cannot be read from)."""
    if isinstance(value, int | np.integer | np.ndarray | dict):
        return True
    return isinstance(value, list | tuple) and (not value or isinstance(value[0], int | np.integer))


class RowReader:
    """Plan -> rows, for one or several domains' document sources. Small and picklable."""

    def __init__(self, sources: Any, seq_len: int, pad_id: int | Sequence[int] = 0):
        if isinstance(sources, Mapping):
            sources = list(sources.values())
        elif not isinstance(sources, list | tuple) or (sources and _is_document(sources[0])):
            sources = [sources]  # one source (possibly itself a list of documents)
        if not sources:
            raise ValueError("read_rows needs at least one document source")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        pad_ids = [pad_id] * len(sources) if isinstance(pad_id, int | np.integer) else pad_id
        if len(pad_ids) != len(sources):
            raise ValueError(f"pad_id has {len(pad_ids)} entries for {len(sources)} sources")
        self.sources = tuple(sources)
        self.seq_len = int(seq_len)
        self.pad_ids = tuple(int(p) for p in pad_ids)

    def __repr__(self) -> str:
        return f"RowReader({len(self.sources)} sources, seq_len={self.seq_len})"

    def __call__(self, plan: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if "row_pieces" in plan:
            return self.read_batch(plan)
        domain = plan.get("domain")
        batch = self.read_batch(
            {
                "doc_ids": plan["doc_ids"],
                "offsets": plan["offsets"],
                "lengths": plan["lengths"],
                "row_pieces": np.array([len(plan["doc_ids"])]),
                "domain_ids": np.array([0 if domain is None else domain], dtype=np.int32),
            }
        )
        row = {key: batch[key][0] for key in ROW_KEYS}
        if domain is not None:
            row["domain_ids"] = batch["domain_ids"][0]
        return row

    def read_batch(
        self,
        plan: Mapping[str, Any],
        labels_dtype: Any = np.int32,
        allocate: Callable[[int], np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """`(B, L)` int32 rows and `(B,)` int32 `domain_ids` of a batch plan; `labels` of
        `labels_dtype` (int64 for torch's losses: written so, not converted afterwards). The
        rows are built in memory from `allocate(nbytes) -> (nbytes,) uint8` when given (a
        worker's shared-memory slot: the rows then need no copy into it).

        One read per domain of only the tokens the pieces name (`read_pieces` where the source
        has it); then numpy per token and at most Python per row (padded rows and rows of
        several domains are copied a slice each), never per token. A plan has a few rows and
        tens of pieces, so per-row values are Python ints and reductions call ufuncs directly:
        a numpy call on a tiny array costs microseconds, most of a batch's fixed cost.
        """
        doc_ids = np.asarray(plan["doc_ids"], dtype=np.int64)
        offsets = np.asarray(plan["offsets"], dtype=np.int64)
        sizes = np.asarray(plan["lengths"], dtype=np.int64)
        row_pieces = np.asarray(plan["row_pieces"], dtype=np.int64)
        n, seq_len = row_pieces.size, self.seq_len
        domain_ids = np.asarray(plan.get("domain_ids", np.zeros(n)), dtype=np.int32)
        if domain_ids.shape != (n,):
            raise ValueError(f"plan has {n} rows but domain_ids of shape {domain_ids.shape}")
        pieces_per_row, domains = row_pieces.tolist(), domain_ids.tolist()
        if n and (min(domains) < 0 or max(domains) >= len(self.sources)):
            bad = min(domains) if min(domains) < 0 else max(domains)
            raise ValueError(
                f"plan names domain {bad}; this reader has {len(self.sources)} sources"
            )
        num_pieces = sum(pieces_per_row)
        if not doc_ids.shape == offsets.shape == sizes.shape == (num_pieces,):
            raise ValueError(
                f"plan has {num_pieces} pieces by row_pieces, but doc_ids, offsets "
                f"and lengths of shapes {doc_ids.shape}, {offsets.shape}, {sizes.shape}"
            )
        if n == 0:
            rows = {key: np.empty((0, seq_len), dtype=np.int32) for key in ROW_KEYS}
            rows["labels"] = rows["labels"].astype(labels_dtype)
            return {**rows, "domain_ids": domain_ids}
        if (
            min(pieces_per_row) < 1
            or _lowest(sizes) < 1
            or _lowest(doc_ids) < 0
            or _lowest(offsets) < 0
        ):
            raise ValueError(
                f"plan rows of {min(pieces_per_row)} pieces, pieces of {_lowest(sizes)} "
                f"tokens, document {_lowest(doc_ids)} or offset {_lowest(offsets)}: every "
                "row holds >= 1 piece, every piece >= 1 token of a document >= 0 from an "
                "offset >= 0"
            )
        piece_stop = np.add.accumulate(sizes)  # of each piece in the batch's planned tokens
        piece_start = piece_stop - sizes
        row_stops = list(itertools.accumulate(pieces_per_row))  # of each row's pieces
        stop_tokens = piece_stop.tolist()
        row_stop = [stop_tokens[stop - 1] for stop in row_stops]  # in the planned tokens
        row_start = [0, *row_stop[:-1]]
        used = [stop - start for start, stop in zip(row_start, row_stop, strict=True)]
        if max(used) > seq_len:
            raise ValueError(
                f"plan rows hold {min(used)} to {max(used)} tokens: not a plan for "
                f"seq_len={seq_len}"
            )
        rows = _Rows(n, seq_len, used, row_start, labels_dtype, allocate)
        one_domain = min(domains) == max(domains)
        for domain in sorted(set(domains)):
            if one_domain:
                pieces, rows_of_domain = slice(None), range(n)
            else:
                pieces = np.repeat(domain_ids == domain, row_pieces)
                rows_of_domain = [row for row in range(n) if domains[row] == domain]
            tokens, no_loss = self._domain_tokens(
                domain, doc_ids[pieces], offsets[pieces], sizes[pieces]
            )
            rows.place(tokens, no_loss, rows_of_domain, self.pad_ids[domain])
        return rows.finish(row_pieces, sizes, piece_start, row_stops, domain_ids)

    def _domain_tokens(self, domain, doc_ids, offsets, sizes):
        """(tokens (T,), positions of no-loss tokens among them or None) of one domain's
        pieces, in order: `read_pieces` reads only those tokens; any other source is read a
        document at a time (`read_documents`) and the pieces cut out of them."""
        source = self.sources[domain]
        read_pieces = getattr(source, "read_pieces", None)
        lengths = getattr(source, "lengths", None)
        if read_pieces is not None and lengths is None:  # it checks the pieces itself
            return read_pieces(doc_ids, offsets, sizes), None
        if read_pieces is not None:
            if int(np.maximum.reduce(doc_ids)) >= len(lengths):
                bad = int(doc_ids[doc_ids >= len(lengths)][0])
                raise IndexError(
                    f"record {bad} out of range for {describe_source(source)} with "
                    f"{len(lengths)} records"
                )
            _check_pieces(source, doc_ids, offsets + sizes, lengths[doc_ids])
            return read_pieces(doc_ids, offsets, sizes), None
        wanted, which = _distinct(doc_ids)
        flat, lengths, mask = _read_joined(source, wanted)
        _check_pieces(source, doc_ids, offsets + sizes, lengths[which])
        starts = (np.add.accumulate(lengths) - lengths)[which] + offsets
        tokens = take_pieces(flat, starts, sizes)
        if mask is None:
            return tokens, None
        return tokens, np.flatnonzero(take_pieces(mask, starts, sizes) == 0)


def _check_pieces(source, doc_ids, stops, doc_lengths) -> None:
    """Every piece ends within its document."""
    if np.maximum.reduce(stops - doc_lengths) > 0:
        bad = int(np.flatnonzero(stops > doc_lengths)[0])
        raise ValueError(
            f"{describe_source(source)} document {int(doc_ids[bad])} has {int(doc_lengths[bad])} "
            f"tokens but the plan needs [.., {int(stops[bad])}): the source's lengths do not "
            "match its records"
        )


class _Rows:
    """The arrays of a batch being built: tokens placed row by row, then labels, positions
    and segments from the pieces' sizes (numpy per token: `np.repeat`, no running sums)."""

    def __init__(self, n, seq_len, used, row_start, labels_dtype, allocate):
        self.n, self.seq_len, self.used, self.row_start = n, seq_len, used, row_start
        self.padded = sum(used) != n * seq_len
        self.input_ids = _empty((n, seq_len), np.int32, allocate)
        self.labels = _empty((n, seq_len), labels_dtype, allocate)
        # Positions and segments: the arrays np.repeat makes, or copied into `allocate`'s.
        self.allocated = None if allocate is None else _empty((2, n, seq_len), np.int32, allocate)
        self.no_loss: list[np.ndarray] = []

    def place(self, tokens, no_loss, rows, pad_id) -> None:
        """Puts a domain's planned tokens (its rows' tokens back to back) into its `rows`."""
        input_ids, used, seq_len = self.input_ids, self.used, self.seq_len
        if not self.padded and len(rows) == self.n:
            input_ids.reshape(-1)[:] = tokens
            if no_loss is not None:
                self.no_loss.append(no_loss)
            return
        start, shifts = 0, []
        for row in rows:  # Python per row, numpy per token
            count = used[row]
            input_ids[row, :count] = tokens[start : start + count]
            input_ids[row, count:] = pad_id
            shifts.append(row * seq_len - start)
            start += count
        if no_loss is not None:  # flat position = index among the domain's tokens + shift
            counts = [used[row] for row in rows]
            self.no_loss.append(no_loss + np.repeat(shifts, counts)[no_loss])

    def finish(self, row_pieces, sizes, piece_start, row_stops, domain_ids):
        """Labels, positions and segments; returns the batch."""
        n, seq_len, used = self.n, self.seq_len, self.used
        input_ids = self.input_ids
        num_pieces = sizes.size
        piece_in_row = np.arange(num_pieces) - np.repeat(
            np.asarray(row_stops) - row_pieces, row_pieces
        )
        if self.padded:
            # Flat start of each piece, and a padding run after each row's pieces (empty for
            # a full row), so that one repeat covers every position of the rows.
            shift = np.array([row * seq_len - start for row, start in enumerate(self.row_start)])
            at = piece_start + np.repeat(shift, row_pieces)
            slot = np.arange(num_pieces) + np.repeat(np.arange(n), row_pieces)
            pad_slot = np.asarray(row_stops) + np.arange(n)
            counts = np.empty(num_pieces + n, dtype=np.int64)
            counts[slot], counts[pad_slot] = sizes, seq_len - np.asarray(used)
            starts = np.empty(num_pieces + n, dtype=np.int32)
            starts[slot], starts[pad_slot] = at, np.arange(n) * seq_len + np.asarray(used)
            numbers = np.zeros(num_pieces + n, dtype=np.int32)  # padding: segment 0
            numbers[slot] = piece_in_row + 1
        else:
            at, counts, starts, numbers = piece_start, sizes, piece_start.astype(np.int32), None
        labels = self.labels
        labels[...] = input_ids
        flat_labels = labels.reshape(-1)
        flat_labels[at] = IGNORE_INDEX  # nothing predicts a segment's first token
        for no_loss in self.no_loss:
            flat_labels[no_loss] = IGNORE_INDEX
        positions = np.repeat(starts, counts)
        np.subtract(_ramp(n * seq_len), positions, out=positions)
        if numbers is None:
            numbers = (piece_in_row + 1).astype(np.int32)
        segments = np.repeat(numbers, counts)
        if self.allocated is None:
            positions, segments = positions.reshape(n, seq_len), segments.reshape(n, seq_len)
        else:
            self.allocated.reshape(2, -1)[0] = positions
            self.allocated.reshape(2, -1)[1] = segments
            positions, segments = self.allocated
        if self.padded:  # padding: labels -100, positions 0 (segments are 0 already)
            for row, count in enumerate(used):
                if count < seq_len:
                    labels[row, count:] = IGNORE_INDEX
                    positions[row, count:] = 0
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": positions,
            "segment_ids": segments,
            "domain_ids": domain_ids,
        }


_RAMP = np.arange(0, dtype=np.int32)


def _ramp(size: int) -> np.ndarray:
    """`np.arange(size, dtype=int32)`, a view of one kept array (rebuilt when outgrown)."""
    global _RAMP
    if _RAMP.size < size:
        _RAMP = np.arange(max(size, 2 * _RAMP.size), dtype=np.int32)
        _RAMP.setflags(write=False)
    return _RAMP[:size]


def _empty(shape: tuple[int, ...], dtype: Any, allocate: Callable[[int], np.ndarray] | None):
    """An uninitialised array, in memory from `allocate(nbytes)` when given."""
    if allocate is None:
        return np.empty(shape, dtype)
    dtype = np.dtype(dtype)
    return allocate(math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)


def _lowest(values: np.ndarray) -> int:
    """The smallest of a non-empty int array (the ufunc: `ndarray.min` adds a Python layer)."""
    return int(np.minimum.reduce(values))


def _distinct(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct `keys` ascending, the index of each key among them): what
    `np.unique(keys, return_inverse=True)` returns, at about half its cost on tens of keys."""
    order = keys.argsort()
    ordered = keys[order]
    first = np.empty(keys.size, dtype=bool)  # of a run of equal keys
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    rank = np.add.accumulate(first, dtype=np.int64)  # 1 + index among the distinct keys
    rank -= 1
    which = np.empty(keys.size, dtype=np.int64)
    which[order] = rank
    return ordered[first], which


class SliceRows:
    """Batch plan -> the batch plan of rows `[start, stop)` (a data-parallel rank's rows)."""

    def __init__(self, start: int, stop: int):
        if not 0 <= start < stop:
            raise ValueError(f"SliceRows needs 0 <= start < stop, got {start}, {stop}")
        self.start, self.stop = int(start), int(stop)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        row_pieces = batch["row_pieces"]
        if self.stop > row_pieces.size:
            raise ValueError(f"rows [{self.start}, {self.stop}) of a {row_pieces.size}-row batch")
        sliced = dict(batch)
        if self.start == 0 and self.stop == row_pieces.size:  # the whole batch (one rank)
            return sliced
        first = int(np.add.reduce(row_pieces[: self.start]))
        last = first + int(np.add.reduce(row_pieces[self.start : self.stop]))
        for key in PLAN_KEYS:
            sliced[key] = batch[key][first:last]
        sliced["row_pieces"] = row_pieces[self.start : self.stop]
        sliced["domain_ids"] = batch["domain_ids"][self.start : self.stop]
        return sliced

    def __repr__(self) -> str:
        return f"SliceRows({self.start}, {self.stop})"


def rename_domains(batch: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """`batch` with domain ids and served counts re-indexed to `names` (matched by name).

    A batch planned under other domains (before a restore into an extended or re-ordered
    mixture) keeps its rows' domains; a domain it has and `names` lacks is an error.
    """
    planned = json.loads(batch["domain_names"])
    if planned == list(names):
        return batch
    missing = sorted(set(planned) - set(names))
    if missing:
        raise ValueError(f"a planned batch has rows of domains {missing}, which this loader lacks")
    index = np.array([list(names).index(name) for name in planned], dtype=np.int32)
    renamed = dict(
        batch, domain_ids=index[batch["domain_ids"]], domain_names=json.dumps(list(names))
    )
    for key in ("served_rows", "served_tokens"):
        counts = np.zeros(len(names), dtype=np.int64)
        counts[index] = batch[key]
        renamed[key] = counts
    return renamed


class ReadSlice:
    """The loader's worker function: a global batch plan -> this rank's rows (numpy), plus the
    plan's `step` and cumulative `served_rows` / `served_tokens`, which the loader pops.
    `labels_dtype` "int64" builds the labels torch's losses take (the loader's torch batches)."""

    def __init__(
        self,
        reader: RowReader,
        rows: SliceRows,
        domain_names: Sequence[str],
        labels_dtype: str = "int32",
    ):
        self.reader, self.rows, self.domain_names = reader, rows, tuple(domain_names)
        self.labels_dtype = np.dtype(labels_dtype)
        self._names_json = json.dumps(list(self.domain_names))

    def __call__(self, plan: dict[str, Any]) -> dict[str, np.ndarray]:
        return self.many([plan])[0]

    def many(
        self,
        plans: Sequence[dict[str, Any]],
        allocate: Callable[[int], np.ndarray] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """`[self(plan) for plan in plans]` from one read of all their rows: a read has a fixed
        cost (a sort, one call per domain and shard) that several batches then share. Rows are
        built in memory from `allocate` when given (see `RowReader.read_batch`; `ProcessMap`'s
        workers pass their result slot's)."""
        plans = [
            plan
            if plan["domain_names"] == self._names_json  # else planned before a restore
            else rename_domains(plan, self.domain_names)
            for plan in plans
        ]
        sliced = [self.rows(plan) for plan in plans]
        joined = sliced[0]
        if len(sliced) > 1:
            joined = {
                key: np.concatenate([part[key] for part in sliced])
                for key in (*PLAN_KEYS, "row_pieces", "domain_ids")
            }
        rows = self.reader.read_batch(joined, self.labels_dtype, allocate)
        size = self.rows.stop - self.rows.start
        results = []
        for index, plan in enumerate(plans):
            batch = {key: value[index * size : (index + 1) * size] for key, value in rows.items()}
            batch["step"] = np.asarray(plan["step"], dtype=np.int64)
            batch["served_rows"] = plan["served_rows"]
            batch["served_tokens"] = plan["served_tokens"]
            results.append(batch)
        return results


def _read_joined(source: Any, indices: np.ndarray):
    """Documents `indices` of `source` joined: (tokens (T,), lengths (n,), loss mask (T,)
    uint8 or None). A source with `read_tokens` (a prepared dataset) fills the buffer in one
    join; any other source is read with `read_documents`."""
    read_tokens = getattr(source, "read_tokens", None)
    if read_tokens is not None and getattr(source, "lengths", None) is not None:
        return (*read_tokens(indices), None)  # back to back, in the order asked
    tokens, masks = read_documents(source, indices.tolist())
    docs = [tokens[i] for i in indices.tolist()]
    lengths = np.fromiter(map(len, docs), np.int64, len(docs))
    flat = np.concatenate(docs) if docs else np.zeros(0, np.int32)
    mask = None
    if masks:
        mask = np.concatenate(
            [
                np.ones(len(doc), np.uint8) if masks.get(i) is None else masks[i]
                for i, doc in zip(indices.tolist(), docs, strict=True)
            ]
        ).astype(np.uint8, copy=False)
    return flat, lengths, mask
