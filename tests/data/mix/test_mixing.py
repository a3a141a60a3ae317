"""mix_plans: proportions, determinism, exact resume, exhaustion, lag, policies, composition."""

import json
import math

import grain
import numpy as np
import pytest

from wf_data.data.mix.exp3 import Exp3
from wf_data.data.mix.mixing import Exp3Policy, RowUniforms, draw_domains, mix_plans
from wf_data.data.read.packing import pack
from wf_data.data.read.rows import read_rows
from wf_data.data.shards.sources import InMemorySource

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


def mixed(weights, num_domains=3, num_epochs=None, seed=0, **kwargs):
    """(mixer over the domains' plans, the same mixer mapped to rows)."""
    datasets = packed_domains(num_domains, num_epochs=num_epochs)
    mixer = mix_plans({n: ds.plans for n, ds in datasets.items()}, weights, seed=seed, **kwargs)
    return mixer, mixer.map(reader_of(datasets))


def reader_of(datasets):
    return read_rows([ds.docs for ds in datasets.values()], SEQ_LEN)


def domains_of(iterator, n):
    return np.array([next(iterator)["domain"] for _ in range(n)])


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
    mixer, _ = mixed(weights, seed=3)
    n = 3000
    counts = np.bincount(domains_of(iter(mixer), n), minlength=3)
    for index, weight in enumerate(weights.values()):
        assert abs(counts[index] - n * weight) <= binomial_bound(n, weight), counts


def test_rows_carry_their_domain():
    _, rows = mixed({"d0": 1, "d1": 1, "d2": 1})
    for row in take(iter(rows), 60):
        real = row["segment_ids"] > 0
        assert np.all(row["input_ids"][real] // 1_000_000 == row["domain_ids"])


def test_zero_weight_domain_is_never_drawn():
    mixer, _ = mixed({"d0": 1, "d1": 0, "d2": 1})
    assert 1 not in set(domains_of(iter(mixer), 400).tolist())


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"d0": 1, "d1": -1, "d2": 1}, "finite and >= 0"),
        ({"d0": 1, "d1": float("nan"), "d2": 1}, "finite and >= 0"),
        ({"d0": 0, "d1": 0, "d2": 0}, "positive sum"),
        ({"d0": 1, "d1": 1}, "missing \\['d2'\\]"),
        ({"d0": 1, "d1": 1, "d2": 1, "d9": 1}, "unknown \\['d9'\\]"),
        ({"d0": 1, "d1": "x", "d2": 1}, "not a number"),
        ({"d0": 1, "d1": True, "d2": 1}, "not a number"),
    ],
)
def test_bad_weights_fail_clearly(weights, message):
    with pytest.raises(ValueError, match=message):
        mixed(weights)


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_exhausted"):
        mixed({"d0": 1, "d1": 1, "d2": 1}, on_exhausted="wrap")
    with pytest.raises(TypeError, match="domain 'd0': expected a Grain"):
        mix_plans({"d0": [1, 2]}, {"d0": 1})
    with pytest.raises(ValueError, match="bandit has 2 domains"):
        mix_plans({n: ds.plans for n, ds in packed_domains().items()}, Exp3Policy(Exp3(2)))


@pytest.mark.parametrize("cut", [0, 1, 7, 33, 90])
def test_static_resume_is_exact(cut):
    _, rows = mixed({"d0": 2, "d1": 1, "d2": 1}, seed=5)
    iterator = iter(rows)
    take(iterator, cut)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 40)
    _, again = mixed({"d0": 2, "d1": 1, "d2": 1}, seed=5)
    restored = iter(again)
    restored.set_state(state)
    assert_rows_equal(take(restored, 40), expected)


def test_state_size_does_not_grow():
    mixer, _ = mixed({"d0": 1, "d1": 1, "d2": 1})
    iterator = iter(mixer)
    take(iterator, 10)
    small = len(json.dumps(iterator.get_state()))
    take(iterator, 1000)
    assert len(json.dumps(iterator.get_state())) <= small + 32


def test_stop_ends_at_first_exhausted_domain():
    datasets = packed_domains(num_epochs=1)
    rows_per_domain = [sum(1 for _ in iter(ds.plans)) for ds in datasets.values()]
    mixer = mix_plans(
        {n: ds.plans for n, ds in datasets.items()},
        {"d0": 1, "d1": 1, "d2": 1},
        on_exhausted="stop",
    )
    iterator = iter(mixer)
    counts = np.bincount([plan["domain"] for plan in iterator], minlength=3)
    # The stream stops when a draw hits a finished domain: one domain is complete, none over.
    assert np.any(counts == rows_per_domain)
    assert np.all(counts <= rows_per_domain)
    assert next(iterator, None) is None


def test_restart_replays_exhausted_domain():
    datasets = packed_domains(num_epochs=1)
    first_rows = list(iter(datasets["d0"]))
    mixer = mix_plans(
        {n: ds.plans for n, ds in datasets.items()},
        {"d0": 1, "d1": 0, "d2": 0},
        on_exhausted="restart",
    )
    iterator = iter(mixer.map(reader_of(datasets)))
    rows = take(iterator, 2 * len(first_rows))
    assert iterator.get_state()["domains"]["d0"]["restarts"] == 1
    assert_rows_equal(
        [{k: v for k, v in r.items() if k != "domain_ids"} for r in rows[len(first_rows) :]],
        first_rows,
    )


def test_reweighted_and_added_source_continue_unchanged_sources():
    old_mixer, old = mixed({"d0": 1, "d1": 1}, num_domains=2)
    iterator = iter(old)
    take(iterator, 50)
    state = iterator.get_state()
    positions = {name: state["domains"][name]["state"] for name in ["d0", "d1"]}
    datasets = packed_domains(3)
    mixer = mix_plans({n: ds.plans for n, ds in datasets.items()}, {"d0": 1, "d1": 3, "d2": 1})
    new = iter(mixer.map(reader_of(datasets)))
    new.set_state(state)
    assert {n: new.get_state()["domains"][n]["state"] for n in positions} == positions
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


def test_plain_grain_transformations_between_packer_mixer_and_reader():
    """Parents are any Grain datasets of plans: a concat MapDataset, a filtered best_fit,
    a shuffled MapDataset; rows are a plain `.map`; the state restores exactly."""
    docs = {k: domain_docs(k, 60, seed=7) for k in range(3)}
    concat = pack(docs[0], SEQ_LEN, "concat", seed=0, num_epochs=None)
    best_fit = pack(docs[1], SEQ_LEN, "best_fit", window_size=16, seed=1, num_epochs=None)
    shuffled = pack(docs[2], SEQ_LEN, "concat", seed=2)
    parents = {
        "d0": concat.plans,
        "d1": best_fit.plans.filter(lambda plan: len(plan["doc_ids"]) > 1),
        "d2": shuffled.plans.shuffle(seed=4),
    }
    assert isinstance(parents["d0"], grain.MapDataset)
    reader = read_rows(list(docs.values()), SEQ_LEN)

    def build():
        mixer = mix_plans(parents, {"d0": 1, "d1": 1, "d2": 1}, seed=3)
        return mixer.map(reader).map(lambda row: {**row, "real": (row["segment_ids"] > 0).sum()})

    iterator = iter(build())
    rows = take(iterator, 40)
    assert all(r["real"] == (r["segment_ids"] > 0).sum() for r in rows)
    assert {int(r["domain_ids"]) for r in rows} == {0, 1, 2}
    for row in rows:
        if row["domain_ids"] == 1:
            assert row["segment_ids"].max() > 1  # the filter on plans held
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 30)
    restored = iter(build())
    restored.set_state(state)
    assert_rows_equal(take(restored, 30), expected)


# ----------------------------------------------------------------------------- EXP3


def exp3(seed=0, **kwargs):
    policy = Exp3Policy(Exp3(3, seed=seed, **kwargs))
    return mixed(policy, seed=seed)


def drive(iterator, mixer, steps, losses_fn, rows_per_step=8):
    """Draws rows_per_step rows, then feeds losses; returns all rows drawn."""
    rows = []
    for step in range(steps):
        rows += take(iterator, rows_per_step)
        mixer.update(losses_fn(step))
    return rows


def skewed_losses(step):
    return np.array([4.0, 1.0, 0.5]) + 0.01 * step


def test_exp3_deterministic_given_seed_and_updates():
    (first, first_rows), (second, second_rows) = exp3(seed=2), exp3(seed=2)
    iterators = iter(first_rows), iter(second_rows)
    rows_a = drive(iterators[0], first, 30, skewed_losses)
    rows_b = drive(iterators[1], second, 30, skewed_losses)
    assert_rows_equal(rows_a, rows_b)
    np.testing.assert_array_equal(first.policy.probabilities(), second.policy.probabilities())


def test_exp3_policy_moves_toward_high_loss_domain():
    mixer, rows = exp3()
    iterator = iter(rows)
    drive(iterator, mixer, 60, skewed_losses)
    policy = mixer.policy.probabilities()
    assert policy[0] > policy[1] > policy[2]
    assert mixer.mixture["d0"] == pytest.approx(policy[0])
    assert mixer.policy.bandit.step == 60, "the mixer draws with the policy it was given"


@pytest.mark.parametrize("cut_step", [0, 3, 17])
def test_exp3_resume_mid_stream_with_updates(cut_step):
    mixer, rows = exp3(seed=4)
    iterator = iter(rows)
    drive(iterator, mixer, cut_step, skewed_losses)
    take(iterator, 3)  # mid-step: some rows of the step drawn already
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 5)
    mixer.update(skewed_losses(cut_step))
    expected += drive(iterator, mixer, 10, skewed_losses)

    restored_mixer, restored_rows = exp3(seed=4)
    restored = iter(restored_rows)
    restored.set_state(state)
    got = take(restored, 5)
    restored_mixer.update(skewed_losses(cut_step))
    got += drive(restored, restored_mixer, 10, skewed_losses)
    assert_rows_equal(got, expected)


def test_exp3_rows_drawn_with_the_reported_policy():
    """The weights policy() reports are the ones the very next rows are drawn with."""
    mixer, _ = exp3(seed=9)
    iterator = iter(mixer)
    uniforms = RowUniforms(9)
    row = 0
    for step in range(25):
        policy = mixer.policy.probabilities()
        expected = draw_domains(policy, uniforms.take(row, 8))
        assert domains_of(iterator, 8).tolist() == expected.tolist()
        row += 8
        mixer.update(skewed_losses(step))


def test_exp3_bulk_draws_match_row_by_row_across_blocks():
    """Domains are drawn in growing chunks per policy: across chunk and 4096-row block
    boundaries, with updates at irregular rows, each row still gets `draw_domains(policy in
    force, u_row)`."""
    mixer, _ = exp3(seed=4)
    iterator = iter(mixer)
    uniforms = RowUniforms(4)
    row = 0
    for step, count in enumerate([3, 70, 500, 3600, 1, 4200, 130]):
        policy = mixer.policy.probabilities()
        expected = draw_domains(policy, uniforms.take(row, count))
        assert domains_of(iterator, count).tolist() == expected.tolist()
        row += count
        if step % 3 != 2:  # some spans continue with the same policy
            mixer.update(skewed_losses(step))


@pytest.mark.parametrize("prefetch", [1, 4])
def test_exp3_update_lag_is_prefetch_depth(prefetch):
    """A consumer reading P rows ahead sees an update take effect after at most P rows."""
    mixer, _ = exp3(seed=1)
    iterator = iter(mixer)
    uniforms = RowUniforms(1)
    buffer = domains_of(iterator, prefetch).tolist()  # the read-ahead buffer, drawn pre-update
    old_policy = mixer.policy.probabilities()
    for step in range(12):
        mixer.update(skewed_losses(step))
    new_policy = mixer.policy.probabilities()
    assert not np.allclose(old_policy, new_policy)
    consumed = buffer + domains_of(iterator, 16).tolist()
    u = uniforms.take(0, prefetch + 16)
    np.testing.assert_array_equal(consumed[:prefetch], draw_domains(old_policy, u[:prefetch]))
    np.testing.assert_array_equal(consumed[prefetch:], draw_domains(new_policy, u[prefetch:]))


def test_exp3_realised_proportions_follow_policy():
    mixer, _ = exp3(seed=3)
    iterator = iter(mixer)
    for step in range(40):
        mixer.update(skewed_losses(step))
    policy = mixer.policy.probabilities()
    n = 3000
    counts = np.bincount(domains_of(iterator, n), minlength=3)
    for index in range(3):
        assert abs(counts[index] - n * policy[index]) <= binomial_bound(n, policy[index])


def test_exp3_update_keys():
    mixer, _ = exp3()
    iterator = iter(mixer)
    for _ in range(10):
        mixer.update({"d0": 5.0, "d2": 0.1})
    mixer.update({0: 5.0, 2: 0.1})
    assert mixer.policy.bandit.step == 11
    with pytest.raises(KeyError, match="unknown domain 'zz'"):
        mixer.update({"zz": 1.0})
    with pytest.raises(TypeError, match="key True"):
        mixer.update({True: 1.0})
    with pytest.raises(KeyError, match="index 3 out of range"):
        mixer.update({3: 1.0})
    with pytest.raises(TypeError, match="must be a number"):
        mixer.update({"d0": "high"})
    assert mixer.policy.bandit.step == 11
    next(iterator)


def test_static_mixture_refuses_updates():
    mixer, _ = mixed({"d0": 1, "d1": 1, "d2": 1})
    iter(mixer)
    with pytest.raises(TypeError, match="exp3"):
        mixer.update({"d0": 1.0})


def test_exp3_state_restores_bandit_in_fresh_iterator():
    mixer, rows = exp3(seed=6)
    iterator = iter(rows)
    drive(iterator, mixer, 20, skewed_losses)
    state = json.loads(json.dumps(iterator.get_state()))
    fresh, _ = exp3(seed=6)
    fresh_iterator = iter(fresh)
    fresh_iterator.set_state(state)
    np.testing.assert_array_equal(fresh.policy.probabilities(), mixer.policy.probabilities())


def test_exp3_reweighted_restore_keeps_rewards_by_name():
    mixer, rows = exp3(seed=6)
    iterator = iter(rows)
    drive(iterator, mixer, 20, skewed_losses)
    state = iterator.get_state()
    rewards = dict(zip(mixer.names, state["policy"]["rewards"], strict=True))
    datasets = packed_domains(3)
    reordered = mix_plans(
        {"d2": datasets["d2"].plans, "d0": datasets["d0"].plans, "d1": datasets["d1"].plans},
        Exp3Policy(Exp3(3, prior=[1, 2, 1], seed=6)),
        seed=6,
    )
    reordered_iterator = iter(reordered)
    with pytest.warns(UserWarning, match="rewards carried over by name"):
        reordered_iterator.set_state(state)
    restored = reordered.policy.bandit.state_dict()
    assert restored["rewards"] == [rewards["d2"], rewards["d0"], rewards["d1"]]
    assert restored["step"] == 20
