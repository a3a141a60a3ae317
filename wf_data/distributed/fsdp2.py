"""FSDP2 wrapping and torch.distributed.checkpoint (DCP) save/load of model + optimizer + loader.

A checkpoint is a directory `step-N/` under a checkpoint root, written through `wf_data.atomic`:
filled as `step-N.tmp/`, published by rename once every rank has finished, so a kill -9 at any
point leaves the previous checkpoints loadable and `latest_checkpoint` never returns a partial
one. Model and optimizer state are DCP tensors, saved sharded (DTensors) and resharded by DCP on
load, so a run can resume on a different world size or parallelism. The step, `extra` and the
data loader state are JSON documents (`meta.json`, `loader_state.json`) written once by rank 0;
nothing read back is unpickled beyond DCP's own metadata classes and tensors. Every file's size
and CRC-32 is recorded at save (`checksums.json`) and checked before anything is loaded. Works
with or without an initialised process group.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from wf_data import atomic
from wf_data.distributed.parallelism import ParallelDims, decoder_layers

__all__ = [
    "apply_fsdp",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

_STEP_DIR = re.compile(r"^step-(\d+)(?:\.old)?$")
_LEFTOVER = re.compile(r"^step-(\d+)\.(?:tmp|old)$")
_META_FILE = "meta.json"
_async_group = None
_saving: set[Path] = set()  # step directories of background saves still being written


def apply_fsdp(
    model: nn.Module,
    dp_mesh,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    activation_checkpointing: bool = False,
) -> nn.Module:
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


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


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
    """The loader's JSON-safe state: a plain dict, a Stateful's `state_dict()`, or Grain's
    `get_state()`; the same on every rank, checked, since only rank 0 stores it."""
    if isinstance(dataloader, dict):
        state = dataloader
    elif hasattr(dataloader, "state_dict"):
        state = dataloader.state_dict()
    else:
        state = dataloader.get_state()
    digest = hashlib.sha256(atomic.json_text(state, "data loader state").encode()).hexdigest()
    if _distributed():
        digests: list = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest, group=_checkpoint_group())
        differing = [rank for rank, other in enumerate(digests) if other != digests[0]]
        if differing:
            raise ValueError(
                f"data loader state differs between rank 0 and ranks {differing}; a checkpoint "
                "stores one global loader state (wf-data loaders hold the same state on every "
                "rank), so it cannot be saved: give every rank the same loader state"
            )
    return state


def _set_loader_state(dataloader: Any, state: Any) -> None:
    if hasattr(dataloader, "load_state_dict"):
        dataloader.load_state_dict(state)
    else:
        dataloader.set_state(state)


def save_checkpoint(
    path: str | Path,
    *,
    step: int,
    model: nn.Module | Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    dataloader: Any = None,
    extra: dict | None = None,
    parallel_dims: ParallelDims | None = None,
    async_save: bool = False,
) -> Path | Future:
    """Save `path/step-{step}/` atomically; every rank calls it. Returns the directory.

    `model`/`optimizer` may be lists (pipeline stages on this rank, one optimizer each). The data
    loader (a JSON-safe dict, anything with `state_dict()`, or Grain's `get_state()`) must hold
    the same state on every rank: rank 0 stores it once, as JSON. `extra` (JSON-safe: config,
    metrics) is stored once too. Leftovers of saves killed earlier are cleaned up first.
    `parallel_dims` is accepted for symmetry with `load_checkpoint`; saving needs no layout.
    With `async_save` the state is staged to CPU, written in the background, and a `Future` is
    returned that completes after the rename; wait on it before the next save.
    """
    import torch.distributed.checkpoint as dcp

    del parallel_dims
    final = Path(path) / f"step-{step}"
    documents: dict[str, Any] = {_META_FILE: {"step": int(step), "extra": extra}}
    atomic.json_text(documents[_META_FILE], final / _META_FILE)
    if dataloader is not None:
        documents[atomic.LOADER_STATE_FILE] = _loader_state(dataloader)
    parts = _as_list(model)
    _reshard(parts)
    state: dict[str, Any] = {
        "model": _model_state(parts),
        "optimizer": _optimizer_state(parts, _as_list(optimizer)),
    }
    primary = _rank() == 0
    if primary:
        _recover_steps(final.parent)
    if not async_save:
        return atomic.save_dcp(final, state, documents)
    tmp = atomic.start_staging(final) if primary else None
    _saving.add(final)
    if _distributed():
        dist.barrier()
    with atomic.dcp_call() as no_dist:
        written = dcp.async_save(
            state,
            checkpoint_id=str(final) + atomic.TMP_SUFFIX,
            process_group=_checkpoint_group(),
            no_dist=no_dist,
        )
    if hasattr(written, "upload_completion"):  # AsyncSaveResponse (custom stagers)
        written = written.upload_completion
    done: Future = Future()

    def finish(future: Future) -> None:
        try:
            future.result()
            if primary:
                atomic.finish_staging(tmp, final, documents)
            done.set_result(final)
        except BaseException as error:  # noqa: BLE001 - surfaced through the returned future
            done.set_exception(error)
        finally:
            _saving.discard(final)

    written.add_done_callback(finish)
    return done


def _recover_steps(root: Path) -> None:
    # Saves killed earlier left step-N.tmp (never complete: removed) or step-N.old (restored
    # if step-N is missing): clean them up before writing more, sparing background saves.
    leftovers = {
        root / f"step-{match.group(1)}"
        for child in (root.iterdir() if root.is_dir() else ())
        if (match := _LEFTOVER.match(child.name))
    }
    for step_dir in leftovers - _saving:
        atomic.recover(step_dir)


def _checkpoint_group():
    # Background saves run collectives from another thread: give them their own gloo group so
    # they never interleave with the training collectives on the default group.
    global _async_group
    if _distributed() and _async_group is None:
        _async_group = dist.new_group(backend="gloo")
    return _async_group


def latest_checkpoint(path: str | Path) -> Path | None:
    """The `step-N` directory under `path` with the highest N that holds a complete checkpoint
    (never a `.tmp` directory; a `step-N.old` left by a save killed while replacing `step-N`
    counts as `step-N`); None when there is none."""
    root = Path(path)
    if not root.is_dir():
        return None
    steps = {
        int(match.group(1)) for child in root.iterdir() if (match := _STEP_DIR.match(child.name))
    }
    for step in sorted(steps, reverse=True):
        found = atomic.readable(root / f"step-{step}")
        if found is not None and (found / ".metadata").is_file():
            return found
    return None


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module | Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
    dataloader: Any = None,
    parallel_dims: ParallelDims | None = None,
) -> tuple[int, dict | None]:
    """Load a checkpoint in place into model/optimizer/dataloader; returns `(step, extra)`.

    `path` is a `step-N` directory or a checkpoint root (its `latest_checkpoint`). The parallel
    layout may differ from the saving run's (DCP reshards; `parallel_dims` is not needed). The
    one global loader state is restored on every rank. A file damaged or truncated since the
    save (its checksum), or a checkpoint holding anything but DCP tensors and JSON (a pickled
    object, a crafted metadata file) raises `wf_data.atomic.CheckpointFormatError` naming the
    file, before anything is loaded or run.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    del parallel_dims
    checkpoint = _resolve(Path(path))
    atomic.verify_checkpoint(checkpoint)  # every rank checks its share of the files
    step, extra = _read_meta(checkpoint)
    loader_file = checkpoint / atomic.LOADER_STATE_FILE
    if dataloader is not None and not loader_file.is_file():
        raise ValueError(f"checkpoint {checkpoint} holds no data loader state ({loader_file})")
    parts = _as_list(model)
    _reshard(parts)
    state: dict[str, Any] = {"model": _model_state(parts)}
    if optimizer is not None:
        optimizers = _as_list(optimizer)
        state["optimizer"] = _optimizer_state(parts, optimizers)
    atomic.load_dcp(checkpoint, state, verify=False)

    for part in parts:
        set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        for part, optim in zip(parts, optimizers, strict=True):
            set_optimizer_state_dict(part, optim, state["optimizer"], options=options)
    if dataloader is not None:
        _set_loader_state(dataloader, atomic.read_json(loader_file))
    return step, extra


def _read_meta(checkpoint: Path) -> tuple[int, dict | None]:
    file = checkpoint / _META_FILE
    if not file.is_file():
        raise atomic.CheckpointFormatError(
            f"checkpoint {checkpoint} has no {_META_FILE}: it was written by an older wf-data "
            "which pickled its metadata, and is not loaded because unpickling it could run "
            "code. Load it once with the old version and save it again"
        )
    meta = atomic.read_json(file)
    if not (isinstance(meta, dict) and isinstance(meta.get("step"), int) and "extra" in meta):
        raise atomic.CheckpointFormatError(
            f'{file}: expected {{"step": int, "extra": ...}}, got {str(meta)[:200]}'
        )
    return meta["step"], meta["extra"]


def _resolve(path: Path) -> Path:
    found = atomic.readable(path)
    if found is not None and (found / ".metadata").is_file():
        return found
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint (step-N/.metadata) in {path}")
    return latest
