"""Mixing plan streams of several domains: `mix_plans({name: plans}, policy, seed=...)`.

The parents are any Grain datasets (`MapDataset` or `IterDataset`) yielding row plans (see
`wf_data.data.plan.plans`), with whatever plain Grain transformations a user puts on them. The
mixer yields each parent's plans with `"domain": index` added (index = position in the
mapping). Rows are packed within one domain and mixed at row level, so a row's loss belongs to
one domain.

The domain of mixed row `j` is drawn by inverse CDF from a uniform `u_j` that is a pure
function of `(seed, j)`, with the *policy*'s current probabilities: `StaticWeights` (fixed) or
`Exp3Policy` (the EXP3 bandit of `wf_data.data.mix.exp3`, which learns from per-domain losses).
The mixer draws with the policy object it is given, which its owner feeds (`policy.update`,
`MixPlans.update`, or the loader's `update_mixture` on the policy the loader owns); rows drawn
after an update use the new probabilities, never rows before. An iterator's `get_state` holds
the row counter, each parent's state and the policy's state; `set_state` restores them all, so
a restored stream draws the same domains.

The mixer's iterator hands whole blocks of rows to the batcher (`next_block`): the domains of
a block are drawn at once, and each parent that is a `BlockIterator` (our planners) gives its
rows as one block, others row by row; the stream is the same as row by row.
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from wf_data.data.mix.exp3 import Exp3, float_loss
from wf_data.data.plan.blocks import RowBlock, next_rows

ON_EXHAUSTED = ("restart", "stop")
_UNIFORM_BLOCK = 4096
_FIRST_DRAW = 64  # rows whose domains are drawn at once after a policy change
_MIX_STREAM_TAG = 0x6D6978  # keeps the mixing stream independent of packers seeded alike

__all__ = [
    "Exp3Policy",
    "MixPlans",
    "MixPolicy",
    "StaticWeights",
    "draw_domains",
    "mix_plans",
    "validate_weights",
]


def validate_weights(names: Sequence[str], weights: Mapping[str, float]) -> np.ndarray:
    """Returns the weights as a float64 `(K,)` array in `names` order, normalised to sum 1.

    Fails naming the offending domain when names differ or a weight is not finite and >= 0.
    """
    if set(weights) != set(names):
        missing = sorted(set(names) - set(weights))
        extra = sorted(map(str, set(weights) - set(names)))
        raise ValueError(
            f"weights must name exactly the datasets {list(names)}: missing {missing}, "
            f"unknown {extra}"
        )
    values = np.empty(len(names), dtype=np.float64)
    for index, name in enumerate(names):
        value = weights[name]
        try:
            if isinstance(value, bool):
                raise TypeError
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
    """The uniform `u_j` in [0, 1) of every mixed row `j`, a pure function of the seed.

    Drawn in blocks of 4096 from `default_rng([seed, tag, block])` so that jumping to any row
    costs one block, and the last block is cached for sequential reads.
    """

    def __init__(self, seed: int):
        self._seed = int(seed)
        self._block_index = -1
        self._block = np.empty(0)

    def block(self, block_index: int) -> np.ndarray:
        """`(4096,)` float64 uniforms of rows `block_index * 4096 ...` (cached while reused)."""
        if block_index != self._block_index:
            rng = np.random.default_rng([self._seed, _MIX_STREAM_TAG, block_index])
            self._block = rng.random(_UNIFORM_BLOCK)
            self._block_index = block_index
        return self._block

    def __getitem__(self, row: int) -> float:
        block_index, offset = divmod(row, _UNIFORM_BLOCK)
        return float(self.block(block_index)[offset])

    def take(self, start: int, count: int) -> np.ndarray:
        """`(count,)` float64 uniforms of rows `start .. start + count - 1`."""
        parts, row, stop = [], start, start + count
        while row < stop:
            block_index, offset = divmod(row, _UNIFORM_BLOCK)
            part = self.block(block_index)[offset : offset + stop - row]
            parts.append(part)
            row += part.size
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts or [np.empty(0)])


def draw_domains(probabilities: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Domain index per uniform by inverse CDF: `(n,)` int64, never a zero-probability domain.

    The CDF ends at exactly 1.0 and every uniform is < 1, so a zero-probability domain (an
    empty CDF step) can never be returned, trailing ones included.
    """
    cdf = np.cumsum(probabilities)
    cdf /= cdf[-1]
    return np.searchsorted(cdf, uniforms, side="right")


# ----------------------------------------------------------------------------- policies


class MixPolicy(Protocol):
    """What the mixer asks of a policy. `version` changes whenever `probabilities()` may have
    (an update, a restore), so that domains drawn ahead are redrawn."""

    kind: str
    learns: bool
    version: int

    def bind(self, names: Sequence[str]) -> None: ...

    def probabilities(self) -> np.ndarray: ...

    def update(self, losses: np.ndarray) -> None: ...

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, saved_names: Sequence[str]) -> None: ...


class StaticWeights:
    """Fixed mixture weights by domain name (finite, >= 0, positive sum; 0 disables one)."""

    kind = "static"
    learns = False
    version = 0
    reference_due = False

    def __init__(self, weights: Mapping[str, float]):
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping name -> weight, got {weights!r}")
        self.weights = dict(weights)
        self._probabilities: np.ndarray | None = None

    def bind(self, names: Sequence[str]) -> None:
        """Checks the weights against the mixer's domains (called by the mixer)."""
        self._probabilities = validate_weights(names, self.weights)

    def probabilities(self) -> np.ndarray:
        return self._probabilities

    def update(self, losses: np.ndarray) -> None:
        raise TypeError("update_mixture needs mixing kind 'exp3'; this mixture is static")

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any, saved_names: Sequence[str]) -> None:
        """Nothing to restore: the weights are configuration."""


class Exp3Policy:
    """Online Data Mixing: probabilities from an `Exp3` bandit, updated with per-domain losses.

    The bandit's prior is the static mixture it starts from. Its state (rewards, step) is the
    policy state; a restore into other domains or another prior carries rewards over by name.
    """

    kind = "exp3"
    learns = True

    def __init__(self, bandit: Exp3):
        if not isinstance(bandit, Exp3):
            raise TypeError(f"Exp3Policy needs an odm.Exp3 bandit, got {type(bandit).__name__}")
        self.bandit = bandit
        self._names: tuple[str, ...] = ()
        self.version = 0

    def bind(self, names: Sequence[str]) -> None:
        if self.bandit.num_domains != len(names):
            raise ValueError(
                f"the EXP3 bandit has {self.bandit.num_domains} domains, the mixture "
                f"{len(names)}: {list(names)}"
            )
        self._names = tuple(names)

    def probabilities(self) -> np.ndarray:
        return self.bandit.policy()

    def update(self, losses: np.ndarray) -> None:
        self.version += 1
        self.bandit.update(losses)

    @property
    def reference_due(self) -> bool:
        """True when the bandit's ``reference_losses: auto`` wants held-out losses now."""
        return self.bandit.reference_due

    def record_reference(self, losses: np.ndarray) -> None:
        self.bandit.record_reference(losses)

    def state_dict(self) -> dict:
        return self.bandit.state_dict()

    def load_state_dict(self, state: Mapping[str, Any], saved_names: Sequence[str]) -> None:
        """Restores the bandit; rewards follow domains by name (an added domain starts at 0),
        prior and bounds stay this policy's, so a re-weighted restore takes effect."""
        current = self.bandit.state_dict()
        if list(saved_names) != list(self._names) or state["prior"] != current["prior"]:
            rewards = dict(zip(saved_names, state["rewards"], strict=True))
            warnings.warn(
                f"restoring the EXP3 state of domains {list(saved_names)} into "
                f"{list(self._names)} with the new prior: rewards carried over by name, new "
                "domains start at 0",
                stacklevel=4,
            )
            state = {
                **current,
                "alpha": state["alpha"],
                "step": state["step"],
                "rewards": [float(rewards.get(name, 0.0)) for name in self._names],
            }
        self.version += 1
        self.bandit.load_state_dict(state)


# ----------------------------------------------------------------------------- the mixer


def mix_plans(
    parents: Mapping[str, Any],
    policy: StaticWeights | Exp3Policy | Mapping[str, float],
    *,
    seed: int = 0,
    on_exhausted: str = "restart",
) -> MixPlans:
    """Mixes the plan streams `parents` ({name: Grain dataset of plans}) with `policy` (a
    policy object, or a mapping name -> weight for static weights). See `MixPlans`."""
    if isinstance(policy, Mapping):
        policy = StaticWeights(policy)
    return MixPlans(parents, policy, seed=seed, on_exhausted=on_exhausted)


class MixPlans(grain.IterDataset):
    """An `IterDataset` of plans drawn from several domains' plan streams by a policy.

    `on_exhausted="restart"` starts an exhausted parent over (a fresh iterator); `"stop"` ends
    the stream at the first row drawn from an exhausted parent. The mixer draws with `policy`
    itself, not a copy: `update(losses)` feeds it (keys: domain names or indices; unknown names
    and bool keys are refused here, loss values are checked by the bandit), and every iterator
    of this mixer draws with it. `with_policy` gives the same mixer driven by another policy
    object (the loader's own).
    """

    def __init__(
        self,
        parents: Mapping[str, Any],
        policy: MixPolicy,
        *,
        seed: int = 0,
        on_exhausted: str = "restart",
    ):
        if not isinstance(parents, Mapping) or not parents:
            raise ValueError(
                f"parents must be a non-empty mapping name -> dataset, got {parents!r}"
            )
        for name, parent in parents.items():
            if not isinstance(name, str):
                raise TypeError(f"domain names must be str, got {name!r}")
            if not isinstance(parent, grain.MapDataset | grain.IterDataset):
                raise TypeError(
                    f"domain {name!r}: expected a Grain MapDataset or IterDataset of plans, got "
                    f"{type(parent).__name__}"
                )
        if on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"on_exhausted must be one of {ON_EXHAUSTED}, got {on_exhausted!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {seed!r}")
        super().__init__(
            [
                p if isinstance(p, grain.IterDataset) else p.to_iter_dataset()
                for p in parents.values()
            ]
        )
        self.names: tuple[str, ...] = tuple(parents)
        self.datasets = dict(parents)
        self.seed = int(seed)
        self.on_exhausted = on_exhausted
        policy.bind(self.names)
        self.policy = policy

    def with_policy(self, policy: MixPolicy) -> MixPlans:
        """This mixer (same parents, seed and `on_exhausted`) drawing with `policy`."""
        return MixPlans(self.datasets, policy, seed=self.seed, on_exhausted=self.on_exhausted)

    @property
    def num_domains(self) -> int:
        return len(self.names)

    @property
    def mixture(self) -> dict[str, float]:
        """Current weights by domain name (the ones the next rows are drawn with)."""
        return dict(zip(self.names, self.policy.probabilities().tolist(), strict=True))

    def losses_array(self, losses: Mapping[Any, float] | Any) -> np.ndarray:
        """(K,) float64 from a mapping (names or indices -> loss; NaN where absent) or array."""
        if not isinstance(losses, Mapping):
            return losses
        array = np.full(self.num_domains, np.nan)
        for key, value in losses.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"mixture loss of {key!r} must be a number, got {value!r}")
            array[self._domain_index(key)] = float_loss(value, f"domain {key!r}")
        return array

    def _domain_index(self, key: Any) -> int:
        if isinstance(key, bool) or not isinstance(key, str | numbers.Integral):
            raise TypeError(
                f"mixture loss key {key!r} must be a domain name {list(self.names)} or an int index"
            )
        if isinstance(key, str):
            if key not in self.names:
                raise KeyError(f"unknown domain {key!r}; domains are {list(self.names)}")
            return self.names.index(key)
        if not 0 <= key < self.num_domains:
            raise KeyError(f"domain index {key} out of range for {self.num_domains} domains")
        return int(key)

    def update(self, losses: Mapping[Any, float] | Any) -> None:
        """Feeds per-domain mean losses to the policy (EXP3 only)."""
        if not self.policy.learns:
            raise TypeError("update_mixture needs mixing kind 'exp3'; this mixture is static")
        self.policy.update(self.losses_array(losses))

    @property
    def reference_due(self) -> bool:
        """True when the live policy wants held-out losses (``reference_losses: auto``)."""
        return self.policy.reference_due

    def record_reference(self, losses: Mapping[Any, float] | Any) -> None:
        """Hands held-out losses per domain (names or indices, or a (K,) array) to the live
        policy's reference estimate; they change no row already drawn."""
        if not self.policy.reference_due:
            raise ValueError(f"{self}: no reference measurement is due")
        array = np.asarray(self.losses_array(losses), dtype=np.float64)
        if np.isnan(array).any():
            missing = [n for n, v in zip(self.names, array, strict=True) if np.isnan(v)]
            raise ValueError(f"held-out losses for the reference lack domains {missing}")
        self.policy.record_reference(array)

    def fingerprint(self) -> dict:
        """What produced this stream, per source, for refusing a foreign state (the shape of
        `wf_data.data.deliver.factory.loader_fingerprint`, so sources compare one by one)."""
        return {
            "seed": self.seed,
            "mixing": self.policy.kind,
            "sources": {name: _fingerprint(ds) for name, ds in self.datasets.items()},
        }

    def __iter__(self) -> MixPlansIterator:
        return MixPlansIterator(self)

    def __str__(self) -> str:
        return (
            f"MixPlans({list(self.names)}, policy={self.policy.kind}, seed={self.seed}, "
            f"on_exhausted={self.on_exhausted})"
        )


def _fingerprint(dataset: Any) -> Any:
    fingerprint = getattr(dataset, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


class MixPlansIterator(grain.DatasetIterator):
    """Draws a domain per row and pulls that parent's next plan, with the mixer's policy.

    Row by row (`next`) or a block of rows at once (`next_block`, the batcher's path): the same
    rows, the same state. State: `{"names", "row", "stopped", "domains": {name: {"restarts",
    "state"}}, "policy"}`.
    """

    def __init__(self, mixer: MixPlans):
        self._mixer = mixer
        self._domain_iters = [iter(ds) for ds in mixer.datasets.values()]
        super().__init__([it for it in self._domain_iters if isinstance(it, grain.DatasetIterator)])
        self.policy = mixer.policy
        self._uniforms = RowUniforms(mixer.seed)
        self._row = 0
        self._restarts = [0] * mixer.num_domains
        self._stopped = False
        # Domains of rows `_drawn_from ...` drawn at once with the policy at `_drawn_version`
        # (one searchsorted per chunk, not per row); redrawn when the policy has changed since,
        # so rows after an update are drawn with the new one, exactly as row by row. Chunks
        # double from `_FIRST_DRAW` while the policy holds, so per-step updates do not redraw
        # a whole block.
        self._drawn: list[int] = []
        self._drawn_from = 0
        self._drawn_version = -1
        self._draw_size = _FIRST_DRAW

    def _domain(self, row: int) -> int:
        offset = row - self._drawn_from
        if self._drawn_version != self.policy.version:
            self._drawn, self._draw_size = [], _FIRST_DRAW
        if not 0 <= offset < len(self._drawn):
            block_index, offset = divmod(row, _UNIFORM_BLOCK)
            uniforms = self._uniforms.block(block_index)[offset : offset + self._draw_size]
            self._draw_size = min(2 * self._draw_size, _UNIFORM_BLOCK)
            self._drawn = draw_domains(self.policy.probabilities(), uniforms).tolist()
            self._drawn_from, offset = row, 0
            self._drawn_version = self.policy.version
        return self._drawn[offset]

    def __next__(self) -> dict[str, Any]:
        if self._stopped:
            raise StopIteration
        domain = self._domain(self._row)
        try:
            plan = next(self._domain_iters[domain])
        except StopIteration:
            plan = self._restart(domain)
        self._row += 1
        return {**plan, "domain": domain}

    def next_block(self, max_rows: int) -> RowBlock:
        """The next `max_rows` rows as one block with `domains` (fewer only where the stream
        stops; see `wf_data.data.plan.blocks.BlockIterator`)."""
        if self._stopped:
            raise StopIteration
        if self._mixer.on_exhausted == "stop":
            # Row by row: the stream ends at the first row of an exhausted domain, and no
            # other domain's rows may be taken past it.
            plans = list(itertools.islice(self, max_rows))
            if not plans:
                raise StopIteration
            return RowBlock.from_rows(plans)
        domains = draw_domains(
            self.policy.probabilities(), self._uniforms.take(self._row, max_rows)
        )
        counts = np.bincount(domains, minlength=self._mixer.num_domains).tolist()
        blocks = [self._take(domain, count) for domain, count in enumerate(counts) if count]
        self._row += max_rows
        if len(blocks) == 1:
            mixed = blocks[0]
        else:
            # The blocks in domain order hold the rows sorted by domain (stably): row i of the
            # stream is their row `rank[i]`.
            rank = np.empty(max_rows, dtype=np.int64)
            rank[np.argsort(domains, kind="stable")] = np.arange(max_rows)
            mixed = RowBlock.concat(blocks).take(rank)
        return RowBlock(
            mixed.doc_ids, mixed.offsets, mixed.lengths, mixed.starts, mixed.epochs, domains
        )

    def _take(self, domain: int, count: int) -> RowBlock:
        """The next `count` rows of `domain`, restarting its parent where it ends."""
        try:
            part = next_rows(self._domain_iters[domain], count)
        except StopIteration:
            part = RowBlock.empty()
        if len(part) == count:  # most often: the parent had them all
            return part
        parts, taken = [part], len(part)
        while taken < count:
            try:
                part = next_rows(self._domain_iters[domain], count - taken)
            except StopIteration:
                fresh = iter(self._mixer.datasets[self._mixer.names[domain]])
                try:
                    part = next_rows(fresh, count - taken)
                except StopIteration:
                    raise self._empty_domain(domain) from None
                self._restarts[domain] += 1
                self._domain_iters[domain] = fresh
            parts.append(part)
            taken += len(part)
        return RowBlock.concat(parts)

    def _empty_domain(self, domain: int) -> ValueError:
        return ValueError(
            f"domain {self._mixer.names[domain]!r} has no rows: cannot draw from an empty "
            "dataset (no documents, only empty ones, or a filter that drops every plan); "
            "remove it or give it weight 0"
        )

    def _restart(self, domain: int) -> dict[str, Any]:
        name = self._mixer.names[domain]
        fresh = iter(self._mixer.datasets[name])
        try:
            plan = next(fresh)
        except StopIteration:
            # Also under "stop": an empty domain would end the stream at its first draw,
            # silently, however much the other domains hold.
            raise self._empty_domain(domain) from None
        if self._mixer.on_exhausted == "stop":
            self._stopped = True
            raise StopIteration
        self._restarts[domain] += 1
        self._domain_iters[domain] = fresh
        return plan

    def get_state(self) -> dict[str, Any]:
        return {
            "names": list(self._mixer.names),
            "row": self._row,
            "stopped": self._stopped,
            "domains": {
                name: {"restarts": restarts, "state": it.get_state()}
                for name, restarts, it in zip(
                    self._mixer.names, self._restarts, self._domain_iters, strict=True
                )
            },
            "policy": self.policy.state_dict(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a state; domains missing from it (added since) start from their first row.

        Domains in the state that this mixer no longer has are ignored, so a restore with
        re-weighted, added or removed domains continues every unchanged one where it was.
        """
        self._row = int(state["row"])
        self._stopped = bool(state["stopped"])
        saved_domains = state["domains"]
        for index, name in enumerate(self._mixer.names):
            self._domain_iters[index] = iter(self._mixer.datasets[name])
            saved = saved_domains.get(name)
            self._restarts[index] = 0
            if saved is not None:
                self._restarts[index] = int(saved["restarts"])
                self._domain_iters[index].set_state(saved["state"])
        if state.get("policy") is not None:
            self.policy.load_state_dict(state["policy"], state["names"])
        self._drawn_version = -1

    def __str__(self) -> str:
        return f"MixPlansIterator({self._mixer}, row={self._row})"
