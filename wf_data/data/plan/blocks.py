"""Blocks of row plans: many rows as flat piece arrays, the hand-off between planning stages.

A `RowBlock` of `n` rows holds the pieces of all its rows back to back:

    doc_ids, offsets, lengths: (P,) int64   pieces, row after row
    starts: (n + 1,) int64                  row i's pieces are [starts[i], starts[i + 1])
    epochs: (n,) int64 or None              each row's epoch (None: unknown)
    domains: (n,) int64 or None             each row's domain, once mixed

`block.row(i)` is the row plan dict of `wf_data.data.plan.plans` (views of the arrays). The
planners, the mixer and the batcher hand whole blocks to each other through `next_block`
(`BlockIterator`), so a batch costs a few numpy calls instead of a dict per row; any other
Grain iterator (a user's `.map` or `.filter` between our stages) is read row by row with
`next_rows`, which builds the same block.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from wf_data.data.plan import PLAN_KEYS

__all__ = ["BlockIterator", "RowBlock", "hands_blocks", "next_rows"]


@runtime_checkable
class BlockIterator(Protocol):
    """An iterator of row plans that can also hand over several rows at once.

    `next_block(max_rows)` returns the next 1 to `max_rows` rows (fewer when a window or
    chunk ends there) and leaves the iterator exactly where as many `next()` calls would, its
    `get_state()` included; it raises `StopIteration` when no row is left.
    """

    def next_block(self, max_rows: int) -> RowBlock: ...


class RowBlock:
    """`n` row plans as flat arrays (see the module docstring for the layout)."""

    __slots__ = ("doc_ids", "offsets", "lengths", "starts", "epochs", "domains")

    def __init__(
        self,
        doc_ids: np.ndarray,
        offsets: np.ndarray,
        lengths: np.ndarray,
        starts: np.ndarray,
        epochs: np.ndarray | None = None,
        domains: np.ndarray | None = None,
    ):
        self.doc_ids, self.offsets, self.lengths = doc_ids, offsets, lengths
        self.starts, self.epochs, self.domains = starts, epochs, domains

    def __len__(self) -> int:
        return self.starts.size - 1

    def __repr__(self) -> str:
        return f"RowBlock({len(self)} rows, {self.doc_ids.size} pieces)"

    @classmethod
    def empty(cls) -> RowBlock:
        none = np.zeros(0, dtype=np.int64)
        return cls(none, none, none, np.zeros(1, dtype=np.int64), none, None)

    @classmethod
    def from_counts(
        cls,
        doc_ids: np.ndarray,
        offsets: np.ndarray,
        lengths: np.ndarray,
        row_pieces: np.ndarray,
        epochs: np.ndarray | None = None,
    ) -> RowBlock:
        """A block from flat pieces and the number of pieces of each row ((n,) int)."""
        starts = np.zeros(len(row_pieces) + 1, dtype=np.int64)
        np.cumsum(row_pieces, out=starts[1:])
        return cls(doc_ids, offsets, lengths, starts, epochs)

    @classmethod
    def from_rows(cls, plans: Sequence[dict[str, Any]]) -> RowBlock:
        """A block from row plan dicts (what a plain Grain iterator yields); keys other than
        the pieces, `epoch` and `domain` are dropped."""
        if not plans:
            return cls.empty()
        pieces = [
            np.concatenate([np.asarray(plan[key]) for plan in plans]).astype(np.int64, copy=False)
            for key in PLAN_KEYS
        ]
        counts = np.fromiter((len(plan["doc_ids"]) for plan in plans), np.int64, len(plans))
        block = cls.from_counts(*pieces, counts)
        if all("epoch" in plan for plan in plans):
            block.epochs = np.fromiter((plan["epoch"] for plan in plans), np.int64, len(plans))
        if any("domain" in plan for plan in plans):
            block.domains = np.fromiter(
                (plan.get("domain", 0) for plan in plans), np.int64, len(plans)
            )
        return block

    @classmethod
    def concat(cls, blocks: Sequence[RowBlock]) -> RowBlock:
        """The rows of `blocks` one after the other (epochs, domains kept where all have them)."""
        if len(blocks) == 1:
            return blocks[0]
        if not blocks:
            return cls.empty()
        starts, offset = [np.zeros(1, dtype=np.int64)], 0
        for block in blocks:
            starts.append(block.starts[1:] + (offset - int(block.starts[0])))
            offset += int(block.starts[-1] - block.starts[0])
        pieces = [block.pieces() for block in blocks]
        joined = cls(
            *(np.concatenate(arrays) for arrays in zip(*pieces, strict=True)),
            np.concatenate(starts),
        )
        if all(b.epochs is not None for b in blocks):
            joined.epochs = np.concatenate([b.epochs for b in blocks])
        if all(b.domains is not None for b in blocks):
            joined.domains = np.concatenate([b.domains for b in blocks])
        return joined

    @property
    def row_pieces(self) -> np.ndarray:
        """(n,) int64 pieces per row."""
        return np.diff(self.starts)

    def pieces(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(doc_ids, offsets, lengths) of the block's own pieces (`starts[0]` may be > 0)."""
        first, last = int(self.starts[0]), int(self.starts[-1])
        if first == 0 and last == self.doc_ids.size:
            return self.doc_ids, self.offsets, self.lengths
        return self.doc_ids[first:last], self.offsets[first:last], self.lengths[first:last]

    def row(self, index: int) -> dict[str, Any]:
        """Row plan `index`: `{"doc_ids", "offsets", "lengths": (p,) int64 views, "epoch"}`,
        plus `"domain"` once mixed."""
        first, last = int(self.starts[index]), int(self.starts[index + 1])
        plan = {
            "doc_ids": self.doc_ids[first:last],
            "offsets": self.offsets[first:last],
            "lengths": self.lengths[first:last],
        }
        if self.epochs is not None:
            plan["epoch"] = int(self.epochs[index])
        if self.domains is not None:
            plan["domain"] = int(self.domains[index])
        return plan

    def slice(self, start: int, stop: int) -> RowBlock:
        """Rows `[start, stop)` as views (no copy)."""
        return RowBlock(
            self.doc_ids,
            self.offsets,
            self.lengths,
            self.starts[start : stop + 1],
            None if self.epochs is None else self.epochs[start:stop],
            None if self.domains is None else self.domains[start:stop],
        )

    def take(self, rows: np.ndarray) -> RowBlock:
        """Rows `rows` ((m,) int, any order) gathered into a new block."""
        first = self.starts[rows]
        counts = self.starts[rows + 1] - first
        starts = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        # Piece j of the result is piece `j + shift` of this block, shift constant per row.
        index = np.arange(int(starts[-1]), dtype=np.int64)
        index += np.repeat(first - starts[:-1], counts)
        return RowBlock(
            self.doc_ids[index],
            self.offsets[index],
            self.lengths[index],
            starts,
            None if self.epochs is None else self.epochs[rows],
            None if self.domains is None else self.domains[rows],
        )


def next_rows(iterator: Iterator[dict[str, Any]], count: int) -> RowBlock:
    """The next `count` rows of `iterator` as one block (fewer only where it ends; raises
    `StopIteration` when it has none). Whole blocks from a `BlockIterator`, else row by row."""
    if hands_blocks(iterator):
        block = iterator.next_block(count)  # most often all of them at once
        if len(block) == count:
            return block
        blocks, taken = [block], len(block)
        while taken < count:
            try:
                block = iterator.next_block(count - taken)
            except StopIteration:
                break
            blocks.append(block)
            taken += len(block)
        return RowBlock.concat(blocks)
    plans = list(itertools.islice(iterator, count))
    if not plans:
        raise StopIteration
    return RowBlock.from_rows(plans)


_HANDS_BLOCKS: dict[type, bool] = {}


def hands_blocks(iterator: Any) -> bool:
    """Whether `iterator` is a `BlockIterator` (the protocol check, once per type: a
    `runtime_checkable` isinstance costs tens of microseconds)."""
    kind = type(iterator)
    known = _HANDS_BLOCKS.get(kind)
    if known is None:
        known = _HANDS_BLOCKS[kind] = isinstance(iterator, BlockIterator)
    return known
