"""One prepare at a time writes a dataset, and a failed write says why in one line.

`writing(DIR)` holds an exclusive lock (flock) on the file `.DIR.wf-lock` beside `DIR` while
a prepare builds it (the kernel drops the lock when the process ends, a kill -9 included) and
turns a write that fails there (a full disk, a read-only file system, a file size limit),
whichever library raised it, into an `OutDirError` naming the file, the reason and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import pathlib
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from wf_data.data.prepare.out_dir import OutDirError, build_dir, create_parent, replaced_dir

__all__ = ["holding_lock", "lock_path", "write_failure", "writing"]


def lock_path(out_dir: pathlib.Path) -> pathlib.Path:
    """The lock file of `out_dir`'s build (`writing`): `.NAME.wf-lock` beside it."""
    return out_dir.parent / f".{out_dir.name}.wf-lock"


def holding_lock(run: Callable[..., dict]) -> Callable[..., dict]:
    """`run(inputs, out_dir, ...)` (a prepare runner) inside `writing(out_dir)`."""

    @functools.wraps(run)
    def holding(inputs: Any, out_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> dict:
        with writing(out_dir):
            return run(inputs, out_dir, *args, **kwargs)

    return holding


@contextlib.contextmanager
def writing(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold `out_dir`'s build lock while building it; a write that fails there is an
    `OutDirError` (`write_failure`).

    Creates the parent of `out_dir`. Another prepare holding the lock is an `OutDirError`
    naming its pid, at once: two builds of one dataset would delete each other's files, and
    a run that waited could sit behind a stuck one without a word.
    """
    out_dir = pathlib.Path(os.path.realpath(out_dir))  # as `prepare` resolves it
    create_parent(out_dir)
    with _failed_writes_named(out_dir):
        lock = _lock(out_dir)
        try:
            yield
        finally:
            # Unlinked while held: a prepare that opened it meanwhile sees it is stale (`_lock`).
            lock_path(out_dir).unlink(missing_ok=True)
            os.close(lock)


@contextlib.contextmanager
def _failed_writes_named(out_dir: pathlib.Path) -> Iterator[None]:
    try:
        yield
    except (OSError, RuntimeError) as error:
        failure = write_failure(error, out_dir)
        if failure is None:
            raise
        raise failure from error


def _lock(out_dir: pathlib.Path) -> int:
    """A descriptor of `out_dir`'s lock file, locked (flock) with this pid written in it."""
    path = lock_path(out_dir)
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutDirError(
                f"--out {out_dir}: cannot create the lock file {path} ({error.strerror}); "
                "choose a writable --out"
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(descriptor)
            os.close(descriptor)
            raise OutDirError(
                f"--out {out_dir}: another prepare ({holder}) is writing this dataset (it holds "
                f"{path}); wait for it to end, or stop it and run again (a re-run resumes its "
                "work)"
            ) from None
        try:  # the holder we waited for may have unlinked it: lock the file now at `path`
            same = os.path.samestat(os.stat(path), os.fstat(descriptor))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            return descriptor
        os.close(descriptor)


def _lock_holder(descriptor: int, wait_s: float = 1.0) -> str:
    """`pid N` of the lock's holder, read from the file (written just after it locked)."""
    deadline = time.monotonic() + wait_s
    while True:
        text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return f"pid {text}"
        if time.monotonic() > deadline:
            return "pid unknown"
        time.sleep(0.01)


# What a failed write says, and what to do about it.
_WRITE_FIXES = {
    errno.ENOSPC: "free space on its file system, or choose another --out",
    errno.EDQUOT: "free space within your disk quota, or choose another --out",
    errno.EFBIG: "a file grew over the file size limit (ulimit -f) or the file system's "
    "largest file: raise the limit or choose another --out",
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.EACCES: "no permission to write there: make it writable or choose another --out",
    errno.EPERM: "no permission to write there: make it writable or choose another --out",
}
_STRERROR_CODES = {os.strerror(code): code for code in errno.errorcode}
# Riegeli (under array_record) reports a failed system call as a RuntimeError:
# "write() failed: No space left on device; writing PATH; at byte N; ...".
_RIEGELI_FAILURE = re.compile(r"\w+\(\) failed: (?P<reason>[^;]+); \w+ (?P<path>[^;]+)")


def write_failure(error: BaseException, out_dir: pathlib.Path) -> OutDirError | None:
    """The `OutDirError` for `error` if it is a failed write (or read back) of the dataset's
    files beside `out_dir` (an `OSError`, or a library's RuntimeError carrying one); else None.

    A failure without a file name counts when its errno is only ever a write's (ENOSPC,
    EDQUOT, EFBIG, EROFS): Python reports a full disk at a file's flush that way.
    """
    path: str | None
    if isinstance(error, OSError):
        code, reason, path = error.errno, error.strerror or str(error), error.filename
    else:
        match = _RIEGELI_FAILURE.search(str(error))
        if match is None:
            return None
        reason, path = match["reason"], match["path"]
        code = _STRERROR_CODES.get(reason)
    if path is not None:
        if not _beside(pathlib.Path(os.fspath(path)), out_dir):
            return None
    elif code not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return None
    name = f" ({errno.errorcode[code]})" if code in errno.errorcode else ""
    fix = _WRITE_FIXES.get(code or 0, "check the file system of --out")
    build = build_dir(out_dir)
    kept = (
        f"; a re-run resumes the work kept in {build} (delete it to free its space)"
        if build.exists()
        else ""
    )
    return OutDirError(
        f"--out {out_dir}: cannot write {path or 'the dataset'}: {reason}{name}; {fix}. The "
        f"dataset in --out is unchanged{kept}"
    )


def _beside(path: pathlib.Path, out_dir: pathlib.Path) -> bool:
    """Whether `path` is `out_dir`, its parent, or in one of the hidden siblings prepare
    writes (the build, the replaced dataset, the lock)."""
    if path == out_dir.parent:
        return True
    homes = (out_dir, build_dir(out_dir), replaced_dir(out_dir), lock_path(out_dir))
    return any(path == home or home in path.parents for home in homes)
