"""`DataLoader`: a composition of Grain parts that a trainer iterates, checkpoints and feeds back.

    mix_plans -> batch_plans (global batches) -> [filter(StepShard)] -> ProcessMap(read this
    rank's rows) -> framework arrays

(`loader_pipeline` builds the Grain part, up to numpy batches; `DataLoader` adds the framework
arrays, the checkpoint with its fingerprint, and mixture feedback.)

Every data-parallel rank plans the same global batch (plans need only document lengths) and
reads only its slice of rows, so ranks receive disjoint rows whose concatenation is the
single-process batch, and the loader state is the same on every rank: it restores with any
rank count that divides the global batch. The mixer (and so the EXP3 bandit) lives in this
process only; workers read rows from plans they are handed. `ProcessMap` pulls `prefetch`
batches ahead at a fixed lag, so an EXP3 update reaches the batch `prefetch + 1` steps later,
whatever the worker count, and its state always describes the last batch handed out.

The config factory (`get_loader`, `get_eval_loaders`) lives in `wf_data.data.deliver.factory`; it
hands each loader its `LoaderRecipe`, what builds the loader again in another process (a torch
`DataLoader` worker: `wf_data.integrations.torch_dataset.LoaderDataset.from_loader`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from wf_data.data.deliver.interop import to_jax, to_torch
from wf_data.data.deliver.loader_state import (
    STATE_VERSION,
    LoaderStateError,
    PendingLosses,
    by_domain,
    check_fingerprint,
    check_progress,
    check_seal,
    check_state,
    from_domains,
    seal,
    stats_summary,
)
from wf_data.data.mix.mixing import MixPlans
from wf_data.data.plan.batching import StepShard, batch_plans
from wf_data.data.read.rows import ReadSlice, RowReader, SliceRows
from wf_data.data.workers.process_map import DEFAULT_TIMEOUT_S, ProcessMap

FRAMEWORKS = ("numpy", "torch", "jax")


def loader_pipeline(
    mixer: MixPlans,
    reader: RowReader,
    *,
    global_batch_size: int,
    rows: tuple[int, int] | None = None,
    step_shard: tuple[int, int] | None = None,
    labels_dtype: str = "int32",
    num_workers: int = 0,
    prefetch: int = 0,
    worker_timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> ProcessMap:
    """The Grain pipeline a `DataLoader` iterates: batch plans of `mixer`'s rows -> owned steps
    (`step_shard`) -> `ProcessMap(ReadSlice)` reading rows `[start, stop)` of each global batch
    (`rows`, default all) with `num_workers` processes, `prefetch` batches ahead. Its elements
    are numpy batches plus `step`, `served_rows` and `served_tokens`; its iterator checkpoints
    with `get_state`/`set_state` like any Grain iterator."""
    plans = batch_plans(mixer, global_batch_size, domain_names=mixer.names)
    if step_shard is not None:
        plans = grain.experimental.WithOptionsIterDataset(
            plans.filter(StepShard(*step_shard)),  # other shards' steps are no cause to warn
            grain.experimental.DatasetOptions(filter_warn_threshold_ratio=None),
        )
    read = ReadSlice(
        reader, SliceRows(*(rows or (0, global_batch_size))), mixer.names, labels_dtype=labels_dtype
    )
    return ProcessMap(
        plans, read, num_workers=num_workers, lookahead=prefetch, timeout_s=worker_timeout_s
    )


@dataclass(frozen=True)
class LoaderRecipe:
    """What `get_loader` built a loader from: its resolved data config and the arguments that
    hold for every process of a data-parallel rank (not the torch worker's `step_shard`, nor
    the framework, which the consumer chooses)."""

    config: Any
    dp_rank: int = 0
    dp_world_size: int = 1
    num_workers: int | None = None
    device: Any = None
    pin_memory: bool | None = None

    def loader_kwargs(self) -> dict[str, Any]:
        """The `get_loader` keyword arguments besides the config."""
        return {
            "dp_rank": self.dp_rank,
            "dp_world_size": self.dp_world_size,
            "num_workers": self.num_workers,
            "device": self.device,
            "pin_memory": self.pin_memory,
        }


class DataLoader:
    """Fixed-shape batches for one data-parallel rank; a torchdata `Stateful`.

    Batches are dicts (`input_ids`, `labels`, `position_ids`, `segment_ids` `(b, L)` int32 and
    `domain_ids` `(b,)` int32, `b = global_batch_size / dp_world_size`) as numpy arrays, torch
    tensors (int64 `labels`) or JAX arrays (`framework`). `step_shard=(index, count)` yields
    only global steps `s` with `s % count == index` (all steps are planned, only owned ones are
    read). `pipeline` is the Grain dataset behind it (`loader_pipeline`), whose mixer draws
    with `policy`, the loader's own copy of the mixer's policy (`update_mixture` feeds it).
    `recipe` is what built it from a config (`get_loader`), None for a loader built by hand.
    """

    def __init__(
        self,
        mixer: MixPlans,
        reader: RowReader,
        *,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        step_shard: tuple[int, int] | None = None,
        framework: str = "numpy",
        device: Any = None,
        pin_memory: bool | None = None,
        jax_sharding: Any = None,
        num_workers: int = 0,
        prefetch: int = 0,
        worker_timeout_s: float | None = DEFAULT_TIMEOUT_S,
        fingerprint: Mapping[str, Any] | None = None,
        recipe: LoaderRecipe | None = None,
    ):
        _check_arguments(
            framework, global_batch_size, dp_rank, dp_world_size, num_workers, prefetch
        )
        # The live mixture policy is the loader's own: its mixer draws with it, every
        # (re)started iterator continues it, `update_mixture` feeds it and a state restores it.
        self.policy = copy.deepcopy(mixer.policy)
        self.mixer, self.reader = mixer.with_policy(self.policy), reader
        self.global_batch_size = int(global_batch_size)
        self.dp_rank, self.dp_world_size = int(dp_rank), int(dp_world_size)
        self.local_batch_size = self.global_batch_size // self.dp_world_size
        self.step_shard = None if step_shard is None else StepShard(*step_shard)
        self.framework, self.device, self.pin_memory = framework, device, pin_memory
        self.jax_sharding = jax_sharding
        self.num_workers, self.prefetch = int(num_workers), int(prefetch)
        self.recipe = recipe
        # Computed on first use (a state save or restore): it may sum every document length.
        self._fingerprint = None if fingerprint is None else dict(fingerprint)
        first = self.dp_rank * self.local_batch_size
        # Built once (an immutable recipe, as in Grain); every (re)start is a new iterator of it.
        self.pipeline = loader_pipeline(
            self.mixer,
            reader,
            global_batch_size=self.global_batch_size,
            rows=(first, first + self.local_batch_size),
            step_shard=step_shard,
            labels_dtype="int64" if framework == "torch" else "int32",  # torch's losses: int64
            num_workers=self.num_workers,
            prefetch=self.prefetch,
            worker_timeout_s=worker_timeout_s,
        )
        self._iterator = None
        self.reset()

    def _restart(self, pipeline_state: Mapping[str, Any] | None = None) -> None:
        """Stops the pipeline iterator and starts a new one, at `pipeline_state` if given."""
        self.close()
        self._iterator = iter(self.pipeline)
        if pipeline_state is not None:
            self._iterator.set_state(pipeline_state)

    def reset(self) -> None:
        """Starts over from the first batch (an eval loader is reset before each evaluation).

        The mixture policy (the EXP3 bandit) carries over: it belongs to the run, not the stream.
        """
        self._restart()
        self._step = 0
        self._served = np.zeros((2, self.num_domains), dtype=np.int64)  # rows, tokens
        self._pending = PendingLosses(self.domain_names)

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What a saved state must match (see `wf_data.data.deliver.loader_state`)."""
        if self._fingerprint is None:
            self._fingerprint = dict(self.mixer.fingerprint())
        return self._fingerprint

    @property
    def domain_names(self) -> tuple[str, ...]:
        """The mixture's domain names, in the order of `domain_ids` and of (K,) loss arrays."""
        return self.mixer.names

    @property
    def num_domains(self) -> int:
        """K, the number of domains."""
        return len(self.mixer.names)

    @property
    def step(self) -> int:
        """Global steps passed: the index of the next batch (the same on every rank)."""
        return self._step

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> Any:
        batch = next(self._iterator)
        self._step = int(batch.pop("step")) + 1
        self._served = np.stack([batch.pop("served_rows"), batch.pop("served_tokens")])
        if self.framework == "torch":
            return to_torch(batch, device=self.device, pin_memory=self.pin_memory)
        if self.framework == "jax":
            return to_jax(batch, sharding=self.jax_sharding)
        return batch

    # ------------------------------------------------------------------ mixture feedback

    @property
    def mixture(self) -> dict[str, float]:
        """Current mixture weights by domain name (the ones new rows are drawn with)."""
        return self.mixer.mixture  # the loader's mixer, driven by `self.policy`

    def update_mixture(self, losses: Mapping[str | int, float] | Any) -> None:
        """Feeds per-domain mean losses to the EXP3 mixture (all ranks must pass the same):
        a mapping name (or index) -> loss, or a (K,) array with NaN for unobserved domains."""
        self.mixer.update(losses)  # the loader's mixer, driven by `self.policy`

    @property
    def reference_due(self) -> bool:
        """True when the mixture's ``reference_losses: auto`` wants the held-out loss per
        domain now (`MixtureFeedback(loader, evaluate=...)` measures it)."""
        return self.mixer.reference_due

    def record_reference(self, losses: Mapping[str | int, float] | Any) -> None:
        """Hands the held-out loss per domain that `reference_due` asks for to the mixture (the
        same on every rank): a mapping name (or index) -> loss, or a (K,) array."""
        self.mixer.record_reference(losses)

    def observe_losses(self, loss_sums: np.ndarray, row_counts: np.ndarray) -> None:
        """Adds (K,) per-domain loss sums and row counts, all-reduced, to the pending feedback."""
        self._pending.add(loss_sums, row_counts)

    def apply_observed(self) -> None:
        """Feeds the pending mean losses to `update_mixture` and clears them (none: no update)."""
        means = self._pending.take()
        if means is not None:
            self.update_mixture(means)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-safe state, the same on every rank, of the last batch handed out,
        sealed: `load_state_dict` refuses it once any entry was changed."""
        return seal(
            {
                "version": STATE_VERSION,
                "fingerprint": self.fingerprint,
                "step": self._step,
                "pipeline": self._iterator.get_state(),
                "stats": from_domains(self.domain_names, self._served, int),
                "feedback": self._pending.to_state(),
            }
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a state saved by a loader over the same data and settings.

        Refuses, naming the difference, a malformed state, one edited or corrupted since it
        was saved (its seal), or one from other data, tokenizer, `seq_len`, packing or seed.
        Sources are matched by name: a changed weight, an added source (it starts at its
        first row) or a removed one is accepted. A state saved before states were sealed is
        restored with a warning.
        """
        check_state(state)
        served = by_domain(state["stats"], "stats", self.domain_names, np.int64)
        pending = PendingLosses.from_state(state["feedback"], self.domain_names)
        check_seal(state)
        check_fingerprint(state["fingerprint"], self.fingerprint)
        check_progress(state, self.global_batch_size)
        previous = self._iterator.get_state()
        try:
            self._restart(self._owned(state["pipeline"]))
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
            self._restart(previous)  # keep serving where it was
            raise LoaderStateError(
                f"loader state entry 'pipeline' does not restore: {error}"
            ) from error
        self._step, self._served, self._pending = state["step"], served, pending

    def _owned(self, pipeline_state: Mapping[str, Any]) -> Mapping[str, Any]:
        """`pipeline_state` without the batches it planned ahead for steps that `step_shard`
        does not own (a state saved by a loader of all steps, or of another shard)."""
        if self.step_shard is None:
            return pipeline_state
        in_flight = [plan for plan in pipeline_state["in_flight"] if self.step_shard(plan)]
        return {**pipeline_state, "in_flight": in_flight}

    # ------------------------------------------------------------------ extras

    def stats(self) -> dict[str, float]:
        """Flat `data/...` floats for any logger: configured and realised shares, fill."""
        return stats_summary(self.domain_names, self._served, self.mixture, self.reader.seq_len)

    def close(self) -> None:
        """Stops worker processes; the loader can still save its state afterwards."""
        if self._iterator is not None:
            self._iterator.close()

    def __enter__(self) -> DataLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_arguments(
    framework: str,
    global_batch_size: int,
    dp_rank: int,
    dp_world_size: int,
    num_workers: int,
    prefetch: int,
) -> None:
    """Raises `ValueError` naming the first `DataLoader` argument out of range."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
        raise ValueError(f"dp_rank {dp_rank} is not in range for dp_world_size {dp_world_size}")
    if global_batch_size % dp_world_size:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by "
            f"dp_world_size {dp_world_size}"
        )
    if num_workers < 0 or prefetch < 0:
        raise ValueError(f"num_workers ({num_workers}) and prefetch ({prefetch}) must be >= 0")
