"""Make a child process die with its parent, so that a ``kill -9`` leaves no orphans.

Two mechanisms, because each has a hole the other covers:

- Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``): the kernel signals the child at
  once when its parent dies. It fires when the *thread* that forked the child exits, not the
  process, so a child forked from a short-lived thread is killed too early; fork from the main
  thread or from :func:`run_in_launcher_thread`. It also only watches the direct parent, which
  is a forkserver, not the main process, for ``forkserver`` pools.
- A watch thread in the child that waits on a pidfd of the process to outlive (or polls
  ``os.getppid()`` where pidfds are missing) and kills the child when that process exits.

Use it first thing in the child: ``die_with_parent(main_pid)`` (e.g. as the ``initializer``
of a ``ProcessPoolExecutor``, with ``initargs=(os.getpid(),)`` evaluated in the parent).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

from wf_data.data.workers.fd_wait import ready

_PR_SET_PDEATHSIG = 1
T = TypeVar("T")


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits.

    Returns False where ``prctl`` is unavailable (not Linux); the caller then relies on a watch.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG, {int(sig)}) failed: {os.strerror(errno)}")
    return True


def process_exited(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie counts as exited); never blocks."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as stat:
            # The state letter follows the parenthesised command name, which may hold spaces.
            state = stat.read().rsplit(b")", 1)[1].split()[0]
        return state in (b"Z", b"X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def die_with_parent(
    parent_pid: int | None = None,
    *,
    sig: int = signal.SIGKILL,
    pdeathsig: bool = True,
    poll_s: float = 0.5,
) -> None:
    """Kill this process with ``sig`` as soon as process ``parent_pid`` exits.

    ``parent_pid`` is the process to outlive, read in the parent before starting the child
    (``os.getpid()`` there): passing it closes the race where the parent dies before this call.
    It may be the direct parent or a grand-parent (a forkserver's client). ``None`` means the
    current direct parent. ``pdeathsig=False`` skips the kernel signal, for children forked from
    a thread that may end before the parent does; the watch thread still applies.
    """
    direct_parent = os.getppid()
    owner = direct_parent if parent_pid is None else int(parent_pid)
    if pdeathsig:
        set_parent_death_signal(sig)
    # Checked after prctl: a parent that died before it is gone now, one that dies after it
    # triggers the signal (direct parent) or the watch (grand-parent).
    if os.getppid() != direct_parent or process_exited(owner):
        _die(sig)
    threading.Thread(
        target=_watch, args=(owner, sig, poll_s), name="wf-data-die-with-parent", daemon=True
    ).start()


def _watch(owner: int, sig: int, poll_s: float) -> None:
    try:
        pidfd = os.pidfd_open(owner)
    except ProcessLookupError:
        _die(sig)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        ready([pidfd])  # readable once ``owner`` has exited
        _die(sig)
    while not process_exited(owner):
        threading.Event().wait(poll_s)
    _die(sig)


def _die(sig: int) -> None:
    os.kill(os.getpid(), sig)
    os._exit(128 + int(sig))


_LAUNCHER: concurrent.futures.ThreadPoolExecutor | None = None
_LAUNCHER_LOCK = threading.Lock()


def _forget_launcher() -> None:
    # A forked child has no launcher thread: only the forking thread survives a fork.
    global _LAUNCHER, _LAUNCHER_LOCK
    _LAUNCHER, _LAUNCHER_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_launcher)


def run_in_launcher_thread(fn: Callable[..., T], *args) -> T:
    """Run ``fn(*args)`` in a thread that lives as long as the process, and return its result.

    Start child processes through this when the calling thread may exit before the process
    does (a prefetch thread, a torch pin-memory thread): the parent-death signal of a child
    fires when the thread that forked it exits. In the main thread it just calls ``fn``.
    """
    global _LAUNCHER
    if threading.current_thread() is threading.main_thread():
        return fn(*args)
    with _LAUNCHER_LOCK:
        if _LAUNCHER is None:
            _LAUNCHER = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="wf-data-launcher"
            )
    return _LAUNCHER.submit(fn, *args).result()
