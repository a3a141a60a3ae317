"""Batch plans: a global batch of row plans as one element, so one read serves a whole batch.

`batch_plans(plans, batch_size, domain_names=names)` is an `IterDataset` whose elements are

    {"doc_ids", "offsets", "lengths": (P,) int64   pieces of all rows, row after row,
     "row_pieces": (B,) int64                        pieces per row,
     "domain_ids": (B,) int32                        each row's domain (0 without mixing),
     "step": int                                     index of this batch in the stream,
     "served_rows", "served_tokens": (K,) int64     rows / real tokens per domain served in
                                                     batches 0..step (cumulative),
     "domain_names": str                             JSON list of the K domain names}

A batch takes its rows as one block from a parent that hands blocks over (our mixer and
planners, `wf_data.data.plan.blocks`), else row by row. A partial last batch is dropped.
Because a batch plan carries its own step and cumulative counts, whoever consumes it (the
loader, after worker processes read it) knows the step and the statistics of the last batch
delivered without any state of its own; and because it names its domains, a batch planned
before a restore into re-weighted or added domains is read right
(`wf_data.data.read.rows.ReadSlice`). `StepShard` (owned steps) is the predicate a loader
`.filter`s them with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from wf_data.data.plan import PLAN_KEYS
from wf_data.data.plan.blocks import next_rows

__all__ = ["BatchPlans", "StepShard", "batch_plans"]


def batch_plans(parent: Any, batch_size: int, *, domain_names: Sequence[str] = ("",)) -> BatchPlans:
    """Groups the row plans of `parent` (a Grain dataset) into batch plans of `batch_size`;
    `domain_names` name the plans' `domain` indices (one unnamed domain by default)."""
    return BatchPlans(parent, batch_size, domain_names=domain_names)


class BatchPlans(grain.IterDataset):
    """Batch plans of `batch_size` rows; see the module docstring for the element layout."""

    def __init__(self, parent: Any, batch_size: int, *, domain_names: Sequence[str] = ("",)):
        if isinstance(parent, grain.MapDataset):
            parent = parent.to_iter_dataset()
        if not isinstance(parent, grain.IterDataset):
            raise TypeError(f"parent must be a Grain dataset of plans, got {type(parent)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        domain_names = tuple(domain_names)
        if not domain_names or len(set(domain_names)) != len(domain_names):
            raise ValueError(f"domain_names must be distinct and non-empty, got {domain_names}")
        super().__init__(parent)
        self.parent = parent
        self.batch_size = batch_size
        self.domain_names = domain_names

    def __iter__(self) -> BatchPlansIterator:
        return BatchPlansIterator(self)

    def __str__(self) -> str:
        return f"BatchPlans(batch_size={self.batch_size}, domains={list(self.domain_names)})"


class BatchPlansIterator(grain.DatasetIterator):
    """State: `{"parent", "step", "ended", "served": {name: [rows, tokens]}}`."""

    def __init__(self, batched: BatchPlans):
        self._plans = iter(batched.parent)
        super().__init__(self._plans)
        self._batch_size = batched.batch_size
        self._names = batched.domain_names
        self._names_json = json.dumps(list(self._names))
        self._num_domains = len(self._names)
        self._step = 0
        self._rows = np.zeros(self._num_domains, dtype=np.int64)
        self._tokens = np.zeros(self._num_domains, dtype=np.int64)
        self._ended = False

    def __next__(self) -> dict[str, Any]:
        if self._ended:
            raise StopIteration
        try:
            rows = next_rows(self._plans, self._batch_size)
        except StopIteration:
            rows = None
        if rows is None or len(rows) < self._batch_size:
            # A partial batch is dropped on every rank alike: no rank waits for a batch
            # another rank never gets.
            self._ended = True
            raise StopIteration
        pieces = (array.astype(np.int64, copy=False) for array in rows.pieces())
        batch = dict(zip(PLAN_KEYS, pieces, strict=True))
        batch["row_pieces"] = rows.row_pieces
        domain_ids = (
            np.zeros(len(rows), dtype=np.int32)
            if rows.domains is None
            else rows.domains.astype(np.int32)
        )
        row_counts = self._count_rows(domain_ids)
        batch["domain_ids"] = domain_ids
        row_tokens = np.add.reduceat(batch["lengths"], rows.starts[:-1] - rows.starts[0])
        self._rows += row_counts
        self._tokens += np.bincount(
            domain_ids, weights=row_tokens, minlength=self._num_domains
        ).astype(np.int64)
        batch["step"] = self._step
        batch["served_rows"] = self._rows.copy()
        batch["served_tokens"] = self._tokens.copy()
        batch["domain_names"] = self._names_json
        self._step += 1
        return batch

    def _count_rows(self, domain_ids: np.ndarray) -> np.ndarray:
        """(K,) rows of each domain in a batch; fails on a domain `domain_names` do not name."""
        try:
            counts = np.bincount(domain_ids, minlength=self._num_domains)
        except ValueError:  # a negative domain
            counts = None
        if counts is None or counts.size > self._num_domains:
            bad = int(domain_ids[(domain_ids < 0) | (domain_ids >= self._num_domains)][0])
            raise ValueError(
                f"batch_plans got a plan of domain {bad}, but domain_names {list(self._names)} "
                f"name {self._num_domains} domain(s): pass one name per domain of the mixer, "
                "in its order (domain_names=mixer.names)"
            )
        return counts

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._plans.get_state(),
            "step": self._step,
            "ended": self._ended,
            "served": {
                name: [rows, tokens]
                for name, rows, tokens in zip(
                    self._names, self._rows.tolist(), self._tokens.tolist(), strict=True
                )
            },
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._plans.set_state(state["parent"])
        self._step = int(state["step"])
        self._ended = bool(state["ended"])
        # Counts follow domains by name: an added domain starts at 0.
        served = state["served"]
        self._rows = np.array([served.get(n, [0, 0])[0] for n in self._names], dtype=np.int64)
        self._tokens = np.array([served.get(n, [0, 0])[1] for n in self._names], dtype=np.int64)

    def __str__(self) -> str:
        return f"BatchPlansIterator(step={self._step})"


class StepShard:
    """Filter predicate keeping batch plans whose `step % count == index`."""

    def __init__(self, index: int, count: int):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"step_shard count must be an int >= 1, got {count!r}")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise ValueError(f"step_shard index must be an int in [0, {count}), got {index!r}")
        self.index, self.count = index, count

    def __call__(self, batch: dict[str, Any]) -> bool:
        return batch["step"] % self.count == self.index

    def __repr__(self) -> str:
        return f"StepShard({self.index}, {self.count})"
