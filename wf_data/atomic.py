"""The one write path: atomic files and directories, and reading checkpoints back without pickle.

Every file wf-data writes goes through ``AtomicWriter`` (or ``write_bytes``, ``write_text``,
``write_json``, ``write_npy``, ``publish_file`` built on it), and nothing replaces an older
version until the new one is complete. A file is written under a name unique to its writer
(``NAME.PID-RANDOM.tmp``: two live copies of one task, as Beam or Spark speculation runs, never
share a temp file), fsynced, renamed over ``NAME``, and the directory fsynced. A directory is
filled as ``NAME.tmp/`` and published by renaming the old one to ``NAME.old/``, the new one in,
then removing the old. A kill -9 at any point leaves either the old or the new version
readable: ``recover`` (writers, before writing) drops a stale ``.tmp`` and brings back an
``.old`` whose replacement never arrived; ``readable`` (readers) finds the same version
without touching the disk.

Checkpoints keep the loader state as one global JSON document (``LOADER_STATE_FILE``) written
once by rank 0 beside torch DCP's tensor files; DCP content is read back with a reader that
allows only DCP's own metadata classes and tensors, so a crafted checkpoint cannot run code.
Every checkpoint directory carries ``CHECKSUMS_FILE``, the size and CRC-32 of each of its
files taken at save, checked at load: a truncated, damaged or missing file is a
``CheckpointFormatError`` naming it, never weights loaded silently wrong.
Top-level so that ``wf_data.data`` and ``wf_data.distributed`` (which must not import each
other) share it; torch is imported only by the DCP functions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import sys
import warnings
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from wf_data.extras import requires

__all__ = [
    "CHECKSUMS_FILE",
    "LOADER_STATE_FILE",
    "AtomicWriter",
    "CheckpointFormatError",
    "dcp_call",
    "finish_staging",
    "fsync_directory",
    "json_text",
    "load_dcp",
    "publish_directory",
    "publish_file",
    "read_json",
    "readable",
    "recover",
    "save_dcp",
    "staging_directory",
    "start_staging",
    "temp_files",
    "temp_path",
    "verify_checkpoint",
    "write_bytes",
    "write_checksums",
    "write_json",
    "write_npy",
    "write_text",
]

LOADER_STATE_FILE = "loader_state.json"
CHECKSUMS_FILE = "checksums.json"
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
_CHUNK = 8 << 20  # bytes read at a time when checksumming a file


class CheckpointFormatError(ValueError):
    """A checkpoint file is not what wf-data writes (corrupt, truncated or crafted)."""


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make renames and new entries in ``directory`` durable (they are not until it is synced)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def json_text(value: Any, where: str | os.PathLike, *, indent: int | None = None) -> str:
    """``value`` as canonical JSON text (sorted keys, no NaN); TypeError naming ``where`` if it
    is not JSON-safe.

    Without ``indent`` the text is compact ASCII, the form checkpoint digests are taken over;
    with it, laid out for people (manifests) and non-ASCII characters kept as they are.
    """
    try:
        if indent is None:
            return json.dumps(value, sort_keys=True, allow_nan=False)
        return json.dumps(value, sort_keys=True, allow_nan=False, indent=indent, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{where}: the value to save is not JSON-safe ({error}); JSON documents hold plain "
            "dicts, lists, str, int, finite float, bool and None"
        ) from error


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh sibling name for writing ``path``: ``NAME.PID-RANDOM.tmp``.

    Unique per call (pid and 64 random bits; a name only, the bytes written stay deterministic),
    so concurrent writers of one ``path`` never write into each other's temp file. It ends in
    ``.tmp`` so that cleanup of a killed run recognises it.
    """
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(8)}{TMP_SUFFIX}")


# What `temp_path` appends to a name: ".PID-RANDOM.tmp".
_TEMP_NAME = re.compile(r"\.[0-9]+-[0-9a-f]{16}" + re.escape(TMP_SUFFIX) + r"\Z")


def temp_files(directory: str | os.PathLike) -> list[Path]:
    """The temp files ``AtomicWriter`` writers left in ``directory`` (killed before their
    rename), sorted. Unique names are never reused, so whoever knows that no writer of the
    directory is still live deletes them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        entry for entry in directory.iterdir() if entry.is_file() and _TEMP_NAME.search(entry.name)
    )


def publish_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make the complete, closed file ``tmp`` the file ``path``: fsync it, rename it over
    ``path`` (atomic: readers see the old or the new file, never a mix), fsync the directory."""
    with open(tmp, "rb") as file:
        os.fsync(file.fileno())
    os.replace(tmp, path)
    fsync_directory(Path(path).parent)


class AtomicWriter:
    """A file for ``path`` that appears there complete or not at all.

    Writes go to ``temp_path(path)`` (``file``, opened with ``mode``: ``"wb"`` or ``"w"``);
    ``commit()`` publishes it (``publish_file``), ``discard()`` removes it. As a context
    manager it commits on a clean exit and discards on an exception, leaving ``path`` as it was.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "wb"):
        if mode not in ("wb", "w"):
            raise ValueError(f"AtomicWriter mode must be 'wb' or 'w', got {mode!r}")
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        # "x": never open a file another writer created, however unlikely the name clash.
        encoding = "utf-8" if mode == "w" else None
        self.file: IO[Any] = open(self.tmp, mode.replace("w", "x"), encoding=encoding)

    def commit(self) -> Path:
        """Flush and close the file and rename it over ``path``; returns ``path``. On an
        error (disk full at the flush) the temp file is removed and ``path`` is untouched."""
        try:
            self.file.close()
            publish_file(self.tmp, self.path)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        return self.path

    def discard(self) -> None:
        """Close and remove the temp file; ``path`` is untouched."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> IO[Any]:
        return self.file

    def __exit__(self, error_type: type | None, *_: Any) -> None:
        if error_type is None:
            self.commit()
        else:
            self.discard()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``AtomicWriter``)."""
    with AtomicWriter(path) as file:
        file.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (``AtomicWriter``)."""
    write_bytes(path, text.encode("utf-8"))


def write_npy(path: str | os.PathLike, array: Any) -> None:
    """Write ``array`` in ``.npy`` format to ``path`` atomically (``np.save``, no pickles)."""
    import numpy as np

    with AtomicWriter(path) as file:
        np.save(file, np.asarray(array), allow_pickle=False)


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = None) -> None:
    """Write ``value`` as canonical JSON (``json_text``) to ``path`` atomically
    (``AtomicWriter``); ``indent`` lays it out for people, one line per value and a final newline.

    Raises TypeError naming ``path`` when ``value`` is not JSON-safe (NaN included), before
    anything is written.
    """
    text = json_text(value, path, indent=indent)
    write_text(path, text if indent is None else text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document at ``path``; CheckpointFormatError naming the file if it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointFormatError(
            f"{path}: not a JSON document ({error}); the checkpoint is corrupt or was not written "
            "by wf-data: restore from an earlier one"
        ) from error


def recover(path: str | os.PathLike) -> None:
    """Finish or undo an interrupted ``publish_directory`` of ``path`` (writers call this).

    A leftover ``path.tmp`` is removed (never complete); ``path.old`` is renamed back when
    ``path`` is missing (killed between the two renames) and removed otherwise.
    """
    path = Path(path)
    shutil.rmtree(_sibling(path, TMP_SUFFIX), ignore_errors=True)
    old = _sibling(path, OLD_SUFFIX)
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, path)
            fsync_directory(path.parent)


def readable(path: str | os.PathLike) -> Path | None:
    """The complete version of ``path`` without changing the disk: ``path``, else a ``path.old``
    left by a publish killed between its renames, else None (readers call this)."""
    path = Path(path)
    for candidate in (path, _sibling(path, OLD_SUFFIX)):
        if candidate.exists():
            return candidate
    return None


def _fsync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
        fsync_directory(Path(root))


def publish_directory(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Replace directory ``path`` by the complete directory ``tmp``, keeping one of the two
    readable at every instant: fsync ``tmp``, rename ``path`` aside to ``path.old``, rename
    ``tmp`` in, fsync the parent, remove the old one."""
    tmp, path = Path(tmp), Path(path)
    _fsync_tree(tmp)
    old = _sibling(path, OLD_SUFFIX)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    fsync_directory(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def start_staging(path: str | os.PathLike) -> Path:
    """Recover ``path`` from an interrupted publish and return a fresh, empty ``path.tmp/``."""
    path = Path(path)
    recover(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, TMP_SUFFIX)
    tmp.mkdir()
    return tmp


def finish_staging(
    tmp: str | os.PathLike,
    path: str | os.PathLike,
    documents: Mapping[str, Any] | None = None,
    checksums: Mapping[str, Any] | None = None,
) -> None:
    """Write the JSON ``documents`` (``{file name: value}``) and the ``CHECKSUMS_FILE`` of
    every file into ``tmp`` (``write_checksums``, taking those already in ``checksums``), then
    publish it as ``path`` (``publish_directory``)."""
    for name, value in (documents or {}).items():
        write_json(Path(tmp) / name, value)
    write_checksums(tmp, checksums)
    publish_directory(tmp, path)


@contextlib.contextmanager
def staging_directory(
    path: str | os.PathLike,
    documents: Mapping[str, Any] | None = None,
    *,
    primary: bool = True,
    checksums: Mapping[str, Any] | None = None,
) -> Iterator[Path]:
    """Yield an empty ``path.tmp/`` to fill; on a clean exit the JSON ``documents`` and the
    checksums are added and it replaces ``path`` atomically (``finish_staging``).

    With several processes only the ``primary`` one prepares and publishes; the caller keeps
    the others in step (barriers) and they only write into the yielded directory. The caller
    may fill ``checksums`` (a dict) inside the block with those of files it already knows. An
    exception removes the partial directory and leaves ``path`` as it was.
    """
    tmp = start_staging(path) if primary else _sibling(Path(path), TMP_SUFFIX)
    try:
        yield tmp
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if primary:
        finish_staging(tmp, path, documents, checksums)


# ------------------------------------------------------------------------------ checksums


def file_checksum(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "crc32": 8 hex digits}`` of the file at ``path``.

    CRC-32 (zlib, in the standard library) detects accidental damage (every burst of up to 32
    flipped bits, any other change but for 1 in 4e9) at about twice the speed of SHA-256 here;
    anyone who can rewrite a file can rewrite the manifest too, so a cryptographic hash would
    buy nothing more.
    """
    crc, size = 0, 0
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def _files(directory: Path) -> list[str]:
    """Relative POSIX paths of the files below ``directory``, but the manifest, sorted."""
    return sorted(
        entry.relative_to(directory).as_posix()
        for entry in directory.rglob("*")
        if entry.is_file() and entry.name != CHECKSUMS_FILE
    )


def write_checksums(
    directory: str | os.PathLike,
    known: Mapping[str, Any] | None = None,
    names: list[str] | None = None,
) -> None:
    """Write ``CHECKSUMS_FILE`` into ``directory``: the ``file_checksum`` of each of ``names``
    (default: every file below it), taken from ``known`` where given (ranks checksum their
    share of the files)."""
    directory = Path(directory)
    known = known or {}
    files = {
        name: known.get(name) or file_checksum(directory / name)
        for name in (_files(directory) if names is None else names)
    }
    write_json(directory / CHECKSUMS_FILE, {"algorithm": "crc32", "files": files})


def verify_checkpoint(directory: str | os.PathLike, *, collective: bool = True) -> bool:
    """Check every file of checkpoint ``directory`` against its ``CHECKSUMS_FILE``.

    Raises ``CheckpointFormatError`` naming each file that is missing, of another size or
    another checksum (truncated, damaged). Returns False, with a warning, for a checkpoint
    saved before wf-data wrote checksums: it loads unverified. With an initialised torch
    process group and ``collective``, every rank calls it and checks its share of the files.
    """
    directory = Path(directory)
    manifest_path = directory / CHECKSUMS_FILE
    if not manifest_path.is_file():
        warnings.warn(
            f"checkpoint {directory} has no {CHECKSUMS_FILE} (saved by a wf-data version "
            "before checkpoints carried checksums): its files load unverified; save it again "
            "to protect it",
            UserWarning,
            stacklevel=2,
        )
        return False
    files = _manifest_files(manifest_path)
    rank, world = (_rank(), _world_size()) if collective and _distributed() else (0, 1)
    problems = [_file_problem(directory, name, files[name]) for name in sorted(files)[rank::world]]
    problems = [problem for problem in problems if problem]
    if world > 1:
        problems = [problem for share in _all_gather(problems) for problem in share]
    if problems:
        raise CheckpointFormatError(
            f"checkpoint {directory} is damaged: " + "; ".join(problems) + ". Restore from "
            "another checkpoint (or a copy of this one); these files were not loaded"
        )
    return True


def _manifest_files(manifest_path: Path) -> dict[str, Mapping[str, Any]]:
    manifest = read_json(manifest_path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or manifest.get("algorithm") != "crc32"
        or not all(
            isinstance(entry, dict) and {"size", "crc32"} <= set(entry) for entry in files.values()
        )
    ):
        raise CheckpointFormatError(
            f"{manifest_path}: expected {{'algorithm': 'crc32', 'files': {{name: {{'size', "
            f"'crc32'}}}}}}, got {str(manifest)[:200]}; the manifest is damaged"
        )
    return files


def _file_problem(directory: Path, name: str, expected: Mapping[str, Any]) -> str | None:
    """What is wrong with file ``name`` of ``directory`` against its manifest entry, or None."""
    path = directory / name
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{path} has {size} bytes, {expected['size']} were saved (truncated or replaced)"
    found = file_checksum(path)["crc32"]
    if found != expected["crc32"]:
        return f"{path} has CRC-32 {found}, {expected['crc32']} was saved (damaged on disk)"
    return None


# ------------------------------------------------------------------------------ torch DCP


def _distributed() -> bool:
    # Without torch imported no process group can exist: JAX-only users never import it here.
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _distributed() else 1


def _all_gather(value: Any) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _checksum_share(directory: Path) -> dict[str, Any]:
    """The ``file_checksum`` of every file of ``directory``, each rank computing its share:
    a save of N ranks reads its files back once, spread over the ranks."""
    names = _files(directory)
    rank, world = _rank(), _world_size()
    mine = {name: file_checksum(directory / name) for name in names[rank::world]}
    if world == 1:
        return mine
    return {name: entry for share in _all_gather(mine) for name, entry in share.items()}


def _barrier() -> None:
    import torch.distributed as dist

    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def dcp_call() -> Iterator[bool]:
    """Context for a DCP call: silences its single-process warning, yields `no_dist`."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield not _distributed()


def save_dcp(
    path: str | os.PathLike, state: Mapping[str, Any], documents: Mapping[str, Any] | None = None
) -> Path:
    """Save ``state`` with ``torch.distributed.checkpoint`` and the JSON ``documents``
    (``{file name: JSON-safe value}``, written by rank 0 only) as directory ``path``, atomically.

    Every rank calls it (or one process alone). ``path`` appears complete or not at all, and a
    previous ``path`` survives until the new one is published. Returns ``path``.
    """
    with requires("torch", feature="save_dcp"):
        import torch.distributed.checkpoint as dcp

    path = Path(path)
    for name, value in (documents or {}).items():
        json_text(value, path / name)  # fail before writing anything, on every rank alike
    checksums: dict[str, Any] = {}
    with staging_directory(path, documents, primary=_rank() == 0, checksums=checksums) as tmp:
        _barrier()  # the directory exists before any rank writes into it
        with dcp_call() as no_dist:
            dcp.save(dict(state), checkpoint_id=str(tmp), no_dist=no_dist)
        # dcp.save returns only after every rank's data and .metadata are written (rank 0
        # gathers the write results, writes .metadata, and tells the others), so the files are
        # complete now: checksum them, and publish a whole checkpoint.
        checksums.update(_checksum_share(tmp))
    _barrier()
    return path


def load_dcp(path: str | os.PathLike, state: dict[str, Any], *, verify: bool = True) -> None:
    """Load ``state`` in place from a DCP checkpoint directory, unpickling nothing unsafe.

    The files are first checked against their checksums (``verify_checkpoint``; ``verify=False``
    when the caller did). DCP stores its metadata and non-tensor values as pickles: they are
    read with an unpickler that admits only DCP's metadata classes and torch's
    ``weights_only`` types, so a crafted file raises CheckpointFormatError instead of running
    code. Any other failure to read it (DCP's ``CheckpointException``, a ``BaseException``) is
    a CheckpointFormatError too, naming ``path``.
    """
    with requires("torch", feature="load_dcp"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

    if verify:
        verify_checkpoint(path)
    reader, planner = _safe_dcp_types()
    reader(os.fspath(path)).read_metadata()  # refuse a crafted .metadata before DCP wraps errors
    try:
        with dcp_call() as no_dist:
            dcp.load(
                state, storage_reader=reader(os.fspath(path)), planner=planner(), no_dist=no_dist
            )
    except CheckpointException as error:
        causes = [
            failure[0] if isinstance(failure, tuple) else failure  # (error, traceback)
            for failure in error.failures.values()
        ]
        named = [cause for cause in causes if isinstance(cause, CheckpointFormatError)]
        detail = named[0] if named else "; ".join(f"{type(c).__name__}: {c}" for c in causes)
        raise CheckpointFormatError(
            f"{path}: torch.distributed.checkpoint could not load it ({detail}); the checkpoint "
            "is damaged or does not hold this state: restore from another one"
        ) from error


# DCP's .metadata pickle references these globals and nothing else (torch 2.x); torch dtypes
# are admitted by type in RestrictedUnpickler.
_DCP_METADATA_GLOBALS = {
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.metadata": {
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
}


@functools.cache
def _safe_dcp_types() -> tuple[type, type]:
    """``(reader class, load planner class)``, built on first use so that importing this module
    does not import torch."""
    import io
    import pickle

    import torch
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class RestrictedUnpickler(pickle.Unpickler):
        def __init__(self, file, where: str):
            super().__init__(file)
            self.where = where

        def find_class(self, module: str, name: str) -> Any:
            allowed = name in _DCP_METADATA_GLOBALS.get(module, ())
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                allowed = True
            if not allowed:
                raise CheckpointFormatError(
                    f"{self.where}: refers to {module}.{name}, which DCP metadata never holds; "
                    "the checkpoint was crafted or corrupted and is not loaded (nothing in it "
                    "was run)"
                )
            return super().find_class(module, name)

    class SafeFileSystemReader(FileSystemReader):
        """Reads ``.metadata`` with ``RestrictedUnpickler`` instead of ``pickle.load``."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            path = Path(os.fspath(self.path)) / (
                ".metadata" if rank is None else f"__{rank}.metadata"
            )
            with open(path, "rb") as file:
                try:
                    metadata = RestrictedUnpickler(file, str(path)).load()
                except CheckpointFormatError:
                    raise
                except Exception as error:
                    raise CheckpointFormatError(
                        f"{path}: unreadable DCP metadata ({type(error).__name__}: {error}); "
                        "the checkpoint is corrupt: restore from an earlier one"
                    ) from error
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        """Non-tensor values (optimizer hyper-parameters) load with ``weights_only=True``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                checked = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as error:
                raise CheckpointFormatError(
                    f"checkpoint value {read_item.dest_index.fqn!r} holds a type that "
                    f"torch.load(weights_only=True) refuses; it is not loaded: {error}"
                ) from error
            # The parent class unpickles without restriction: hand it a re-serialisation of
            # the value that passed the weights_only check, never the bytes from disk.
            buffer = io.BytesIO()
            torch.save(checked, buffer)
            buffer.seek(0)
            super().load_bytes(read_item, buffer)

    return SafeFileSystemReader, WeightsOnlyLoadPlanner
