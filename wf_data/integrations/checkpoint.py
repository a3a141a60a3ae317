"""Loader state in the trainer's checkpoint: Orbax (JAX side) and torch DCP (torch side).

The loader state is global, the same on every data-parallel rank (see ``loader.py``), so it is
stored once, by rank 0 / the primary host, as one JSON document (``loader_state.json``) written
through ``wf_data.atomic`` (temp file, fsync, rename), and read back by every rank, on any rank
count. The torch DCP checkpoint directory as a whole is published atomically too: a save killed
at any point leaves the previous checkpoint loadable. On the Orbax side the JSON file is one
item of the step; Orbax publishes the step directory by its own rename when every item is done.
Both record the size and CRC-32 of the files they write (``wf_data.atomic.CHECKSUMS_FILE``) and
check them before loading: a damaged file is a ``CheckpointFormatError`` naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

from wf_data import atomic
from wf_data.extras import requires

LOADER_KEY = "loader"


def _loader_state(loader) -> Any:
    state = loader.state_dict()
    atomic.json_text(state, "loader.state_dict()")  # refuse a non-JSON state before any write
    return state


@functools.cache
def _orbax_args() -> tuple[type, type]:
    """``(save args, restore args)`` classes of the loader-state Orbax item, built on first use
    (Orbax and JAX are optional)."""
    with requires("jax", feature="the Orbax loader-state item"):
        import jax
        import orbax.checkpoint as ocp

    class LoaderStateHandler(ocp.CheckpointHandler):
        """One JSON file per step, written by the primary host through ``wf_data.atomic``."""

        def save(self, directory, args) -> None:
            if jax.process_index() == 0:
                directory = Path(os.fspath(directory))
                atomic.write_json(directory / atomic.LOADER_STATE_FILE, args.state)
                atomic.write_checksums(directory, names=[atomic.LOADER_STATE_FILE])

        def restore(self, directory, args=None) -> Any:
            directory = Path(os.fspath(directory))
            atomic.verify_checkpoint(directory, collective=False)  # each host reads it alone
            return atomic.read_json(directory / atomic.LOADER_STATE_FILE)

    @ocp.args.register_with_handler(LoaderStateHandler, for_save=True)
    @dataclasses.dataclass
    class LoaderStateSave(ocp.args.CheckpointArgs):
        state: Any

    @ocp.args.register_with_handler(LoaderStateHandler, for_restore=True)
    @dataclasses.dataclass
    class LoaderStateRestore(ocp.args.CheckpointArgs):
        pass

    return LoaderStateSave, LoaderStateRestore


def orbax_save_args(loader) -> Any:
    """``ocp.args`` item that saves ``loader``'s state: use it in an ``ocp.args.Composite``."""
    return _orbax_args()[0](_loader_state(loader))


def orbax_restore_args() -> Any:
    """``ocp.args`` item that restores a loader state saved with ``orbax_save_args``."""
    return _orbax_args()[1]()


def save_with_orbax(manager, step: int, loader, **items: Any) -> bool:
    """Saves the loader state beside other Orbax items (``name=ocp.args...``) at ``step``."""
    with requires("jax", feature="save_with_orbax"):
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
    with requires("jax", feature="restore_with_orbax"):
        import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    restored = manager.restore(
        step, args=ocp.args.Composite(**{LOADER_KEY: orbax_restore_args()}, **items)
    )
    loader.load_state_dict(restored[LOADER_KEY])
    return restored


def save_with_dcp(path: str | os.PathLike, loader, state: dict[str, Any] | None = None) -> Path:
    """Save directory ``path`` atomically: ``state`` with ``torch.distributed.checkpoint`` and
    the loader's state as ``loader_state.json``. Every rank calls it; returns ``path``."""
    return atomic.save_dcp(path, state or {}, {atomic.LOADER_STATE_FILE: _loader_state(loader)})


def load_with_dcp(path: str | os.PathLike, loader, state: dict[str, Any] | None = None) -> None:
    """Loads what ``save_with_dcp`` wrote: ``state`` in place, and the loader's state.

    A ``path`` whose replacement was killed mid-publish is read from the surviving copy. Every
    file is checked against its checksum first: ``CheckpointFormatError`` names a damaged one.
    """
    found = atomic.readable(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {path} (nor {path}.old)")
    atomic.verify_checkpoint(found)
    if state:
        atomic.load_dcp(found, state, verify=False)
    loader.load_state_dict(atomic.read_json(found / atomic.LOADER_STATE_FILE))
