"""Reward transforms of online data mixing: per-domain loss stream in, per-domain reward out.

The bandit (`wf_data.data.mix.exp3.Exp3`) calls `transform.step(losses)` once per update with a
(K,) float64 array of mean losses, NaN for unobserved domains, and feeds the (K,) rewards it
returns (NaN where unobserved) to its update rule. Each transform is a pure function of the
loss stream it has seen; the little it remembers is in `state_dict()`, which the bandit
checkpoints inside its own state, so the loader never needs to know which reward is in use.

- ``loss``: the loss itself (the ODM paper). It favours the hardest domain, even an
  unlearnable one.
- ``excess_loss``: ``max(L_i - ref_i, 0)`` against a fixed per-domain reference loss (DoReMi's
  excess loss, clipped at 0 as DoReMi does): a domain at or below its reference earns nothing.
- ``loss_decrease``: learning progress (ADO-style). The loss of each domain is smoothed by an
  EMA, ``s <- beta s + (1 - beta) min(L, 2 s)`` (``s = L`` at the first observation; the clip
  keeps one loss spike from reading as progress long after it), and the reward is
  how much ``s`` fell over the last ``window`` observations of that domain,
  ``s[n - m] - s[n]`` with ``m = min(n, window)`` (0 at the first observation). A domain that
  no longer improves, such as one of random tokens, earns nothing.
- ``loss_change``: absolute learning progress ``|s[n - m] - s[n]|`` (ALP-GMM, Portelas et al.
  2019; Teacher-Student Curriculum Learning, Matiisen et al. 2017): a domain whose loss rises
  because it gets too few rows (forgetting) is rewarded like one being learned, rather than
  pushed further down.
- ``relative_excess`` and ``relative_decrease``: the same two on a common scale, as log ratios:
  ``max(log(L_i / ref_i), 0)`` and ``log(s[n - m] / s[n])`` (signed). A domain 10% above its
  reference, or 10% lower than a window ago, scores the same at 6 nats as at 1.4, so domains
  compare whatever their loss level.

- ``loss_decrease_per_token``: learning progress per unit of sampling weight, ``(s[n - m] -
  s[n]) / (W[n] - W[n - m])``, where ``W`` sums the domain's policy weight over the updates
  whose rows trained the model between the two observations: the fall of the loss per row the
  domain was given (in steps' worth of rows), an estimate of ``-dL/dn``. ``loss_decrease``
  grows with the weight it earns (more rows, more progress), so the leading domain keeps
  leading; per row, a domain's reward shrinks as it saturates and a starved domain is not
  penalised for being starved, so the weights settle where the domains' marginal returns do.

The references of the excess rewards are given, or ``"auto"``: set later with `set_reference`
(`wf_data.data.mix.reference` measures them in the run); until then the rewards are NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "REWARDS",
    "ExcessLoss",
    "Loss",
    "LossChange",
    "LossDecrease",
    "LossDecreasePerToken",
    "RelativeDecrease",
    "RelativeExcess",
    "make_reward",
]

_TINY = 1e-12  # a loss of 0 is clamped here before a log ratio

REWARDS = (
    "loss",
    "excess_loss",
    "loss_decrease",
    "loss_change",
    "relative_excess",
    "relative_decrease",
    "loss_decrease_per_token",
)


class Loss:
    """``reward = loss``: stateless."""

    name = "loss"

    def __init__(self, num_domains: int):
        self.num_domains = num_domains

    def step(self, losses: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """(K,) rewards for (K,) losses (NaN = unobserved, kept NaN); ``weights`` is the (K,)
        policy that sampled the rows of these losses (used by `LossDecreasePerToken` only)."""
        return losses.copy()

    def state_dict(self) -> dict[str, Any]:
        """Nothing to remember."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Accepts the empty state."""


class ExcessLoss(Loss):
    """``reward = max(loss - reference, 0)`` per domain; ``reference`` is (K,) finite floats,
    or ``"auto"``: set later by `set_reference` (measured in the run), NaN rewards until then."""

    name = "excess_loss"

    def __init__(self, num_domains: int, reference: Any):
        super().__init__(num_domains)
        if reference is None:
            raise ValueError(
                f"reward {self.name!r} needs reference losses, one per domain "
                "(mixing.reference_losses: {domain_name: loss}, or auto)"
            )
        self.reference: np.ndarray | None = None
        if not (isinstance(reference, str) and reference == "auto"):
            self.set_reference(reference)

    def set_reference(self, reference: Any) -> None:
        """Sets the (K,) reference losses (finite floats)."""
        values = np.asarray(reference, dtype=np.float64)
        if values.shape != (self.num_domains,) or not np.isfinite(values).all():
            raise ValueError(
                f"reference losses must be {self.num_domains} finite floats, got {values.tolist()}"
            )
        self.reference = values

    def step(self, losses: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """(K,) rewards: the excess over the reference, clipped at 0; NaN stays NaN."""
        if self.reference is None:
            return np.full(self.num_domains, np.nan)
        return np.maximum(losses - self.reference, 0.0, where=~np.isnan(losses), out=losses.copy())


class RelativeExcess(ExcessLoss):
    """``reward = max(log(loss / reference), 0)``: the excess as a log ratio, the same for a
    domain 10% above a reference of 6 nats as for one 10% above a reference of 1.4."""

    name = "relative_excess"

    def step(self, losses: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """(K,) rewards: log(loss / reference) clipped at 0; NaN stays NaN."""
        if self.reference is None:
            return np.full(self.num_domains, np.nan)
        with np.errstate(divide="ignore"):
            ratio = np.log(np.maximum(losses, _TINY) / np.maximum(self.reference, _TINY))
        return np.maximum(ratio, 0.0, where=~np.isnan(losses), out=ratio)


class LossDecrease(Loss):
    """Learning progress: decrease of the EMA-smoothed loss over the last ``window`` observations.

    State: ``history`` (K, window + 1) ring buffer of smoothed losses, ``count`` (K,) number of
    observations per domain; the newest smoothed loss of domain i is at ``(count_i - 1) %
    (window + 1)``.
    """

    name = "loss_decrease"

    def __init__(self, num_domains: int, *, smoothing: float = 0.9, window: int = 16):
        super().__init__(num_domains)
        smoothing = float(smoothing)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"loss_smoothing must be in [0, 1), got {smoothing}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"progress_window must be an int >= 1, got {window!r}")
        self.smoothing = smoothing
        self.window = window
        self._history = np.zeros((num_domains, window + 1))
        self._count = np.zeros(num_domains, dtype=np.int64)

    def step(self, losses: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """(K,) rewards ``s[n - m] - s[n]`` for the observed domains, NaN for the others."""
        observed = np.flatnonzero(~np.isnan(losses))
        self._record(observed, weights)
        size = self.window + 1
        count = self._count[observed]
        newest = self._history[observed, (count - 1) % size]
        # A loss above twice the smoothed one counts as twice: one spike (or corrupted value)
        # would otherwise sit in the EMA and read as progress for many observations after it.
        clipped = np.minimum(losses[observed], 2.0 * newest)
        smoothed = np.where(
            count == 0,
            losses[observed],
            self.smoothing * newest + (1.0 - self.smoothing) * clipped,
        )
        self._history[observed, count % size] = smoothed
        count = count + 1
        self._count[observed] = count
        back = np.minimum(count - 1, self.window)
        rewards = np.full(self.num_domains, np.nan)
        rewards[observed] = self._progress(
            self._history[observed, (count - 1 - back) % size],
            smoothed,
            observed,
            (count - 1 - back) % size,
        )
        return rewards

    def _record(self, observed: np.ndarray, weights: np.ndarray | None) -> None:
        """Hook run before the observed domains' smoothed losses are stored."""

    def _progress(
        self, before: np.ndarray, now: np.ndarray, observed: np.ndarray, slot: np.ndarray
    ) -> np.ndarray:
        """Reward of smoothed losses ``before`` (``window`` observations ago, ring ``slot``) and
        ``now`` of the ``observed`` domains."""
        return before - now

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe: the ring buffer and the per-domain observation counts."""
        return {"history": self._history.tolist(), "count": self._count.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores `state_dict()` output; refuses another K or window, or non-finite values."""
        history, count = self._state_arrays(
            state,
            history=((self.num_domains, self.window + 1), np.float64),
            count=((self.num_domains,), np.int64),
        )
        if not np.isfinite(history).all() or (count < 0).any():
            raise ValueError(f"{self.name} state: history must be finite and counts >= 0")
        self._history, self._count = history, count

    def _state_arrays(self, state: Mapping[str, Any], **spec: Any) -> list[np.ndarray]:
        """The arrays `spec` names in `state` (name=(shape, dtype)), each of its shape."""
        try:
            arrays = [np.array(state[key], dtype=dtype) for key, (_, dtype) in spec.items()]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{self.name} state: expected {' and '.join(spec)}, got {err}"
            ) from None
        if any(
            array.shape != shape for array, (shape, _) in zip(arrays, spec.values(), strict=True)
        ):
            found = " / ".join(
                f"{key} shape {a.shape}" for key, a in zip(spec, arrays, strict=True)
            )
            wanted = " / ".join(str(shape) for shape, _ in spec.values())
            raise ValueError(
                f"{self.name} state: {found} do not match {wanted} (from num_domains and "
                "progress_window)"
            )
        return arrays


class LossChange(LossDecrease):
    """Absolute learning progress, ``|s[n - m] - s[n]|``: a domain whose loss falls is being
    learned and one whose loss rises is being forgotten; both want rows. One whose loss does
    neither (random tokens, a saturated domain) earns nothing but its noise."""

    name = "loss_change"

    def _progress(self, before, now, observed, slot) -> np.ndarray:
        return np.abs(before - now)


class RelativeDecrease(LossDecrease):
    """Learning progress as a log ratio, ``log(s[n - m] / s[n])`` (signed): the share of its
    loss a domain shed over the window, comparable across loss levels; 0 when it gains nothing,
    negative when its loss rises."""

    name = "relative_decrease"

    def _progress(self, before, now, observed, slot) -> np.ndarray:
        return np.log(np.maximum(before, _TINY) / np.maximum(now, _TINY))


class LossDecreasePerToken(LossDecrease):
    """Learning progress per unit of sampling weight, ``(s[n - m] - s[n]) / (W[n] - W[n - m])``.

    ``W`` sums the domain's policy weight over the updates before each observation: the rows
    (in steps' worth) that trained the model between two observations of the domain. Extra
    state: ``served`` (K,) that sum so far, and ``served_history`` (K, window + 1), its value at
    each stored observation. `step` needs ``weights``, the policy that sampled the step's rows.
    """

    name = "loss_decrease_per_token"

    def __init__(self, num_domains: int, *, smoothing: float = 0.9, window: int = 16):
        super().__init__(num_domains, smoothing=smoothing, window=window)
        self._served = np.zeros(num_domains)
        self._served_history = np.zeros((num_domains, window + 1))
        self._served_now = np.zeros(num_domains)

    def _record(self, observed: np.ndarray, weights: np.ndarray | None) -> None:
        if weights is None:
            raise ValueError(f"reward {self.name!r}: step needs the policy weights of the step")
        # This step's loss comes from rows sampled now, measured before training on them: the
        # observation sees the weights of the steps before it.
        self._served_now = self._served.copy()
        self._served_history[observed, self._count[observed] % (self.window + 1)] = (
            self._served_now[observed]
        )
        self._served += np.asarray(weights, dtype=np.float64)

    def _progress(self, before, now, observed, slot) -> np.ndarray:
        served = self._served_now[observed] - self._served_history[observed, slot]
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = (before - now) / served
        return np.where(served > 0, rate, 0.0)

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe: `LossDecrease`'s state plus the weight served per domain."""
        return {
            **super().state_dict(),
            "served": self._served.tolist(),
            "served_history": self._served_history.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores `state_dict()` output; refuses another K or window, or non-finite values."""
        served, served_history = self._state_arrays(
            state,
            served=((self.num_domains,), np.float64),
            served_history=((self.num_domains, self.window + 1), np.float64),
        )
        if not (np.isfinite(served).all() and np.isfinite(served_history).all()):
            raise ValueError(f"{self.name} state: served must be finite")
        super().load_state_dict(state)
        self._served, self._served_history = served, served_history


def make_reward(
    kind: str,
    num_domains: int,
    *,
    reference: Any = None,
    smoothing: float = 0.9,
    window: int = 16,
) -> Loss:
    """The reward transform named ``kind`` (one of `REWARDS`) for ``num_domains`` domains."""
    if kind == "loss":
        return Loss(num_domains)
    if kind == "excess_loss":
        return ExcessLoss(num_domains, reference)
    progress = {
        "loss_decrease": LossDecrease,
        "loss_change": LossChange,
        "relative_decrease": RelativeDecrease,
        "loss_decrease_per_token": LossDecreasePerToken,
    }
    if kind in progress:
        return progress[kind](num_domains, smoothing=smoothing, window=window)
    if kind == "relative_excess":
        return RelativeExcess(num_domains, reference)
    raise ValueError(f"reward must be one of {REWARDS}, got {kind!r}")
