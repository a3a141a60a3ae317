"""Loader state under faults (issue 10 cases 4 and 12).

Case 4, a worker killed with SIGKILL mid-stream: after the error, `state_dict()` must describe
the last batch handed out; resuming from it (in a fresh loader) or simply calling `next()`
again (the pool restarts) gives the exact stream an undisturbed loader gives, EXP3 updates
included. Case 12, a damaged state (None, a missing or wrong-typed entry, a bad `stats` or
`feedback` entry, a pipeline state that does not restore): `LoaderStateError` naming it, and
the loader keeps serving where it was.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.data.deliver.test_loader import assert_batches_equal, losses_for, make_loader, run
from wf_data.data.deliver.loader import LoaderStateError
from wf_data.data.workers.process_map import WorkerError


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


def good_state():
    loader = make_loader("exp3", prefetch=1)
    run([loader], 3)
    return json.loads(json.dumps(loader.state_dict()))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: None, "expected a dict, got NoneType"),
        (lambda s: [s], "expected a dict, got list"),
        (lambda s: {k: v for k, v in s.items() if k != "pipeline"}, "missing the entry 'pipeline'"),
        (lambda s: {k: v for k, v in s.items() if k != "stats"}, "missing the entry 'stats'"),
        (lambda s: {**s, "step": "3"}, "'step' must be a int, got str"),
        (lambda s: {**s, "step": True}, "'step' must be a int, got bool"),
        (lambda s: {**s, "step": -1}, "'step' must be >= 0"),
        (lambda s: {**s, "stats": [1, 2]}, "'stats' must be a dict, got list"),
        (lambda s: {**s, "stats": {**s["stats"], "a": "many"}}, "'stats': domain 'a' must map"),
        (lambda s: {**s, "stats": {**s["stats"], "b": [1]}}, "'stats': domain 'b' must map"),
        (lambda s: {**s, "feedback": {"a": [None, 1]}}, "'feedback': domain 'a' must map"),
        (lambda s: {**s, "version": 1}, "version 1 is not supported"),
        (lambda s: {**s, "pipeline": {"in_flight": []}}, "'pipeline' does not restore"),
    ],
)
def test_malformed_states_are_named(change, match):
    state = good_state()
    loader = make_loader("exp3", prefetch=1)
    run([loader], 1)
    with pytest.raises(LoaderStateError, match=match):
        loader.load_state_dict(change(state))
    # The loader serves on from where it was, and a good state still restores.
    assert loader.step == 1
    assert_batches_equal([next(loader)], run([make_loader("exp3", prefetch=1)], 2)[1:])
    loader.load_state_dict(state)
    assert loader.step == 3
