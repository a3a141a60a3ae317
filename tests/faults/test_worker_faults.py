"""Worker processes under kill -9 (issue 10 cases 3 and 4): no orphans, no skipped elements.

Every fault is real: a subprocess is killed with SIGKILL and the test watches the processes
and files it left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from wf_data.data.worker_lifetime import process_exited

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start(script: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _wait_exited(pids: list[int], within_s: float) -> list[int]:
    """The pids still alive after ``within_s`` seconds (zombies count as exited)."""
    deadline = time.monotonic() + within_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if not process_exited(pid)]
        time.sleep(0.05)
    return alive


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


CHILD = """
import sys, time
from wf_data.data.worker_lifetime import die_with_parent
die_with_parent(int(sys.argv[1]))
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("layout", ["child", "grandchild"])
def test_die_with_parent_after_kill_9(layout):
    """A child (parent-death signal) or a grandchild behind a surviving middle process (a
    forkserver's place; pidfd watch) exits within 5 s of a kill -9 of the process it outlives."""
    parent = _start(
        """
        import os, subprocess, sys, time
        child, layout = sys.argv[1], sys.argv[2]
        me = str(os.getpid())
        if layout == "child":
            proc = subprocess.Popen([sys.executable, "-c", child, me], stdout=subprocess.PIPE)
            pids, ready = [proc.pid], proc.stdout
        else:  # a middle process that survives the parent starts the watched grandchild
            middle = subprocess.Popen([sys.executable, "-c",
                "import subprocess, sys, time;"
                "p = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]);"
                "print(p.pid, flush=True); time.sleep(60)", child, me], stdout=subprocess.PIPE)
            pids, ready = [int(middle.stdout.readline()), middle.pid], middle.stdout
        print(*pids, flush=True)
        print(ready.readline().decode().strip(), flush=True)
        time.sleep(60)
        """,
        CHILD,
        layout,
    )
    watched, *others = [int(pid) for pid in parent.stdout.readline().split()]
    try:
        assert parent.stdout.readline().strip() == "ready"
        parent.kill()
        parent.wait()
        assert _wait_exited([watched], within_s=5.0) == []
    finally:
        _kill_all([watched, *others])
