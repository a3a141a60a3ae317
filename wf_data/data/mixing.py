"""Mixing per-domain packed rows into one stream: static weights or online EXP3.

Rows are packed within one domain and mixed at row level, so a row's loss belongs to one
domain. The domain of global row ``j`` is drawn by inverse CDF from a uniform ``u_j`` that is a
pure function of ``(seed, j)``: the mixer's RNG state is the row counter, so a resumed stream
draws the same domains, and every data-parallel rank, planning the same global rows, agrees on
them without communicating. With EXP3 the CDF is the bandit's current policy, so an ``update``
changes the domains of the rows drawn after it, never before.

Iterators expose the planning interface of the packers (``next_plans`` / ``materialize``): the
loader plans every row of the global batch (cheap: lengths only) and materializes only its
rank's rows.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import grain.python as grain
import numpy as np

from wf_data.data.odm import Exp3
from wf_data.data.packing import RowPlan

ON_EXHAUSTED = ("restart", "stop")
_UNIFORM_BLOCK = 4096
_MIX_STREAM_TAG = 0x6D6978  # keeps the mixing stream independent of packers seeded alike


def validate_weights(names: Sequence[str], weights: Mapping[str, float]) -> np.ndarray:
    """Returns the weights as a float64 ``(K,)`` array in ``names`` order, normalised to sum 1.

    Fails naming the offending domain when names differ or a weight is not finite and >= 0.
    """
    if set(weights) != set(names):
        missing = sorted(set(names) - set(weights))
        extra = sorted(set(weights) - set(names))
        raise ValueError(
            f"weights must name exactly the datasets {list(names)}: missing {missing}, "
            f"unknown {extra}"
        )
    values = np.empty(len(names), dtype=np.float64)
    for index, name in enumerate(names):
        value = weights[name]
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"weight of {name!r} is not a number: {value!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weight of {name!r} must be finite and >= 0, got {value}")
        values[index] = value
    total = values.sum()
    if total <= 0:
        given = dict(zip(names, values.tolist(), strict=True))
        raise ValueError(f"weights must have a positive sum, got {given}")
    return values / total


class RowUniforms:
    """The uniform ``u_j`` in [0, 1) of every global row ``j``, a pure function of the seed.

    Drawn in blocks of 4096 from ``default_rng([seed, tag, block])`` so that jumping to any row
    costs one block, and the last block is cached for sequential reads.
    """

    def __init__(self, seed: int):
        self._seed = int(seed)
        self._block_index = -1
        self._block = np.empty(0)

    def take(self, start: int, count: int) -> np.ndarray:
        """``(count,)`` float64 uniforms of rows ``start .. start + count - 1``."""
        out = np.empty(count, dtype=np.float64)
        filled = 0
        while filled < count:
            block_index, offset = divmod(start + filled, _UNIFORM_BLOCK)
            if block_index != self._block_index:
                rng = np.random.default_rng([self._seed, _MIX_STREAM_TAG, block_index])
                self._block = rng.random(_UNIFORM_BLOCK)
                self._block_index = block_index
            n = min(count - filled, _UNIFORM_BLOCK - offset)
            out[filled : filled + n] = self._block[offset : offset + n]
            filled += n
        return out


@dataclasses.dataclass(frozen=True)
class MixedPlan:
    """One planned row of a mixture: its domain index and the domain packer's row plan."""

    domain: int
    row: RowPlan


def encode_plans(plans: Sequence[MixedPlan], names: Sequence[str]) -> list:
    """JSON-safe form of plans, domains by name (indices move when sources are added)."""
    return [
        [names[plan.domain], plan.row.epoch, [list(piece) for piece in plan.row.pieces]]
        for plan in plans
    ]


def decode_plans(encoded: Sequence, names: Sequence[str]) -> list[MixedPlan]:
    """Inverse of ``encode_plans``; fails naming a domain this mixture does not have."""
    plans = []
    for name, epoch, pieces in encoded:
        if name not in names:
            raise ValueError(f"planned rows of domain {name!r}, which this mixture lacks")
        row = RowPlan(int(epoch), tuple(tuple(int(v) for v in piece) for piece in pieces))
        plans.append(MixedPlan(names.index(name), row))
    return plans


def draw_domains(probabilities: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Domain index per uniform by inverse CDF: ``(n,)`` int64, never a zero-probability domain.

    The CDF ends at exactly 1.0 and every uniform is < 1, so a zero-probability domain (an
    empty CDF step) can never be returned, trailing ones included.
    """
    cdf = np.cumsum(probabilities)
    cdf /= cdf[-1]
    return np.searchsorted(cdf, uniforms, side="right")


class _MixingDataset(grain.IterDataset):
    """Shared base of the static and the online mixture: domains, seed, exhaustion policy."""

    def __init__(self, datasets: Mapping[str, Any], *, seed: int, on_exhausted: str):
        if not isinstance(datasets, Mapping) or not datasets:
            raise ValueError(
                f"datasets must be a non-empty mapping name -> dataset, got {datasets!r}"
            )
        if on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"on_exhausted must be one of {ON_EXHAUSTED}, got {on_exhausted!r}")
        super().__init__(list(datasets.values()))
        self.names: tuple[str, ...] = tuple(datasets)
        self.datasets = dict(datasets)
        self.seed = int(seed)
        self.on_exhausted = on_exhausted

    @property
    def num_domains(self) -> int:
        return len(self.names)

    def probabilities(self) -> np.ndarray:
        """The ``(K,)`` probabilities rows are drawn with right now."""
        raise NotImplementedError

    @property
    def mixture(self) -> dict[str, float]:
        """Current weights by domain name."""
        return dict(zip(self.names, self.probabilities().tolist(), strict=True))

    def _bandit_state(self) -> dict | None:
        return None

    def fingerprint(self) -> dict:
        """What produced this stream, per domain, for refusing a foreign state."""
        return {
            "seed": self.seed,
            "domains": {name: _dataset_fingerprint(ds) for name, ds in self.datasets.items()},
        }

    def __iter__(self) -> MixingIterator:
        return MixingIterator(self)

    def __str__(self) -> str:
        weights = ", ".join(f"{n}={w:.3f}" for n, w in self.mixture.items())
        return (
            f"{type(self).__name__}({weights}, seed={self.seed}, "
            f"on_exhausted={self.on_exhausted})"
        )


def _dataset_fingerprint(dataset: Any) -> Any:
    fingerprint = getattr(dataset, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


class MixedDataset(_MixingDataset):
    """Rows from several domains in fixed proportions, each tagged with its ``domain_ids``.

    ``datasets`` maps domain name -> packed dataset (see ``wf_data.data.packing.pack``); the
    domain index is the position in the mapping. Weights are finite, >= 0, with a positive sum;
    a zero weight disables the domain. ``on_exhausted="restart"`` starts an exhausted domain
    over; ``"stop"`` ends the stream at the first row drawn from an exhausted domain.
    """

    def __init__(
        self,
        datasets: Mapping[str, Any],
        weights: Mapping[str, float],
        *,
        seed: int = 0,
        on_exhausted: str = "restart",
    ):
        super().__init__(datasets, seed=seed, on_exhausted=on_exhausted)
        self._weights = validate_weights(self.names, weights)

    def probabilities(self) -> np.ndarray:
        return self._weights.copy()


class Exp3Mixing(_MixingDataset):
    """Online Data Mixing: each row's domain drawn from the EXP3 bandit's current policy.

    ``weights`` is the bandit's prior (the static mixture it starts from). ``update(losses)``
    feeds the per-domain mean loss of a training step back (``Mapping[int, float]`` or a
    ``(K,)`` array with NaN for unobserved domains). Rows drawn after an update use the new
    policy; rows already drawn keep theirs, so a consumer that reads P rows ahead (a prefetch
    buffer of depth P) sees an update take effect at most P rows late. The iterator's state
    holds the bandit, the row counter (the RNG) and every domain's position.
    """

    def __init__(
        self,
        datasets: Mapping[str, Any],
        weights: Mapping[str, float] | None = None,
        *,
        seed: int = 0,
        on_exhausted: str = "restart",
        alpha: float = 0.9,
        min_weight: float | None = None,
        max_weight: float | None = None,
        warmup_steps: int = 0,
    ):
        super().__init__(datasets, seed=seed, on_exhausted=on_exhausted)
        prior = None
        if weights is not None:
            prior = validate_weights(self.names, weights)
        self.bandit = Exp3(
            self.num_domains,
            alpha=alpha,
            prior=prior,
            seed=seed,
            min_weight=min_weight,
            max_weight=max_weight,
            warmup_steps=warmup_steps,
        )

    def probabilities(self) -> np.ndarray:
        return self.bandit.policy()

    def update(self, losses: Mapping[int, float] | Mapping[str, float] | np.ndarray) -> None:
        """Feeds per-domain mean losses back to the bandit (keys: index or domain name)."""
        if isinstance(losses, Mapping):
            losses = {self._domain_index(key): value for key, value in losses.items()}
        self.bandit.update(losses)

    def _domain_index(self, key: int | str) -> int:
        if isinstance(key, str):
            if key not in self.names:
                raise KeyError(f"unknown domain {key!r}; domains are {list(self.names)}")
            return self.names.index(key)
        return key  # the bandit checks the type (bool and float keys are refused) and range

    def _bandit_state(self) -> dict:
        return self.bandit.state_dict()

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "mixing": "exp3"}


def _remap_bandit_state(saved: dict, saved_names: list[str], mixing: Exp3Mixing) -> dict:
    """The saved bandit state carried over to this mixture's domains and prior.

    Rewards follow domains by name (an added domain starts at 0); the prior and bounds are
    this mixture's, so re-weighting takes effect while the learnt rewards are kept.
    """
    current = mixing.bandit.state_dict()
    if saved_names == list(mixing.names) and saved["prior"] == current["prior"]:
        return saved
    rewards = dict(zip(saved_names, saved["rewards"], strict=True))
    warnings.warn(
        f"restoring the EXP3 state of domains {saved_names} into {list(mixing.names)} with "
        "the new prior: rewards carried over by name, new domains start at 0",
        stacklevel=3,
    )
    return {
        **current,
        "alpha": saved["alpha"],
        "step": saved["step"],
        "rewards": [float(rewards.get(name, 0.0)) for name in mixing.names],
    }


class MixingIterator(grain.DatasetIterator):
    """Iterates a mixture row by row; plans and materializes rows in bulk for the loader."""

    def __init__(self, mixing: _MixingDataset):
        super().__init__()
        self._mixing = mixing
        self._uniforms = RowUniforms(mixing.seed)
        self._domain_iters = [iter(ds) for ds in mixing.datasets.values()]
        self._row = 0
        self._restarts = [0] * mixing.num_domains
        self._stopped = False

    def next_plans(self, count: int) -> list[MixedPlan]:
        """Plans the next ``count`` rows (domain draw + the domain packer's cheap planning).

        Returns fewer than ``count`` plans only when the stream ends (``on_exhausted="stop"``).
        """
        if self._stopped:
            return []
        domains = draw_domains(
            self._mixing.probabilities(), self._uniforms.take(self._row, count)
        )
        plans: list[MixedPlan] = []
        for domain in domains.tolist():
            row_plan = self._plan_one(domain)
            if row_plan is None:
                self._stopped = True
                break
            plans.append(MixedPlan(domain, row_plan))
            self._row += 1
        return plans

    def _plan_one(self, domain: int) -> Any | None:
        planned = self._domain_iters[domain].next_plans(1)
        if planned:
            return planned[0]
        if self._mixing.on_exhausted == "stop":
            return None
        # Restart: a fresh iterator replays the domain from its first row.
        self._restarts[domain] += 1
        self._domain_iters[domain] = iter(self._mixing.datasets[self._mixing.names[domain]])
        planned = self._domain_iters[domain].next_plans(1)
        if not planned:
            name = self._mixing.names[domain]
            raise ValueError(f"domain {name!r} has no rows: cannot draw from an empty dataset")
        return planned[0]

    def materialize(self, plans: Sequence[MixedPlan]) -> dict[str, np.ndarray]:
        """Reads the rows of ``plans``: a batch dict of ``(n, L)`` int32 plus ``domain_ids`` (n,).

        Rows keep the order of ``plans``; each domain's rows are read in one call.
        """
        if not plans:
            raise ValueError("materialize needs at least one plan")
        domain_ids = np.fromiter((p.domain for p in plans), dtype=np.int32, count=len(plans))
        batch: dict[str, np.ndarray] | None = None
        for domain in np.unique(domain_ids).tolist():
            positions = np.flatnonzero(domain_ids == domain)
            rows = self._domain_iters[domain].materialize([plans[i].row for i in positions])
            if batch is None:
                batch = {
                    key: np.empty((len(plans),) + value.shape[1:], dtype=value.dtype)
                    for key, value in rows.items()
                }
            for key, value in rows.items():
                batch[key][positions] = value
        batch["domain_ids"] = domain_ids
        return batch

    def __next__(self) -> dict[str, np.ndarray]:
        plans = self.next_plans(1)
        if not plans:
            raise StopIteration
        return {key: value[0] for key, value in self.materialize(plans).items()}

    def get_state(self) -> dict[str, Any]:
        return {
            "names": list(self._mixing.names),
            "row": self._row,
            "stopped": self._stopped,
            "domains": {
                name: {"restarts": restarts, "state": it.get_state()}
                for name, restarts, it in zip(
                    self._mixing.names, self._restarts, self._domain_iters, strict=True
                )
            },
            "bandit": self._mixing._bandit_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a state; domains missing from it (added since) start from their first row.

        Domains in the state that this mixture no longer has are ignored, so a restore with
        re-weighted, added or removed domains continues every unchanged one where it was.
        """
        self._row = int(state["row"])
        self._stopped = bool(state["stopped"])
        saved_domains = state["domains"]
        for index, name in enumerate(self._mixing.names):
            self._domain_iters[index] = iter(self._mixing.datasets[name])
            saved = saved_domains.get(name)
            self._restarts[index] = 0
            if saved is not None:
                self._restarts[index] = int(saved["restarts"])
                self._domain_iters[index].set_state(saved["state"])
        bandit = state.get("bandit")
        if bandit is not None and isinstance(self._mixing, Exp3Mixing):
            self._mixing.bandit.load_state_dict(
                _remap_bandit_state(bandit, list(state["names"]), self._mixing)
            )

    def __str__(self) -> str:
        return f"MixingIterator({self._mixing}, row={self._row})"
