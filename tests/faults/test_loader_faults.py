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
import re
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
        (lambda s: {**s, "pipeline": {"in_flight": []}}, "entry 'pipeline' differs"),
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


def edit_first(state, key, value, under=("pipeline",)):
    """Sets the first ``key`` found breadth-first below ``state[under...]`` (nested dicts and
    lists) to ``value``, wherever the pipeline's iterators keep it; returns ``state``."""
    node = state
    for name in under:
        node = node[name]
    stack = [node]
    while stack:
        current = stack.pop(0)
        if isinstance(current, dict):
            if key in current:
                current[key] = value
                return state
            stack.extend(current.values())
        elif isinstance(current, list):
            stack.extend(current)
    raise AssertionError(f"no {key!r} in the state")


def flip_a_digit(text):
    """The JSON text with one digit of a number value near its middle changed: still JSON."""
    numbers = [match.end() - 1 for match in re.finditer(r": [1-9][0-9]*", text)]
    at = min(numbers, key=lambda end: abs(end - len(text) // 2))
    return text[:at] + str(int(text[at]) - 1) + text[at + 1 :]


EDITS = {
    # The edits of issue 19 case 7: each was accepted with another stream, or raised a raw
    # IndexError at the next batch, or was ignored.
    "in_flight emptied": lambda s: edit_first(s, "in_flight", []),
    "epoch 5.5": lambda s: edit_first(s, "epoch", 5.5),
    "row 5": lambda s: edit_first(s, "row", 5),
    "row -1": lambda s: edit_first(s, "row", -1),
    "parent step -1": lambda s: edit_first(s, "step", -1, under=("pipeline", "parent")),
    "step 10**12": lambda s: {**s, "step": 10**12},
    "one digit of the saved text": lambda s: json.loads(flip_a_digit(json.dumps(s))),
}


@pytest.mark.parametrize("edit", EDITS)
def test_edited_or_corrupted_state_is_refused(edit):
    """Any change to a saved state is a LoaderStateError naming the entry changed; the loader
    keeps serving where it was, and the unmodified state still restores exactly."""
    state = good_state()
    changed = EDITS[edit](json.loads(json.dumps(state)))
    assert changed != state
    loader = make_loader("exp3", prefetch=1)
    run([loader], 1)
    with pytest.raises(LoaderStateError, match=r"edited or corrupted.*entry '(pipeline|step)'"):
        loader.load_state_dict(changed)
    assert loader.step == 1
    assert_batches_equal([next(loader)], run([make_loader("exp3", prefetch=1)], 2)[1:])
    loader.load_state_dict(state)
    reference = make_loader("exp3", prefetch=1)
    assert_batches_equal(run([loader], 3, start_step=3), run([reference], 6)[3:])


def unsealed(state):
    """``state`` as wf-data wrote it before states were sealed."""
    return {key: value for key, value in state.items() if key != "seal"}


def test_state_saved_before_the_seal_restores_with_a_warning():
    state = unsealed(good_state())
    loader = make_loader("exp3", prefetch=1)
    with pytest.warns(UserWarning, match="no seal.*without checking it for edits"):
        loader.load_state_dict(state)
    reference = make_loader("exp3", prefetch=1)
    assert_batches_equal(run([loader], 3, start_step=3), run([reference], 6)[3:])


def test_unsealed_state_whose_step_disagrees_with_its_stats_is_refused():
    loader = make_loader("exp3", prefetch=1)
    with pytest.warns(UserWarning, match="no seal"):
        with pytest.raises(LoaderStateError, match="'step' and 'stats' disagree: step 10"):
            loader.load_state_dict({**unsealed(good_state()), "step": 10**12})
