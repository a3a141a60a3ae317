"""Stand-in for procmap's `ProcessMap` (num_workers=0 only), removed when it is merged."""

from __future__ import annotations

import collections
from typing import Any

import grain
import numpy as np


def _encode(element: dict[str, Any]) -> dict[str, Any]:
    return {k: {"dtype": str(v.dtype), "data": v.tolist()} if isinstance(v, np.ndarray) else v
            for k, v in element.items()}


def _decode(encoded: dict[str, Any]) -> dict[str, Any]:
    return {k: np.array(v["data"], dtype=v["dtype"]) if isinstance(v, dict) else v
            for k, v in encoded.items()}


class ProcessMap(grain.IterDataset):
    def __init__(self, parent, fn, *, num_workers: int, lookahead: int):
        super().__init__(parent)
        self.parent, self.fn, self.lookahead = parent, fn, lookahead

    def __iter__(self):
        return _Iterator(self)


class _Iterator(grain.DatasetIterator):
    def __init__(self, ds):
        self._source = iter(ds.parent)
        super().__init__(self._source)
        self._fn, self._lookahead = ds.fn, ds.lookahead
        self._buffer = collections.deque()
        self._ended = False

    def __next__(self):
        while not self._ended and len(self._buffer) <= self._lookahead:
            try:
                self._buffer.append(next(self._source))
            except StopIteration:
                self._ended = True
        if not self._buffer:
            raise StopIteration
        return self._fn(self._buffer.popleft())

    def get_state(self):
        return {"parent": self._source.get_state(),
                "in_flight": [_encode(e) for e in self._buffer]}

    def set_state(self, state):
        self._source.set_state(state["parent"])
        self._buffer = collections.deque(_decode(e) for e in state["in_flight"])
        self._ended = False
