"""Reference losses measured in the run itself (``reference_losses: auto``).

An excess-loss reward needs a reference: the held-out loss per domain that a model trained on
the prior mixture reaches at the end of the run (DoReMi's reference model). Rather than a second
run, `ReferenceEstimate` extrapolates it from the run's own static warm-up: the trainer
evaluates the held-out loss per domain (``get_eval_loaders``) twice, after ``W / 2`` and after
``W`` updates (``W = warmup_steps``, during which the policy is the prior), and each domain's
loss is extended to the end of the run ``T = total_steps`` by the power law through both points:

    c = max(log(L(W/2) / L(W)) / log(W / (W/2)), 0),     reference = L(W) (T / W) ** -c

A domain that did not improve during the warm-up (random tokens) keeps its warm-up loss as
reference, so it earns no excess later. The estimate is what the run would reach if it stayed
static and its loss kept falling at the warm-up's rate; `tools/mixing_study.py` measures how
close that is to the static arm's final loss (docs/mixing.md).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["ReferenceEstimate"]


class ReferenceEstimate:
    """Schedule and estimator of ``reference_losses: auto`` for `num_domains` domains.

    `due(step)` says whether a held-out measurement is wanted after `step` bandit updates;
    `record(step, losses)` takes it ((K,) held-out losses); `value` is the (K,) reference once
    both measurements are in, else None. `state_dict()` keeps the measurements, so a run
    checkpointed between them resumes exactly.
    """

    def __init__(self, num_domains: int, warmup_steps: int, total_steps: int | None):
        if warmup_steps < 2:
            raise ValueError(
                "reference_losses: auto measures the held-out loss during the static warm-up: "
                f"it needs warmup_steps >= 2 (or warmup_fraction), got {warmup_steps}"
            )
        if total_steps is None or total_steps < warmup_steps:
            raise ValueError(
                "reference_losses: auto extrapolates the warm-up's held-out loss to the end of "
                f"the run: it needs total_steps >= warmup_steps ({warmup_steps}), got "
                f"{total_steps}"
            )
        self.num_domains = int(num_domains)
        self.steps = (warmup_steps // 2, int(warmup_steps))
        self.total_steps = int(total_steps)
        self._measured: dict[int, np.ndarray] = {}

    def due(self, step: int) -> bool:
        """True when the held-out losses after `step` updates are wanted and not yet recorded."""
        return step in self.steps and step not in self._measured

    def record(self, step: int, losses: Any) -> None:
        """Records (K,) held-out losses measured after `step` updates (finite, > 0)."""
        if not self.due(step):
            raise ValueError(
                f"reference_losses: auto: no measurement is due after update {step} (measured "
                f"after updates {self.steps}, recorded {sorted(self._measured)})"
            )
        self._measured[step] = _held_out_losses(losses, self.num_domains)

    @property
    def value(self) -> np.ndarray | None:
        """(K,) float64 reference losses, or None before both measurements."""
        if len(self._measured) < 2:
            return None
        (first, early), (last, late) = sorted(self._measured.items())
        rate = np.maximum(np.log(early / late) / math.log(last / first), 0.0)
        return late * (self.total_steps / last) ** -rate

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe: `{"measured": {step: [K losses]}}`."""
        return {"measured": {str(step): v.tolist() for step, v in self._measured.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores `state_dict()` output; refuses measurements at other steps or of other K."""
        try:
            measured = {int(step): v for step, v in state["measured"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"reference estimate state: expected measured, got {error}") from None
        unknown = sorted(set(measured) - set(self.steps))
        if unknown:
            raise ValueError(
                f"reference estimate state: measurements after updates {unknown}, this run "
                f"measures after {self.steps} (another warmup_steps?)"
            )
        self._measured = {
            step: _held_out_losses(v, self.num_domains) for step, v in measured.items()
        }


def _held_out_losses(losses: Any, num_domains: int) -> np.ndarray:
    """(K,) float64 from a sequence of K finite losses > 0; ValueError naming what is wrong."""
    if isinstance(losses, Mapping) or isinstance(losses, str | bytes):
        raise TypeError(f"held-out losses must be a (K,) sequence, got {type(losses).__name__}")
    values = list(losses)
    if len(values) != num_domains or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"held-out losses must be {num_domains} numbers, got {values!r}")
    array = np.array([float(v) for v in values])
    if not (np.isfinite(array).all() and (array > 0).all()):
        raise ValueError(f"held-out losses must be finite and > 0, got {array.tolist()}")
    return array
