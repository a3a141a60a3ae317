"""MixedDataset and Exp3Mixing: proportions, determinism, exact resume, exhaustion, lag."""

import json
import math

import numpy as np
import pytest

from wf_data.data.mixing import (
    Exp3Mixing,
    MixedDataset,
    RowUniforms,
    decode_plans,
    draw_domains,
    encode_plans,
)
from wf_data.data.packing import pack
from wf_data.data.sources import InMemorySource

SEQ_LEN = 16


def domain_docs(domain: int, num_docs: int, seed: int) -> InMemorySource:
    """Documents whose tokens encode (domain, doc, position) so rows can be traced back."""
    rng = np.random.default_rng([seed, domain])
    lengths = rng.integers(3, 40, size=num_docs)
    docs = [
        (domain * 1_000_000 + doc * 100 + np.arange(n) % 100).astype(np.uint32)
        for doc, n in enumerate(lengths)
    ]
    return InMemorySource(docs, format="tokens")


def packed_domains(num_domains=3, num_docs=60, num_epochs=None, method="best_fit"):
    return {
        f"d{k}": pack(
            domain_docs(k, num_docs, seed=7),
            SEQ_LEN,
            method,
            window_size=16,
            seed=k,
            num_epochs=num_epochs,
        )
        for k in range(num_domains)
    }


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_rows_equal(rows_a, rows_b):
    assert len(rows_a) == len(rows_b)
    for a, b in zip(rows_a, rows_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def binomial_bound(n, p):
    return 3 * math.sqrt(n * p * (1 - p))


def test_static_proportions_within_three_sigma():
    weights = {"d0": 0.5, "d1": 0.3, "d2": 0.2}
    mixed = MixedDataset(packed_domains(), weights, seed=3)
    iterator = iter(mixed)
    n = 3000
    domains = np.concatenate(
        [iterator.materialize(iterator.next_plans(500))["domain_ids"] for _ in range(n // 500)]
    )
    counts = np.bincount(domains, minlength=3)
    for index, weight in enumerate(weights.values()):
        assert abs(counts[index] - n * weight) <= binomial_bound(n, weight), counts


def test_rows_carry_their_domain():
    iterator = iter(MixedDataset(packed_domains(), {"d0": 1, "d1": 1, "d2": 1}, seed=0))
    for row in take(iterator, 60):
        real = row["segment_ids"] > 0
        assert np.all(row["input_ids"][real] // 1_000_000 == row["domain_ids"])


def test_zero_weight_domain_is_never_drawn():
    iterator = iter(MixedDataset(packed_domains(), {"d0": 1, "d1": 0, "d2": 1}, seed=0))
    domains = iterator.materialize(iterator.next_plans(400))["domain_ids"]
    assert 1 not in set(domains.tolist())


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"d0": 1, "d1": -1, "d2": 1}, "finite and >= 0"),
        ({"d0": 1, "d1": float("nan"), "d2": 1}, "finite and >= 0"),
        ({"d0": 0, "d1": 0, "d2": 0}, "positive sum"),
        ({"d0": 1, "d1": 1}, "missing \\['d2'\\]"),
        ({"d0": 1, "d1": 1, "d2": 1, "d9": 1}, "unknown \\['d9'\\]"),
        ({"d0": 1, "d1": "x", "d2": 1}, "not a number"),
    ],
)
def test_bad_weights_fail_clearly(weights, message):
    with pytest.raises(ValueError, match=message):
        MixedDataset(packed_domains(), weights)


def test_bad_on_exhausted():
    with pytest.raises(ValueError, match="on_exhausted"):
        MixedDataset(packed_domains(), {"d0": 1, "d1": 1, "d2": 1}, on_exhausted="wrap")


@pytest.mark.parametrize("cut", [0, 1, 7, 33, 90])
def test_static_resume_is_exact(cut):
    mixed = MixedDataset(packed_domains(), {"d0": 2, "d1": 1, "d2": 1}, seed=5)
    iterator = iter(mixed)
    take(iterator, cut)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 40)
    restored = iter(MixedDataset(packed_domains(), {"d0": 2, "d1": 1, "d2": 1}, seed=5))
    restored.set_state(state)
    assert_rows_equal(take(restored, 40), expected)


def test_state_size_does_not_grow():
    iterator = iter(MixedDataset(packed_domains(), {"d0": 1, "d1": 1, "d2": 1}, seed=0))
    take(iterator, 10)
    small = len(json.dumps(iterator.get_state()))
    take(iterator, 1000)
    assert len(json.dumps(iterator.get_state())) <= small + 32


def test_stop_ends_at_first_exhausted_domain():
    datasets = packed_domains(num_epochs=1)
    rows_per_domain = [sum(1 for _ in iter(ds)) for ds in datasets.values()]
    iterator = iter(MixedDataset(datasets, {"d0": 1, "d1": 1, "d2": 1}, on_exhausted="stop"))
    rows = list(iterator)
    counts = np.bincount([int(r["domain_ids"]) for r in rows], minlength=3)
    # The stream stops when a draw hits a finished domain: one domain is complete, none over.
    assert np.any(counts == rows_per_domain)
    assert np.all(counts <= rows_per_domain)
    assert iterator.next_plans(5) == []


def test_restart_replays_exhausted_domain():
    datasets = packed_domains(num_epochs=1)
    first_rows = list(iter(datasets["d0"]))
    iterator = iter(MixedDataset(datasets, {"d0": 1, "d1": 0, "d2": 0}, on_exhausted="restart"))
    rows = take(iterator, 2 * len(first_rows))
    assert iterator.get_state()["domains"]["d0"]["restarts"] == 1
    assert_rows_equal(
        [{k: v for k, v in r.items() if k != "domain_ids"} for r in rows[len(first_rows):]],
        first_rows,
    )


def test_reweighted_and_added_source_continue_unchanged_sources():
    old = iter(MixedDataset(packed_domains(2), {"d0": 1, "d1": 1}, seed=0))
    take(old, 50)
    state = old.get_state()
    positions = {name: old._domain_iters[i].get_state() for i, name in enumerate(["d0", "d1"])}
    datasets = packed_domains(3)
    new = iter(MixedDataset(datasets, {"d0": 1, "d1": 3, "d2": 1}, seed=0))
    new.set_state(state)
    for index, name in enumerate(["d0", "d1"]):
        assert new._domain_iters[index].get_state() == positions[name]
    continued = take(new, 30)
    # The unchanged sources continue with the rows the old stream would have served next.
    expected_d0 = take(iter_from(datasets["d0"], positions["d0"]), 30)
    got_d0 = [r for r in continued if r["domain_ids"] == 0]
    assert_rows_equal(
        [{k: v for k, v in r.items() if k != "domain_ids"} for r in got_d0],
        expected_d0[: len(got_d0)],
    )
    assert {int(r["domain_ids"]) for r in continued} == {0, 1, 2}


def iter_from(dataset, state):
    iterator = iter(dataset)
    iterator.set_state(state)
    return iterator


def test_plans_encode_round_trip():
    iterator = iter(MixedDataset(packed_domains(), {"d0": 1, "d1": 1, "d2": 1}, seed=0))
    plans = iterator.next_plans(20)
    names = ("d0", "d1", "d2")
    encoded = json.loads(json.dumps(encode_plans(plans, names)))
    assert decode_plans(encoded, names) == plans
    with pytest.raises(ValueError, match="lacks"):
        decode_plans(encoded, ("d0", "d9"))


# ----------------------------------------------------------------------------- EXP3


def exp3(seed=0, **kwargs):
    return Exp3Mixing(packed_domains(), {"d0": 1, "d1": 1, "d2": 1}, seed=seed, **kwargs)


def drive(iterator, mixing, steps, losses_fn, rows_per_step=8):
    """Draws rows_per_step rows, then feeds losses; returns all rows drawn."""
    rows = []
    for step in range(steps):
        rows += take(iterator, rows_per_step)
        mixing.update(losses_fn(step))
    return rows


def skewed_losses(step):
    return np.array([4.0, 1.0, 0.5]) + 0.01 * step


def test_exp3_deterministic_given_seed_and_updates():
    first, second = exp3(seed=2), exp3(seed=2)
    rows_a = drive(iter(first), first, 30, skewed_losses)
    rows_b = drive(iter(second), second, 30, skewed_losses)
    assert_rows_equal(rows_a, rows_b)
    np.testing.assert_array_equal(first.bandit.policy(), second.bandit.policy())


def test_exp3_policy_moves_toward_high_loss_domain():
    mixing = exp3()
    drive(iter(mixing), mixing, 60, skewed_losses)
    policy = mixing.bandit.policy()
    assert policy[0] > policy[1] > policy[2]
    assert mixing.mixture["d0"] == pytest.approx(policy[0])


@pytest.mark.parametrize("cut_step", [0, 3, 17])
def test_exp3_resume_mid_stream_with_updates(cut_step):
    mixing = exp3(seed=4)
    iterator = iter(mixing)
    drive(iterator, mixing, cut_step, skewed_losses)
    take(iterator, 3)  # mid-step: some rows of the step drawn already
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 5)
    mixing.update(skewed_losses(cut_step))
    expected += drive(iterator, mixing, 10, skewed_losses)

    restored_mixing = exp3(seed=4)
    restored = iter(restored_mixing)
    restored.set_state(state)
    got = take(restored, 5)
    restored_mixing.update(skewed_losses(cut_step))
    got += drive(restored, restored_mixing, 10, skewed_losses)
    assert_rows_equal(got, expected)


def test_exp3_rows_drawn_with_the_reported_policy():
    """The weights policy() reports are the ones the very next rows are drawn with."""
    mixing = exp3(seed=9)
    iterator = iter(mixing)
    uniforms = RowUniforms(9)
    row = 0
    for step in range(25):
        policy = mixing.bandit.policy()
        plans = iterator.next_plans(8)
        expected = draw_domains(policy, uniforms.take(row, 8))
        assert [p.domain for p in plans] == expected.tolist()
        row += 8
        mixing.update(skewed_losses(step))


@pytest.mark.parametrize("prefetch", [1, 4])
def test_exp3_update_lag_is_prefetch_depth(prefetch):
    """A consumer reading P rows ahead sees an update take effect after at most P rows."""
    mixing = exp3(seed=1)
    iterator = iter(mixing)
    uniforms = RowUniforms(1)
    buffer = list(iterator.next_plans(prefetch))  # the read-ahead buffer, drawn pre-update
    old_policy = mixing.bandit.policy()
    for step in range(12):
        mixing.update(skewed_losses(step))
    new_policy = mixing.bandit.policy()
    assert not np.allclose(old_policy, new_policy)
    # Consume: the P buffered rows were drawn with the old policy, later rows with the new.
    consumed = buffer + iterator.next_plans(16)
    u = uniforms.take(0, prefetch + 16)
    np.testing.assert_array_equal(
        [p.domain for p in consumed[:prefetch]], draw_domains(old_policy, u[:prefetch])
    )
    np.testing.assert_array_equal(
        [p.domain for p in consumed[prefetch:]], draw_domains(new_policy, u[prefetch:])
    )


def test_exp3_realised_proportions_follow_policy():
    mixing = exp3(seed=3)
    iterator = iter(mixing)
    for step in range(40):
        mixing.update(skewed_losses(step))
    policy = mixing.bandit.policy()
    n = 3000
    domains = iterator.materialize(iterator.next_plans(n))["domain_ids"]
    counts = np.bincount(domains, minlength=3)
    for index in range(3):
        assert abs(counts[index] - n * policy[index]) <= binomial_bound(n, policy[index])


def test_exp3_update_by_name_and_unknown_name():
    mixing = exp3()
    for _ in range(10):
        mixing.update({"d0": 5.0, "d2": 0.1})
    assert mixing.bandit.step == 10
    with pytest.raises(KeyError, match="unknown domain 'zz'"):
        mixing.update({"zz": 1.0})


def test_exp3_state_restores_bandit_in_fresh_object():
    mixing = exp3(seed=6)
    iterator = iter(mixing)
    drive(iterator, mixing, 20, skewed_losses)
    state = json.loads(json.dumps(iterator.get_state()))
    fresh = exp3(seed=6)
    iter(fresh).set_state(state)
    np.testing.assert_array_equal(fresh.bandit.policy(), mixing.bandit.policy())


def test_exp3_reweighted_restore_keeps_rewards_by_name():
    mixing = exp3(seed=6)
    iterator = iter(mixing)
    drive(iterator, mixing, 20, skewed_losses)
    state = iterator.get_state()
    rewards = dict(zip(mixing.names, state["bandit"]["rewards"], strict=True))
    datasets = packed_domains(3)
    reordered = Exp3Mixing(
        {"d2": datasets["d2"], "d0": datasets["d0"], "d1": datasets["d1"]},
        {"d2": 1, "d0": 2, "d1": 1},
        seed=6,
    )
    with pytest.warns(UserWarning, match="rewards carried over by name"):
        iter(reordered).set_state(state)
    restored = reordered.bandit.state_dict()
    assert restored["rewards"] == [rewards["d2"], rewards["d0"], rewards["d1"]]
    assert restored["step"] == 20
