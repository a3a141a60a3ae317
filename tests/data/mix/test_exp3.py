"""Tests for wf_data.data.mix.exp3.Exp3 and the tools/simulate_odm.py simulation."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from wf_data.data.mix.exp3 import UPDATE_RULES, Exp3
from wf_data.data.mix.rewards import REWARDS

REPO = Path(__file__).resolve().parents[3]


def reference_run(k, alpha, prior, loss_rows, warmup_steps=0):
    """The issue's formulas step by step in plain Python: (policies before each update, R)."""
    prior = [p / sum(prior) for p in prior]

    def eps(s):
        return 1.0 / k if s == 0 else min(1.0 / k, math.sqrt(math.log(k) / (k * s)))

    rewards = [0.0] * k
    policies = []
    for n, row in enumerate(loss_rows):
        t = n + 1
        if n < warmup_steps:
            pi = list(prior)
        else:
            exps = [math.exp(eps(t - 1) * r) for r in rewards]
            total = sum(exps)
            pi = [
                (1 - k * eps(t)) * e / total + k * eps(t) * p
                for e, p in zip(exps, prior, strict=True)
            ]
        policies.append(pi)
        for i, loss in enumerate(row):
            if loss is not None:
                rewards[i] = alpha * rewards[i] + (1 - alpha) * loss / pi[i]
    return policies, rewards


def fixed_losses(k, steps, seed=0, observe_prob=0.7):
    """A fixed (steps, K) loss sequence with None for unobserved domains."""
    rng = np.random.default_rng([seed, 7])
    losses = rng.uniform(0.5, 4.0, size=(steps, k)) * (1 + np.arange(k)) / k
    observed = rng.random((steps, k)) < observe_prob
    return [
        [float(v) if o else None for v, o in zip(r, m, strict=True)]
        for r, m in zip(losses, observed, strict=True)
    ]


def as_array(row):
    return np.array([np.nan if v is None else v for v in row])


def as_mapping(row):
    return {i: v for i, v in enumerate(row) if v is not None}


@pytest.mark.parametrize(
    "k, alpha, prior",
    [(4, 0.9, None), (3, 0.5, [3.0, 1.0, 2.0]), (22, 0.9, None), (6, 0.0, [1, 2, 3, 4, 5, 6])],
)
@pytest.mark.parametrize("form", ["array", "mapping"])
def test_matches_step_by_step_formulas(k, alpha, prior, form):
    steps = 120
    rows = fixed_losses(k, steps, seed=k)
    prior_list = [1.0] * k if prior is None else [float(p) for p in prior]
    expected_policies, expected_rewards = reference_run(k, alpha, prior_list, rows)
    bandit = Exp3(k, alpha=alpha, prior=prior)
    for n, row in enumerate(rows):
        np.testing.assert_allclose(bandit.policy(), expected_policies[n], rtol=0, atol=1e-12)
        assert bandit.step == n
        bandit.update(as_array(row) if form == "array" else as_mapping(row))
    np.testing.assert_allclose(bandit.rewards, expected_rewards, rtol=1e-12, atol=1e-12)
    assert abs(bandit.policy().sum() - 1.0) < 1e-12


def test_policy_equals_prior_until_exploration_decays():
    k = 4  # eps_t = 1/K while t <= K ln K = 5.55: the first 5 policies are the prior
    prior = [0.4, 0.3, 0.2, 0.1]
    bandit = Exp3(k, prior=prior)
    for _ in range(5):
        np.testing.assert_allclose(bandit.policy(), prior, atol=1e-15)
        bandit.update([1.0, 2.0, 3.0, 4.0])
    assert bandit.step == 5
    assert bandit.rewards[3] > bandit.rewards[0] > 0
    assert np.abs(bandit.policy() - prior).max() > 1e-3  # t = 6 > K ln K: the rewards count


def test_policy_moves_toward_high_loss_domain():
    bandit = Exp3(3)
    for _ in range(300):
        bandit.update([1.0, 1.0, 3.0])
    policy = bandit.policy()
    assert policy[2] > 1 / 3 > policy[0]
    assert policy[0] == pytest.approx(policy[1], abs=1e-12)


def test_policy_is_cached_read_only_and_recomputed_after_update():
    bandit = Exp3(5)
    first = bandit.policy()
    assert bandit.policy() is first
    assert first.dtype == np.float64 and first.shape == (5,)
    with pytest.raises(ValueError):
        first[0] = 1.0
    bandit.update({0: 2.0})
    assert bandit.policy() is not first


def test_prior_is_normalised_and_validated():
    bandit = Exp3(3, prior=[2, 1, 1])
    np.testing.assert_allclose(bandit.prior, [0.5, 0.25, 0.25])
    np.testing.assert_allclose(bandit.policy(), [0.5, 0.25, 0.25])
    for bad, match in [
        ([1, 2], "shape"),
        ([1, -1, 1], ">= 0"),
        ([1, np.nan, 1], "finite"),
        ([1, np.inf, 1], "finite"),
        ([0, 0, 0], "positive sum"),
    ]:
        with pytest.raises(ValueError, match=match):
            Exp3(3, prior=bad)
    with pytest.raises(TypeError, match="mapping"):
        Exp3(3, prior={0: 1.0})


def test_prior_with_zero_weight_warns_instead_of_dividing_by_zero():
    bandit = Exp3(3, prior=[1, 1, 0], warmup_steps=2)
    assert bandit.policy()[2] == 0.0
    with pytest.warns(RuntimeWarning, match="domain 2 has policy weight 0"):
        bandit.update([1.0, 2.0, 5.0])
    assert np.isfinite(bandit.rewards).all() and bandit.rewards[2] == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"min_weight": 0.5}, "infeasible"),
        ({"max_weight": 0.2}, "infeasible"),
        ({"min_weight": 0.3, "max_weight": 0.2}, "exceeds"),
        ({"min_weight": -0.1}, "min_weight"),
    ],
)
def test_constructor_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Exp3(3, **kwargs)


def test_constructor_validates_num_domains():
    with pytest.raises(ValueError, match="num_domains"):
        Exp3(0)
    with pytest.raises(TypeError, match="num_domains"):
        Exp3(2.0)


def test_update_validates_indices_and_shape():
    bandit = Exp3(3)
    with pytest.raises(ValueError, match=r"out of range, valid: 0\.\.2"):
        bandit.update({3: 1.0})
    with pytest.raises(ValueError, match="out of range"):
        bandit.update({-1: 1.0})
    with pytest.raises(TypeError, match="ints"):
        bandit.update({"web": 1.0})
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        bandit.update([1.0, 2.0])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        bandit.update(np.ones((3, 1)))
    assert bandit.step == 0  # nothing was applied
    bandit.update({np.int64(2): np.float32(1.5)})
    assert bandit.step == 1


def test_nan_and_inf_losses_are_ignored_with_a_warning():
    bandit = Exp3(3, alpha=0.5)
    bandit.update([1.0, 1.0, 1.0])
    before = bandit.rewards
    with pytest.warns(RuntimeWarning, match="domain 1 loss is nan"):
        bandit.update({0: 2.0, 1: float("nan")})
    with pytest.warns(RuntimeWarning, match="domain 2 loss is inf"):
        bandit.update(np.array([np.nan, 1.0, np.inf]))
    with pytest.warns(RuntimeWarning, match="domain 0 loss is -inf"):
        bandit.update({0: -math.inf})
    rewards = bandit.rewards
    assert np.isfinite(rewards).all() and np.isfinite(bandit.policy()).all()
    assert rewards[2] == before[2]  # inf never reached R
    assert rewards[0] != before[0] and rewards[1] != before[1]
    assert bandit.step == 4
    # NaN in the array form means "unobserved": silent, R unchanged.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bandit.update(np.full(3, np.nan))
    np.testing.assert_array_equal(bandit.rewards, rewards)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("rule, loss", [("paper", 1.7e308), ("smoothed_mean", 800.0)])
def test_reward_overflow_without_a_cap_is_ignored_with_a_warning(rule, loss):
    bandit = Exp3(2, alpha=0.0, update_rule=rule, reward_cap=math.inf)
    with pytest.warns(RuntimeWarning, match="domain 1 loss .* overflows"):
        bandit.update(np.array([1.0, loss]))
    assert np.isfinite(bandit.rewards).all() and bandit.rewards[0] > 0


def test_update_accepts_torch_and_jax_arrays():
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    losses = [1.5, float("nan"), 3.0]
    reference = Exp3(3)
    reference.update(np.array(losses))
    for converted in (torch.tensor(losses, dtype=torch.float64), jnp.asarray(losses)):
        bandit = Exp3(3)
        bandit.update(converted)
        np.testing.assert_allclose(bandit.rewards, reference.rewards, rtol=1e-6)


@pytest.mark.parametrize("min_weight, max_weight", [(0.1, None), (None, 0.3), (0.05, 0.4)])
def test_bounds_hold_and_rescale_the_unclipped_entries(min_weight, max_weight):
    k = 5
    prior = [0.02, 0.08, 0.2, 0.3, 0.4]  # outside the bounds at first: clipping is exercised
    bounded = Exp3(k, alpha=0.5, prior=prior, min_weight=min_weight, max_weight=max_weight)
    free = Exp3(k, alpha=0.5, prior=prior)
    lo = min_weight or 0.0
    hi = max_weight or 1.0
    saw_clipping = False
    for step in range(200):
        losses = np.array([0.2, 0.5, 1.0, 4.0, 9.0]) * (1 + 0.1 * np.sin(step))
        policy = bounded.policy()
        assert abs(policy.sum() - 1.0) < 1e-12
        assert policy.min() >= lo - 1e-12 and policy.max() <= hi + 1e-12
        # Same rewards -> the bounded policy is clip(c * unbounded policy, lo, hi).
        free.load_state_dict({**free.state_dict(), "rewards": bounded.rewards.tolist()})
        free_policy = free.policy()
        inside = (policy > lo + 1e-12) & (policy < hi - 1e-12)
        if inside.sum() < k:
            saw_clipping = True
        if inside.any():
            ratio = policy[inside] / free_policy[inside]
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-10)
            assert np.all(free_policy[policy <= lo + 1e-12] * ratio[0] <= lo + 1e-12)
            assert np.all(free_policy[policy >= hi - 1e-12] * ratio[0] >= hi - 1e-12)
        bounded.update(losses)
        free.update(losses)
    assert saw_clipping


def test_bounds_equal_to_one_over_k_force_uniform():
    bandit = Exp3(4, min_weight=0.25, max_weight=0.25, prior=[5, 1, 1, 1])
    for _ in range(20):
        np.testing.assert_allclose(bandit.policy(), 0.25, atol=1e-15)
        bandit.update([1.0, 2.0, 3.0, 4.0])


def test_warmup_keeps_the_prior_while_rewards_accumulate():
    k, warmup = 3, 40
    prior = [0.5, 0.3, 0.2]
    rows = fixed_losses(k, 80, seed=3, observe_prob=1.0)
    expected_policies, expected_rewards = reference_run(k, 0.9, prior, rows, warmup)
    bandit = Exp3(k, prior=prior, warmup_steps=warmup)
    for n, row in enumerate(rows):
        if n < warmup:
            np.testing.assert_array_equal(bandit.policy(), bandit.prior)
        np.testing.assert_allclose(bandit.policy(), expected_policies[n], atol=1e-12)
        bandit.update(as_array(row))
    np.testing.assert_allclose(bandit.rewards, expected_rewards, rtol=1e-12)
    assert np.abs(bandit.policy() - np.array(prior)).max() > 1e-3


def test_state_round_trip_through_json():
    rows = fixed_losses(6, 50, seed=11)
    bandit = Exp3(6, alpha=0.8, prior=[1, 2, 3, 4, 5, 6], min_weight=0.05, warmup_steps=3)
    for row in rows[:30]:
        bandit.update(as_mapping(row))
    state = json.loads(json.dumps(bandit.state_dict()))
    assert state["step"] == 30 and len(state["rewards"]) == 6
    restored = Exp3(6, alpha=0.8, prior=[1, 2, 3, 4, 5, 6], min_weight=0.05, warmup_steps=3)
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.policy(), bandit.policy())
    for row in rows[30:]:
        bandit.update(as_mapping(row))
        restored.update(as_mapping(row))
        np.testing.assert_array_equal(restored.policy(), bandit.policy())
    assert restored.step == bandit.step == 50


@pytest.mark.parametrize(
    "other, match",
    [
        (Exp3(5, alpha=0.8), "num_domains=4"),
        (Exp3(4, alpha=0.7), "alpha=0.8"),
        (Exp3(4, alpha=0.8, prior=[1, 1, 1, 2]), "prior="),
    ],
)
def test_load_state_refuses_a_different_configuration(other, match):
    state = Exp3(4, alpha=0.8).state_dict()
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(state)


def test_load_state_validates_values():
    bandit = Exp3(2)
    state = bandit.state_dict()
    with pytest.raises(ValueError, match="finite"):
        bandit.load_state_dict({**state, "rewards": [0.0, float("nan")]})
    with pytest.raises(ValueError, match="lacks"):
        bandit.load_state_dict({"num_domains": 2})


def test_single_domain_is_trivial():
    bandit = Exp3(1)
    for _ in range(3):
        np.testing.assert_array_equal(bandit.policy(), [1.0])
        bandit.update([2.0])


# --- tools/simulate_odm.py ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulate_odm():
    spec = importlib.util.spec_from_file_location("simulate_odm", REPO / "tools/simulate_odm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["simulate_odm"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("simulate_odm", None)


@pytest.mark.parametrize("seed", [0, 1])
def test_simulation_moves_weight_to_the_slow_learning_domain(simulate_odm, seed):
    domains = simulate_odm.default_domains()
    slow = domains.names.index("math")
    fast = domains.names.index("code")
    assert domains.rate[slow] == domains.rate.min() and domains.rate[fast] == domains.rate.max()
    exp3 = simulate_odm.simulate(domains, mixer="exp3", steps=300, seed=seed)
    static = simulate_odm.simulate(domains, mixer="static", steps=300, seed=seed)
    assert exp3.policy.shape == exp3.loss.shape == (300, 5)
    final = exp3.final_policy
    assert final.argmax() == slow and final.argmin() == fast
    assert final[slow] > 0.2 + 0.005 and final[fast] < 0.2 - 0.005
    np.testing.assert_allclose(static.policy, 0.2)
    # More rows for the slow domain lowers its loss below the static run's.
    assert exp3.rows_seen[-1, slow] > static.rows_seen[-1, slow]
    again = simulate_odm.simulate(domains, mixer="exp3", steps=300, seed=seed)
    np.testing.assert_array_equal(again.policy, exp3.policy)


def demo_mixing_options(**changes):
    """The demo config's EXP3 settings (the default setting) as `Exp3` keyword arguments."""
    import dataclasses

    from wf_data.config import load_data_config
    from wf_data.data.mix.exp3 import Exp3Options

    mixing = load_data_config("demo", check_paths=False).mixing
    options = {f.name: getattr(mixing, f.name) for f in dataclasses.fields(Exp3Options)}
    options.pop("reference_losses")  # none in the demo config: its reward needs none
    return {**options, **changes}


def _study_simulation(simulate_odm, options, seed):
    """Final token share per domain of the EXP3 run, and both runs' final average loss."""
    domains = simulate_odm.study_domains()
    runs = {
        mixer: simulate_odm.simulate(
            domains, mixer=mixer, steps=120, batch_size=8, seed=seed, **options
        )
        for mixer in ("exp3", "static")
    }
    rows = runs["exp3"].rows_seen[-1]
    final = {mixer: domains.expected_loss(run.rows_seen[-1]).mean() for mixer, run in runs.items()}
    return dict(zip(domains.names, rows / rows.sum(), strict=True)), final


@pytest.mark.parametrize("seed", range(6))
def test_study_simulation_keeps_the_unlearnable_domain_at_its_floor(simulate_odm, seed):
    """The study's five domains as curves (120 steps of 8 rows): under the log-ratio reward (a
    common scale), `random` (no progress) gets at most 1.5 times its floor of the tokens, and
    the average loss ends below the static run's."""
    options = demo_mixing_options(reward="relative_decrease")
    share, final = _study_simulation(simulate_odm, options, seed)
    assert share["random"] <= 1.5 * options["min_weight"], share
    assert final["exp3"] < final["static"]


@pytest.mark.parametrize("seed", range(6))
def test_study_simulation_under_the_demo_default(simulate_odm, seed):
    """The demo's setting (progress per token) on the same curves: the average loss ends below
    the static run's and `random` gets less than half of its static share. Its rare rows make
    its per-token progress noisy (a small fall divided by a small weight), so in the simulation
    it sits above the floor more often than under the log ratio (the real study: docs/mixing.md)."""
    options = demo_mixing_options()
    assert options["reward"] == "loss_decrease_per_token"
    share, final = _study_simulation(simulate_odm, options, seed)
    assert share["random"] < 0.5 * 0.2, share
    assert final["exp3"] < final["static"]


@pytest.mark.slow
def test_simulation_main_prints_table_and_writes_png(simulate_odm, tmp_path, capsys):
    out = tmp_path / "plots" / "odm.png"
    assert simulate_odm.main(["--steps", "60", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "final EXP3 weights: web=" in printed and "static" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob("*.tmp"))  # pathlib globs dotfiles too


# --- hand-computed vectors of both update rules ---------------------------------------------


def test_paper_rule_hand_computed_vector():
    # K = 2, alpha = 0.5, uniform prior. eps_1 = min(1/2, sqrt(ln 2 / 2)) = 1/2, so the first
    # policy is the prior; eps_2 = sqrt(ln 2 / 4).
    bandit = Exp3(2, alpha=0.5)
    np.testing.assert_allclose(bandit.policy(), [0.5, 0.5], atol=1e-15)
    bandit.update([1.0, 3.0])  # R = 0.5 * 0 + 0.5 * L / 0.5 = L
    np.testing.assert_allclose(bandit.rewards, [1.0, 3.0], rtol=1e-15)
    eps_1, eps_2 = 0.5, math.sqrt(math.log(2) / 4)
    soft = [1 / (1 + math.exp(eps_1 * 2)), math.exp(eps_1 * 2) / (1 + math.exp(eps_1 * 2))]
    pi = [(1 - 2 * eps_2) * soft[i] + 2 * eps_2 * 0.5 for i in range(2)]
    np.testing.assert_allclose(bandit.policy(), pi, rtol=1e-12)
    bandit.update({1: 2.0})  # only domain 1 observed: R_1 = 0.5 * 3 + 0.5 * 2 / pi_1
    np.testing.assert_allclose(bandit.rewards, [1.0, 1.5 + 1.0 / pi[1]], rtol=1e-12)


def test_smoothed_mean_rule_hand_computed_vector():
    # K = 3, alpha = 0.5, losses ln 2, ln 4, ln 8 so that exp(L) is 2, 4, 8.
    bandit = Exp3(3, alpha=0.5, update_rule="smoothed_mean", prior=[2, 1, 1])
    np.testing.assert_allclose(bandit.policy(), [0.5, 0.25, 0.25])  # n = 0: the prior
    bandit.update([math.log(2), math.log(4), np.nan])
    np.testing.assert_allclose(bandit.rewards, [1.0, 2.0, 0.0], rtol=1e-12)
    # eps_1 = min(1/3, sqrt(log10 3 / 3)) = 1/3: uniform exploration takes all the mass.
    np.testing.assert_allclose(bandit.policy(), [1 / 3] * 3, rtol=1e-12)
    bandit.update({0: math.log(2), 1: math.log(2), 2: math.log(8)})
    rewards = [0.5 * 1 + 0.5 * 2, 0.5 * 2 + 0.5 * 2, 0.5 * 0 + 0.5 * 8]  # 1.5, 2, 4
    np.testing.assert_allclose(bandit.rewards, rewards, rtol=1e-12)
    eps_2 = math.sqrt(math.log10(3) / 6)
    pi = [(1 - 3 * eps_2) * r / 7.5 + eps_2 for r in rewards]
    np.testing.assert_allclose(bandit.policy(), pi, rtol=1e-12)
    assert eps_2 < 1 / 3 and pi[2] > pi[1] > pi[0]


def test_proportional_rule_hand_computed_vector():
    # K = 3, alpha = 0.5, reward = loss, floor 0.05. R = 0.5 * [1, 2, 0] = [0.5, 1, 0]: domain 2
    # earns nothing and sits at the floor; the others share 0.95 as 1 : 2.
    bandit = Exp3(3, alpha=0.5, update_rule="proportional", min_weight=0.05, prior=[2, 1, 1])
    np.testing.assert_allclose(bandit.policy(), [0.5, 0.25, 0.25])  # no positive R: the prior
    bandit.update([1.0, 2.0, np.nan])
    np.testing.assert_allclose(bandit.rewards, [0.5, 1.0, 0.0], rtol=1e-15)
    np.testing.assert_allclose(bandit.policy(), [0.95 / 3, 1.9 / 3, 0.05], rtol=1e-12)
    # Rewards are signed: a negative one pulls R down, and R <= 0 weighs nothing.
    bandit = Exp3(2, alpha=0.5, update_rule="proportional", min_weight=0.1, reward_cap=1.0)
    bandit.update([3.0, 0.5])  # the cap: 3 counts as 1
    np.testing.assert_allclose(bandit.rewards, [0.5, 0.25], rtol=1e-15)
    np.testing.assert_allclose(bandit.policy(), [2 / 3, 1 / 3], rtol=1e-12)


@pytest.mark.parametrize("reward", ["loss_decrease", "loss_decrease_per_token"])
def test_proportional_rule_settles_where_the_rates_per_row_say(reward):
    """Domains whose loss falls by c per unit of weight served: progress per token settles the
    policy at c / sum(c) (floor aside); plain progress feeds the leader its own rows and runs
    away to the fastest domain."""
    rates = np.array([0.01, 0.02, 0.05])
    bandit = Exp3(3, update_rule="proportional", reward=reward, min_weight=0.05, alpha=0.9)
    served = np.zeros(3)
    for _ in range(400):
        bandit.update(100.0 - rates * served)
        served += bandit.policy()
    if reward == "loss_decrease_per_token":
        np.testing.assert_allclose(bandit.policy(), rates / rates.sum(), atol=0.01)
    else:
        np.testing.assert_allclose(bandit.policy(), [0.05, 0.05, 0.9], atol=0.01)


@pytest.mark.parametrize("unit", [0.1, 1 / math.log(2), 10.0])
def test_proportional_policy_does_not_depend_on_the_unit_of_the_reward(unit):
    """Losses in nats or bits (or scaled) give the same mixture; smoothed_mean's exp does not."""
    rows = fixed_losses(4, 30, seed=3)
    policies = {}
    for scale in (1.0, unit):
        bandit = Exp3(4, update_rule="proportional", min_weight=0.02, reward_cap=math.inf)
        for row in rows:
            bandit.update(as_array(row) * scale)
        policies[scale] = bandit.policy()
    np.testing.assert_allclose(policies[unit], policies[1.0], rtol=1e-12)


def test_proportional_rule_needs_a_floor():
    with pytest.raises(ValueError, match="needs min_weight > 0"):
        Exp3(3, update_rule="proportional")
    with pytest.raises(ValueError, match="needs min_weight > 0"):
        Exp3(3, update_rule="proportional", min_weight=0.0)


def test_smoothed_mean_eps_clock_counts_warmup_steps():
    warm = Exp3(3, alpha=0.5, update_rule="smoothed_mean", warmup_steps=4)
    cold = Exp3(3, alpha=0.5, update_rule="smoothed_mean")
    for n in range(6):
        losses = [1.0, 2.0 + n / 10, 0.5]
        if n < 4:
            np.testing.assert_array_equal(warm.policy(), warm.prior)
        else:  # same R and same clock: the policy is the unwarmed one
            np.testing.assert_allclose(warm.policy(), cold.policy(), rtol=1e-15)
        warm.update(losses)
        cold.update(losses)
    eps_6 = math.sqrt(math.log10(3) / 18)
    share = warm.rewards / warm.rewards.sum()
    np.testing.assert_allclose(warm.policy(), (1 - 3 * eps_6) * share + eps_6, rtol=1e-12)


@pytest.mark.parametrize("rule", UPDATE_RULES)
@pytest.mark.parametrize("reward", REWARDS)
def test_state_round_trip_every_rule_and_reward(rule, reward):
    kwargs = dict(update_rule=rule, reward=reward, reference_losses=[1.0, 2.0, 0.5, 1.5], alpha=0.8)
    if rule == "proportional":
        kwargs["min_weight"] = 0.02
    rows = fixed_losses(4, 60, seed=5)
    bandit = Exp3(4, **kwargs)
    for row in rows[:25]:
        bandit.update(as_array(row))
    state = json.loads(json.dumps(bandit.state_dict()))
    restored = Exp3(4, **kwargs)
    restored.load_state_dict(state)
    for row in rows[25:]:
        np.testing.assert_array_equal(restored.policy(), bandit.policy())
        bandit.update(as_array(row))
        restored.update(as_array(row))
    np.testing.assert_array_equal(restored.rewards, bandit.rewards)
    # The policy moved away from the prior: the rule and reward are exercised.
    assert np.abs(bandit.policy() - 0.25).max() > 1e-3


def test_load_state_refuses_another_rule_or_reward_and_reads_version_1():
    state = Exp3(3, update_rule="smoothed_mean").state_dict()
    with pytest.raises(ValueError, match="update_rule='smoothed_mean'"):
        Exp3(3).load_state_dict(state)
    state = Exp3(3, reward="loss_decrease").state_dict()
    with pytest.raises(ValueError, match="reward='loss_decrease'"):
        Exp3(3).load_state_dict(state)
    old = Exp3(3)
    old.update([1.0, 2.0, 3.0])
    version_1 = {
        key: value
        for key, value in old.state_dict().items()
        if key not in ("update_rule", "reward", "reward_state")
    }
    version_1["version"] = 1
    restored = Exp3(3)
    restored.load_state_dict(version_1)
    np.testing.assert_array_equal(restored.policy(), old.policy())
    with pytest.raises(ValueError, match="update_rule='paper'"):
        Exp3(3, update_rule="smoothed_mean").load_state_dict(version_1)


# --- input safety (issue 10 case 10) --------------------------------------------------------


@pytest.mark.parametrize(
    "losses, error, match",
    [
        ({True: 1.0}, TypeError, "domain keys must be ints.*True"),
        ({np.bool_(False): 1.0}, TypeError, "domain keys must be ints"),
        ({1.0: 1.0}, TypeError, "domain keys must be ints"),
        ({"0": 1.0}, TypeError, "domain keys must be ints"),
        ({0: "2.5"}, TypeError, "domain 0 loss must be a real number, got '2.5'"),
        ({1: True}, TypeError, "domain 1 loss must be a real number, got True"),
        ({2: None}, TypeError, "domain 2 loss must be a real number"),
        ({0: np.bool_(True)}, TypeError, "domain 0 loss must be a real number"),
        ([1.0, "x", 2.0], TypeError, "domain 1 loss must be a real number"),
        ([1.0, False, 2.0], TypeError, "domain 1 loss must be a real number"),
        (np.array([True, False, True]), TypeError, "dtype bool"),
        (np.array(["1", "2", "3"]), TypeError, "dtype <U1"),
        ("1.0", TypeError, "got str"),
    ],
)
def test_update_rejects_non_numeric_and_bool_keys_and_values(losses, error, match):
    bandit = Exp3(3)
    with pytest.raises(error, match=match):
        bandit.update(losses)
    assert bandit.step == 0 and not bandit.rewards.any()


@pytest.mark.parametrize("rule", ["paper", "smoothed_mean"])
def test_negative_and_infinite_losses_warn_and_are_ignored(rule):
    bandit = Exp3(3, alpha=0.5, update_rule=rule)
    bandit.update([1.0, 1.0, 1.0])
    before = bandit.rewards
    with pytest.warns(RuntimeWarning, match=r"domain 1 loss is -0\.5; losses must be finite"):
        bandit.update({0: 2.0, 1: -0.5})
    with pytest.warns(RuntimeWarning, match="domain 2 loss is -1.0"):
        bandit.update(np.array([np.nan, np.nan, -1.0]))
    with pytest.warns(RuntimeWarning, match="domain 0 loss is inf"):
        bandit.update([math.inf, np.nan, np.nan])
    assert bandit.rewards[1] == before[1] and bandit.rewards[2] == before[2]
    assert bandit.rewards[0] != before[0] and bandit.step == 4


@pytest.mark.parametrize("rule", ["paper", "smoothed_mean"])
def test_one_huge_loss_cannot_pin_a_domain(rule):
    """After a 1e308 loss the policy recovers within tens of steps thanks to the cap; without a
    cap the same spike (1e300 for paper, 700 nats for smoothed_mean) holds it for hundreds."""

    def steps_pinned(reward_cap, spike):
        bandit = Exp3(3, update_rule=rule, reward_cap=reward_cap)
        for _ in range(200):
            bandit.update([2.0, 2.0, 2.0])
        bandit.update([2.0, spike, 2.0])
        for step in range(2000):
            if bandit.policy()[1] < 0.5:
                return step
            bandit.update([2.0, 2.0, 2.0])
        return 2000

    capped = steps_pinned(None, 1e308)
    assert 0 < capped <= 60
    uncapped = steps_pinned(math.inf, 1e300 if rule == "paper" else 700.0)
    assert uncapped >= 300


def test_reward_cap_defaults_and_validation():
    assert Exp3(2).reward_cap == 1e4
    assert Exp3(2, update_rule="smoothed_mean").reward_cap == pytest.approx(math.exp(10))
    bandit = Exp3(2, alpha=0.5)
    bandit.update([1.0, 1e308])  # the first policy is the prior: R = 0.5 min(L / 0.5, cap)
    np.testing.assert_allclose(bandit.rewards, [1.0, 0.5e4])
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="reward_cap"):
            Exp3(2, reward_cap=bad)
    with pytest.raises(ValueError, match="update_rule"):
        Exp3(2, update_rule="ema")
    with pytest.raises(ValueError, match="reward must be one of"):
        Exp3(2, reward="accuracy")


# --- bandit_from_config -----------------------------------------------------------------------


def test_exp3_defaults_are_written_once():
    """`MixingConfig` takes every bandit default from `Exp3Options`; `Exp3` uses them too."""
    import dataclasses

    from wf_data.config import MixingConfig
    from wf_data.data.mix.exp3 import Exp3Options, bandit_from_config

    config = MixingConfig()
    for field in dataclasses.fields(Exp3Options):
        if field.name != "reference_losses":  # {} in the config schema: no reference
            assert getattr(config, field.name) == field.default, field.name
    from_config = bandit_from_config(MixingConfig(kind="exp3"), 3).state_dict()
    assert from_config == Exp3(3).state_dict()
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['alhpa'\]"):
        Exp3(3, alhpa=0.5)


def test_bandit_from_config_reads_every_field():
    from wf_data.config import MixingConfig
    from wf_data.data.mix.exp3 import bandit_from_config

    cfg = MixingConfig(
        kind="exp3",
        alpha=0.7,
        update_rule="smoothed_mean",
        reward="excess_loss",
        reference_losses={"b": 2.0, "a": 1.0},
        warmup_fraction=0.1,
        total_steps=300,
        min_weight=0.1,
        reward_cap=50.0,
    )
    bandit = bandit_from_config(cfg, 2, prior=[3, 1], seed=4, domain_names=["a", "b"])
    assert (bandit.update_rule, bandit.reward, bandit.alpha) == (
        "smoothed_mean",
        "excess_loss",
        0.7,
    )
    assert (bandit.warmup_steps, bandit.min_weight, bandit.reward_cap) == (30, 0.1, 50.0)
    np.testing.assert_allclose(bandit.prior, [0.75, 0.25])
    bandit.update([1.5, 1.0])  # excess = max(L - ref, 0) = [0.5, 0]
    np.testing.assert_allclose(bandit.rewards, 0.3 * np.exp([0.5, 0.0]), rtol=1e-12)
    default = bandit_from_config(MixingConfig(kind="exp3"), 3)
    assert (default.update_rule, default.reward, default.warmup_steps) == ("paper", "loss", 0)
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        bandit_from_config(
            MixingConfig(reward="excess_loss", reference_losses={"a": 1.0}),
            2,
            domain_names=["a", "b"],
        )
    with pytest.raises(ValueError, match="needs reference losses"):
        bandit_from_config(MixingConfig(reward="excess_loss"), 2, domain_names=["a", "b"])
    with pytest.raises(ValueError, match="total_steps"):
        bandit_from_config(MixingConfig(warmup_fraction=0.1), 2)
    auto = bandit_from_config(
        MixingConfig(
            reward="relative_excess",
            reference_losses="auto",
            warmup_fraction=0.2,
            total_steps=50,
        ),
        2,
    )
    assert auto.warmup_steps == 10 and auto.reference_losses is None
    for _ in range(5):
        auto.update([2.0, 1.0])
    assert auto.reference_due


@pytest.mark.parametrize(
    "rule, reward, max_weight",
    [
        ("paper", "loss", None),
        ("paper", "loss_decrease", None),
        ("smoothed_mean", "loss_decrease", None),
        # Raw loss makes smoothed_mean favour the unlearnable domain (loss 9, e^9 times the
        # others' reward): max_weight is the bound that keeps the others trained.
        ("smoothed_mean", "loss", 0.25),
    ],
)
def test_22_noisy_domains_never_collapse(simulate_odm, rule, reward, max_weight):
    """22 domains, noisy losses and occasional corrupted 1e308 losses: every weight stays at or
    above the floor, nothing is NaN, and no domain holds the majority for long."""
    domains = simulate_odm.many_domains(22, noise=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run = simulate_odm.simulate(
            domains,
            steps=600,
            seed=0,
            spike_prob=0.002,
            update_rule=rule,
            reward=reward,
            min_weight=0.01,
            max_weight=max_weight,
            warmup_steps=30,
        )
    policy = run.policy
    assert not np.isnan(policy).any() and not np.isnan(run.loss).any()
    assert policy.min() >= 0.01 - 1e-12
    assert policy.max() <= (max_weight or 1.0) + 1e-12
    np.testing.assert_allclose(policy.sum(axis=1), 1.0, atol=1e-9)
    assert (policy.max(axis=1) > 0.5).mean() < 0.2
    assert run.rows_seen[-1].min() > 0  # every domain was trained on


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["mixing.warmup_fraction=0.1"], "needs data.mixing.total_steps"),
        (["mixing.reward=excess_loss"], "reference_losses: reward excess_loss needs"),
        (["mixing.reward=relative_excess"], "reference_losses: reward relative_excess needs"),
        (["mixing.reference_losses=auto", "mixing.reward=excess_loss"], "set data.mixing.total"),
        (["mixing.reference_losses=[1, 2]"], r"must be \{source: loss\} or auto"),
        (["mixing.update_rule=ema"], "'ema' is not one of 'paper', 'smoothed_mean'"),
        (["~mixing.min_weight"], "update_rule proportional needs min_weight > 0"),
        (["mixing.reward_cap=0"], "reward_cap: must be > 0"),
        (["mixing.progress_window=0"], "progress_window: must be >= 1"),
        (["mixing.loss_smoothing=1.0"], r"loss_smoothing: must be in \[0, 1\)"),
    ],
)
def test_config_mixing_section_is_validated(overrides, match):
    from wf_data.config import ConfigError, load_data_config

    with pytest.raises(ConfigError, match=match):
        load_data_config("demo", overrides)


def test_config_mixing_section_accepts_every_option():
    from wf_data.config import load_data_config

    mixing = load_data_config(
        "demo",
        [
            "mixing.update_rule=smoothed_mean",
            "mixing.reward=excess_loss",
            "+mixing.reference_losses={prose: 2.0, code: 1.0, math: 1.5}",
            "mixing.warmup_fraction=0.1",
            "mixing.total_steps=50",
            "mixing.reward_cap=100",
        ],
        check_paths=False,
    ).mixing
    assert mixing.reference_losses == {"prose": 2.0, "code": 1.0, "math": 1.5}
    assert (mixing.update_rule, mixing.warmup_fraction, mixing.total_steps) == (
        "smoothed_mean",
        0.1,
        50,
    )


def test_mixture_update_refuses_bool_keys_and_string_values_end_to_end():
    """Through `MixPlans.update` (what `loader.update_mixture` calls): names map to indices,
    bool keys and non-numeric values are refused before the bandit (True is not domain 1)."""
    import grain.python as grain

    from wf_data.data.mix.mixing import Exp3Policy, mix_plans

    domain = grain.MapDataset.range(4).map(lambda i: {"doc": i}).to_iter_dataset()
    policy = Exp3Policy(Exp3(2))
    mixer = mix_plans({"a": domain, "b": domain}, policy)
    iterator = iter(mixer)  # draws with `policy`, the object updates reach
    for bad, match in [
        ({True: 1.0}, "key True must be a domain name"),
        ({1.5: 1.0}, "key 1.5 must be a domain name"),
        ({"a": "2.0"}, "loss of 'a' must be a number, got '2.0'"),
        ({"b": False}, "loss of 'b' must be a number, got False"),
    ]:
        with pytest.raises(TypeError, match=match):
            mixer.update(bad)
    assert mixer.policy.bandit.step == 0
    mixer.update({"a": 2.0, 1: 3.0})
    assert mixer.policy.bandit.step == 1 and (mixer.policy.bandit.rewards > 0).all()
    assert iterator is not None


@pytest.mark.parametrize("losses", [{0: 10**400}, {"b": 10**400}, [1.0, 10**400, 2.0]])
def test_a_loss_beyond_float64_is_a_named_error_not_an_overflow(losses):
    """`loader.update_mixture` with an integer no float64 holds (issue 19, case 5): a
    ValueError naming the domain, not Python's raw OverflowError; nothing is applied."""
    from tests.data.deliver.test_loader import make_loader

    loader = make_loader("exp3")
    next(loader)
    with pytest.raises(ValueError, match=r"domain .* loss of about 10\*\*400 \(int\) does not fit"):
        loader.update_mixture(losses)
    assert loader.mixer.policy.bandit.step == 0
    loader.update_mixture([1.0, 2.0, 3.0])
    assert loader.mixer.policy.bandit.step == 1
