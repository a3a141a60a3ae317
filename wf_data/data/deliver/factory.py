"""The config factory: from a data config to a `DataLoader` (`get_loader`, `get_eval_loaders`).

`get_loader` calls `build_domains` (one packed dataset per source: tokenizer loaded once, seeds
keyed by source name), `build_mixer` (the plans of every domain under the configured policy),
`reader_of` (the rows of every domain) and `loader_fingerprint` (what a saved state must match),
and hands them to `wf_data.data.deliver.loader.DataLoader`.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wf_data.data.deliver.loader import DataLoader, LoaderRecipe
from wf_data.data.mix.exp3 import bandit_from_config
from wf_data.data.mix.mixing import Exp3Policy, MixPlans, StaticWeights, mix_plans, validate_weights
from wf_data.data.read.packing import PackedDataset
from wf_data.data.read.rows import RowReader

__all__ = [
    "build_domain",
    "build_domains",
    "build_mixer",
    "domain_seed",
    "get_eval_loaders",
    "get_loader",
    "json_safe",
    "load_tokenizer",
    "loader_fingerprint",
    "reader_of",
]


def get_loader(
    cfg: Any,
    *,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    framework: str = "torch",
    overrides: Sequence[str] = (),
    num_workers: int | None = None,
    step_shard: tuple[int, int] | None = None,
    device: Any = None,
    pin_memory: bool | None = None,
    jax_sharding: Any = None,
) -> DataLoader:
    """The loader a config describes, for data-parallel rank `dp_rank` of `dp_world_size`.

    `cfg` is a `DataConfig`, a dict, or a config name from `configs/data` (`"demo"`,
    `"mixed_pretrain"`) with Hydra `overrides`. Workers: `WF_DATA_NUM_WORKERS` beats
    `num_workers` beats the config. `step_shard=(index, count)` yields only global steps
    `s % count == index` (one torch `DataLoader` worker's share); the state stays global.
    """
    from wf_data.config import load_data_config, resolve_num_workers

    cfg = load_data_config(cfg, overrides)
    domains = build_domains(cfg)
    weights = {name: source.weight for name, source in cfg.enabled_sources().items()}
    return DataLoader(
        build_mixer(cfg, domains, weights),
        reader_of(domains),
        global_batch_size=cfg.global_batch_size,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        step_shard=step_shard,
        framework=framework,
        device=device,
        pin_memory=pin_memory,
        jax_sharding=jax_sharding,
        num_workers=resolve_num_workers(cfg, num_workers),
        prefetch=cfg.prefetch,
        worker_timeout_s=cfg.worker_timeout_s,
        fingerprint=loader_fingerprint(cfg, domains),
        recipe=LoaderRecipe(cfg, dp_rank, dp_world_size, num_workers, device, pin_memory),
    )


def get_eval_loaders(
    cfg: Any, *, overrides: Sequence[str] = (), framework: str = "torch", **kwargs: Any
) -> dict[str, DataLoader]:
    """One finite, deterministic loader per held-out source (`eval_sources`), by name.

    Each reads its source once, in a fixed order, and ends with its last full batch.
    """
    from wf_data.config import load_data_config

    cfg = load_data_config(cfg, overrides)
    if not cfg.eval_sources:
        raise ValueError("the config has no eval_sources: add held-out sources to evaluate on")
    loaders = {}
    for name, source in cfg.eval_sources.items():
        domains = build_domains(cfg, sources={name: source}, num_epochs=1)
        _warn_if_no_batch(name, domains[name], cfg.global_batch_size)
        mixer = mix_plans(
            {name: domains[name].plans}, {name: 1.0}, seed=cfg.seed, on_exhausted="stop"
        )
        loaders[name] = DataLoader(
            mixer,
            reader_of(domains),
            global_batch_size=cfg.global_batch_size,
            framework=framework,
            fingerprint=loader_fingerprint(cfg, domains),
            **kwargs,
        )
    return loaders


def _warn_if_no_batch(name: str, domain: PackedDataset, global_batch_size: int) -> None:
    """Warns when an eval source cannot fill one global batch: its loader would yield none."""
    if domain.lengths is None:
        return  # text tokenized on the fly: no lengths to count rows from
    # Every row holds at most seq_len tokens of pieces cut at seq_len: rows <= pieces.
    max_rows = int((-(-domain.lengths // domain.seq_len)).sum())
    if max_rows < global_batch_size:
        warnings.warn(
            f"eval source {name!r} packs into at most {max_rows} rows, fewer than one global "
            f"batch of {global_batch_size}: its loader yields no batch (a partial last batch "
            "is dropped). Lower global_batch_size for evaluation or add documents",
            UserWarning,
            stacklevel=3,
        )


def domain_seed(seed: int, name: str) -> int:
    """Seed of one domain's shuffle: keyed by name, so adding a domain changes no other one."""
    return zlib.crc32(f"{int(seed)}:{name}".encode())


def load_tokenizer(name: str | None):
    """The config's tokenizer (`TokenizerWrapper.from_pretrained`), or None."""
    from wf_data.data.text.tokenization import TokenizerWrapper

    return TokenizerWrapper.from_pretrained(name) if name else None


def build_domain(source, cfg, *, tokenizer, num_epochs) -> PackedDataset:
    """One domain's packed dataset: pre-training (tokenize + pack) or SFT (chat + pack)."""
    from wf_data.data.shards.sources import open_dataset

    documents = open_dataset(source.path)
    if len(documents) == 0 or documents.num_tokens == 0:
        # Caught here, naming the source, rather than at the first draw from its domain.
        raise ValueError(
            f"source {source.name!r} ({source.path}) holds {len(documents)} documents and "
            f"{documents.num_tokens} tokens (wf-data prepare drops empty records): prepare "
            "it from non-empty inputs, or remove the source (weight 0 disables it)"
        )
    seed = domain_seed(cfg.seed, source.name)
    common = dict(seq_len=cfg.seq_len, seed=seed, num_epochs=num_epochs, pad_id=cfg.pad_id)
    if cfg.window_size is not None:
        common["window_size"] = cfg.window_size
    if cfg.kind == "sft":
        from wf_data.data.read.sft import SFTDataset

        return SFTDataset(
            documents,
            tokenizer=tokenizer,
            chat_template=cfg.sft.chat_template,
            overlong=cfg.sft.overlong,
            **common,
        )
    from wf_data.data.read.pretrain import PretrainDataset

    return PretrainDataset(
        documents,
        tokenizer=tokenizer,
        packing=cfg.packing,
        allow_tokenizer_mismatch=cfg.allow_tokenizer_mismatch,
        **common,
    )


def build_domains(cfg, *, sources=None, num_epochs="config") -> dict[str, PackedDataset]:
    """One packed dataset per enabled source of `cfg` (or per entry of `sources`), by name."""
    sources = cfg.enabled_sources() if sources is None else sources
    tokenizer = load_tokenizer(cfg.tokenizer)
    epochs = cfg.num_epochs if num_epochs == "config" else num_epochs
    return {
        name: build_domain(source, cfg, tokenizer=tokenizer, num_epochs=epochs)
        for name, source in sources.items()
    }


def build_mixer(
    cfg,
    domains: Mapping[str, PackedDataset],
    weights: Mapping[str, float],
    *,
    on_exhausted: str | None = None,
) -> MixPlans:
    """The mixer of the domains' plans under the config's policy (static or EXP3).

    Finite epochs end the stream when a domain runs out; otherwise domains start over.
    """
    names = list(domains)
    if cfg.mixing.kind == "exp3":
        bandit = bandit_from_config(
            cfg.mixing,
            len(names),
            prior=validate_weights(names, weights),
            seed=cfg.seed,
            domain_names=names,
        )
        policy = Exp3Policy(bandit)
    else:
        policy = StaticWeights(weights)
    on_exhausted = on_exhausted or ("stop" if cfg.num_epochs is not None else "restart")
    return mix_plans(
        {name: ds.plans for name, ds in domains.items()},
        policy,
        seed=cfg.seed,
        on_exhausted=on_exhausted,
    )


def reader_of(domains: Mapping[str, PackedDataset]) -> RowReader:
    """The reader of all domains' rows, indexed like the mixer's domains."""
    first = next(iter(domains.values()))
    return RowReader(
        [ds.docs for ds in domains.values()], first.seq_len, [ds.pad_id for ds in domains.values()]
    )


def loader_fingerprint(cfg, domains: Mapping[str, PackedDataset]) -> dict[str, Any]:
    """What a loader state depends on: global settings plus one fingerprint per source."""
    return {
        "kind": cfg.kind,
        "seq_len": cfg.seq_len,
        "packing": cfg.packing if cfg.kind == "pretrain" else "best_fit",
        "window_size": cfg.window_size,
        "seed": cfg.seed,
        # In-flight batch plans have this many rows: another size cannot continue them.
        "global_batch_size": cfg.global_batch_size,
        "tokenizer": cfg.tokenizer,
        "num_epochs": cfg.num_epochs,
        "mixing": cfg.mixing.kind,
        "sources": {name: json_safe(ds.fingerprint()) for name, ds in domains.items()},
    }


def json_safe(value: Any) -> Any:
    """`value` with tuples as lists and numpy scalars as Python numbers (JSON round trip)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
