"""The EXP3 bandit of Online Data Mixing (Albalak et al., arXiv 2312.02406): pure numpy, no I/O.

`Exp3` turns per-domain training losses into sampling weights that favour the domains whose
loss is still high. It holds no RNG of its own (sampling lives in `wf_data.data.mixing`), so
its policy is a pure function of its configuration and the sequence of `update` calls.

Formulas (K domains, prior mixture p, rewards R starting at 0, n updates so far):

    eps_0 = 1/K,  eps_s = min(1/K, sqrt(ln K / (K s)))  for s >= 1
    t = n + 1
    pi = (1 - K eps_t) softmax(eps_{t-1} R) + K eps_t p
    update: R_i <- alpha R_i + (1 - alpha) L_i / pi_i   for every observed domain i; n <- n + 1

with `pi` the policy current before the update (importance weighting). `eps_t = 1/K` until
`t > K ln K`, so the policy equals the prior for the first steps, as in the paper.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["Exp3"]

_STATE_VERSION = 1


class Exp3:
    """EXP3 bandit over `num_domains` data domains, rewarded by their mean training loss.

    Args:
      num_domains: K >= 1.
      alpha: reward smoothing in [0, 1]: `R_i <- alpha R_i + (1 - alpha) L_i / pi_i`.
      prior: (K,) non-negative weights (normalised here); uniform when None. It is the
        exploration mixture and the policy during warmup.
      seed: kept for API symmetry with the mixing transforms; the bandit itself never samples.
      min_weight, max_weight: optional bounds on every policy entry, applied after the formula
        by clipping and renormalising the unclipped entries until the bounds hold (the result
        is `clip(c * pi, min_weight, max_weight)` with the scalar c that makes it sum to 1).
        They require `K * min_weight <= 1 <= K * max_weight`. They also bound the warmup prior.
      warmup_steps: for the first `warmup_steps` updates the policy stays at the prior; rewards
        still accumulate (importance-weighted by the prior, the policy in force).

    `policy()` is cached and recomputed only after `update`; `policy()` + `update()` of a (K,)
    array cost about 15 microseconds for K = 22 (pure numpy, no Python loop over domains).
    """

    def __init__(
        self,
        num_domains: int,
        *,
        alpha: float = 0.9,
        prior: Any = None,
        seed: int = 0,
        min_weight: float | None = None,
        max_weight: float | None = None,
        warmup_steps: int = 0,
    ) -> None:
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
        self._prior = _validate_prior(prior, self._k)
        self._prior_positive = bool((self._prior > 0).all())
        self._policy_positive = True
        self._min_weight, self._max_weight = _validate_bounds(min_weight, max_weight, self._k)
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
    def step(self) -> int:
        """Number of `update` calls so far (n)."""
        return self._step

    @property
    def rewards(self) -> np.ndarray:
        """(K,) float64 smoothed importance-weighted rewards R (a copy)."""
        return self._rewards.copy()

    def exploration_rate(self, s: int) -> float:
        """eps_s = min(1/K, sqrt(ln K / (K s))) for s >= 1; eps_0 = 1/K."""
        k = self._k
        if s <= 0:
            return 1.0 / k
        return min(1.0 / k, math.sqrt(math.log(k) / (k * s)))

    # -- the bandit ---------------------------------------------------------------------------

    def policy(self) -> np.ndarray:
        """Current sampling weights: (K,) float64, read-only, summing to 1."""
        if self._policy is None:
            self._policy = self._compute_policy()
            self._policy.flags.writeable = False
        return self._policy

    def _compute_policy(self) -> np.ndarray:
        k = self._k
        if self._step < self._warmup_steps:
            pi = self._prior.copy()
            self._policy_positive = self._prior_positive
        else:
            t = self._step + 1
            log_k = math.log(k)
            k_eps = min(1.0, math.sqrt(k * log_k / t))  # K * eps_t
            eps_prev = 1.0 / k if t == 1 else min(1.0 / k, math.sqrt(log_k / (k * (t - 1))))
            logits = eps_prev * self._rewards
            weights = np.exp(logits - logits.max())
            pi = (1.0 - k_eps) / weights.sum() * weights
            pi += k_eps * self._prior
            # softmax can underflow to 0 for an entry, so only the prior term guarantees pi > 0.
            self._policy_positive = (k_eps > 0.0 and self._prior_positive) or k == 1
        if self._min_weight is not None or self._max_weight is not None:
            lo = 0.0 if self._min_weight is None else self._min_weight
            hi = 1.0 if self._max_weight is None else self._max_weight
            pi = _apply_bounds(pi, lo, hi)
            self._policy_positive = self._policy_positive or lo > 0.0
        return pi

    def update(self, losses: Mapping[int, float] | Any) -> None:
        """Feed back one step's mean loss per domain and advance the step counter.

        Args:
          losses: `{domain_index: mean_loss}` for the domains observed in the step, or a (K,)
            array (numpy, torch, JAX, list) with NaN for unobserved domains.

        A NaN or infinite loss given explicitly in a mapping, or an infinite one in an array, is
        ignored with a warning naming the domain: that domain keeps its reward. So is a domain
        whose current policy weight is 0 (its importance weight is undefined), and one whose
        reward would overflow.
        """
        pi = self.policy()
        values = self._losses_array(losses)
        if self._policy_positive:
            rewards = self._alpha * self._rewards + (1.0 - self._alpha) * values / pi
            if not math.isfinite(rewards.sum()):
                # A NaN reward comes from a NaN (unobserved) loss; an infinite one from an
                # infinite loss or an overflow, which deserve a warning. Both keep the old R.
                infinite = np.isinf(rewards)
                if infinite.any():
                    self._warn_rejected(values, pi, infinite)
                    rewards[infinite] = np.nan
                np.copyto(rewards, self._rewards, where=np.isnan(rewards))
        else:
            rewards = self._update_with_zero_weights(values, pi)
        self._rewards = rewards
        self._step += 1
        self._policy = None

    def _update_with_zero_weights(self, values: np.ndarray, pi: np.ndarray) -> np.ndarray:
        """The update when some policy entries are 0 (a prior with zeros, no exploration left)."""
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
            rewards = self._alpha * self._rewards + (1.0 - self._alpha) * values / safe_pi
        kept = np.isfinite(rewards) & ~zero
        self._warn_rejected(values, pi, ~kept & ~zero & ~np.isnan(values), stacklevel=4)
        return np.where(kept, rewards, self._rewards)

    def _warn_rejected(
        self, values: np.ndarray, pi: np.ndarray, rejected: np.ndarray, stacklevel: int = 3
    ) -> None:
        for i in np.flatnonzero(rejected):
            loss = float(values[i])
            if math.isfinite(loss):
                reason = f"loss {loss!r} / weight {float(pi[i])!r} overflows the reward"
            else:
                reason = f"loss is {loss!r}"
            warnings.warn(
                f"Exp3.update: domain {i} {reason}; ignored, its reward is unchanged",
                RuntimeWarning,
                stacklevel=stacklevel,
            )

    def _losses_array(self, losses: Mapping[int, float] | Any) -> np.ndarray:
        """(K,) float64 with NaN for unobserved domains; warns about explicit non-finite ones."""
        k = self._k
        if isinstance(losses, Mapping):
            values = np.full(k, np.nan)
            for key, value in losses.items():
                if type(key) is not int and (
                    isinstance(key, bool) or not isinstance(key, numbers.Integral)
                ):
                    raise TypeError(
                        f"Exp3.update: domain keys must be ints in [0, {k}), "
                        f"got {key!r} ({type(key).__name__})"
                    )
                if not 0 <= key < k:
                    raise ValueError(
                        f"Exp3.update: domain index {key} out of range, valid: 0..{k - 1}"
                    )
                loss = float(value)
                if math.isfinite(loss):
                    values[key] = loss
                else:  # an explicit NaN is not "unobserved": say so
                    _warn_non_finite(int(key), loss)
            return values
        if hasattr(losses, "detach"):  # torch tensor, possibly bf16 or on an accelerator
            losses = losses.detach().cpu().double().numpy()
        try:
            values = np.asarray(losses, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(
                "Exp3.update: losses must be a Mapping[int, float] or a (K,) float array, "
                f"got {type(losses).__name__}"
            ) from err
        if values.shape != (k,):
            raise ValueError(
                f"Exp3.update: losses array must have shape ({k},) (one entry per domain, "
                f"NaN for unobserved), got shape {values.shape}"
            )
        return values

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: rewards, step and the configuration used to check a restore."""
        return {
            "version": _STATE_VERSION,
            "num_domains": self._k,
            "alpha": self._alpha,
            "prior": self._prior.tolist(),
            "min_weight": self._min_weight,
            "max_weight": self._max_weight,
            "warmup_steps": self._warmup_steps,
            "seed": self._seed,
            "step": self._step,
            "rewards": self._rewards.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` output; refuses a state saved with another K, alpha or prior.

        Bounds and warmup may differ from the saved ones (they shape the policy, not R).
        """
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
        rewards = np.array(state["rewards"], dtype=np.float64)
        if rewards.shape != (self._k,) or not np.isfinite(rewards).all():
            raise ValueError(
                f"Exp3.load_state_dict: rewards must be {self._k} finite floats, "
                f"got {rewards.tolist()}"
            )
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"Exp3.load_state_dict: step must be >= 0, got {step}")
        self._rewards = rewards
        self._step = step
        self._policy = None

    def __repr__(self) -> str:
        return (
            f"Exp3(num_domains={self._k}, alpha={self._alpha}, step={self._step}, "
            f"min_weight={self._min_weight}, max_weight={self._max_weight}, "
            f"warmup_steps={self._warmup_steps})"
        )


def _warn_non_finite(domain: int, loss: float) -> None:
    warnings.warn(
        f"Exp3.update: domain {domain} loss is {loss!r}; ignored, its reward is unchanged",
        RuntimeWarning,
        stacklevel=4,
    )


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
