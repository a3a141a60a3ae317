"""FSDP2 wrapping and torch.distributed.checkpoint (DCP) save/load of model + optimizer + loader.

A checkpoint is a directory `step-N/` under a checkpoint root, written as `step-N.tmp/` and renamed
once every rank has finished: a crash mid-save leaves only a `.tmp` directory, which
`latest_checkpoint` never returns. Model and optimizer state are saved sharded (DTensors) and
resharded by DCP on load, so a run can resume on a different world size or parallelism. Works with
or without an initialised process group.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import shutil
import warnings
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from wf_data.distributed.parallelism import ParallelDims, decoder_layers

__all__ = [
    "apply_fsdp",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

_STEP_DIR = re.compile(r"^step-(\d+)$")
_LOADER_PREFIX = "dataloader/dp_rank_"
_META_KEY = "meta"
_async_group = None


def apply_fsdp(model: nn.Module, dp_mesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None, reshard_after_forward: bool = True,
               cpu_offload: bool = False, activation_checkpointing: bool = False) -> nn.Module:
    """`fully_shard` every decoder layer, then the root (embeddings, norm, lm_head); returns model.

    `dp_mesh` 1-D shards over all its ranks (FSDP); 2-D (dp_replicate, dp_shard) replicates over
    the first dimension and shards over the second (HSDP; DDP when dp_shard has size 1). Apply
    after `apply_tp` (parameters become 2-D DTensors). Works on a causal LM or a pipeline stage.
    `activation_checkpointing` recomputes each decoder layer in backward (names unchanged).
    """
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {
        "mesh": dp_mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
    }
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        if activation_checkpointing:
            checkpoint(layer)
        # The last layer's parameters are needed again at once by backward: keep them gathered.
        last = index == len(layers) - 1
        fully_shard(layer, reshard_after_forward=reshard_after_forward and not last, **options)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **options)
    return model


# ----------------------------------------------------------------------------- checkpoints


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _dcp_call():
    # DCP warns on every single-process call; single-process use is intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield not _distributed()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _reshard(parts: Sequence[nn.Module]) -> None:
    # After a forward without backward (evaluation) FSDP leaves the root module unsharded, its
    # parameters swapped for the gathered ones: put the sharded ones back before reading state.
    # (An optimizer built in that window holds the gathered tensors; stepping it after their
    # storage is freed crashes torch 2.15, so build optimizers before any forward.)
    from torch.distributed.fsdp import FSDPModule

    for part in parts:
        for module in part.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def _model_state(parts: Sequence[nn.Module]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state: dict[str, Any] = {}
    for part in parts:
        state.update(get_model_state_dict(part))
    return state


def _optimizer_state(parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    state: dict[str, Any] = {}
    for part, optimizer in zip(parts, optimizers, strict=True):
        state.update(get_optimizer_state_dict(part, optimizer, options=options))
    return state


def _loader_state(dataloader: Any) -> Any:
    return dataloader.state_dict() if hasattr(dataloader, "state_dict") else dataloader.get_state()


def _set_loader_state(dataloader: Any, state: Any) -> None:
    if hasattr(dataloader, "load_state_dict"):
        dataloader.load_state_dict(state)
    else:
        dataloader.set_state(state)


def _dp_rank(parallel_dims: ParallelDims | None) -> int:
    return parallel_dims.dp_rank if parallel_dims is not None else _rank()


def save_checkpoint(path: str | Path, *, step: int, model: nn.Module | Sequence[nn.Module],
                    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
                    dataloader: Any = None, extra: dict | None = None,
                    parallel_dims: ParallelDims | None = None,
                    async_save: bool = False) -> Path | Future:
    """Save `path/step-{step}/` atomically; every rank calls it. Returns the directory.

    `model`/`optimizer` may be lists (pipeline stages on this rank, one optimizer each). The data
    loader (anything with `state_dict()` or Grain's `get_state()`) is stored under
    `dataloader/dp_rank_{r}`, `r` = `parallel_dims.dp_rank` (the global rank if not given);
    `extra` (picklable, e.g. config or metrics) is stored once. With `async_save` the state is
    staged to CPU, written in the background, and a `Future` is returned that completes after
    the rename; wait on it before the next save.
    """
    import torch.distributed.checkpoint as dcp

    root = Path(path)
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by an interrupted save
        tmp.mkdir(parents=True)
    _barrier()
    parts = _as_list(model)
    _reshard(parts)
    state: dict[str, Any] = {
        "model": _model_state(parts),
        "optimizer": _optimizer_state(parts, _as_list(optimizer)),
        _META_KEY: pickle.dumps({"step": step, "extra": extra}),
    }
    if dataloader is not None:
        state[f"{_LOADER_PREFIX}{_dp_rank(parallel_dims)}"] = pickle.dumps(
            _loader_state(dataloader)
        )
    if not async_save:
        with _dcp_call() as no_dist:
            dcp.save(state, checkpoint_id=str(tmp), no_dist=no_dist)
        # dcp.save returns on rank 0 only after every rank's data is written (rank 0 gathers
        # their write results to write .metadata), so the rename publishes a complete checkpoint.
        if _rank() == 0:
            _publish(tmp, final)
        _barrier()
        return final
    with _dcp_call() as no_dist:
        written = dcp.async_save(state, checkpoint_id=str(tmp),
                                 process_group=_checkpoint_group(), no_dist=no_dist)
    if hasattr(written, "upload_completion"):  # AsyncSaveResponse (custom stagers)
        written = written.upload_completion
    done: Future = Future()

    def finish(future: Future) -> None:
        try:
            future.result()
            if _rank() == 0:
                _publish(tmp, final)
            done.set_result(final)
        except BaseException as error:  # noqa: BLE001 - surfaced through the returned future
            done.set_exception(error)

    written.add_done_callback(finish)
    return done


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _checkpoint_group():
    # Background saves run collectives from another thread: give them their own gloo group so
    # they never interleave with the training collectives on the default group.
    global _async_group
    if _distributed() and _async_group is None:
        _async_group = dist.new_group(backend="gloo")
    return _async_group


def latest_checkpoint(path: str | Path) -> Path | None:
    """The `step-N` directory under `path` with the highest N that holds a complete checkpoint
    (never a `.tmp` directory); None when there is none."""
    root = Path(path)
    if not root.is_dir():
        return None
    complete = [
        (int(match.group(1)), child) for child in root.iterdir()
        if (match := _STEP_DIR.match(child.name)) and (child / ".metadata").is_file()
    ]
    return max(complete)[1] if complete else None


def load_checkpoint(path: str | Path, *, model: nn.Module | Sequence[nn.Module],
                    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
                    dataloader: Any = None,
                    parallel_dims: ParallelDims | None = None) -> tuple[int, dict | None]:
    """Load a checkpoint in place into model/optimizer/dataloader; returns `(step, extra)`.

    `path` is a `step-N` directory or a checkpoint root (its `latest_checkpoint`). The parallel
    layout may differ from the saving run's (DCP reshards). The loader state saved by the dp rank
    `parallel_dims.dp_rank` is restored; when the saving run had a different number of dp ranks,
    the saved states must all be equal (wf-data loader state is global) or this raises ValueError.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    checkpoint = _resolve(Path(path))
    parts = _as_list(model)
    _reshard(parts)
    state: dict[str, Any] = {"model": _model_state(parts), _META_KEY: b""}
    if optimizer is not None:
        optimizers = _as_list(optimizer)
        state["optimizer"] = _optimizer_state(parts, optimizers)
    loader_keys = []
    if dataloader is not None:
        saved = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
        loader_keys = sorted(key for key in saved if key.startswith(_LOADER_PREFIX))
        if not loader_keys:
            raise ValueError(f"checkpoint {checkpoint} holds no data loader state")
        state.update(dict.fromkeys(loader_keys, b""))
    with _dcp_call() as no_dist:
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=no_dist)

    for part in parts:
        set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        for part, optim in zip(parts, optimizers, strict=True):
            set_optimizer_state_dict(part, optim, state["optimizer"], options=options)
    if dataloader is not None:
        _set_loader_state(dataloader, _pick_loader_state(
            checkpoint, {key: state[key] for key in loader_keys}, _dp_rank(parallel_dims),
            parallel_dims.dp_world_size if parallel_dims is not None else None,
        ))
    meta = pickle.loads(state[_META_KEY])
    return meta["step"], meta["extra"]


def _resolve(path: Path) -> Path:
    if (path / ".metadata").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint (step-N/.metadata) in {path}")
    return latest


def _pick_loader_state(checkpoint: Path, saved: dict[str, bytes], dp_rank: int,
                       dp_world_size: int | None) -> Any:
    own = f"{_LOADER_PREFIX}{dp_rank}"
    distinct = set(saved.values())
    if len(distinct) == 1:
        return pickle.loads(distinct.pop())
    if own in saved and dp_world_size == len(saved):
        return pickle.loads(saved[own])
    raise ValueError(
        f"checkpoint {checkpoint}: the {len(saved)} saved data loader states differ per dp rank, "
        f"so they cannot be resharded to dp rank {dp_rank} of {dp_world_size}"
    )
