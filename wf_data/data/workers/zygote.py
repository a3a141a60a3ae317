"""A pre-started process that forks worker processes on request: pools start in ms.

A fresh interpreter costs a worker ~0.25 s of CPU (mostly importing numpy), paid again at
every pool start (a loader reset, a restore, a worker death) and by every worker at once on
a busy machine. The zygote pays it once: a clean interpreter, started on first use, that
imports the worker entry point it is told (``"module:function"``, with numpy) and never runs
anything else, so forking it is safe (no threads but its parent watch, no open readers;
unlike forking the trainer).

Requests come over a ``SOCK_SEQPACKET`` socket, after the zygote's "ready": ``spawn``
carries the worker's three fds (``SCM_RIGHTS``) and returns its pid; ``reap`` waits for a
worker and returns its exit code. A zygote that does not answer in time is killed.
The zygote does not reap on its own, so a dead worker stays a zombie until ``reap``: its pid
cannot be reused while this process holds a pidfd on it. The zygote and its workers die with
this process (:mod:`wf_data.data.workers.lifetime`). Linux only.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import traceback

from wf_data.data.workers.fd_wait import ready
from wf_data.data.workers.lifetime import die_with_parent, run_in_launcher_thread

# The directory holding the `wf_data` package (this file is wf_data/data/workers/zygote.py).
_PACKAGE_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 3))
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from wf_data.data.workers.zygote import zygote_main; zygote_main(sys.argv[2:])"
)
_MAX_MESSAGE = 1 << 20  # a spawn request carries the environment
_MAX_FDS = 16  # descriptors a spawn request may pass to its worker
# A reap follows the worker's exit, so only a stuck zygote takes long; the bound of pools that
# wait forever for their workers (timeout_s=None): reaping is not computing.
DEFAULT_REAP_TIMEOUT_S = 60.0
_START_TIMEOUT_S = 60.0  # at least, for its imports on a busy machine (a few seconds at worst)
STATUS_LOST = 255  # exit code reported for a worker whose zygote died before reaping it


class Worker:
    """A process forked by the zygote, with the part of ``subprocess.Popen`` pools use.

    ``reap_timeout_s`` bounds the zygote's answer when the worker has exited; a zygote that
    misses it is killed, and ``zygote_error`` says so (the exit status is then read from
    ``/proc`` where the kernel shows it, else lost: ``STATUS_LOST``).
    """

    def __init__(self, zygote: Zygote, pid: int, reap_timeout_s: float):
        self._zygote = zygote
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        self._reap_timeout_s = reap_timeout_s
        self.returncode: int | None = None
        self.zygote_error: str | None = None

    def poll(self) -> int | None:
        """The exit code (negative: killed by that signal) once exited, else None."""
        return self.wait(timeout=0) if self.returncode is None else self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """Waits until the worker exits; ``subprocess.TimeoutExpired`` after ``timeout`` s."""
        if self.returncode is not None:
            return self.returncode
        if not ready([self._pidfd], timeout_s=timeout):
            if timeout == 0:
                return None
            raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout)
        # Read while the zombie is certainly there: the zygote may be stuck and killed below.
        seen_status = _zombie_exit_code(self.pid)
        try:
            self.returncode = self._zygote.reap(self.pid, self._reap_timeout_s)
        except (OSError, RuntimeError) as error:
            self.zygote_error = str(error)
            self.returncode = STATUS_LOST if seen_status is None else seen_status
        os.close(self._pidfd)
        self._pidfd = -1
        return self.returncode

    def fileno(self) -> int:
        """The pidfd, readable once the worker exited (for ``poll``); only until reaped."""
        if self._pidfd < 0:
            raise ValueError(f"worker pid {self.pid} was reaped: its pidfd is closed")
        return self._pidfd

    def kill(self) -> None:
        """SIGKILL through the pidfd: never hits a process that reused the pid."""
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)


def _zombie_exit_code(pid: int) -> int | None:
    """The exit code of zombie ``pid`` as ``Popen`` gives it, from the last field of
    ``/proc/PID/stat`` (Linux >= 3.5), or None where unknown. The kernel shows 0 there to
    processes it does not let inspect ``pid``, so 0 counts as unknown."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        status = int(fields[-1])
        return os.waitstatus_to_exitcode(status) if status else None
    except (OSError, IndexError, ValueError):
        return None


class Zygote:
    """Handle on a zygote process that forks workers running ``entry`` (``"module:function"``,
    called with the worker's argv); one per entry and process (:func:`zygote`), thread-safe."""

    def __init__(self, entry: str):
        self.entry = entry
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = run_in_launcher_thread(_start, entry, theirs.fileno())
        finally:
            theirs.close()
        self._socket = ours
        self._lock = threading.Lock()
        self._ready = False  # the zygote says "ready" once it has imported the worker loop
        # Set once a request finds the zygote gone: its socket closes before it can be reaped,
        # so `poll()` alone would hand a dying zygote to the next pool start.
        self._gone = False

    @property
    def pid(self) -> int:
        """The zygote's process id."""
        return self._process.pid

    def alive(self) -> bool:
        """Whether the zygote process still runs and answers."""
        return not self._gone and self._process.poll() is None

    def spawn(self, fds: tuple[int, ...], timeout_s: float | None = None) -> Worker:
        """Forks a worker that runs the entry with argv ``[this pid, *fds]``; the fds are passed
        to it (closed in the zygote).

        A zygote that does not answer within ``timeout_s`` (stuck importing on a hung
        filesystem, stopped) is killed, and a RuntimeError says so; the next call starts anew.
        The same bound applies when the worker is reaped (``DEFAULT_REAP_TIMEOUT_S`` for None).
        """
        context = (os.getpid(), dict(os.environ), os.getcwd())  # as of now, not zygote start
        pid = self._request(("spawn", context), fds, timeout_s)
        return Worker(self, pid, DEFAULT_REAP_TIMEOUT_S if timeout_s is None else timeout_s)

    def reap(self, pid: int, timeout_s: float = DEFAULT_REAP_TIMEOUT_S) -> int:
        """The exit code of exited worker ``pid`` (negative: the signal that killed it)."""
        return self._request(("reap", pid), timeout_s=timeout_s)

    def _request(self, message, fds=(), timeout_s: float | None = None):
        with self._lock:
            if not self._ready:
                start_timeout_s = None if timeout_s is None else max(timeout_s, _START_TIMEOUT_S)
                self._reply("start", start_timeout_s)
                self._ready = True
            try:
                socket.send_fds(self._socket, [pickle.dumps(message)], list(fds))
            except OSError as error:
                self._gone = True
                raise RuntimeError(
                    f"the ProcessMap zygote (pid {self._process.pid}) is gone ({error})"
                ) from error
            return self._reply(message[0], timeout_s)

    def _reply(self, what: str, timeout_s: float | None):
        if not ready([self._socket.fileno()], timeout_s=timeout_s):
            self._gone = True
            self._process.kill()
            self._process.wait()
            raise RuntimeError(
                f"the ProcessMap zygote (pid {self._process.pid}) did not answer its {what} "
                f"within {timeout_s:g} s (stopped, or stuck on a hung filesystem) and was "
                f"killed; the next pool start forks from a new one"
            )
        try:
            reply = self._socket.recv(_MAX_MESSAGE)
        except OSError:  # ECONNRESET: the zygote died
            reply = b""
        if not reply:
            self._gone = True
            raise RuntimeError(
                f"the ProcessMap zygote (pid {self._process.pid}) exited: "
                f"code {self._process.poll()}"
            )
        status, value = pickle.loads(reply)  # ipc-pickle
        if status != "ok":
            raise RuntimeError(f"the ProcessMap zygote failed: {value}")
        return value


def _start(entry: str, child_fd: int) -> subprocess.Popen:
    argv = [_PACKAGE_ROOT, str(os.getpid()), str(child_fd), entry]
    return subprocess.Popen(
        [sys.executable, "-c", _BOOTSTRAP, *argv], stdin=subprocess.DEVNULL, pass_fds=(child_fd,)
    )


_ZYGOTES: dict[str, Zygote] = {}
_ZYGOTE_LOCK = threading.Lock()


def zygote(entry: str) -> Zygote:
    """This process's zygote for workers running ``entry`` (``"module:function"``), started
    (or restarted, if it died) on demand."""
    with _ZYGOTE_LOCK:
        found = _ZYGOTES.get(entry)
        if found is None or not found.alive():
            found = _ZYGOTES[entry] = Zygote(entry)
        return found


def _forget_zygote() -> None:
    # A forked child must start its own zygotes: these answer only their creator.
    global _ZYGOTES, _ZYGOTE_LOCK
    _ZYGOTES, _ZYGOTE_LOCK = {}, threading.Lock()


os.register_at_fork(after_in_child=_forget_zygote)


def zygote_main(argv: list[str]) -> None:
    """Entry point of the zygote: ``argv`` = the pid it serves, its socket fd and the workers'
    entry point ``"module:function"``."""
    owner_pid, socket_fd, entry = int(argv[0]), int(argv[1]), argv[2]
    die_with_parent(owner_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    module, _, function = entry.partition(":")
    worker_main = getattr(importlib.import_module(module), function)  # inherited by each worker

    requests = socket.socket(fileno=socket_fd)
    requests.send(pickle.dumps(("ok", "ready")))
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(requests, _MAX_MESSAGE, _MAX_FDS)
        except OSError:
            return
        if not data:
            return  # the owner closed the socket or died
        kind, value = pickle.loads(data)  # ipc-pickle
        try:
            if kind == "spawn":
                pid = os.fork()
                if pid == 0:
                    requests.close()
                    owner, environ, cwd = value
                    os.environ.clear()
                    os.environ.update(environ)
                    os.chdir(cwd)
                    _run_worker(worker_main, [str(owner), *map(str, fds)])
                for fd in fds:
                    os.close(fd)
                reply = ("ok", pid)
            else:
                reply = ("ok", os.waitstatus_to_exitcode(os.waitpid(value, 0)[1]))
        except Exception as error:
            reply = ("error", f"{type(error).__name__}: {error}")
        requests.send(pickle.dumps(reply))


def _run_worker(worker_main, argv: list[str]) -> None:
    """Runs a forked worker to its end and exits with its code, never returning."""
    code = 1
    try:
        worker_main(argv)
        code = 0
    except SystemExit as exit_request:
        code = exit_request.code if isinstance(exit_request.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
