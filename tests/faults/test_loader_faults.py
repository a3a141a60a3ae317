"""Loader state under faults (issue 10 case 4): a worker killed with SIGKILL mid-stream.

After the error, `state_dict()` must describe the last batch handed out: resuming from it (in
a fresh loader) or simply calling `next()` again (the pool restarts) gives the exact stream
that an undisturbed loader gives, EXP3 updates included.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.data.test_loader import assert_batches_equal, losses_for, make_loader
from wf_data.data.process_map import WorkerError


def feed(loader, batch_index):
    loader.update_mixture(losses_for(batch_index))


@pytest.mark.slow
def test_worker_killed_state_points_at_the_last_delivered_batch():
    reference = make_loader("exp3", prefetch=3)
    expected = []
    for step in range(14):
        expected.append(next(reference))
        feed(reference, step)

    loader = make_loader("exp3", num_workers=2, prefetch=3)
    got = []
    for step in range(5):
        got.append(next(loader))
        feed(loader, step)
    os.kill(loader._iterator.worker_pids[0], signal.SIGKILL)  # noqa: SLF001 - the fault
    with pytest.raises(WorkerError):
        # Batches already read into shared memory may still come out; the dead worker's next
        # batch cannot.
        while True:
            got.append(next(loader))
            feed(loader, len(got) - 1)
    delivered = len(got)
    assert loader.step == delivered
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["step"] == delivered

    resumed = make_loader("exp3", num_workers=2, prefetch=3)
    resumed.load_state_dict(state)
    after_resume = []
    for step in range(delivered, 14):
        after_resume.append(next(resumed))
        feed(resumed, step)
    assert_batches_equal(got + after_resume, expected)

    # The same loader continues too: the next call restarts the workers.
    for step in range(delivered, 14):
        got.append(next(loader))
        feed(loader, step)
    assert_batches_equal(got, expected)
    for each in (loader, resumed, reference):
        each.close()
