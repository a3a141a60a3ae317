"""``ProcessMap``: apply ``fn`` to a stream of plans in worker processes, as a Grain dataset.

The parent pipeline (planning, mixing, anything stateful) stays in this process; workers only
turn small plans into arrays (``fn(plan) -> dict[str, np.ndarray]``, e.g. reading the rows of
a batch), and hand them back through shared memory (:mod:`wf_data.data.workers.shm_ring`).

Invariants:

- **Order.** Results come in the parent's order, whatever ``num_workers`` is; ``num_workers=0``
  runs ``fn`` inline and gives the identical stream. With workers, elements that no worker has
  room for are computed in this process while it waits: the same results, whoever computes.
- **Lookahead.** After the consumer has taken ``k`` elements, exactly ``k + lookahead`` have
  been pulled from the parent (fewer at its end; one more while a failed ``next()`` awaits its
  retry), synchronously inside ``__next__``. A feedback call between two ``next()`` (a mixture
  update) therefore reaches the parent after a fixed lag, independent of worker count and
  timing.
- **State.** ``get_state()`` is ``{"parent": <the live parent state>, "in_flight": [<plans
  pulled but not delivered, JSON-safe>]}``: it always describes the last element handed to
  the consumer, also after a worker died or ``fn`` raised. ``set_state`` re-submits the
  in-flight plans, then continues from the parent; states move freely between 0 and N workers.
- **Failures.** A worker death raises :class:`WorkerError` (naming pid and signal), and so
  does a worker that gives no result for ``timeout_s`` seconds while ``next()`` waits on it
  (stuck in ``fn``: it is killed first); the next ``next()`` restarts the workers and
  continues the exact stream. An exception of ``fn`` is re-raised here with the worker's
  traceback and the element, and the same element is tried again on the next ``next()``.
- **Results** are fresh arrays (copied out of shared memory): the consumer may keep them.
  Workers start at the first ``next()`` (or ``start_prefetch()``), stop at ``close()``.
"""

from __future__ import annotations

import base64
import collections
import math
import os
import pickle
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from wf_data.data.workers.pool import (
    DEFAULT_TIMEOUT_S,
    RemoteTraceback,
    WorkerError,
    WorkerPool,
    results_together,
    worker_zygote,
)
from wf_data.data.workers.shm_ring import check_result

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ProcessMap",
    "RemoteTraceback",
    "WorkerError",
    "decode_plan",
    "encode_plan",
]

Plan = dict[str, Any]  # flat: np.ndarray | np.generic | int | float | str | bool values
_PLAN_SCALARS = (int, float, str)


class ProcessMap(grain.IterDataset):
    """``fn`` applied to every element of ``parent`` by ``num_workers`` processes, in order.

    ``parent`` yields plans (flat dicts of small arrays, ints, floats, strings); a
    ``MapDataset`` parent is turned into an ``IterDataset`` without reader threads. ``fn`` is
    picklable (a module-level function or a small object of an importable module; keep that
    module free of grain/JAX imports: workers import it at start) and returns
    ``dict[str, np.ndarray]``, e.g. ``(B, L) int32`` rows. ``lookahead`` elements are pulled
    ahead of the consumer and computed in parallel; with ``num_workers > 0`` it bounds the
    parallelism, so use at least ``num_workers`` (default: ``max(2, num_workers)``). Workers
    hold all but about one in-flight element each; while the head's result is not ready, this
    process computes the elements left waiting instead of idling. With ``num_workers=0`` and
    an ``fn`` that
    has ``many(plans) -> [fn(plan) for plan in plans]`` (one call sharing fixed costs, as
    :class:`wf_data.data.read.rows.ReadSlice` reads several batches at once), the in-flight
    elements are computed together, ``lookahead + 1`` at a time; in a worker, a ``many`` with
    an ``allocate`` keyword is passed ``allocate(nbytes) -> (nbytes,) uint8 array`` for a lone
    task: memory of the result's shared slot, so the arrays it builds there are not copied
    again (``ReadSlice`` builds its rows so). A worker that gives no
    result for ``timeout_s`` seconds while ``next()`` waits on it is killed and ``next()``
    raises ``WorkerError``; ``None`` waits forever (``num_workers=0`` never times out: ``fn``
    runs inline).
    """

    def __init__(
        self,
        parent: grain.IterDataset | grain.MapDataset,
        fn: Callable[[Plan], dict[str, np.ndarray]],
        *,
        num_workers: int,
        lookahead: int | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
    ):
        if lookahead is None:
            lookahead = max(2, num_workers) if isinstance(num_workers, int) else 2
        if isinstance(parent, grain.MapDataset):
            # Plans are cheap and computed in memory: reader threads would only compete with
            # the workers for the GIL and the cores (Grain's advice for in-memory data).
            parent = parent.to_iter_dataset(grain.ReadOptions(num_threads=0))
        if not isinstance(parent, grain.IterDataset):
            raise TypeError(f"ProcessMap parent must be a grain IterDataset, got {type(parent)}")
        if not callable(fn):
            raise TypeError(f"ProcessMap fn must be callable, got {fn!r}")
        for name, value in (("num_workers", num_workers), ("lookahead", lookahead)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ProcessMap {name} must be an int >= 0, got {value!r}")
        if timeout_s is not None and (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, (int, float))
            or not math.isfinite(timeout_s)
            or timeout_s <= 0
        ):
            raise ValueError(
                f"ProcessMap timeout_s must be a finite number of seconds > 0, or None to wait "
                f"forever for a stuck worker; got {timeout_s!r}"
            )
        if num_workers and not hasattr(os, "memfd_create"):
            raise ValueError(
                f"ProcessMap num_workers={num_workers} needs Linux (memfd shared memory); "
                f"use num_workers=0 on {sys.platform}"
            )
        super().__init__(parent)
        self._plans = parent  # our own handle: Grain's `_parent` is private
        self._fn = fn
        self._num_workers = num_workers
        self._lookahead = lookahead
        self._timeout_s = None if timeout_s is None else float(timeout_s)
        self._fn_pickle = _pickle_fn(fn) if num_workers else b""
        if num_workers:
            worker_zygote()  # starts importing numpy now, while the caller builds the rest

    def __iter__(self) -> ProcessMapIterator:
        return ProcessMapIterator(
            self._plans.__iter__(),
            self._fn,
            self._fn_pickle,
            num_workers=self._num_workers,
            lookahead=self._lookahead,
            timeout_s=self._timeout_s,
        )

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Refuses Grain's ``mp_prefetch`` (which asks each of its workers for a slice of the
        stream through this method), naming what to use instead."""
        del sequential_slice
        raise ValueError(
            f"ProcessMap cannot run under Grain's mp_prefetch (each of its workers would take "
            f"the slice {sl} of the stream): its parent is planned in order, in one process "
            f"(mixing draws, batch plans, online mixture feedback), so no slice can be computed "
            f"alone. ProcessMap already runs fn in worker processes: set its num_workers "
            f"(ProcessMap(..., num_workers=N); for a loader, get_loader(..., num_workers=N) or "
            f"data.num_workers) instead of mp_prefetch, and move CPU-heavy maps into its fn"
        )

    def __str__(self) -> str:
        return (
            f"ProcessMap(fn={getattr(self._fn, '__name__', type(self._fn).__name__)}, "
            f"num_workers={self._num_workers}, lookahead={self._lookahead}, "
            f"timeout_s={self._timeout_s})"
        )


@dataclass
class _InFlight:
    plan: Plan
    ticket: tuple[int, int] | None = None  # (worker, task) once submitted to the current pool
    result: dict[str, np.ndarray] | None = None  # computed ahead inline (``fn.many``)


class ProcessMapIterator(grain.DatasetIterator):
    """Iterator of :class:`ProcessMap`; owns the worker pool, started at the first ``next()``.

    Not to be shared across processes. ``close()`` (also ``with``, and garbage collection)
    stops the workers.
    """

    def __init__(
        self,
        parent: grain.DatasetIterator,
        fn: Callable[[Plan], dict[str, np.ndarray]],
        fn_pickle: bytes,
        *,
        num_workers: int,
        lookahead: int,
        timeout_s: float | None,
    ):
        super().__init__(parent)
        self._plans = parent  # our own handle: Grain's `_parent` is private
        self._fn = fn
        self._fn_pickle = fn_pickle
        self._num_workers = num_workers
        self._lookahead = lookahead
        self._timeout_s = timeout_s
        self._in_flight: collections.deque[_InFlight] = collections.deque()
        self._parent_exhausted = False
        self._pool: WorkerPool | None = None
        self._delivered = 0  # since start or the last set_state; names elements in errors
        self._owner_pid = os.getpid()
        self._stopped = False

    def __next__(self) -> dict[str, np.ndarray]:
        self._check_usable()
        self._pull()
        if not self._in_flight:
            raise StopIteration
        try:
            if self._num_workers == 0:
                result = self._inline_result()
            else:
                result = self._result_from_pool()
        except Exception as error:
            plan = _short(self._in_flight[0].plan)
            error.add_note(f"ProcessMap failed on element {self._delivered} (plan {plan})")
            raise
        self._in_flight.popleft()
        self._delivered += 1
        return result

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._plans.get_state(),
            "in_flight": [encode_plan(entry.plan) for entry in self._in_flight],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._check_usable()
        if not isinstance(state, Mapping) or set(state) != {"parent", "in_flight"}:
            raise ValueError(
                f"ProcessMap state must be a dict with keys 'parent' and 'in_flight', got "
                f"{sorted(state) if isinstance(state, Mapping) else type(state).__name__}"
            )
        in_flight = state["in_flight"]
        if not isinstance(in_flight, list) or not all(isinstance(p, Mapping) for p in in_flight):
            raise ValueError(
                f"ProcessMap state 'in_flight' must be a list of encoded plans (dicts), got "
                f"{str(in_flight)[:200]}"
            )
        plans = [decode_plan(encoded) for encoded in in_flight]
        self._restart_sequence()
        self._plans.set_state(state["parent"])
        self._in_flight = collections.deque(_InFlight(plan) for plan in plans)
        self._parent_exhausted = False
        self._delivered = 0

    def start_prefetch(self) -> None:
        """Starts the worker processes now rather than at the first ``next()`` (idempotent)."""
        self._check_usable()
        if self._num_workers and self._pool is None:
            self._start_pool()
        super().start_prefetch()

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (empty before the first ``next()`` or inline)."""
        return [] if self._pool is None else self._pool.pids

    def close(self) -> None:
        """Stops the worker processes; idempotent. The iterator cannot be used afterwards."""
        if getattr(self, "_stopped", True):
            return
        self._stopped = True
        self._stop_pool()
        super().close()

    def __enter__(self) -> ProcessMapIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __reduce__(self):
        raise TypeError("a ProcessMap iterator owns worker processes and cannot be pickled")

    def __str__(self) -> str:
        return f"ProcessMapIterator(num_workers={self._num_workers}, lookahead={self._lookahead})"

    def _check_usable(self) -> None:
        if self._stopped:
            raise ValueError("this ProcessMap iterator is closed")
        if os.getpid() != self._owner_pid:
            raise RuntimeError(
                "a ProcessMap iterator was used in a forked child of the process that made it; "
                "create the iterator in the process that consumes it"
            )

    def _pull(self) -> None:
        """Pulls from the parent until ``lookahead`` elements are queued behind the head."""
        while not self._parent_exhausted and len(self._in_flight) <= self._lookahead:
            try:
                plan = next(self._plans)
            except StopIteration:
                self._parent_exhausted = True
                break
            index = self._delivered + len(self._in_flight)
            self._in_flight.append(_InFlight(_check_plan(plan, index)))

    def _inline_result(self) -> dict[str, np.ndarray]:
        """The head's result computed here; with ``fn.many``, together with every in-flight
        element not yet computed (their results wait in order)."""
        if self._in_flight[0].result is None:
            self._compute_here([entry for entry in self._in_flight if entry.result is None])
        return self._in_flight[0].result

    def _compute_here(self, pending: list[_InFlight]) -> None:
        """Computes the results of ``pending`` in this process: together with ``fn.many``;
        otherwise (or if ``many`` failed) the head alone if it is pending, so that an error
        names it, else the last of them, whose error waits until it is computed again."""
        results = results_together(self._fn, [entry.plan for entry in pending])
        if results is not None:
            for entry, result in zip(pending, results, strict=True):
                entry.result = result
        elif pending[0] is self._in_flight[0]:
            pending[0].result = check_result(self._fn(pending[0].plan))
        else:
            try:
                pending[-1].result = check_result(self._fn(pending[-1].plan))
            except Exception:
                pass  # raised again, and named, when its element is computed as the head

    def _result_from_pool(self) -> dict[str, np.ndarray]:
        """The head's result. Elements go to the least busy worker while one has room; the
        others wait here, and while the head is not ready this process computes them rather
        than idle (results are the same whoever computes them): workers that cannot keep up
        (as many workers as cores, a slow ``fn``) cost the stream less."""
        if self._pool is None:
            self._start_pool()
        head = self._in_flight[0]
        try:
            for entry in self._in_flight:
                if entry.ticket is None and entry.result is None:
                    entry.ticket = self._pool.submit(entry.plan)
                    if entry.ticket is None:
                        break  # every worker is busy
            helped = False
            while head.result is None:
                waiting = [e for e in self._in_flight if e.ticket is None and e.result is None]
                if waiting and (
                    head.ticket is None or not (helped or self._pool.ready(head.ticket))
                ):
                    self._compute_here(waiting)  # computes the head if it is waiting too
                    helped = True
                else:
                    head.result = self._pool.result(head.ticket)
            return head.result
        except WorkerError:
            self._stop_pool()
            raise
        except Exception:
            # fn failed on the head: drop the results of the elements behind it, so that the
            # next call re-submits everything in order, the head first.
            self._restart_sequence()
            raise
        except BaseException:
            # Ctrl-C may fall between the two halves of a message: the pipes are no longer
            # trusted, so the next call starts fresh workers.
            self._stop_pool()
            raise

    def _start_pool(self) -> None:
        # Workers hold all but about one element per worker of the in-flight ones: those wait
        # here, for this process to compute while its head is not ready.
        slots = max(1, math.ceil((self._lookahead + 1) / self._num_workers) - 1)
        self._pool = WorkerPool(self._fn_pickle, self._num_workers, slots, self._timeout_s)

    def _restart_sequence(self) -> None:
        """Forgets every submitted task; a worker death here just stops the pool."""
        try:
            if self._pool is not None:
                self._pool.discard_outstanding()
        except WorkerError:
            self._stop_pool()
        for entry in self._in_flight:
            entry.ticket = None

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        for entry in self._in_flight:
            entry.ticket = None
        if pool is not None:
            pool.close()


def _pickle_fn(fn) -> bytes:
    try:
        return pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:
        raise TypeError(
            f"ProcessMap fn {fn!r} cannot be pickled for the worker processes ({error}); define "
            f"it at module level of an importable module, or use num_workers=0"
        ) from error


def _check_plan(plan, index: int) -> Plan:
    if not isinstance(plan, Mapping):
        raise TypeError(
            f"ProcessMap element {index} is a {type(plan).__name__}; elements must be plans: "
            f"flat dicts of np.ndarray, int, float or str"
        )
    for key, value in plan.items():
        if not isinstance(key, str) or not isinstance(
            value, (np.ndarray, np.generic, *_PLAN_SCALARS)
        ):
            raise TypeError(
                f"ProcessMap element {index} key {key!r} holds {type(value).__name__}; plans "
                f"are flat dicts of np.ndarray, int, float or str"
            )
        if isinstance(value, (np.ndarray, np.generic)) and (
            value.dtype.hasobject or value.dtype.fields is not None
        ):
            raise TypeError(
                f"ProcessMap element {index} key {key!r} has dtype {value.dtype}; plan arrays "
                f"must have a plain numeric, bool or string dtype"
            )
    return plan


def encode_plan(plan: Plan) -> dict[str, Any]:
    """A JSON-safe copy of ``plan``: arrays and numpy scalars become tagged base64 dicts."""
    encoded = {}
    for key, value in plan.items():
        if isinstance(value, (np.ndarray, np.generic)):
            array = np.asarray(value)
            encoded[key] = {
                "ndarray" if isinstance(value, np.ndarray) else "scalar": array.dtype.str,
                "shape": list(array.shape),
                "base64": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
            }
        else:
            encoded[key] = value
    return encoded


def decode_plan(encoded: Mapping[str, Any]) -> Plan:
    """The plan :func:`encode_plan` encoded, with the same dtypes, shapes and values."""
    plan = {}
    for key, value in encoded.items():
        if isinstance(value, Mapping):
            try:
                kind = "ndarray" if "ndarray" in value else "scalar"
                dtype = np.dtype(value[kind])
                raw = base64.b64decode(value["base64"], validate=True)
                array = np.frombuffer(raw, dtype).reshape(value["shape"]).copy()
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(
                    f"ProcessMap state: in-flight plan key {key!r} is not an encoded array "
                    f"({error}): {str(value)[:200]}"
                ) from error
            plan[key] = array if kind == "ndarray" else array[()]
        elif isinstance(value, _PLAN_SCALARS):
            plan[key] = value
        else:
            raise ValueError(
                f"ProcessMap state: in-flight plan key {key!r} holds {type(value).__name__}"
            )
    return plan


def _short(plan: Plan) -> str:
    """``plan`` in one line of at most 200 characters, for error messages."""
    parts = []
    for key, value in plan.items():
        if isinstance(value, np.ndarray):
            value = np.array2string(value, threshold=6, separator=",").replace("\n", "")
        elif isinstance(value, np.generic):
            value = repr(value.item())
        else:
            value = repr(value)
        parts.append(f"{key}={value}")
    text = ", ".join(parts)
    return text if len(text) <= 200 else text[:197] + "..."
