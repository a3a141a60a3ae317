"""The loader as a torch ``IterableDataset``: torch / torchdata ``DataLoader`` workers, HF models.

``LoaderDataset`` holds a *recipe* (a resolved ``DataConfig`` plus ``get_loader`` arguments)
and a start state, never a live loader: each process that iterates it (the main process, or
each torch ``DataLoader`` worker, forked, spawned or forkserved) builds its own loader, so no
ArrayRecord reader crosses a fork and spawn pickles only the recipe. (array_record's own
process-wide state still does: a worker forked after its parent read shards is refused with a
clear error; use the ``forkserver`` or ``spawn`` start method there.) Torch worker ``w`` of
``W`` reads global steps ``s % W == w`` (``step_shard``); torch's ``DataLoader`` takes one
batch from each worker in turn, so the stream equals the 0-worker stream.

Items are whole batches (``DataLoader(ds, batch_size=None)``): ``input_ids``, ``labels``
(int64 for torch losses), ``position_ids``, ``segment_ids`` ``(b, L)`` and ``domain_ids``
``(b,)``; or, with ``rows=True``, one row at a time (``(L,)`` and ``()``), for clients that batch
themselves, such as the Hugging Face ``Trainer`` with ``per_device_train_batch_size=b``.
"""

from __future__ import annotations

import collections
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from wf_data.data.deliver.loader_state import LoaderStateError
from wf_data.data.shards.sources import read_before_fork
from wf_data.extras import requires

with requires("torch", feature="LoaderDataset"):
    from torch.utils.data import IterableDataset, get_worker_info

__all__ = ["LoaderDataset", "check_model"]

# States of batches delivered, kept for clients that read ahead (accelerate): at least the
# last HISTORY, and every one since the position the consumer last marked (`mark_consumed`).
HISTORY = 16


class LoaderDataset(IterableDataset):
    """A torch ``IterableDataset`` of the batches ``get_loader(config, **loader_kwargs)`` yields.

    ``state_dict()`` describes the last item handed out in this process; ``load_state_dict``
    sets where the next iteration starts. Both follow torchdata's ``Stateful`` protocol, so
    ``StatefulDataLoader`` saves and restores each worker exactly. With EXP3 mixing, torch
    workers would each hold a copy of the mixture that ``update_mixture`` cannot reach, so
    iterating in a torch worker is refused: use the loader's own ``num_workers`` instead.
    """

    def __init__(
        self,
        config: Any,
        *,
        overrides: Sequence[str] = (),
        rows: bool = False,
        **loader_kwargs: Any,
    ):
        from wf_data.config import load_data_config

        for key in ("framework", "step_shard"):
            if key in loader_kwargs:
                raise TypeError(f"LoaderDataset sets {key!r} itself; remove it from the arguments")
        self.config = load_data_config(config, overrides)
        self.rows = bool(rows)
        self.loader_kwargs = dict(loader_kwargs)
        self._start: Mapping[str, Any] | None = None
        self._live: _LoaderIterator | None = None
        self._consumed_rows: int | None = None  # the consumer's last `mark_consumed`

    @classmethod
    def from_loader(cls, loader: Any, *, rows: bool = False) -> IterableDataset:
        """The dataset of a loader made by ``get_loader``, starting where ``loader`` stands.

        A loader built by hand (no config to rebuild it from) gives a dataset that iterates
        that very loader in this process and refuses to run in torch workers.
        """
        if loader.recipe is None:
            return _InProcessDataset(loader)
        dataset = cls(loader.recipe.config, rows=rows, **loader.recipe.loader_kwargs())
        dataset.load_state_dict({"loader": loader.state_dict(), "row": 0, "step_shard": [0, 1]})
        return dataset

    def __getstate__(self) -> dict[str, Any]:
        # Workers get the recipe and the start state; a loader iterated here stays here.
        return {**self.__dict__, "_live": None}

    @property
    def online_mixing(self) -> bool:
        """True with EXP3 mixing: trainer feedback must reach the one loader that mixes."""
        return self.config.mixing.kind == "exp3"

    def __iter__(self) -> _LoaderIterator:
        info = get_worker_info()
        if info is not None and self.online_mixing:
            raise RuntimeError(
                f"LoaderDataset with mixing.kind='exp3' in torch DataLoader worker {info.id} of "
                f"{info.num_workers}: each worker would mix with its own copy of the EXP3 weights, "
                "which update_mixture cannot reach. Use torch num_workers=0 and the loader's own "
                "worker processes: LoaderDataset(config, num_workers=N)"
            )
        if info is not None and read_before_fork():
            raise RuntimeError(
                f"torch DataLoader worker {info.id} was forked from a process that had read "
                "ArrayRecord shards; array_record (riegeli) is not fork-safe after use and may "
                "crash here. Start workers with DataLoader(..., multiprocessing_context="
                "'forkserver') or 'spawn', or do not read shards in the parent before forking"
            )
        shard = (0, 1) if info is None else (info.id, info.num_workers)
        self._live = _LoaderIterator(self, shard, self._start, self._consumed_rows)
        return self._live

    @property
    def loader(self) -> Any:
        """The live ``wf_data`` loader iterated in this process (``None`` before iterating)."""
        return None if self._live is None else self._live.loader

    def update_mixture(self, losses: Any) -> None:
        """Feeds per-domain losses to the loader iterated in this process (``num_workers=0``)."""
        if self.loader is None:
            raise RuntimeError("update_mixture before iterating: no loader has been built yet")
        self.loader.update_mixture(losses)

    def state_dict(self) -> dict[str, Any]:
        """``{"loader": <loader state>, "row": rows of a started batch, "step_shard": [w, W]}``."""
        if self._live is not None:
            return self._live.state_dict()
        return dict(self._start or {"loader": None, "row": 0, "step_shard": None})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The next ``iter(self)`` starts after the item ``state`` describes.

        Raises `LoaderStateError` for a malformed state, and in a torch worker for a state
        saved with another number of workers (what torchdata restores before its own check).
        """
        self._start = _checked_state(state)
        self._live = None
        self._consumed_rows = None

    def state_at(self, step: int) -> dict[str, Any]:
        """The state right after the batch of global step ``step`` (1-based count) was delivered.

        Clients that read ahead (accelerate pulls one batch before the trainer uses it) save
        the state of the batches *consumed*, not of the batches read.
        """
        if self._live is None:
            raise RuntimeError("state_at before iterating: no batch has been delivered yet")
        return self._live.state_at(step)

    def state_at_rows(self, num_rows: int) -> dict[str, Any]:
        """With ``rows=True``: the state right after row ``num_rows`` (a count from the stream's
        start) was delivered, for clients whose batches are not the loader's (a ``Trainer``
        batching 2 or 12 rows of loader batches of 8)."""
        return self._rows_live("state_at_rows").state_at_rows(num_rows)

    def mark_consumed(self, num_rows: int) -> None:
        """With ``rows=True``: the consumer has used ``num_rows`` rows (a count from the
        stream's start) and will ask only for states from there on (``state_at_rows``). They are
        all kept until the next mark, however far the consumer reads ahead (a device batch of
        many loader batches, gradient accumulation); without marks, the last ``HISTORY``. Mark
        before iterating too, after a restore: the consumer may read far before its first step
        ends."""
        if not self.rows:
            raise ValueError("mark_consumed needs LoaderDataset(..., rows=True)")
        self._consumed_rows = int(num_rows)
        if self._live is not None:
            self._live.consumed_rows = self._consumed_rows

    def _rows_live(self, what: str) -> _LoaderIterator:
        """The live iterator of a rows-mode dataset, for ``what``."""
        if self._live is None:
            raise RuntimeError(f"{what} before iterating: no row has been delivered yet")
        if not self.rows:
            raise ValueError(f"{what} needs LoaderDataset(..., rows=True)")
        return self._live


class _InProcessDataset(IterableDataset):
    """A live loader as an ``IterableDataset`` for ``num_workers=0`` only (it has no recipe)."""

    def __init__(self, loader: Any):
        self.loader = loader

    def __iter__(self) -> Any:
        info = get_worker_info()
        if info is not None:
            raise RuntimeError(
                f"torch DataLoader worker {info.id}: this dataset wraps a live loader built by "
                "hand, which cannot be rebuilt in a worker; use torch num_workers=0 (and the "
                "loader's own num_workers), or LoaderDataset(config) to split across workers"
            )
        return iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loader.load_state_dict(state)


class _LoaderIterator:
    """One process's loader (step-sharded in torch workers) and its position; torchdata Stateful.

    The loader is built on first use, so a restore (``load_state_dict`` right after ``iter``,
    as ``StatefulDataLoader`` does) costs one build.
    """

    def __init__(
        self,
        dataset: LoaderDataset,
        shard: tuple[int, int],
        start,
        consumed_rows: int | None = None,
    ):
        self._dataset = dataset
        self._worker = shard  # (torch worker id, workers)
        self._shard = shard  # (index, count): the global steps its loader reads
        self._start = start
        self.loader = None
        self._batch: dict[str, Any] | None = None  # rows mode: the batch being handed out
        self._row = 0
        self._before: dict[str, Any] | None = None  # rows mode: loader state before _batch
        self._rows_per_batch: int | None = None  # rows mode: rows of each loader batch
        self._history: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self.consumed_rows = consumed_rows  # states the consumer may still need start there

    def __iter__(self) -> _LoaderIterator:
        return self

    def _ensure_loader(self) -> Any:
        if self.loader is None:
            from wf_data.data.deliver.factory import get_loader

            self._shard = self._loader_shard(self._start) or self._worker
            self.loader = get_loader(
                self._dataset.config,
                framework="torch",
                step_shard=self._shard,
                **self._dataset.loader_kwargs,
            )
            start, self._start = self._start, None
            if start is not None:
                self._restore(start)
            if self.loader.step not in self._history:  # where the first batch starts
                self._remember_at(self.loader.step, self.loader.state_dict())
        return self.loader

    def _loader_shard(self, start: Mapping[str, Any] | None) -> tuple[int, int] | None:
        """The global steps this worker reads, ``(index, count)``, given its start state.

        A global state (``step_shard`` ``[0, 1]``: a plain loader's, as ``from_loader`` gives,
        or a 0-worker dataset's between batches) at step ``s`` starts worker ``w`` at step
        ``s + w``: torch's round robin begins with worker 0, so the stream stays in order.
        A worker's own state keeps the steps it was reading.
        """
        worker, count = self._worker
        if start is None or start["loader"] is None:
            return self._worker
        saved_index, saved_count = start["step_shard"]
        if saved_count == count:
            return (int(saved_index), count)
        if saved_count == 1 and not start["row"]:
            return ((int(start["loader"]["step"]) + worker) % count, count)
        return None  # another worker count's state: `_restore` refuses it

    def _restore(self, state: Mapping[str, Any]) -> None:
        if state["loader"] is None:
            return
        if self._loader_shard(state) != tuple(self._shard):  # None: refused
            raise _other_workers(state["step_shard"], self._worker)
        self.loader.load_state_dict(state["loader"])
        self._remember_at(self.loader.step, state["loader"])
        self._batch, self._row = None, int(state["row"])
        if self._row:
            self._before = state["loader"]
            self._batch = next(self.loader)
            self._rows_per_batch = len(self._batch["domain_ids"])
            if self._row >= self._rows_per_batch:
                raise LoaderStateError(
                    f"LoaderDataset state entry 'row' is {self._row}, but a batch has "
                    f"{self._rows_per_batch} rows (row counts rows of the batch being handed "
                    "out): the state was edited or belongs to another batch size"
                )

    def __next__(self) -> dict[str, Any]:
        loader = self._ensure_loader()
        if not self._dataset.rows:
            batch = next(loader)
            self._remember()
            return batch
        if self._batch is None or self._row == len(self._batch["domain_ids"]):
            self._before = loader.state_dict()
            self._batch, self._row = next(loader), 0
            self._rows_per_batch = len(self._batch["domain_ids"])
        row = {key: value[self._row] for key, value in self._batch.items()}
        self._row += 1
        if self._row == len(self._batch["domain_ids"]):
            self._remember()
        return row

    def _remember(self) -> None:
        self._remember_at(self.loader.step, self.state_dict()["loader"])

    def _remember_at(self, step: int, loader_state: dict[str, Any]) -> None:
        """Keeps the state after global step ``step`` (at a batch boundary: row 0)."""
        self._history[step] = {"loader": loader_state, "row": 0, "step_shard": list(self._shard)}
        while len(self._history) > HISTORY and not self._may_be_needed(next(iter(self._history))):
            self._history.popitem(last=False)

    def _may_be_needed(self, step: int) -> bool:
        """Whether ``state_at_rows`` may still ask for the state after step ``step``."""
        if self.consumed_rows is None or self._rows_per_batch is None:
            return False
        return step >= self.consumed_rows // self._rows_per_batch

    def state_dict(self) -> dict[str, Any]:
        if self.loader is None:
            return dict(self._start or {"loader": None, "row": 0, "step_shard": None})
        if self._batch is not None and self._row < len(self._batch["domain_ids"]):
            loader_state = self._before
        else:
            loader_state, self._row = self.loader.state_dict(), 0
            self._batch = None
        return {"loader": loader_state, "row": self._row, "step_shard": list(self._shard)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._start = _checked_state(state)
        self.consumed_rows = None
        if self.loader is not None:
            start, self._start = self._start, None
            self._restore(start)

    def state_at(self, step: int) -> dict[str, Any]:
        if step not in self._history:
            kept = f"{min(self._history)}..{max(self._history)}" if self._history else "none"
            raise KeyError(
                f"no saved state for step {step}: this iterator keeps the states after steps "
                f"{kept} (the last {HISTORY} delivered batches, and every one since the "
                "position last passed to mark_consumed)"
            )
        return self._history[step]

    def state_at_rows(self, num_rows: int) -> dict[str, Any]:
        if self._rows_per_batch is None:  # no batch read yet: where the first one starts
            return self.state_at(min(self._history))
        steps, row = divmod(int(num_rows), self._rows_per_batch)
        # Row `row` of the batch after step `steps`: restored as that batch's start state plus
        # the rows already handed out of it.
        return {**self.state_at(steps), "row": row}


def _checked_state(state: Any) -> dict[str, Any]:
    """``state`` as a dict once its entries have the right types (`LoaderStateError` naming
    the entry otherwise) and, in a torch worker, it was saved with this number of workers."""
    if not isinstance(state, Mapping) or not {"loader", "row", "step_shard"} <= set(state):
        raise LoaderStateError(
            "not a LoaderDataset state: expected keys 'loader', 'row', 'step_shard', got "
            f"{sorted(state) if isinstance(state, Mapping) else type(state).__name__}"
        )
    row, shard, loader = state["row"], state["step_shard"], state["loader"]
    if isinstance(row, bool) or not isinstance(row, int) or row < 0:
        raise LoaderStateError(f"LoaderDataset state entry 'row' must be an int >= 0, got {row!r}")
    if shard is not None and not (
        isinstance(shard, list | tuple)
        and len(shard) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
        and 0 <= shard[0] < shard[1]
    ):
        raise LoaderStateError(
            f"LoaderDataset state entry 'step_shard' must be [worker, workers], got {shard!r}"
        )
    if loader is not None and not isinstance(loader, Mapping):
        raise LoaderStateError(
            f"LoaderDataset state entry 'loader' must be a loader state (dict) or None, got "
            f"{type(loader).__name__}"
        )
    info = get_worker_info()
    if info is not None and loader is not None and shard is not None:
        global_between_batches = shard[1] == 1 and not row  # any worker can start from it
        if shard[1] != info.num_workers and not global_between_batches:
            raise _other_workers(shard, (info.id, info.num_workers))
    return dict(state)


def _other_workers(saved: Sequence[int], worker: tuple[int, int]) -> LoaderStateError:
    return LoaderStateError(
        f"LoaderDataset state was saved by torch DataLoader worker {saved[0]} of {saved[1]}; "
        f"this is worker {worker[0]} of {worker[1]}. Restore it with the same num_workers "
        f"({saved[1]}), e.g. StatefulDataLoader(..., num_workers={saved[1]}). To change the "
        "worker count between runs, use the loader's own worker processes instead "
        "(LoaderDataset(config, num_workers=N) under a torch loader with num_workers=0): its "
        "state restores with any number of them"
    )


# ----------------------------------------------------------------------------- models

_CHECKED_MODELS: weakref.WeakSet = weakref.WeakSet()


def check_model(model: Any) -> bool:
    """Warns once per model whose config has ``use_cache=True``; returns False for such a model.

    Rows are packed: several documents share a row and ``position_ids`` restart at each one.
    Hugging Face models mask attention per document only without a KV cache (with one, the
    causal mask spans the whole row): build them with ``use_cache=False``.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False):
        return True
    if model not in _CHECKED_MODELS:
        _CHECKED_MODELS.add(model)
        warnings.warn(
            f"{type(model).__name__} has config.use_cache=True: with packed rows its attention "
            "crosses document boundaries. Set model.config.use_cache = False (or pass "
            "use_cache=False to its config) when training on wf-data batches",
            UserWarning,
            stacklevel=2,
        )
    return False
