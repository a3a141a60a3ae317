"""Functions ProcessMap tests run in worker processes.

Kept apart from the test modules so that workers import numpy only, not grain (seconds).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np


def rows(plan: dict) -> dict[str, np.ndarray]:
    """A (rows, 16) int32 block and a float vector, both functions of the plan only.

    ``rows`` varies with the plan, so result sizes change and slots must grow.
    """
    index = int(plan["index"])
    count = 1 + index % 4
    block = np.arange(count * 16, dtype=np.int32).reshape(count, 16) + index * 1000
    return {
        "input_ids": block,
        "docs": plan["docs"].astype(np.int64) * 3,
        "weight": np.full((2,), plan["weight"], dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.int32),
        "name": np.array([plan["name"]]),
    }


class SleepyRows:
    """``rows`` after sleeping ``seconds`` from element ``from_index`` on: keeps workers busy
    (deaf to their task pipe) while a test kills something."""

    def __init__(self, seconds: float, from_index: int = 0):
        self.seconds = seconds
        self.from_index = from_index

    def __call__(self, plan: dict) -> dict[str, np.ndarray]:
        if int(plan["index"]) >= self.from_index:
            time.sleep(self.seconds)
        return rows(plan)


class FailWhileFileExists:
    """``rows``, but raises ValueError on element ``index`` while ``path`` exists."""

    def __init__(self, path: str, index: int):
        self.path = path
        self.index = index

    def __call__(self, plan: dict) -> dict[str, np.ndarray]:
        if int(plan["index"]) == self.index and os.path.exists(self.path):
            raise ValueError(f"refusing element {self.index} while {self.path} exists")
        return rows(plan)


def not_a_dict(plan: dict):
    """Breaks the ProcessMap result contract."""
    return [plan["index"]]


class LoadsOnlyInItsProcess:
    """An ``fn`` that cannot be unpickled in another process (like a function of a script's
    ``__main__``)."""

    def __init__(self):
        self.pid = os.getpid()

    def __setstate__(self, state):
        if state["pid"] != os.getpid():
            raise RuntimeError("this fn only loads in the process that made it")
        self.__dict__.update(state)

    def __call__(self, plan: dict) -> dict[str, np.ndarray]:
        return rows(plan)


def environment(plan: dict) -> dict[str, np.ndarray]:
    """The worker's ``WF_DATA_TEST_VALUE`` and working directory."""
    return {
        "value": np.array([os.environ.get("WF_DATA_TEST_VALUE", "")]),
        "cwd": np.array([os.getcwd()]),
    }


class BreakWhileFileExists:
    """``rows``, but element ``index`` never returns while ``path`` exists: the worker stops
    itself (``"stop"``, like SIGSTOP from outside), sleeps in a syscall (``"sleep"``, like a
    hung network read) or exits with status 0 (``"exit"``, like a library calling exit). The
    worker that breaks writes its pid to ``path + ".pid"`` first."""

    def __init__(self, path: str, index: int, how: str):
        self.path = path
        self.index = index
        self.how = how

    def __call__(self, plan: dict) -> dict[str, np.ndarray]:
        if int(plan["index"]) == self.index and os.path.exists(self.path):
            with open(self.path + ".pid", "w") as pid_file:  # which worker broke, for the test
                pid_file.write(str(os.getpid()))
            if self.how == "exit":
                sys.exit(0)
            if self.how == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(600)
        return rows(plan)


def growing(plan: dict) -> dict[str, np.ndarray]:
    """``(n,)`` int32 of value ``index``, ``n`` 30% larger at every element: each result
    outgrows the shared slot it is written to."""
    index = int(plan["index"])
    return {"values": np.full(int(1024 * 1.3**index), index, dtype=np.int32)}


class CountingRows:
    """`rows` with a `many` that records its group sizes and fails on element `fail_at`."""

    def __init__(self, fail_at: int | None = None):
        self.groups: list[int] = []
        self.fail_at = fail_at

    def __call__(self, plan: dict) -> dict:
        if int(plan["index"]) == self.fail_at:
            raise ValueError(f"element {self.fail_at} is bad")
        return rows(plan)

    def many(self, plans: list[dict]) -> list[dict]:
        """Results tagged with `group`, the number of plans computed together."""
        self.groups.append(len(plans))
        return [{**self(plan), "group": np.array([len(plans)])} for plan in plans]


class InPlaceRows:
    """``rows`` built in memory ``many`` is lent (a worker's shared slot), in two requests: a
    small one, then one sized by ``factor`` (large factors outgrow the slot after lending)."""

    def __init__(self, factor: int = 1):
        self.factor = factor

    def __call__(self, plan: dict) -> dict[str, np.ndarray]:
        return rows(plan)

    def many(self, plans: list, allocate=None) -> list[dict[str, np.ndarray]]:
        results = []
        for plan in plans:
            result = rows(plan)
            if allocate is not None:
                for key in ("weight", "input_ids"):
                    value = result[key]
                    size = value.nbytes * (self.factor if key == "input_ids" else 1)
                    built = allocate(size)[: value.nbytes].view(value.dtype).reshape(value.shape)
                    built[...] = value
                    result[key] = built
            results.append(result)
        return results


class RowsAndPid:
    """``rows`` plus the pid of the process that computed them, ``slow_s`` seconds slower in a
    process other than ``consumer_pid`` (workers that cannot keep up)."""

    def __init__(self, consumer_pid: int, slow_s: float):
        self.consumer_pid = consumer_pid
        self.slow_s = slow_s

    def __call__(self, plan: dict) -> dict[str, np.ndarray]:
        if os.getpid() != self.consumer_pid:
            time.sleep(self.slow_s)
        return {**rows(plan), "pid": np.array([os.getpid()])}
