"""Waiting on file descriptors (pipes, sockets, pidfds) with ``poll(2)``, never ``select(2)``.

``select`` refuses any descriptor numbered 1024 or more (``FD_SETSIZE``), and a trainer holds
that many easily (NCCL, sockets, thousands of shard files): every wait of the worker
processes goes through here.
"""

from __future__ import annotations

import math
import select
from collections.abc import Iterable

# poll's timeout is a C int of milliseconds: longer waits are made of several polls.
MAX_WAIT_S = 3600.0


def ready(
    readable: Iterable[int] = (), writable: Iterable[int] = (), timeout_s: float | None = None
) -> set[int]:
    """The descriptors of ``readable`` a read would not block on (data, end of file, hang-up,
    error; a pidfd once its process exited) and of ``writable`` a write would not block on,
    after waiting up to ``timeout_s`` seconds for one (``None``: until one is ready, ``0``:
    not at all). Empty when the time ran out."""
    poller = select.poll()
    for fd in readable:
        poller.register(fd, select.POLLIN)
    for fd in writable:
        poller.register(fd, select.POLLOUT)
    if timeout_s is None:
        return {fd for fd, _ in poller.poll()}
    # Rounded up: a wait cut short by rounding would only spin until the deadline.
    timeout_ms = math.ceil(min(max(timeout_s, 0.0), MAX_WAIT_S) * 1000)
    return {fd for fd, _ in poller.poll(timeout_ms)}
