"""Loader state in the trainer's checkpoint: Orbax (JAX side) and torch DCP (torch side).

The loader state is global, the same on every data-parallel rank (see ``loader.py``), so one
copy restores any number of ranks. Grain's own ``CheckpointHandler`` writes one file per JAX
process and cannot restore on a different process count, so the Orbax side stores the state
with Orbax's JSON handler, written by the primary host only.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any

LOADER_KEY = "loader"


def orbax_save_args(loader) -> Any:
    """``ocp.args`` item that saves ``loader``'s state: use it in an ``ocp.args.Composite``."""
    import orbax.checkpoint as ocp

    return ocp.args.JsonSave(loader.state_dict())


def orbax_restore_args() -> Any:
    """``ocp.args`` item that restores a loader state saved with ``orbax_save_args``."""
    import orbax.checkpoint as ocp

    return ocp.args.JsonRestore()


def save_with_orbax(manager, step: int, loader, **items: Any) -> bool:
    """Saves the loader state beside other Orbax items (``name=ocp.args...``) at ``step``."""
    import orbax.checkpoint as ocp

    saved = manager.save(
        step, args=ocp.args.Composite(**{LOADER_KEY: orbax_save_args(loader)}, **items)
    )
    manager.wait_until_finished()
    return saved


def restore_with_orbax(manager, loader, step: int | None = None, **items: Any) -> Any:
    """Restores ``loader`` from ``step`` (default: the latest) and returns the Composite result.

    Other items are restored with the ``ocp.args`` given in ``items``.
    """
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    restored = manager.restore(
        step, args=ocp.args.Composite(**{LOADER_KEY: orbax_restore_args()}, **items)
    )
    loader.load_state_dict(restored[LOADER_KEY])
    return restored


class DCPLoaderState:
    """A torch DCP ``Stateful`` view of a loader; its state is one JSON string.

    A string (not nested dicts) keeps DCP from flattening the state into per-rank tensors:
    every rank saves the same bytes and any rank count reads them back.
    """

    def __init__(self, loader):
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        return {"json": json.dumps(self.loader.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(json.loads(state["json"]))


@contextlib.contextmanager
def _single_process_ok():
    # DCP warns when used without a process group; a single-process run is a supported use.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_with_dcp(path: str | os.PathLike, loader, state: dict[str, Any] | None = None) -> None:
    """``torch.distributed.checkpoint.save`` of ``state`` plus the loader under ``"loader"``."""
    import torch.distributed.checkpoint as dcp

    with _single_process_ok():
        dcp.save(
            {**(state or {}), LOADER_KEY: DCPLoaderState(loader)}, checkpoint_id=os.fspath(path)
        )


def load_with_dcp(path: str | os.PathLike, loader, state: dict[str, Any] | None = None) -> None:
    """Loads what ``save_with_dcp`` wrote: ``state`` in place, and the loader's state."""
    import torch.distributed.checkpoint as dcp

    with _single_process_ok():
        dcp.load(
            {**(state or {}), LOADER_KEY: DCPLoaderState(loader)}, checkpoint_id=os.fspath(path)
        )
