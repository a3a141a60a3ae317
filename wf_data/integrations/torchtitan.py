"""torchtitan adapter: a ``BaseDataLoader`` yielding torchtitan's ``(inputs, labels)`` layout.

Works with torchtitan 0.3 (``components.dataloader.BaseDataLoader``); torchtitan's main branch
moved the class into its Grain-based ``components/data`` package, which is imported where the
old module is gone (untested until a release ships it; pyproject bounds the tested versions).

torchtitan trains on ``({"input": (b, S), "positions": (b, S)}, labels (b, S))`` with labels
already shifted. A wf-data row of ``L = S + 1`` tokens gives exactly that: ``input`` is
``input_ids[:, :-1]``, ``labels`` is ``labels[:, 1:]`` (-100 on padding and on each packed
document's first token), ``positions`` restart at each document (block-causal masks and RoPE).
So the wf-data config must have ``seq_len = training.seq_len + 1`` and
``global_batch_size = training.local_batch_size * dp_world_size``; both are checked.

In a torchtitan job config::

    dataloader=WfDataTitanLoader.Config(data="demo", overrides=["seq_len=2049"])

Importing this module imports torchtitan; nothing in ``wf_data.data`` imports it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from wf_data.data.deliver.factory import get_loader
from wf_data.extras import requires

with requires("torch", "titan", feature="the torchtitan data loader"):
    import torch

    try:
        from torchtitan.components.dataloader import BaseDataLoader
    except ImportError:  # torchtitan main: the Grain-based components/data package
        from torchtitan.components.data.loader import BaseDataLoader

if not hasattr(BaseDataLoader, "Config"):  # torchtitan 0.2 builds loaders from functions
    raise ImportError(
        "wf_data.integrations.torchtitan needs torchtitan 0.3 (configurable data loaders); "
        "the installed one has no BaseDataLoader.Config: pip install 'torchtitan>=0.3,<0.4'"
    )

__all__ = ["WfDataTitanLoader"]

# The key of the (global) loader state on every rank.
_STATE_KEY = "dp_rank_0"


class WfDataTitanLoader(BaseDataLoader):
    """A wf-data loader for one data-parallel rank, as torchtitan's ``BaseDataLoader``.

    ``state_dict`` follows torchtitan's protocol (``{"dp_rank_<r>": <JSON of the loader state>,
    "world_size": W}``), as JSON rather than pickle. The loader state is the same on every rank,
    so every rank gives it under rank 0's key: torchtitan's ``CheckpointManager`` loads through
    DCP, which plans the load from the keys of the current state, and that key exists in every
    checkpoint whatever ``dp_world_size`` saved it (any value that divides the global batch).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        data: str = "demo"
        """wf-data config name (``configs/data``) or YAML path."""

        overrides: list[str] = field(default_factory=list)
        """Hydra overrides of the wf-data config (``seq_len=2049``)."""

        num_workers: int | None = None
        """The loader's own worker processes (``None``: the wf-data config's value)."""

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int = 1,
        dp_rank: int = 0,
        seq_len: int | None = None,
        local_batch_size: int | None = None,
        tokenizer: Any = None,
        snapshot_every_n_steps: int | None = None,
    ):
        from wf_data.config import load_data_config

        data_config = load_data_config(config.data, config.overrides)
        if seq_len is not None and data_config.seq_len != seq_len + 1:
            raise ValueError(
                f"wf-data config {config.data!r} has seq_len {data_config.seq_len}; torchtitan "
                f"training.seq_len {seq_len} needs rows of {seq_len + 1} tokens (input and "
                f"shifted labels): add the override 'seq_len={seq_len + 1}'"
            )
        if local_batch_size is not None and (
            data_config.global_batch_size != local_batch_size * dp_world_size
        ):
            raise ValueError(
                f"wf-data config {config.data!r} has global_batch_size "
                f"{data_config.global_batch_size}; torchtitan local_batch_size "
                f"{local_batch_size} x dp_world_size {dp_world_size} needs the override "
                f"'global_batch_size={local_batch_size * dp_world_size}'"
            )
        _check_tokenizer(tokenizer, data_config)
        self.dp_rank = int(dp_rank)
        self.dp_world_size = int(dp_world_size)
        self.loader = get_loader(
            data_config,
            framework="torch",
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            num_workers=config.num_workers,
        )

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        for batch in self.loader:
            inputs = {
                "input": batch["input_ids"][:, :-1].long(),
                "positions": batch["position_ids"][:, :-1].long(),
            }
            yield inputs, batch["labels"][:, 1:].long()

    def update_mixture(self, losses: Any) -> None:
        """EXP3 feedback (per-domain mean losses, the same on every rank)."""
        self.loader.update_mixture(losses)

    def state_dict(self) -> dict[str, Any]:
        return {_STATE_KEY: json.dumps(self.loader.state_dict()), "world_size": self.dp_world_size}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not state_dict:  # torchtitan: an empty state is valid (nothing saved yet)
            return
        ranks = sorted(key for key in state_dict if key.startswith("dp_rank_"))
        if not ranks:
            raise ValueError(
                f"not a WfDataTitanLoader state: no 'dp_rank_<r>' entry in {sorted(state_dict)}"
            )
        # Any rank's entry: states saved before every rank used rank 0's key hold one per rank.
        self.loader.load_state_dict(json.loads(state_dict[ranks[0]]))

    def close(self) -> None:
        """Stops the loader's worker processes."""
        self.loader.close()


def _check_tokenizer(tokenizer: Any, data_config: Any) -> None:
    """Refuses a torchtitan tokenizer whose vocabulary size differs from the data's tokenizer.

    The ids come from the wf-data tokenizer; a model and tokenizer of another vocabulary would
    train on them silently.
    """
    if tokenizer is None or not hasattr(tokenizer, "get_vocab_size") or not data_config.tokenizer:
        return
    from wf_data.data.text.tokenization import TokenizerWrapper

    ours = TokenizerWrapper.from_pretrained(data_config.tokenizer).vocab_size
    theirs = tokenizer.get_vocab_size()
    if theirs != ours:
        raise ValueError(
            f"torchtitan tokenizer has {theirs} tokens, the wf-data data is tokenized with "
            f"{data_config.tokenizer!r} ({ours} tokens): point torchtitan's hf_assets_path at "
            "the same tokenizer"
        )
