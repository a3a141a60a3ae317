"""Tests for wf_data.data.mix.reference: reference losses measured in the run (auto)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wf_data.data.mix.exp3 import Exp3
from wf_data.data.mix.reference import ReferenceEstimate


def test_power_law_through_the_two_warmup_measurements_hand_computed():
    # W = 4, T = 16: measured after updates 2 and 4.
    # Domain 0: 4 -> 8/3, c = log2(1.5), reference 8/3 * 4**-c = 8/3 / 1.5**2 = 32/27.
    # Domain 1: flat (random tokens): c = 0, reference 6. Domain 2: halves, c = 1: 1 / 4.
    # Domain 3: rises: c clipped at 0, reference = its last loss, 3.
    estimate = ReferenceEstimate(4, warmup_steps=4, total_steps=16)
    assert estimate.steps == (2, 4)
    assert [estimate.due(step) for step in range(6)] == [False, False, True, False, True, False]
    estimate.record(2, [4.0, 6.0, 2.0, 2.0])
    assert not estimate.due(2) and estimate.value is None
    estimate.record(4, np.array([8 / 3, 6.0, 1.0, 3.0]))
    np.testing.assert_allclose(estimate.value, [32 / 27, 6.0, 0.25, 3.0], rtol=1e-12)
    assert not estimate.due(4)


def test_state_round_trip_between_the_measurements():
    estimate = ReferenceEstimate(2, warmup_steps=6, total_steps=30)
    estimate.record(3, [5.0, 2.0])
    restored = ReferenceEstimate(2, warmup_steps=6, total_steps=30)
    restored.load_state_dict(json.loads(json.dumps(estimate.state_dict())))
    assert not restored.due(3) and restored.due(6)
    for each in (estimate, restored):
        each.record(6, [4.0, 2.0])
    np.testing.assert_array_equal(restored.value, estimate.value)
    with pytest.raises(ValueError, match="another warmup_steps"):
        ReferenceEstimate(2, warmup_steps=8, total_steps=30).load_state_dict(estimate.state_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(warmup_steps=1, total_steps=10), "warmup_steps >= 2"),
        (dict(warmup_steps=4, total_steps=None), "total_steps >= warmup_steps"),
        (dict(warmup_steps=4, total_steps=3), "total_steps >= warmup_steps"),
    ],
)
def test_needs_a_warmup_and_the_run_length(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReferenceEstimate(2, **kwargs)


@pytest.mark.parametrize(
    "losses, error, match",
    [
        ([1.0], ValueError, "2 numbers"),
        ([1.0, "2"], ValueError, "2 numbers"),
        ([1.0, float("nan")], ValueError, "finite and > 0"),
        ([1.0, 0.0], ValueError, "finite and > 0"),
        ({"a": 1.0, "b": 2.0}, TypeError, r"\(K,\) sequence"),
    ],
)
def test_record_validates_the_measurement_and_its_step(losses, error, match):
    estimate = ReferenceEstimate(2, warmup_steps=4, total_steps=8)
    with pytest.raises(error, match=match):
        estimate.record(2, losses)
    with pytest.raises(ValueError, match="no measurement is due after update 3"):
        estimate.record(3, [1.0, 2.0])


def auto_bandit(**kwargs):
    options = dict(
        update_rule="proportional",
        reward="relative_excess",
        reference_losses="auto",
        warmup_steps=4,
        total_steps=16,
        min_weight=0.05,
    )
    return Exp3(3, **{**options, **kwargs})


def test_bandit_asks_for_the_measurements_and_uses_the_estimate():
    bandit = auto_bandit()
    held_out = {2: [4.0, 6.0, 2.0], 4: [8 / 3, 6.0, 1.0]}
    for _ in range(6):
        if bandit.reference_due:
            bandit.record_reference(held_out[bandit.step])
        bandit.update([2.0, 6.0, 1.0])
    np.testing.assert_allclose(bandit.reference_losses, [32 / 27, 6.0, 0.25], rtol=1e-12)
    # Updates 5 and 6 earned log(L / reference) (alpha 0.9, R from 0); before: NaN, R stays 0.
    excess = np.log(np.array([2.0, 6.0, 1.0]) / [32 / 27, 6.0, 0.25])
    np.testing.assert_allclose(bandit.rewards, (1 - 0.9**2) * excess, rtol=1e-12)
    share = excess / excess.sum()  # domain 1 earns nothing: the floor
    np.testing.assert_allclose(bandit.policy()[1], 0.05, rtol=1e-12)
    np.testing.assert_allclose(bandit.policy()[[0, 2]], 0.95 * share[[0, 2]], rtol=1e-12)


def test_bandit_refuses_to_update_past_a_missing_measurement_and_resumes_exactly():
    bandit = auto_bandit()
    for _ in range(2):
        bandit.update([3.0, 6.0, 1.5])
    assert bandit.reference_due
    with pytest.raises(RuntimeError, match="record_reference first"):
        bandit.update([3.0, 6.0, 1.5])
    bandit.record_reference([4.0, 6.0, 2.0])
    bandit.update([3.0, 6.0, 1.5])
    restored = auto_bandit()  # checkpointed between the two measurements
    restored.load_state_dict(json.loads(json.dumps(bandit.state_dict())))
    for each in (bandit, restored):
        each.update([3.0, 6.0, 1.5])
        each.record_reference([8 / 3, 6.0, 1.0])
        for _ in range(3):
            each.update([2.0, 6.0, 1.0])
    np.testing.assert_array_equal(restored.reference_losses, bandit.reference_losses)
    np.testing.assert_array_equal(restored.policy(), bandit.policy())
    assert bandit.policy()[0] > 0.05  # the estimate is in use


def test_auto_is_only_for_excess_rewards():
    with pytest.raises(ValueError, match="excess_loss and relative_excess"):
        auto_bandit(reward="relative_decrease")
    with pytest.raises(ValueError, match="not auto"):
        Exp3(2).record_reference([1.0, 2.0])
