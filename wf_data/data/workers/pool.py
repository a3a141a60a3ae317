"""Worker processes for ``ProcessMap``: ordered tasks in, shared-memory results out.

Workers are forked by this process's zygote (:mod:`wf_data.data.workers.zygote`, a clean
interpreter that imported numpy and this module once), never from this process with its
threads and open readers; each imports only the module of ``fn`` on top, so a pool starts in
milliseconds once the zygote runs. Per worker: a task pipe, a result pipe and a
:mod:`wf_data.data.workers.shm_ring` shared file. Tasks go round-robin; each worker handles
its tasks in order, so the result of a task is the next message on its worker's pipe and no
reordering is needed. Workers die with this process (:mod:`wf_data.data.workers.lifetime`)
and leave no named resource behind. Linux only (memfd, pidfd, parent-death signal).
"""

from __future__ import annotations

import collections
import functools
import inspect
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
import weakref
from dataclasses import dataclass, field

import numpy as np

from wf_data.data.workers.fd_wait import MAX_WAIT_S, ready
from wf_data.data.workers.lifetime import die_with_parent
from wf_data.data.workers.shm_ring import (
    HEADER_SIZE,
    SlotReader,
    SlotWriter,
    check_result,
    frame_message,
    payload_length,
    receive_message,
    send_message,
)
from wf_data.data.workers.zygote import STATUS_LOST, Worker, Zygote, zygote

_CLOSE_GRACE_S = 0.2
DEFAULT_TIMEOUT_S = 300.0  # far above a healthy read, even a slow network one; see README
# What the zygote runs in each worker it forks: named, so that the zygote imports this module
# by name and this module imports the zygote, not the other way round.
WORKER_ENTRY = f"{__name__}:worker_main"


class WorkerError(RuntimeError):
    """A ProcessMap worker process died (killed, crashed, out of memory) before answering, or
    sent nothing for ``timeout_s`` seconds and was killed (stuck in ``fn``).

    The iterator's state still describes the last element it delivered: restore a new
    iterator from ``get_state()``, or call ``next()`` again to restart the pool.
    """


class RemoteTraceback(Exception):
    """The traceback text of an exception raised by ``fn`` in a worker process."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


@dataclass
class _Worker:
    index: int
    process: Worker
    task_fd: int
    result_fd: int
    memory_fd: int
    reader: SlotReader
    outstanding: collections.deque = field(default_factory=collections.deque)  # task ids
    submitted: int = 0


class WorkerPool:
    """``num_workers`` processes applying ``fn`` to tasks; results read back in task order.

    ``slots`` bounds the unread tasks per worker: :meth:`submit` gives a task to the least busy
    worker below that bound, and the caller reads each worker's results in submission order,
    which is what makes reusing a slot safe. A worker that neither takes a task nor answers for
    ``timeout_s`` seconds (``None``: wait forever) while the caller waits on it is killed:
    ``WorkerError``.
    """

    def __init__(
        self, fn_pickle: bytes, num_workers: int, slots: int, timeout_s: float | None = None
    ):
        self._slots = slots
        self._timeout_s = timeout_s
        self._next_task = 0
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, os.getpid())
        try:
            for index in range(num_workers):
                self._workers.append(_start_worker(index, timeout_s))
            # Sent once all have started: a large fn fills the pipe until the worker reads it.
            init = (list(sys.path), fn_pickle)
            for worker in self._workers:
                self._send(worker, init)
        except BaseException:
            self.close()  # the workers started so far, now rather than at garbage collection
            raise

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers, in worker order."""
        return [worker.process.pid for worker in self._workers]

    def submit(self, plan) -> tuple[int, int] | None:
        """Sends ``plan`` to the least busy worker (the first of equals); returns the ticket to
        pass to :meth:`result`, or None (nothing sent) when every worker has ``slots`` unread
        tasks."""
        worker = min(self._workers, key=lambda candidate: len(candidate.outstanding))
        if len(worker.outstanding) >= self._slots:
            return None
        task_id = self._next_task
        self._next_task += 1
        self._send(worker, (task_id, worker.submitted % self._slots, pack_plan(plan)))
        worker.submitted += 1
        worker.outstanding.append(task_id)
        return worker.index, task_id

    def ready(self, ticket: tuple[int, int]) -> bool:
        """Whether the worker of ``ticket`` has begun to answer (or died), so that
        :meth:`result` of its oldest unread task would not wait for a computation."""
        return _readable(self._workers[ticket[0]].result_fd)

    def result(self, ticket: tuple[int, int]) -> dict[str, np.ndarray]:
        """The result of ``ticket``, which must be its worker's oldest unread task.

        Raises ``WorkerError`` if the worker died, or the exception ``fn`` raised (its worker
        traceback chained as ``RemoteTraceback``).
        """
        worker = self._workers[ticket[0]]
        if not worker.outstanding or worker.outstanding[0] != ticket[1]:
            raise RuntimeError(
                f"ProcessMap read task {ticket[1]} out of order; worker {worker.index} has "
                f"{list(worker.outstanding)} outstanding"
            )
        task_id, status, payload = self._receive(worker)
        worker.outstanding.popleft()
        if task_id != ticket[1]:
            raise RuntimeError(
                f"ProcessMap worker {worker.index} answered task {task_id}, expected {ticket[1]}"
            )
        if status == "ok":
            return worker.reader.read(payload)
        raise _remote_exception(payload, f"worker pid {worker.process.pid}")

    def discard_outstanding(self) -> None:
        """Reads and drops every unread result, so the pool can take a fresh task sequence."""
        for worker in self._workers:
            while worker.outstanding:
                self._receive(worker)
                worker.outstanding.popleft()

    def close(self) -> None:
        """Stops the workers (end of their task pipe, then SIGKILL after a grace period)."""
        self._finalizer()

    def _send(self, worker: _Worker, message) -> None:
        doing = "receiving a task"
        started = time.monotonic()
        view = memoryview(frame_message(message))
        while view:
            try:
                view = view[os.write(worker.task_fd, view) :]
            except BlockingIOError:  # the pipe is full: the worker is busy, or stuck
                self._wait(worker, worker.task_fd, started, doing)
            except OSError as error:  # EPIPE: the worker is gone
                raise self._death(worker, doing) from error

    def _receive(self, worker: _Worker):
        started = time.monotonic()
        length = payload_length(self._read(worker, HEADER_SIZE, started))
        return pickle.loads(self._read(worker, length, started))  # ipc-pickle

    def _read(self, worker: _Worker, count: int, started: float) -> bytes:
        chunks = []
        while count:
            try:
                chunk = os.read(worker.result_fd, min(count, 1 << 20))
            except BlockingIOError:
                self._wait(worker, worker.result_fd, started, "computing a result")
                continue
            if not chunk:
                raise self._death(worker, "computing a result")
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    def _wait(self, worker: _Worker, fd: int, started: float, doing: str) -> None:
        """Blocks until pipe ``fd`` of ``worker`` is ready (readable, or writable if it is the
        task pipe); ``WorkerError`` once the worker exits or ``timeout_s`` passed since
        ``started``. Waits in ``poll`` on the pipe and the worker's pidfd: no busy polling."""
        writing = fd == worker.task_fd
        pidfd = worker.process.fileno()
        while True:
            remaining = MAX_WAIT_S
            if self._timeout_s is not None:
                remaining = max(0.0, min(remaining, started + self._timeout_s - time.monotonic()))
            # The pidfd, not EOF, reports a death: a fork of this process (not ours) may hold
            # the pipe's other end.
            found = ready([pidfd] if writing else [fd, pidfd], [fd] if writing else [], remaining)
            if fd in found:
                return
            if found:
                raise self._death(worker, doing)
            # Checked after a wait, so a result that came while this process was stopped
            # still counts.
            waited_s = time.monotonic() - started
            if self._timeout_s is not None and waited_s >= self._timeout_s:
                raise self._stuck(worker, waited_s, doing)

    def _stuck(self, worker: _Worker, waited_s: float, doing: str) -> WorkerError:
        worker.process.kill()
        worker.process.wait()
        self.close()
        return WorkerError(
            f"ProcessMap worker {worker.index} (pid {worker.process.pid}) made no progress "
            f"{doing} for {waited_s:.1f} s (timeout_s={self._timeout_s:g}) and was killed: fn "
            f"is stuck (a hung read, a deadlock, a stopped process) or slower than the timeout. "
            f"If this element legitimately takes longer, raise data.worker_timeout_s (or "
            f"ProcessMap timeout_s; None waits forever).{_zygote_note(worker)} {_RESUME_HINT}"
        )

    def _death(self, worker: _Worker, doing: str) -> WorkerError:
        try:
            code = worker.process.wait(timeout=_CLOSE_GRACE_S)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            how = "closed its result pipe"
        elif code == STATUS_LOST and worker.process.zygote_error is not None:
            how = "exited (its exit status is lost)"
        elif code == STATUS_LOST:
            how = "died with its zygote (exit status lost)"
        elif code < 0:
            how = f"died with signal {signal.Signals(-code).name} ({-code})"
        else:
            how = f"exited with code {code}"
        self.close()
        return WorkerError(
            f"ProcessMap worker {worker.index} (pid {worker.process.pid}) {how} while {doing}."
            f"{_zygote_note(worker)} {_RESUME_HINT}"
        )


_RESUME_HINT = (
    "The iterator's get_state() still describes the last element it delivered: restore from "
    "it, or call next() again to restart the workers."
)


def _zygote_note(worker: _Worker) -> str:
    """What went wrong with the zygote while reaping ``worker``, as a sentence (or nothing)."""
    error = worker.process.zygote_error
    return "" if error is None else f" Reaping it failed: {error}."


def worker_zygote() -> Zygote:
    """The zygote that forks this module's workers (started now if it is not running)."""
    return zygote(WORKER_ENTRY)


def _start_worker(index: int, timeout_s: float | None) -> _Worker:
    task_read, task_write = os.pipe()
    result_read, result_write = os.pipe()
    memory_fd = os.memfd_create(f"wf-data-process-map-{index}")
    try:
        process = worker_zygote().spawn((task_read, result_write, memory_fd), timeout_s)
    except BaseException as error:
        for fd in (task_write, result_read, memory_fd):
            os.close(fd)
        if isinstance(error, RuntimeError):  # the zygote is stuck or gone
            raise WorkerError(
                f"ProcessMap could not start worker {index}: {error}. The iterator's "
                f"get_state() still describes the last element it delivered: call next() again "
                f"to retry with a new zygote, or restore from it."
            ) from error
        raise
    finally:
        os.close(task_read)  # the worker holds its own copies now
        os.close(result_write)
    # Our ends never block, so that every wait goes through `WorkerPool._wait` and its timeout.
    os.set_blocking(task_write, False)
    os.set_blocking(result_read, False)
    return _Worker(index, process, task_write, result_read, memory_fd, SlotReader(memory_fd))


def _shutdown(workers: list[_Worker], owner_pid: int) -> None:
    if os.getpid() != owner_pid:
        return  # a fork of the owner: the workers are not its to stop
    for worker in workers:
        os.close(worker.task_fd)  # an idle worker exits at the end of its task pipe
    deadline = time.monotonic() + _CLOSE_GRACE_S
    for worker in workers:
        try:
            worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.process.kill()  # busy in fn: it holds nothing that needs a clean exit
            worker.process.wait()
        worker.reader.close()
        os.close(worker.result_fd)
        os.close(worker.memory_fd)
    workers.clear()


def _remote_exception(payload, where: str) -> BaseException:
    exception_pickle, traceback_text = payload
    try:
        exception = pickle.loads(exception_pickle)  # ipc-pickle
    except Exception:
        exception = RuntimeError(traceback_text.strip().splitlines()[-1])
    exception.add_note(f"raised by ProcessMap fn in {where}")
    exception.__cause__ = RemoteTraceback(traceback_text)
    return exception


def worker_main(argv: list[str]) -> None:
    """Entry point of a worker process: ``argv`` = parent pid, task, result and memory fds."""
    parent_pid, task_fd, result_fd, memory_fd = (int(arg) for arg in argv)
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the consumer's to handle
    # A task written to the pipe would otherwise wake this worker *on the consumer's core*
    # and preempt the consumer mid-`submit` (measured: ~2 ms per hand-off on a busy 2-core
    # host), serialising planning and reading. SCHED_BATCH workers never preempt on wake-up.
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass  # a policy the host refuses (containers with seccomp): keep the default
    try:
        sys_path, fn_pickle = receive_message(task_fd)
    except EOFError:
        return
    sys.path[:] = sys_path
    try:
        fn, init_error = pickle.loads(fn_pickle), None  # ipc-pickle
    except Exception as error:  # e.g. fn defined in a script's __main__: answer every task
        fn, init_error = None, _exception_payload(error)
    writer = SlotWriter(memory_fd)
    many = getattr(fn, "many", None)
    builds_in_place = _takes_allocate(many)
    while True:
        try:
            tasks = [receive_message(task_fd)]
            # Tasks already waiting are computed together when fn shares costs over several
            # (`many`, e.g. one read for several batches); their answers go out in order.
            while many is not None and init_error is None and _readable(task_fd):
                tasks.append(receive_message(task_fd))
        except EOFError:
            return
        tasks = [(task_id, slot, unpack_plan(packed)) for task_id, slot, packed in tasks]
        if init_error is not None:
            send_message(result_fd, (tasks[0][0], "error", init_error))
            continue
        allocate = None
        if builds_in_place and len(tasks) == 1:  # one result: built in its slot, not copied
            allocate = functools.partial(writer.allocate, tasks[0][1])
        try:
            results = results_together(fn, [plan for _, _, plan in tasks], allocate)
        except ValueError:
            results = None  # a `many` that broke its contract: one by one below
        for index, (task_id, slot, plan) in enumerate(tasks):
            try:
                result = results[index] if results is not None else check_result(fn(plan))
                send_message(result_fd, (task_id, "ok", writer.write(slot, result)))
            except Exception as error:
                writer.forget_lent(slot)
                send_message(result_fd, (task_id, "error", _exception_payload(error)))
        # No view into the shared file may outlive its result: a slot that grows remaps it.
        results = result = None


def _takes_allocate(many) -> bool:
    """Whether ``fn.many`` has an ``allocate`` parameter (memory to build its results in)."""
    if many is None:
        return False
    try:
        return "allocate" in inspect.signature(many).parameters
    except (TypeError, ValueError):  # a callable without a signature (a builtin)
        return False


def pack_plan(plan: dict) -> dict:
    """``plan`` (a flat dict of arrays, numpy and Python scalars) for a task message: arrays and
    numpy scalars become ``(dtype, shape, bytes)`` triples (``shape`` None for a scalar), which
    pickle ~3x faster than arrays do (no per-array ``__reduce__``)."""
    return {
        key: (
            value.dtype.str,
            value.shape if isinstance(value, np.ndarray) else None,
            value.tobytes(),
        )
        if isinstance(value, (np.ndarray, np.generic))
        else value
        for key, value in plan.items()
    }


def unpack_plan(packed: dict) -> dict:
    """The plan :func:`pack_plan` packed: same dtypes, shapes and values; writeable arrays."""
    plan = {}
    for key, value in packed.items():
        if isinstance(value, tuple):
            dtype, shape, raw = value
            array = np.frombuffer(raw, dtype)
            value = array[0] if shape is None else array.reshape(shape).copy()
        plan[key] = value
    return plan


def results_together(fn, plans: list, allocate=None) -> list[dict[str, np.ndarray]] | None:
    """``fn.many(plans)``, each result checked, when ``fn`` has ``many`` and there are several
    plans, or one and ``allocate`` (passed on: ``many`` may build its results in that memory);
    None otherwise, and when ``many`` raised: the caller then runs ``fn`` plan by plan, so that
    each error belongs to its own plan. ValueError if ``many`` returns another count.
    """
    many = getattr(fn, "many", None)
    if many is None or len(plans) < (1 if allocate is not None else 2):
        return None
    try:
        produced = many(plans) if allocate is None else many(plans, allocate=allocate)
        results = [check_result(result) for result in produced]
    except Exception:
        return None
    if len(results) != len(plans):
        raise ValueError(f"{fn!r}.many returned {len(results)} results for {len(plans)} plans")
    return results


def _readable(fd: int) -> bool:
    """Whether a read of `fd` would not block (a message, or EOF, is waiting)."""
    return bool(ready([fd], timeout_s=0))


def _exception_payload(error: Exception) -> tuple[bytes, str]:
    text = "".join(traceback.format_exception(error))
    try:
        exception_pickle = pickle.dumps(error)
        pickle.loads(exception_pickle)  # ipc-pickle
    except Exception:
        exception_pickle = b""
    return exception_pickle, text
