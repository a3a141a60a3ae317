"""The loader a trainer touches: ``get_loader(cfg)`` -> ``DataLoader``.

Every data-parallel rank plans the same *global* batch (domain draws and packing plans need
only document lengths) and materializes only its own slice of rows. Hence the loader state is
the same on every rank, ranks receive disjoint rows whose concatenation is the single-process
global batch, a state restores with any number of ranks that divides the global batch, and
with finite epochs all ranks stop at the same step. Mixture weights live in this process only:
worker processes (``num_workers``) read rows from plans they are handed and hold no weights.
Grain's ``mp_prefetch`` is not used for that on purpose: it runs a copy of the whole pipeline,
mixture included, in every worker, which is how the library we replace ended up with one set
of EXP3 weights per worker, none of them the trainer's.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from wf_data.data.mixing import (
    Exp3Mixing,
    MixedDataset,
    MixedPlan,
    MixingIterator,
    decode_plans,
    encode_plans,
)
from wf_data.data.odm import bandit_from_config

STATE_VERSION = 1
FRAMEWORKS = ("numpy", "torch", "jax")


class LoaderStateError(ValueError):
    """A loader state that does not belong to this loader's data or settings."""


def domain_seed(seed: int, name: str) -> int:
    """Seed of one domain's shuffle: keyed by name, so adding a domain changes no other one."""
    return zlib.crc32(f"{int(seed)}:{name}".encode())


class _Materializer:
    """Turns global-batch plans into this rank's batch, inline or in worker processes.

    Workers get a copy of the mixture's datasets at start and only ever read rows from plans;
    the order of results is the order of submission, so batches do not depend on the count.
    """

    def __init__(self, mixing, num_workers: int):
        self._inline = iter(mixing) if num_workers == 0 else None
        self._pool = None
        if num_workers > 0:
            # forkserver: workers fork from one server that imported the packers once, so a
            # pool starts in well under a second after the first; plain fork is unsafe beside
            # the threads torch and grain start in this process.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["wf_data.data.loader"])
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=num_workers,
                mp_context=context,
                initializer=_worker_init,
                initargs=(mixing,),
            )

    def submit(self, plans: Sequence[MixedPlan]) -> concurrent.futures.Future:
        if self._pool is not None:
            return self._pool.submit(_worker_materialize, list(plans))
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(self._inline.materialize(plans))
        return future

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


_WORKER_ITERATOR: MixingIterator | None = None


def _worker_init(mixing) -> None:
    global _WORKER_ITERATOR
    _WORKER_ITERATOR = iter(mixing)


def _worker_materialize(plans: list[MixedPlan]) -> dict[str, np.ndarray]:
    return _WORKER_ITERATOR.materialize(plans)


class DataLoader:
    """Iterates fixed-shape batches for one data-parallel rank; a torch DCP ``Stateful``.

    Batches are dicts (``input_ids``, ``labels``, ``position_ids``, ``segment_ids`` ``(b, L)``
    int32 and ``domain_ids`` ``(b,)`` int32, ``b = global_batch_size / dp_world_size``) as numpy
    arrays, torch tensors or JAX arrays (``framework``). ``state_dict`` / ``load_state_dict``
    follow torchdata's ``StatefulDataLoader``; the state is the same on every rank.
    Batches are planned in groups of ``prefetch + 1``: with EXP3 a mixture update applies
    to the batches planned after it, at most ``prefetch`` batches later (0 = the very next).
    """

    def __init__(
        self,
        mixing: MixedDataset | Exp3Mixing,
        *,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        framework: str = "numpy",
        device: Any = None,
        pin_memory: bool | None = None,
        jax_sharding: Any = None,
        num_workers: int = 0,
        prefetch: int = 0,
        fingerprint: Mapping[str, Any] | None = None,
    ):
        if framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
        if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} is not in range for dp_world_size {dp_world_size}")
        if global_batch_size % dp_world_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by dp_world_size "
                f"{dp_world_size}"
            )
        if num_workers < 0 or prefetch < 0:
            raise ValueError(f"num_workers ({num_workers}) and prefetch ({prefetch}) must be >= 0")
        self.mixing = mixing
        self.global_batch_size = int(global_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_world_size = int(dp_world_size)
        self.local_batch_size = self.global_batch_size // self.dp_world_size
        self.framework = framework
        self.device = device
        self.pin_memory = pin_memory
        self.jax_sharding = jax_sharding
        self.num_workers = int(num_workers)
        self.prefetch = int(prefetch)
        self._fingerprint = dict(fingerprint or {"mixing": mixing.fingerprint()})
        # (future, part): part indexes this batch's rows in a grouped read, None if alone.
        self._in_flight: collections.deque[tuple[concurrent.futures.Future, int | None]] = (
            collections.deque()
        )
        self._materializer: _Materializer | None = None
        self.reset()

    def reset(self) -> None:
        """Starts over from the first batch (an eval loader is reset before each evaluation).

        The EXP3 bandit is not reset: it belongs to the training run, not to the stream.
        """
        self._close_materializer()
        self._planner = iter(self.mixing)
        self._pending: collections.deque[list[MixedPlan]] = collections.deque()
        self._step = 0
        self._ended = False
        seq_len = self.mixing.datasets[self.domain_names[0]].seq_len
        self._stats = _Stats(self.mixing.names, seq_len)

    # ------------------------------------------------------------------ iteration

    @property
    def domain_names(self) -> tuple[str, ...]:
        return self.mixing.names

    @property
    def num_domains(self) -> int:
        return len(self.mixing.names)

    @property
    def step(self) -> int:
        """Number of batches this loader has yielded (the same on every rank)."""
        return self._step

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                yield next(self)
            except StopIteration:
                return

    def __next__(self) -> Any:
        self._fill_pipeline()
        if not self._pending:
            raise StopIteration
        plans = self._pending.popleft()
        future, part = self._in_flight.popleft()
        batch = future.result()
        if part is not None:
            rows = slice(part * self.local_batch_size, (part + 1) * self.local_batch_size)
            batch = {key: value[rows] for key, value in batch.items()}
        self._step += 1
        self._stats.record(plans)
        return self._convert(batch)

    def _local_slice(self) -> slice:
        start = self.dp_rank * self.local_batch_size
        return slice(start, start + self.local_batch_size)

    def _fill_pipeline(self) -> None:
        """Plans the next group of ``prefetch + 1`` batches once the previous group is used up.

        Planning in groups lets one read serve several batches (a domain's rows of the group
        come from one ``__getitems__`` call), which is what keeps the loader near the packers'
        speed; the price is that an EXP3 update reaches the next group, 0 to ``prefetch``
        batches later, at a lag fixed by the step count alone.
        """
        if self._materializer is None:
            self._materializer = _Materializer(self.mixing, self.num_workers)
            # Batches planned before a restore are read again from their saved plans.
            self._submit(list(self._pending))
        if self._pending or self._ended:
            return
        group = []
        while len(group) <= self.prefetch:
            plans = self._planner.next_plans(self.global_batch_size)
            if len(plans) < self.global_batch_size:
                # A partial global batch is dropped on every rank alike: no rank waits for
                # a batch another rank never gets.
                self._ended = True
                break
            group.append(plans)
        self._pending.extend(group)
        self._submit(group)

    def _submit(self, group: list[list[MixedPlan]]) -> None:
        local = [plans[self._local_slice()] for plans in group]
        if not local:
            return
        if self.num_workers:
            # One task per batch, so that workers read batches in parallel.
            for plans in local:
                self._in_flight.append((self._materializer.submit(plans), None))
            return
        future = self._materializer.submit([plan for plans in local for plan in plans])
        self._in_flight.extend((future, part) for part in range(len(local)))

    def _convert(self, batch: dict[str, np.ndarray]) -> Any:
        if self.framework == "torch":
            from wf_data.data.interop import to_torch

            return to_torch(batch, device=self.device, pin_memory=self.pin_memory)
        if self.framework == "jax":
            from wf_data.data.interop import to_jax

            return to_jax(batch, sharding=self.jax_sharding)
        return batch

    # ------------------------------------------------------------------ mixture

    @property
    def mixture(self) -> dict[str, float]:
        """Current mixture weights by domain name (the ones new rows are drawn with)."""
        return self.mixing.mixture

    def update_mixture(self, losses: Mapping[int, float] | Mapping[str, float] | Any) -> None:
        """Feeds per-domain mean losses to the EXP3 mixture (all ranks must pass the same)."""
        update = getattr(self.mixing, "update", None)
        if update is None:
            raise TypeError("update_mixture needs mixing kind 'exp3'; this loader mixes statically")
        update(losses)

    def update(self, losses) -> None:
        """Alias of ``update_mixture`` so the loader itself can be ``InfluenceAwareOptimizer``'s
        mixture."""
        self.update_mixture(losses)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """A small, JSON-serialisable state: planner, bandit, unconsumed planned batches."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint,
            "step": self._step,
            "global_batch_size": self.global_batch_size,
            "ended": self._ended,
            "planner": self._planner.get_state(),
            "pending": [encode_plans(plans, self.mixing.names) for plans in self._pending],
            "stats": self._stats.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a state saved by a loader over the same data and settings.

        Refuses, naming the difference, a state from other data, tokenizer, ``seq_len``,
        packing or seed. Sources are matched by name: a changed weight, an added source (it
        starts at its first row) or a removed one is accepted.
        """
        if not isinstance(state, Mapping) or "version" not in state:
            raise LoaderStateError(f"not a wf-data loader state: keys {sorted(state)[:8]}")
        if state["version"] != STATE_VERSION:
            raise LoaderStateError(
                f"loader state version {state['version']} is not supported (expected "
                f"{STATE_VERSION})"
            )
        check_fingerprint(state["fingerprint"], self._fingerprint)
        if self.global_batch_size != state["global_batch_size"] and state["pending"]:
            raise LoaderStateError(
                f"state has {len(state['pending'])} planned batches of "
                f"{state['global_batch_size']} rows; this loader's global_batch_size is "
                f"{self.global_batch_size}"
            )
        self._close_materializer()
        self._planner = iter(self.mixing)
        self._planner.set_state(state["planner"])
        try:
            pending = [decode_plans(encoded, self.mixing.names) for encoded in state["pending"]]
        except ValueError as error:
            raise LoaderStateError(f"cannot restore the planned batches: {error}") from error
        self._pending = collections.deque(pending)
        self._step = int(state["step"])
        self._ended = bool(state["ended"])
        self._stats.load_state_dict(state["stats"])

    # ------------------------------------------------------------------ extras

    def stats(self) -> dict[str, float]:
        """Flat ``data/...`` floats for any logger: configured and realised shares, fill."""
        return self._stats.summary(self.mixture)

    def as_torch_dataset(self):
        """This loader as a ``torch.utils.data.IterableDataset`` (use ``batch_size=None``)."""
        from torch.utils.data import IterableDataset

        loader = self

        class _LoaderDataset(IterableDataset):
            def __iter__(self):
                return iter(loader)

            def state_dict(self):
                return loader.state_dict()

            def load_state_dict(self, state):
                loader.load_state_dict(state)

        return _LoaderDataset()

    def _close_materializer(self) -> None:
        for future, _ in self._in_flight:
            future.cancel()
        self._in_flight.clear()
        if self._materializer is not None:
            self._materializer.close()
            self._materializer = None

    def close(self) -> None:
        """Stops worker processes; the loader can still save its state afterwards."""
        self._close_materializer()

    def __enter__(self) -> DataLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._close_materializer()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def check_fingerprint(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raises ``LoaderStateError`` naming every setting or source that differs.

    Per-source entries are compared only for sources present in both; added and removed
    sources are allowed (that is what re-weighting and extending a mixture needs).
    """
    differences = []
    for key in sorted(set(saved) | set(current)):
        if key == "sources":
            continue
        if saved.get(key) != current.get(key):
            differences.append(
                f"{key}: state has {saved.get(key)!r}, loader has {current.get(key)!r}"
            )
    saved_sources = saved.get("sources", {})
    current_sources = current.get("sources", {})
    for name in sorted(set(saved_sources) & set(current_sources)):
        if saved_sources[name] != current_sources[name]:
            differences.append(
                f"source {name!r}: state was made from {saved_sources[name]!r}, "
                f"loader reads {current_sources[name]!r}"
            )
    if differences:
        raise LoaderStateError(
            "loader state belongs to different data or settings:\n  " + "\n  ".join(differences)
        )


class _Stats:
    """Rows and real tokens served per domain over all ranks (from the global plans), and fill.

    Counted from plans, so the numbers (and the state) are the same on every rank.
    """

    def __init__(self, names: Sequence[str], seq_len: int):
        self._names = tuple(names)
        self._seq_len = int(seq_len)
        self._rows = np.zeros(len(names), dtype=np.int64)
        self._tokens = np.zeros(len(names), dtype=np.int64)
        self._slots = 0

    def record(self, plans: Sequence[MixedPlan]) -> None:
        for plan in plans:
            self._rows[plan.domain] += 1
            self._tokens[plan.domain] += plan.row.num_tokens
        self._slots += len(plans) * self._seq_len

    def state_dict(self) -> dict:
        return {
            "names": list(self._names),
            "rows": self._rows.tolist(),
            "tokens": self._tokens.tolist(),
            "slots": self._slots,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        counts = zip(state["rows"], state["tokens"], strict=True)
        saved = dict(zip(state["names"], counts, strict=True))
        for index, name in enumerate(self._names):
            rows, tokens = saved.get(name, (0, 0))
            self._rows[index] = rows
            self._tokens[index] = tokens
        self._slots = int(state["slots"])

    def summary(self, mixture: Mapping[str, float]) -> dict[str, float]:
        rows_total = max(int(self._rows.sum()), 1)
        tokens_total = int(self._tokens.sum())
        out = {
            "data/tokens_served": float(tokens_total),
            "data/rows_served": float(self._rows.sum()),
            "data/fill": tokens_total / self._slots if self._slots else 0.0,
        }
        for index, name in enumerate(self._names):
            out[f"data/weight/{name}"] = float(mixture[name])
            out[f"data/row_share/{name}"] = float(self._rows[index] / rows_total)
            out[f"data/token_share/{name}"] = float(self._tokens[index] / max(tokens_total, 1))
        return out


# ---------------------------------------------------------------------------- from a config


def _load_tokenizer(name: str | None):
    from wf_data.data.tokenization import TokenizerWrapper

    return TokenizerWrapper.from_pretrained(name) if name else None


def build_domain_dataset(source, cfg, *, tokenizer, num_epochs):
    """One domain's packed dataset: pre-training (tokenize + pack) or SFT (chat + pack)."""
    from wf_data.data.sources import open_dataset

    documents = open_dataset(source.path)
    seed = domain_seed(cfg.seed, source.name)
    common = dict(seq_len=cfg.seq_len, seed=seed, num_epochs=num_epochs, pad_id=cfg.pad_id)
    if cfg.window_size is not None:
        common["window_size"] = cfg.window_size
    if cfg.kind == "sft":
        from wf_data.data.datasets.sft import SFTDataset

        return SFTDataset(
            documents,
            tokenizer=tokenizer,
            chat_template=cfg.sft.chat_template,
            overlong=cfg.sft.overlong,
            **common,
        )
    from wf_data.data.datasets.pretrain import PretrainDataset

    return PretrainDataset(documents, tokenizer=tokenizer, packing=cfg.packing, **common)


def build_mixing(cfg, *, sources=None, num_epochs="config", on_exhausted=None):
    """The mixture a config describes: one packed dataset per enabled source, keyed by name."""
    sources = cfg.enabled_sources() if sources is None else sources
    tokenizer = _load_tokenizer(cfg.tokenizer)
    epochs = cfg.num_epochs if num_epochs == "config" else num_epochs
    datasets = {
        name: build_domain_dataset(source, cfg, tokenizer=tokenizer, num_epochs=epochs)
        for name, source in sources.items()
    }
    weights = {name: source.weight for name, source in sources.items()}
    # Finite epochs end the stream when a domain runs out; otherwise domains start over.
    on_exhausted = on_exhausted or ("stop" if epochs is not None else "restart")
    if cfg.mixing.kind == "exp3":
        mixing = Exp3Mixing(datasets, weights, seed=cfg.seed, on_exhausted=on_exhausted)
        mixing.bandit = bandit_from_config(
            cfg.mixing,
            mixing.num_domains,
            prior=mixing.bandit.prior,
            seed=cfg.seed,
            domain_names=mixing.names,
        )
        return mixing
    return MixedDataset(datasets, weights, seed=cfg.seed, on_exhausted=on_exhausted)


def loader_fingerprint(cfg, mixing) -> dict[str, Any]:
    """What a loader state depends on: global settings plus one fingerprint per source."""
    return {
        "kind": cfg.kind,
        "seq_len": cfg.seq_len,
        "packing": cfg.packing if cfg.kind == "pretrain" else "best_fit",
        "window_size": cfg.window_size,
        "seed": cfg.seed,
        "tokenizer": cfg.tokenizer,
        "num_epochs": cfg.num_epochs,
        "mixing": cfg.mixing.kind,
        "sources": {
            name: json_safe(dataset.fingerprint()) for name, dataset in mixing.datasets.items()
        },
    }


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists and numpy scalars as Python numbers (JSON round trip)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def get_loader(
    cfg: Any,
    *,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    framework: str = "torch",
    overrides: Sequence[str] = (),
    num_workers: int | None = None,
    device: Any = None,
    pin_memory: bool | None = None,
    jax_sharding: Any = None,
) -> DataLoader:
    """The loader a config describes, for data-parallel rank ``dp_rank`` of ``dp_world_size``.

    ``cfg`` is a ``DataConfig``, a dict, or a config name from ``configs/data`` (``"demo"``,
    ``"mixed_pretrain"``) with Hydra ``overrides``. Workers: ``WF_DATA_NUM_WORKERS`` beats
    ``num_workers`` beats the config.
    """
    from wf_data.config import load_data_config, resolve_num_workers

    cfg = load_data_config(cfg, overrides)
    mixing = build_mixing(cfg)
    return DataLoader(
        mixing,
        global_batch_size=cfg.global_batch_size,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        framework=framework,
        device=device,
        pin_memory=pin_memory,
        jax_sharding=jax_sharding,
        num_workers=resolve_num_workers(cfg, num_workers),
        prefetch=cfg.prefetch,
        fingerprint=loader_fingerprint(cfg, mixing),
    )


def get_eval_loaders(
    cfg: Any, *, overrides: Sequence[str] = (), framework: str = "torch", **kwargs: Any
) -> dict[str, DataLoader]:
    """One finite, deterministic loader per held-out source (``eval_sources``), by name.

    Each reads its source once, in a fixed order, and ends with its last full batch.
    """
    from wf_data.config import load_data_config

    cfg = load_data_config(cfg, overrides)
    if not cfg.eval_sources:
        raise ValueError("the config has no eval_sources: add held-out sources to evaluate on")
    loaders = {}
    for name, source in cfg.eval_sources.items():
        mixing = build_mixing(cfg, sources={name: source}, num_epochs=1, on_exhausted="stop")
        mixing = MixedDataset(mixing.datasets, {name: 1.0}, seed=cfg.seed, on_exhausted="stop")
        loaders[name] = DataLoader(
            mixing,
            global_batch_size=cfg.global_batch_size,
            framework=framework,
            fingerprint=loader_fingerprint(cfg, mixing),
            **kwargs,
        )
    return loaders
