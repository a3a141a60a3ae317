"""Tests for wf_data.data.mix.rewards: hand-computed vectors of every reward transform."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wf_data.data.mix.rewards import (
    REWARDS,
    ExcessLoss,
    LossChange,
    LossDecrease,
    LossDecreasePerToken,
    RelativeDecrease,
    RelativeExcess,
    make_reward,
)

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


def test_relative_excess_is_a_log_ratio_clipped_at_zero():
    # References 1, 2, 4 nats: e nats is log(e / 1) = 1 above the first; 1 nat is below the
    # second (0); 8 nats is log 2 above the third, as 2 nats would be above a reference of 1.
    reward = make_reward("relative_excess", 4, reference=[1.0, 2.0, 4.0, 1.0])
    got = reward.step(np.array([np.e, 1.0, 8.0, nan]))
    np.testing.assert_allclose(got, [1.0, 0.0, np.log(2.0), nan], rtol=1e-15)
    np.testing.assert_allclose(reward.step(np.array([2.0, 2.0, 8.0, 2.0]))[[0, 2, 3]], np.log(2))


@pytest.mark.parametrize("cls", [ExcessLoss, RelativeExcess])
def test_auto_reference_gives_nan_until_set(cls):
    reward = cls(2, "auto")
    assert np.isnan(reward.step(np.array([3.0, 1.0]))).all()
    reward.set_reference([1.0, 2.0])
    expected = [2.0, 0.0] if cls is ExcessLoss else [np.log(3.0), 0.0]
    np.testing.assert_allclose(reward.step(np.array([3.0, 1.0])), expected, rtol=1e-15)
    with pytest.raises(ValueError, match="2 finite floats"):
        reward.set_reference([1.0, nan])


def test_relative_decrease_hand_computed_vector():
    # beta = 0.5, window = 2: the smoothed losses of test_loss_decrease_hand_computed_vector
    # (domain 0: 4, 3, 2.5, 1.75; domain 1: 6, 4) as log ratios s[n - m] / s[n].
    reward = RelativeDecrease(2, smoothing=0.5, window=2)
    stream = [[4.0, nan], [2.0, 6.0], [2.0, nan], [1.0, 2.0]]
    expected = [
        [0.0, nan],
        [np.log(4 / 3), 0.0],
        [np.log(4 / 2.5), nan],
        [np.log(3 / 1.75), np.log(6 / 4)],
    ]
    for losses, want in zip(stream, expected, strict=True):
        np.testing.assert_allclose(reward.step(np.array(losses)), want, rtol=1e-15)
    # The same progress at a tenth of the loss level earns the same reward (a common scale);
    # a loss that rises earns a negative one.
    scaled = RelativeDecrease(2, smoothing=0.5, window=2)
    for losses, want in zip(stream, expected, strict=True):
        np.testing.assert_allclose(scaled.step(np.array(losses) / 10), want, rtol=1e-12)
    rising = RelativeDecrease(1, smoothing=0.5, window=2)
    rising.step(np.array([2.0]))
    np.testing.assert_allclose(rising.step(np.array([4.0])), [np.log(2 / 3)], rtol=1e-15)


def test_loss_change_rewards_forgetting_like_learning():
    # beta = 0.5, window = 2. Domain 0 is learned (4, 2, 2, 1: s = 4, 3, 2.5, 1.75) and scores
    # as loss_decrease does; domain 1 is forgotten (2, 4, 4, 6: s = 2, 3, 3.5, 4.75) and scores
    # the size of its rise, where loss_decrease gives -1, -1.5, -1.75.
    reward = LossChange(2, smoothing=0.5, window=2)
    decrease = LossDecrease(2, smoothing=0.5, window=2)
    stream = [[4.0, 2.0], [2.0, 4.0], [2.0, 4.0], [1.0, 6.0]]
    expected = [[0.0, 0.0], [1.0, 1.0], [1.5, 1.5], [1.25, 1.75]]
    for losses, want in zip(stream, expected, strict=True):
        np.testing.assert_allclose(reward.step(np.array(losses)), want, rtol=1e-15)
        got = decrease.step(np.array(losses))
        np.testing.assert_allclose(got, [want[0], -want[1]], rtol=1e-15)


def test_make_reward_names():
    assert REWARDS == (
        "loss",
        "excess_loss",
        "loss_decrease",
        "loss_change",
        "relative_excess",
        "relative_decrease",
        "loss_decrease_per_token",
    )
    with pytest.raises(ValueError, match="reward must be one of"):
        make_reward("accuracy", 2)


def test_loss_decrease_per_token_hand_computed_vector():
    # The stream of test_loss_decrease_hand_computed_vector (beta = 0.5, window = 2; domain 0:
    # s = 4, 3, 2.5, 1.75; domain 1 observed at steps 1 and 3: s = 6, 4), with the policy of
    # each step. The weight served before each step: W = [0, 0], [.5, .5], [.75, 1.25],
    # [1.25, 1.75]. Rewards: the fall of s over the window divided by the fall's W span.
    reward = LossDecreasePerToken(2, smoothing=0.5, window=2)
    stream = [[4.0, nan], [2.0, 6.0], [2.0, nan], [1.0, 2.0]]
    weights = [[0.5, 0.5], [0.25, 0.75], [0.5, 0.5], [1.0, 0.0]]
    expected = [
        [0.0, nan],
        [(4 - 3) / 0.5, 0.0],
        [(4 - 2.5) / 0.75, nan],
        [(3 - 1.75) / (1.25 - 0.5), (6 - 4) / (1.75 - 0.5)],
    ]
    for losses, pi, want in zip(stream, weights, expected, strict=True):
        np.testing.assert_allclose(reward.step(np.array(losses), np.array(pi)), want, rtol=1e-15)
    with pytest.raises(ValueError, match="needs the policy weights"):
        reward.step(np.array([1.0, 1.0]))


@pytest.mark.parametrize("weights", [[0.9, 0.1], [0.2, 0.8]])
def test_loss_decrease_per_token_does_not_grow_with_the_weight(weights):
    """Losses that fall by c per unit of weight served earn c, whatever weight a domain had:
    where loss_decrease pays the leading domain for its rows, this one pays the rate."""
    rates = np.array([0.01, 0.03])
    per_token = LossDecreasePerToken(2, smoothing=0.9, window=4)
    decrease = LossDecrease(2, smoothing=0.9, window=4)
    pi = np.array(weights)
    for step in range(200):
        losses = 10.0 - rates * pi * step
        got = per_token.step(losses, pi)
        plain = decrease.step(losses)
    np.testing.assert_allclose(got, rates, rtol=1e-6)
    np.testing.assert_allclose(plain, 4 * rates * pi, rtol=1e-6)


def test_loss_decrease_per_token_state_round_trip_and_validation():
    rng = np.random.default_rng(1)
    stream = np.where(rng.random((40, 3)) < 0.7, rng.uniform(1, 5, (40, 3)), nan)
    policies = rng.dirichlet(np.ones(3), 40)
    reward = LossDecreasePerToken(3, smoothing=0.8, window=5)
    for row, pi in zip(stream[:17], policies[:17], strict=True):
        reward.step(row, pi)
    restored = LossDecreasePerToken(3, smoothing=0.8, window=5)
    restored.load_state_dict(json.loads(json.dumps(reward.state_dict())))
    for row, pi in zip(stream[17:], policies[17:], strict=True):
        np.testing.assert_array_equal(restored.step(row, pi), reward.step(row, pi))
    state = reward.state_dict()
    with pytest.raises(ValueError, match="expected served and served_history"):
        restored.load_state_dict({key: state[key] for key in ("history", "count")})
    with pytest.raises(ValueError, match="served shape"):
        restored.load_state_dict({**state, "served": [0.0, 1.0]})
    with pytest.raises(ValueError, match="served must be finite"):
        restored.load_state_dict({**state, "served": [0.0, nan, 1.0]})
