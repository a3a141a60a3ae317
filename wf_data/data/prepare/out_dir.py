"""Where `prepare` builds a dataset, and how the result takes the place of `--out` atomically.

A dataset for `DIR` is built in the hidden sibling `.DIR.wf-building/` (its shards, lengths,
manifest and, under `.wf-prepare/`, the resumable work) and becomes `DIR` in one step once
complete: an atomic exchange of the two directories (Linux `renameat2(RENAME_EXCHANGE)`), or
where that is missing two renames through `.DIR.wf-replaced/`, which `recover` completes or
undoes after a kill between them. Until that step the dataset already in `DIR` is untouched
and readable; a failed or killed build leaves it as it was.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pathlib
import shutil
import sys

from wf_data import atomic
from wf_data.data.shards import sources

WORK_DIR_NAME = ".wf-prepare"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2

__all__ = [
    "OutDirError",
    "build_dir",
    "dataset_files_only",
    "prepare_out_dir",
    "recover",
    "swap_in",
]


class OutDirError(ValueError):
    """`--out` cannot receive the dataset (not writable, holds other files, or another
    dataset without `overwrite`); the message names the directory and the fix."""


def build_dir(out_dir: pathlib.Path) -> pathlib.Path:
    """The hidden sibling where the dataset for `out_dir` is built: `.NAME.wf-building`."""
    return out_dir.parent / f".{out_dir.name}.wf-building"


def replaced_dir(out_dir: pathlib.Path) -> pathlib.Path:
    """Where the old dataset goes during a two-rename swap: `.NAME.wf-replaced`."""
    return out_dir.parent / f".{out_dir.name}.wf-replaced"


def _is_dataset_file(name: str) -> bool:
    return name in (
        sources.MANIFEST_NAME,
        sources.LENGTHS_NAME,
        sources.OFFSETS_NAME,
        sources.CRC_NAME,
        WORK_DIR_NAME,
        "skipped.jsonl",
    ) or name.endswith((".array_record", ".tmp"))


def dataset_files_only(out_dir: pathlib.Path) -> bool:
    """Whether `out_dir` exists and holds only what `prepare` writes (False when empty).

    Raises `OutDirError` for a file that `prepare` never writes: replacing the directory
    would delete it, so no option allows that.
    """
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise OutDirError(f"--out {out_dir}: exists and is not a directory; choose another --out")
    names = sorted(entry.name for entry in out_dir.iterdir())
    foreign = [name for name in names if not _is_dataset_file(name)]
    if foreign:
        raise OutDirError(
            f"--out {out_dir}: holds files prepare did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty directory"
        )
    return bool(names)


def prepare_out_dir(out_dir: pathlib.Path) -> None:
    """Finish an interrupted swap, check `out_dir` can be replaced, create its parent."""
    create_parent(out_dir)
    recover(out_dir)
    # The build goes beside out_dir, and renaming a directory rewrites its ".." entry.
    for directory in (out_dir.parent, out_dir):
        if directory.exists() and not os.access(directory, os.W_OK | os.X_OK):
            raise OutDirError(
                f"--out {out_dir}: {directory} is not writable; choose a writable --out or "
                f"make it writable (chmod u+w {directory})"
            )


def create_parent(out_dir: pathlib.Path) -> None:
    """Create the directory `out_dir` goes in; `OutDirError` if it cannot be."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutDirError(
            f"--out {out_dir}: cannot create {out_dir.parent} ({error.strerror}); choose a "
            "writable location"
        ) from None


def recover(out_dir: pathlib.Path) -> None:
    """Complete or undo a two-rename swap a kill interrupted, and drop a replaced dataset."""
    replaced = replaced_dir(out_dir)
    if not replaced.exists():
        return
    if not out_dir.exists():  # killed between the two renames
        build = build_dir(out_dir)
        finished = (build / sources.MANIFEST_NAME).exists()
        os.replace(build if finished else replaced, out_dir)
        if not finished:
            return
    shutil.rmtree(replaced)


def swap_in(build: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Make the finished dataset in `build` the content of `out_dir`; the old one is deleted.

    `out_dir` absent or empty: one rename. Else one atomic exchange where the system has it,
    or two renames (`recover` repairs a kill between them).
    """
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        os.replace(build, out_dir)
    else:
        replaced = replaced_dir(out_dir)
        if _exchange(build, out_dir):
            os.replace(build, replaced)  # build now holds the old dataset
        else:
            os.replace(out_dir, replaced)
            os.replace(build, out_dir)
        shutil.rmtree(replaced)
    atomic.fsync_directory(out_dir.parent)


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc older than 2.28
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a file system without exchange
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))
