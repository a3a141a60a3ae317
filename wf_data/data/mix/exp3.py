"""The EXP3 bandit of Online Data Mixing (Albalak et al., arXiv 2312.02406): pure numpy, no I/O.

`Exp3` turns per-domain training losses into sampling weights. It holds no RNG of its own
(sampling lives in `wf_data.data.mix.mixing`), so its policy is a pure function of its
configuration and the sequence of `update` calls: every data-parallel rank fed the same
(all-reduced) losses holds the same policy, and a restored state continues exactly.

Each update turns the step's losses into rewards r (`wf_data.data.mix.rewards`: the loss itself,
the excess loss over a reference, or learning progress, in nats or as log ratios), then applies
one of three rules (K domains, prior mixture p, R starting at 0, n updates so far):

``update_rule="paper"`` (the paper's algorithm, the default):

    eps_0 = 1/K,  eps_s = min(1/K, sqrt(ln K / (K s)))  for s >= 1,   t = n + 1
    pi = (1 - K eps_t) softmax(eps_{t-1} R) + K eps_t p
    update: R_i <- alpha R_i + (1 - alpha) min(r_i / pi_i, cap)   for every observed domain i

``update_rule="smoothed_mean"`` (the authors' repository variant):

    eps_n = min(1/K, sqrt(log10 K / (K n)))   (n >= 1; the policy is the prior at n = 0)
    pi = (1 - K eps_n) R / sum(R) + eps_n
    update: R_i <- alpha R_i + (1 - alpha) min(exp(r_i), cap)     for every observed domain i

``update_rule="proportional"`` (weights in proportion to the smoothed reward itself):

    pi = max(R, 0) / sum(max(R, 0))    (the prior while no R is positive), then min_weight > 0
    update: R_i <- alpha R_i + (1 - alpha) clip(r_i, -cap, cap)   for every observed domain i

The paper form is an unbiased EXP3: the reward of a domain is divided by the probability of
having sampled it (importance weighting), accumulated, and turned into weights through a
softmax whose temperature eps shrinks as 1/sqrt(t), so early on the exploration term K eps_t
(= 1 until t > K ln K) holds the policy at the prior and it moves slowly afterwards. The
smoothed-mean form drops importance weighting, smooths exp(r) instead of r/pi, and makes the
weights proportional to R itself rather than to exp(eps R); its exploration is uniform (eps per
domain, not K eps p) and decays with log10 K rather than ln K, so the policy leaves the prior
at the first update and exploitation dominates within a few steps. It reacts much faster, and
is as sensitive to the scale of r as exp makes it: a domain whose reward is one nat higher
gets e times the exploitation weight, and one whose reward is 0 still gets exp(0) = 1. The
proportional form is invariant to the unit of r (nats, bits, a ratio): a domain whose reward is
twice another's gets twice its weight, and one that earns nothing (no progress, no excess) sits
at `min_weight`, the floor that keeps it observed and stands in for exploration. Its R is signed,
so a domain's noise averages out rather than accumulating as reward.

Source of the smoothed-mean rule: `SmoothedMeanWeightUpdater.group_update` as found in the
public code index (an orchestrator script built on the authors' code; the indexed versions of
alon-albalak/online-data-mixing `megatron/data/data_sampling_utils.py` hold only
`Exp3WeightUpdater`, the paper form, which divides the loss by 10 before weighting). There, eps
uses `math.log10`, `iteration` is the count of group updates starting at 1, the update is
`R <- s R + (1 - s) exp(reward)` over the domains given, and the weights are
`R prev_eps scaling + eps` with `scaling = (1 - K eps) / sum(R prev_eps)`, so prev_eps cancels.
This port follows it; its policy before any update is the prior, as there.

During warmup (`warmup_steps` updates) the policy stays at the prior while rewards accumulate;
both clocks (t and n) count every update, warmup included. `min_weight`/`max_weight` bound
the final policy. `reward_cap` bounds what one update can add to R, so that one absurd loss
(1e308, a unit error) cannot pin a domain for hundreds of steps.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wf_data.data.mix.reference import ReferenceEstimate
from wf_data.data.mix.rewards import REWARDS, ExcessLoss, make_reward

__all__ = ["DEFAULT_REWARD_CAP", "UPDATE_RULES", "Exp3", "Exp3Options", "bandit_from_config"]

_STATE_VERSION = 2
UPDATE_RULES = ("paper", "smoothed_mean", "proportional")

# What one update may add to R before smoothing, per rule, when `reward_cap` is None.
# paper: r / pi. A cross-entropy loss stays below ln(vocab) ~ 12 nats even at init and an observed
# domain's weight is rarely below 1%, so legitimate values stay far below 1e4; a larger one is a
# bug (overflowed loss, wrong units). Capped, it moves R by at most (1 - alpha) 1e4.
# smoothed_mean: exp(r). A loss above 10 nats is a model near its random init (ln 32k = 10.4),
# where every domain is unlearned alike, so those count as 10; a bigger cap lets one spike
# outweigh typical rewards (e^2..e^4) by more than e^6 and pin its domain for ~100 steps.
DEFAULT_REWARD_CAP = {"paper": 1e4, "smoothed_mean": math.exp(10.0), "proportional": 10.0}


@dataclasses.dataclass(frozen=True)
class Exp3Options:
    """The settings of an `Exp3` bandit besides its domains, prior and seed. Each default is
    written here only: `wf_data.config.MixingConfig` takes its defaults from this class.

    Args:
      alpha: reward smoothing in [0, 1] (the rules' alpha).
      min_weight, max_weight: optional bounds on every policy entry, applied after the formula
        by clipping and renormalising the unclipped entries until the bounds hold (the result
        is `clip(c * pi, min_weight, max_weight)` with the scalar c that makes it sum to 1).
        They require `K * min_weight <= 1 <= K * max_weight`. They also bound the warmup prior.
      warmup_steps: for the first `warmup_steps` updates the policy stays at the prior; rewards
        still accumulate (importance-weighted by the prior, the policy in force).
      update_rule: "paper", "smoothed_mean" or "proportional" (module docstring).
      reward: one of `wf_data.data.mix.rewards.REWARDS` (documented there).
      reference_losses: (K,) reference loss per domain, for the rewards "excess_loss" and
        "relative_excess"; or "auto": measured in the run (`wf_data.data.mix.reference`), the
        trainer hands held-out losses to `record_reference` when `reference_due`.
      total_steps: updates in the whole run, for reference_losses "auto".
      loss_smoothing, progress_window: EMA factor and window of the progress rewards
        ("loss_decrease", "loss_change", "relative_decrease", "loss_decrease_per_token").
      reward_cap: the most one update may add to a domain's R before smoothing (> 0; `math.inf`
        disables it); None takes `DEFAULT_REWARD_CAP[update_rule]`.
    """

    alpha: float = 0.9
    update_rule: str = "paper"
    reward: str = "loss"
    reference_losses: Any = None
    loss_smoothing: float = 0.9
    progress_window: int = 16
    warmup_steps: int = 0
    total_steps: int | None = None
    min_weight: float | None = None
    max_weight: float | None = None
    reward_cap: float | None = None


class Exp3:
    """EXP3 bandit over `num_domains` data domains, rewarded from their mean training loss.

    Args:
      num_domains: K >= 1.
      prior: (K,) non-negative weights (normalised here); uniform when None. The policy during
        warmup, and the paper rule's exploration mixture.
      seed: kept for API symmetry with the mixing transforms; the bandit itself never samples.
      options: `Exp3Options` fields by name (alpha, update_rule, reward, min_weight, ...); the
        ones not given take its defaults.

    `policy()` is cached and recomputed only after `update`; `policy()` + `update()` of a (K,)
    array cost about 20 microseconds for K = 22 (pure numpy, no Python loop over domains).
    """

    def __init__(
        self, num_domains: int, *, prior: Any = None, seed: int = 0, **options: Any
    ) -> None:
        try:
            settings = Exp3Options(**options)
        except TypeError:
            unknown = sorted(set(options) - {f.name for f in dataclasses.fields(Exp3Options)})
            raise TypeError(
                f"Exp3: unknown option(s) {unknown}; valid: "
                f"{[f.name for f in dataclasses.fields(Exp3Options)]}"
            ) from None
        alpha, warmup_steps = settings.alpha, settings.warmup_steps
        update_rule, reward, reward_cap = settings.update_rule, settings.reward, settings.reward_cap
        if isinstance(num_domains, bool) or not isinstance(num_domains, numbers.Integral):
            raise TypeError(f"Exp3: num_domains must be an int, got {type(num_domains).__name__}")
        if num_domains < 1:
            raise ValueError(f"Exp3: num_domains must be >= 1, got {num_domains}")
        self._k = int(num_domains)
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Exp3: alpha must be in [0, 1], got {alpha}")
        self._alpha = alpha
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"Exp3: seed must be an int, got {type(seed).__name__}")
        self._seed = int(seed)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral):
            raise TypeError(f"Exp3: warmup_steps must be an int, got {type(warmup_steps).__name__}")
        if warmup_steps < 0:
            raise ValueError(f"Exp3: warmup_steps must be >= 0, got {warmup_steps}")
        self._warmup_steps = int(warmup_steps)
        if update_rule not in UPDATE_RULES:
            raise ValueError(
                f"Exp3: update_rule must be one of {UPDATE_RULES}, got {update_rule!r}"
            )
        self._update_rule = update_rule
        if reward not in REWARDS:
            raise ValueError(f"Exp3: reward must be one of {REWARDS}, got {reward!r}")
        self._reward = make_reward(
            reward,
            self._k,
            reference=settings.reference_losses,
            smoothing=settings.loss_smoothing,
            window=settings.progress_window,
        )
        self._auto_reference = None
        if isinstance(settings.reference_losses, str):
            if not isinstance(self._reward, ExcessLoss):
                raise ValueError(
                    f"Exp3: reference_losses={settings.reference_losses!r} is for the rewards "
                    f"excess_loss and relative_excess, not {reward!r}"
                )
            self._auto_reference = ReferenceEstimate(
                self._k, self._warmup_steps, settings.total_steps
            )
        cap = DEFAULT_REWARD_CAP[update_rule] if reward_cap is None else float(reward_cap)
        if not cap > 0:  # also refuses NaN
            raise ValueError(f"Exp3: reward_cap must be > 0 (math.inf: no cap), got {reward_cap}")
        self._reward_cap = cap
        self._prior = _validate_prior(prior, self._k)
        self._prior_positive = bool((self._prior > 0).all())
        self._policy_positive = True
        self._min_weight, self._max_weight = _validate_bounds(
            settings.min_weight, settings.max_weight, self._k
        )
        if update_rule == "proportional" and not (self._min_weight or 0.0) > 0.0:
            raise ValueError(
                "Exp3: update_rule 'proportional' needs min_weight > 0: a domain whose reward "
                f"is 0 gets the floor, which keeps its loss observed; got {settings.min_weight}"
            )
        self._rewards = np.zeros(self._k, dtype=np.float64)
        self._step = 0
        self._policy: np.ndarray | None = None

    # -- read-only views of the configuration ------------------------------------------------

    @property
    def num_domains(self) -> int:
        """K, the number of domains."""
        return self._k

    @property
    def alpha(self) -> float:
        """Reward smoothing factor."""
        return self._alpha

    @property
    def prior(self) -> np.ndarray:
        """(K,) float64 normalised prior (a copy)."""
        return self._prior.copy()

    @property
    def seed(self) -> int:
        """Seed given at construction (unused by the bandit, kept for the mixing transforms)."""
        return self._seed

    @property
    def min_weight(self) -> float | None:
        """Lower bound on each policy entry, or None."""
        return self._min_weight

    @property
    def max_weight(self) -> float | None:
        """Upper bound on each policy entry, or None."""
        return self._max_weight

    @property
    def warmup_steps(self) -> int:
        """Number of updates during which the policy stays at the prior."""
        return self._warmup_steps

    @property
    def update_rule(self) -> str:
        """The update rule: "paper" or "smoothed_mean"."""
        return self._update_rule

    @property
    def reward(self) -> str:
        """The reward transform: "loss", "excess_loss" or "loss_decrease"."""
        return self._reward.name

    @property
    def reward_cap(self) -> float:
        """The most one update adds to a domain's R before smoothing."""
        return self._reward_cap

    @property
    def step(self) -> int:
        """Number of `update` calls so far (n)."""
        return self._step

    @property
    def rewards(self) -> np.ndarray:
        """(K,) float64 smoothed rewards R (a copy)."""
        return self._rewards.copy()

    def exploration_rate(self, s: int) -> float:
        """The rule's eps_s: min(1/K, sqrt(log K / (K s))) for s >= 1 (ln for paper, log10
        for smoothed_mean); 1/K for s <= 0."""
        k = self._k
        if s <= 0:
            return 1.0 / k
        log_k = math.log(k) if self._update_rule == "paper" else math.log10(k)
        return min(1.0 / k, math.sqrt(log_k / (k * s)))

    # -- reference losses measured in the run ------------------------------------------------

    @property
    def reference_due(self) -> bool:
        """True when ``reference_losses: auto`` wants the held-out losses after this update."""
        return self._auto_reference is not None and self._auto_reference.due(self._step)

    def record_reference(self, losses: Any) -> None:
        """Hands over the (K,) held-out losses that `reference_due` asks for; once the last is
        in, the excess rewards use the estimated reference (`ReferenceEstimate`)."""
        if self._auto_reference is None:
            raise ValueError("Exp3.record_reference: this bandit's reference_losses are not auto")
        self._auto_reference.record(self._step, losses)
        value = self._auto_reference.value
        if value is not None:
            self._reward.set_reference(value)

    @property
    def reference_losses(self) -> np.ndarray | None:
        """(K,) reference losses of an excess reward (a copy), None while not yet measured."""
        reference = getattr(self._reward, "reference", None)
        return None if reference is None else reference.copy()

    # -- the bandit ---------------------------------------------------------------------------

    def policy(self) -> np.ndarray:
        """Current sampling weights: (K,) float64, read-only, summing to 1."""
        if self._policy is None:
            self._policy = self._compute_policy()
            self._policy.flags.writeable = False
        return self._policy

    def _compute_policy(self) -> np.ndarray:
        if self._step < self._warmup_steps:
            pi = self._prior.copy()
            self._policy_positive = self._prior_positive
        elif self._update_rule == "paper":
            pi = self._paper_policy()
        elif self._update_rule == "smoothed_mean":
            pi = self._smoothed_mean_policy()
        else:
            pi = self._proportional_policy()
        if self._min_weight is not None or self._max_weight is not None:
            lo = 0.0 if self._min_weight is None else self._min_weight
            hi = 1.0 if self._max_weight is None else self._max_weight
            pi = _apply_bounds(pi, lo, hi)
            self._policy_positive = self._policy_positive or lo > 0.0
        return pi

    def _paper_policy(self) -> np.ndarray:
        k = self._k
        t = self._step + 1
        k_eps = k * self.exploration_rate(t)
        logits = self.exploration_rate(t - 1) * self._rewards
        weights = np.exp(logits - logits.max())
        pi = (1.0 - k_eps) / weights.sum() * weights
        pi += k_eps * self._prior
        # softmax can underflow to 0 for an entry, so only the prior term guarantees pi > 0.
        self._policy_positive = (k_eps > 0.0 and self._prior_positive) or k == 1
        return pi

    def _smoothed_mean_policy(self) -> np.ndarray:
        # SmoothedMeanWeightUpdater.group_update (module docstring): the eps of the n-th update
        # weighs R after that update. Its prev_eps factor cancels in R eps / sum(R eps).
        if self._step == 0:
            return self._prior.copy()
        eps = self.exploration_rate(self._step)
        total = self._rewards.sum()
        share = self._rewards / total if total > 0 else self._prior
        self._policy_positive = True  # unused by this rule: nothing is importance-weighted
        return (1.0 - self._k * eps) * share + eps

    def _proportional_policy(self) -> np.ndarray:
        # No exploration term: min_weight (required > 0) keeps every domain observed.
        gains = np.maximum(self._rewards, 0.0)
        total = gains.sum()
        return gains / total if total > 0 else self._prior.copy()

    def update(self, losses: Mapping[int, float] | Any) -> None:
        """Feed back one step's mean loss per domain and advance the step counter.

        Args:
          losses: `{domain_index: mean_loss}` for the domains observed in the step, or a (K,)
            array (numpy, torch, JAX, list) with NaN for unobserved domains.

        Raises TypeError for a key that is not an int (bool included) and for a value that is
        not a real number (str, bool, None...), ValueError for an index out of range or an
        array of the wrong shape; nothing is applied then. A loss that is infinite, negative,
        or NaN given explicitly in a mapping is ignored with a warning naming the domain (its
        R is unchanged); so is a domain whose policy weight is 0 under the paper rule (its
        importance weight is undefined), and one whose reward overflows with no cap.
        """
        if self.reference_due:
            raise RuntimeError(
                f"Exp3.update: reference_losses: auto wants the held-out loss per domain after "
                f"update {self._step}: call record_reference first (MixtureFeedback(loader, "
                "evaluate=...) does it)"
            )
        values = self._losses_array(losses)
        rewards = self._reward.step(values, self.policy())
        if self._update_rule == "paper":
            self._rewards = self._paper_update(rewards)
        elif self._update_rule == "smoothed_mean":
            self._rewards = self._smoothed_mean_update(rewards)
        else:
            self._rewards = self._proportional_update(rewards)
        self._step += 1
        self._policy = None

    def _paper_update(self, values: np.ndarray) -> np.ndarray:
        pi = self.policy()
        if not self._policy_positive:
            return self._update_with_zero_weights(values, pi)
        with np.errstate(over="ignore"):
            gains = np.minimum(values / pi, self._reward_cap)
        rewards = self._alpha * self._rewards + (1.0 - self._alpha) * gains
        if not math.isfinite(rewards.sum()):
            # NaN comes from an unobserved domain; inf only from an overflow with no cap, which
            # deserves a warning. Both keep the old R.
            infinite = np.isinf(rewards)
            if infinite.any():
                self._warn_rejected(values, pi, infinite, stacklevel=4)
                rewards[infinite] = np.nan
            np.copyto(rewards, self._rewards, where=np.isnan(rewards))
        return rewards

    def _smoothed_mean_update(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            gains = np.exp(np.minimum(values, math.log(self._reward_cap)))
        rewards = self._alpha * self._rewards + (1.0 - self._alpha) * gains
        infinite = np.isinf(rewards)
        if infinite.any():  # exp overflowed with no cap
            self._warn_rejected(values, np.ones(self._k), infinite, stacklevel=4)
        return np.where(np.isnan(rewards) | infinite, self._rewards, rewards)

    def _proportional_update(self, values: np.ndarray) -> np.ndarray:
        # Signed: a domain's noise averages out in R instead of accumulating as positive reward.
        gains = np.clip(values, -self._reward_cap, self._reward_cap)
        rewards = self._alpha * self._rewards + (1.0 - self._alpha) * gains
        return np.where(np.isnan(rewards), self._rewards, rewards)

    def _update_with_zero_weights(self, values: np.ndarray, pi: np.ndarray) -> np.ndarray:
        """The paper update when some policy entries are 0 (a prior with zeros, no exploration)."""
        zero = pi <= 0.0
        for i in np.flatnonzero(zero & np.isfinite(values)):
            warnings.warn(
                f"Exp3.update: domain {i} has policy weight 0, its loss {float(values[i])!r} "
                "cannot be importance-weighted; ignored",
                RuntimeWarning,
                stacklevel=4,
            )
        safe_pi = np.where(zero, 1.0, pi)
        with np.errstate(over="ignore", invalid="ignore"):
            gains = np.minimum(values / safe_pi, self._reward_cap)
            rewards = self._alpha * self._rewards + (1.0 - self._alpha) * gains
        kept = np.isfinite(rewards) & ~zero
        self._warn_rejected(values, pi, ~kept & ~zero & ~np.isnan(values), stacklevel=5)
        return np.where(kept, rewards, self._rewards)

    def _warn_rejected(
        self, values: np.ndarray, pi: np.ndarray, rejected: np.ndarray, stacklevel: int
    ) -> None:
        for i in np.flatnonzero(rejected):
            warnings.warn(
                f"Exp3.update: domain {i} loss {float(values[i])!r} / weight {float(pi[i])!r} "
                "overflows the reward; ignored, its reward is unchanged (set a finite "
                "reward_cap to bound it instead)",
                RuntimeWarning,
                stacklevel=stacklevel,
            )

    def _losses_array(self, losses: Mapping[int, float] | Any) -> np.ndarray:
        """(K,) float64, NaN for unobserved or rejected domains; raises on a wrong type."""
        k = self._k
        if isinstance(losses, Mapping):
            values = np.full(k, np.nan)
            for key, value in losses.items():
                if isinstance(key, (bool, np.bool_)) or not isinstance(key, numbers.Integral):
                    raise TypeError(
                        f"Exp3.update: domain keys must be ints in [0, {k}), "
                        f"got {key!r} ({type(key).__name__})"
                    )
                if not 0 <= key < k:
                    raise ValueError(
                        f"Exp3.update: domain index {key} out of range, valid: 0..{k - 1}"
                    )
                values[key] = _loss_value(value, f"domain {int(key)}")
            explicit = np.zeros(k, dtype=bool)
            explicit[[int(key) for key in losses]] = True
        else:
            values = _losses_from_array(losses, k)
            explicit = ~np.isnan(values)  # NaN in an array means "unobserved": silent
        rejected = explicit & ~(np.isfinite(values) & (values >= 0.0))
        for i in np.flatnonzero(rejected):
            warnings.warn(
                f"Exp3.update: domain {i} loss is {float(values[i])!r}; losses must be finite "
                "and >= 0: ignored, its reward is unchanged",
                RuntimeWarning,
                stacklevel=3,
            )
        values[rejected] = np.nan
        return values

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: rewards, step, the reward transform's memory, and the
        configuration used to check a restore."""
        return {
            "version": _STATE_VERSION,
            "num_domains": self._k,
            "alpha": self._alpha,
            "prior": self._prior.tolist(),
            "min_weight": self._min_weight,
            "max_weight": self._max_weight,
            "warmup_steps": self._warmup_steps,
            "seed": self._seed,
            "update_rule": self._update_rule,
            "reward": self._reward.name,
            "reward_state": self._reward.state_dict(),
            "step": self._step,
            "rewards": self._rewards.tolist(),
            **(
                {"reference_estimate": self._auto_reference.state_dict()}
                if self._auto_reference is not None
                else {}
            ),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` output; refuses a state saved with another K, alpha, prior,
        update rule or reward. A version-1 state (before rules and rewards) is a paper/loss one.

        Bounds, warmup and the cap may differ from the saved ones (they shape the policy, not R).
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"Exp3.load_state_dict: expected a dict, got {type(state).__name__}")
        missing = {"num_domains", "alpha", "prior", "step", "rewards"} - set(state)
        if missing:
            raise ValueError(f"Exp3.load_state_dict: state lacks keys {sorted(missing)}")
        if int(state["num_domains"]) != self._k:
            raise ValueError(
                f"Exp3.load_state_dict: state has num_domains={int(state['num_domains'])}, "
                f"this bandit has {self._k}"
            )
        if not math.isclose(float(state["alpha"]), self._alpha, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(
                f"Exp3.load_state_dict: state has alpha={float(state['alpha'])}, "
                f"this bandit has alpha={self._alpha}"
            )
        prior = np.asarray(state["prior"], dtype=np.float64)
        if prior.shape != (self._k,) or not np.allclose(prior, self._prior, rtol=1e-6, atol=1e-9):
            raise ValueError(
                f"Exp3.load_state_dict: state has prior={prior.tolist()}, "
                f"this bandit has prior={self._prior.tolist()}"
            )
        for key, default, mine in (
            ("update_rule", "paper", self._update_rule),
            ("reward", "loss", self._reward.name),
        ):
            if state.get(key, default) != mine:
                raise ValueError(
                    f"Exp3.load_state_dict: state has {key}={state.get(key, default)!r}, this "
                    f"bandit has {key}={mine!r}; R means something else under each"
                )
        rewards = np.array(state["rewards"], dtype=np.float64)
        if rewards.shape != (self._k,) or not np.isfinite(rewards).all():
            raise ValueError(
                f"Exp3.load_state_dict: rewards must be {self._k} finite floats, "
                f"got {rewards.tolist()}"
            )
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"Exp3.load_state_dict: step must be >= 0, got {step}")
        self._reward.load_state_dict(state.get("reward_state", {}))
        if self._auto_reference is not None:
            self._auto_reference.load_state_dict(state.get("reference_estimate", {"measured": {}}))
            if self._auto_reference.value is not None:
                self._reward.set_reference(self._auto_reference.value)
        self._rewards = rewards
        self._step = step
        self._policy = None

    def __repr__(self) -> str:
        return (
            f"Exp3(num_domains={self._k}, update_rule={self._update_rule!r}, "
            f"reward={self._reward.name!r}, alpha={self._alpha}, step={self._step}, "
            f"min_weight={self._min_weight}, max_weight={self._max_weight}, "
            f"warmup_steps={self._warmup_steps})"
        )


def bandit_from_config(
    mixing_cfg: Any,
    num_domains: int,
    *,
    prior: Any = None,
    seed: int = 0,
    domain_names: Sequence[str] | None = None,
) -> Exp3:
    """The `Exp3` a `MixingConfig` (or any object with its attributes) describes.

    ``prior``: (K,) weights (the sources' weights); ``domain_names`` (K,) names the domains for
    ``reference_losses`` given by name. Warmup is ``warmup_steps``, or ``warmup_fraction`` of
    ``total_steps`` when a fraction is set. Attributes a config lacks take Exp3's defaults.
    """

    options = {
        field.name: getattr(mixing_cfg, field.name)
        for field in dataclasses.fields(Exp3Options)
        if hasattr(mixing_cfg, field.name)
    }
    fraction = getattr(mixing_cfg, "warmup_fraction", None)
    if fraction is not None:
        total = getattr(mixing_cfg, "total_steps", None)
        if total is None:
            raise ValueError(
                f"mixing.warmup_fraction={fraction} needs mixing.total_steps (the length of the "
                "run) to count steps; set it, or give warmup_steps instead"
            )
        options["warmup_steps"] = int(round(float(fraction) * int(total)))
    options["reference_losses"] = _reference_array(
        options.get("reference_losses"), num_domains, domain_names
    )
    return Exp3(num_domains, prior=prior, seed=seed, **options)


def _reference_array(
    reference: Any, num_domains: int, names: Sequence[str] | None
) -> np.ndarray | None:
    """Reference losses by name (a mapping, needs ``names``) or in domain order: (K,), None,
    or "auto" (measured in the run) as given."""
    if reference is None or (isinstance(reference, Mapping) and not reference):
        return None
    if isinstance(reference, str):
        if reference != "auto":
            raise ValueError(
                f"mixing.reference_losses must be {{domain: loss}} or auto, got {reference!r}"
            )
        return reference
    if not isinstance(reference, Mapping):
        return np.asarray(reference, dtype=np.float64)
    if names is None:
        raise ValueError("mixing.reference_losses by name needs the domain names")
    # Names beyond the domains are allowed: a disabled source, or an eval loader's one domain.
    missing = [name for name in names if name not in reference]
    if missing:
        raise ValueError(
            f"mixing.reference_losses must give one loss per domain {list(names)}: "
            f"missing {missing} (given: {sorted(reference)})"
        )
    return np.array([_loss_value(reference[name], f"reference of {name!r}") for name in names])


def _loss_value(value: Any, where: str) -> float:
    """A loss given as a Python/numpy/0-d tensor real number; TypeError otherwise, ValueError
    for an integer beyond float64 (no loss computation gives one: a caller's bug)."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()  # numpy scalar, 0-d array or tensor
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Exp3.update: {where} loss must be a real number, got {value!r} "
            f"({type(value).__name__})"
        )
    return float_loss(value, where)


def float_loss(value: numbers.Real, where: str) -> float:
    """`float(value)`, or ValueError naming `where` when it does not fit a float64."""
    try:
        return float(value)
    except OverflowError:
        digits = int(value).bit_length() * math.log10(2)
        raise ValueError(
            f"Exp3.update: {where} loss of about 10**{digits:.0f} ({type(value).__name__}) does "
            "not fit a float64 (largest 1.8e308); pass the mean loss as a float"
        ) from None


def _losses_from_array(losses: Any, k: int) -> np.ndarray:
    if hasattr(losses, "detach"):  # torch tensor, possibly bf16 or on an accelerator
        if losses.dtype.is_floating_point or losses.dtype.is_complex:
            losses = losses.detach().cpu().double().numpy()
        else:
            raise TypeError(
                f"Exp3.update: losses tensor must be floating point, got {losses.dtype}"
            )
    if isinstance(losses, (list, tuple)):
        for index, value in enumerate(losses):
            _loss_value(value, f"domain {index}")
    raw = np.asarray(losses)
    if raw.dtype.kind not in "fiu":
        raise TypeError(
            "Exp3.update: losses must be a Mapping[int, float] or a (K,) float array, "
            f"got {type(losses).__name__} of dtype {raw.dtype}"
        )
    values = raw.astype(np.float64)
    if values.shape != (k,):
        raise ValueError(
            f"Exp3.update: losses array must have shape ({k},) (one entry per domain, "
            f"NaN for unobserved), got shape {values.shape}"
        )
    return values


def _validate_prior(prior: Any, k: int) -> np.ndarray:
    if prior is None:
        return np.full(k, 1.0 / k)
    if isinstance(prior, Mapping):
        raise TypeError("Exp3: prior must be a sequence of K weights, not a mapping")
    values = np.asarray(prior, dtype=np.float64)
    if values.shape != (k,):
        raise ValueError(f"Exp3: prior must have shape ({k},), got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"Exp3: prior must be finite, got {values.tolist()}")
    if (values < 0).any():
        raise ValueError(f"Exp3: prior must be >= 0, got {values.tolist()}")
    total = values.sum()
    if not total > 0:
        raise ValueError(f"Exp3: prior must have a positive sum, got {values.tolist()}")
    return values / total


def _validate_bounds(
    min_weight: float | None, max_weight: float | None, k: int
) -> tuple[float | None, float | None]:
    lo = None if min_weight is None else float(min_weight)
    hi = None if max_weight is None else float(max_weight)
    if lo is not None and not (math.isfinite(lo) and 0.0 <= lo <= 1.0):
        raise ValueError(f"Exp3: min_weight must be in [0, 1], got {min_weight}")
    if hi is not None and not (math.isfinite(hi) and 0.0 <= hi <= 1.0):
        raise ValueError(f"Exp3: max_weight must be in [0, 1], got {max_weight}")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"Exp3: min_weight={lo} exceeds max_weight={hi}")
    # A tolerance keeps bounds like min_weight=1/K feasible despite rounding.
    if lo is not None and k * lo > 1.0 + 1e-12:
        raise ValueError(
            f"Exp3: min_weight={lo} is infeasible for {k} domains: K * min_weight must be <= 1"
        )
    if hi is not None and k * hi < 1.0 - 1e-12:
        raise ValueError(
            f"Exp3: max_weight={hi} is infeasible for {k} domains: K * max_weight must be >= 1"
        )
    return lo, hi


def _apply_bounds(pi: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """`clip(c * pi, lo, hi)` with the scalar c that makes it sum to 1: (K,) float64.

    This is the fixed point of "clip the entries outside the bounds, rescale the others to fill
    the remaining mass, repeat". sum(clip(c * pi)) is piecewise linear and non-decreasing in c,
    so c is found exactly between two of its breakpoints. Entries with pi = 0 stay at `lo`,
    unless the positive ones cannot take the rest even at `hi`; then the zeros share it evenly.
    """
    smallest = pi.min()
    if lo <= smallest and pi.max() <= hi:
        return pi
    if smallest > 0.0:
        positive = pi
    else:
        positive = pi[pi > 0]
        n_zero = pi.size - positive.size
        capacity = hi * positive.size + lo * n_zero
        if capacity < 1.0:
            return np.where(pi > 0, hi, lo + (1.0 - capacity) / n_zero)
    scales = np.concatenate(([0.0], lo / positive, hi / positive))
    scales.sort()
    # np.minimum/np.maximum rather than np.clip: same result, a fraction of the call overhead.
    totals = np.minimum(np.maximum(scales[:, None] * pi, lo), hi).sum(axis=1)
    j = min(int(np.searchsorted(totals, 1.0)), scales.size - 1)
    if j == 0 or totals[j] <= 1.0:
        scale = scales[j]
    else:
        scale = scales[j - 1] + (1.0 - totals[j - 1]) * (scales[j] - scales[j - 1]) / (
            totals[j] - totals[j - 1]
        )
    bounded = np.minimum(np.maximum(scale * pi, lo), hi)
    # Put the rounding residual on the entries strictly inside the bounds.
    inside = (bounded > lo) & (bounded < hi)
    if inside.any():
        bounded[inside] *= 1.0 + (1.0 - bounded.sum()) / bounded[inside].sum()
    return bounded
