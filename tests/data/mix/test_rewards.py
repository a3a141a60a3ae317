"""Tests for wf_data.data.mix.rewards: hand-computed vectors of every reward transform."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wf_data.data.mix.rewards import REWARDS, ExcessLoss, LossDecrease, make_reward

nan = np.nan


def test_loss_reward_is_the_loss():
    reward = make_reward("loss", 3)
    np.testing.assert_array_equal(reward.step(np.array([1.5, nan, 0.0])), [1.5, nan, 0.0])
    assert reward.state_dict() == {}


def test_excess_loss_is_clipped_at_zero_and_keeps_unobserved():
    reward = make_reward("excess_loss", 3, reference=[1.0, 2.0, 0.5])
    losses = np.array([1.5, 1.0, nan])
    np.testing.assert_array_equal(reward.step(losses), [0.5, 0.0, nan])
    np.testing.assert_array_equal(losses, [1.5, 1.0, nan])  # input untouched
    for bad in ([1.0, 2.0], [1.0, nan, 2.0]):
        with pytest.raises(ValueError, match="3 finite floats"):
            ExcessLoss(3, bad)


def test_loss_decrease_hand_computed_vector():
    # beta = 0.5, window = 2. Domain 0 sees 4, 2, 2, 1 -> s = 4, 3, 2.5, 1.75;
    # rewards s[n - min(n, 2)] - s[n] = 0, 4 - 3, 4 - 2.5, 3 - 1.75.
    # Domain 1 is observed only at steps 1 and 3 (its own clock): s = 6, 4 -> 0, 2.
    reward = LossDecrease(2, smoothing=0.5, window=2)
    stream = [[4.0, nan], [2.0, 6.0], [2.0, nan], [1.0, 2.0]]
    expected = [[0.0, nan], [1.0, 0.0], [1.5, nan], [1.25, 2.0]]
    for losses, want in zip(stream, expected, strict=True):
        np.testing.assert_allclose(reward.step(np.array(losses)), want, rtol=1e-15)


def test_loss_decrease_state_round_trip_and_validation():
    rng = np.random.default_rng(0)
    stream = np.where(rng.random((40, 3)) < 0.7, rng.uniform(1, 5, (40, 3)), nan)
    reward = LossDecrease(3, smoothing=0.8, window=5)
    for row in stream[:17]:
        reward.step(row)
    restored = LossDecrease(3, smoothing=0.8, window=5)
    restored.load_state_dict(json.loads(json.dumps(reward.state_dict())))
    for row in stream[17:]:
        np.testing.assert_array_equal(restored.step(row), reward.step(row))
    with pytest.raises(ValueError, match="progress_window"):
        LossDecrease(3, smoothing=0.8, window=4).load_state_dict(reward.state_dict())
    with pytest.raises(ValueError, match="history and count"):
        restored.load_state_dict({})
    with pytest.raises(ValueError, match="finite"):
        bad = reward.state_dict()
        bad["history"][0][0] = nan
        restored.load_state_dict(bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"smoothing": 1.0}, "loss_smoothing"), ({"window": 0}, "progress_window")],
)
def test_loss_decrease_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossDecrease(2, **kwargs)


def test_make_reward_names():
    assert REWARDS == ("loss", "excess_loss", "loss_decrease")
    with pytest.raises(ValueError, match="reward must be one of"):
        make_reward("accuracy", 2)
