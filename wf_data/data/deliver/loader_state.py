"""The loader state format: validation, fingerprints, per-domain entries, pending feedback.

A `DataLoader.state_dict()` is a JSON-safe dict, the same on every rank:

    {"version": 2, "fingerprint": {...settings and one entry per source...},
     "step": int, "pipeline": {...the Grain pipeline iterator's state...},
     "stats": {name: [rows, real tokens] served},
     "feedback": {name: [loss sum, rows] pending (`PendingLosses`)},
     "seal": {entry: digest of its canonical JSON, for every other entry}}

Everything read back is checked here first: a malformed or foreign state is a
`LoaderStateError` naming the entry, the value and what was expected, and an entry edited or
corrupted since it was saved no longer matches its seal. The seal detects accidents (a
hand edit, a flipped byte that still parses, a tool rewriting a field), not an attacker, who
can recompute it; the state is JSON, so nothing in it can run code.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

STATE_VERSION = 2
# Fingerprint settings that states saved by older versions do not record: compared only when
# the state has them, so those states still restore.
LATER_SETTINGS = ("global_batch_size",)
_STATE_KEYS = {
    "version": int,
    "fingerprint": dict,
    "step": int,
    "pipeline": dict,
    "stats": dict,
    "feedback": dict,
}
SEAL_KEY = "seal"

__all__ = [
    "LoaderStateError",
    "PendingLosses",
    "STATE_VERSION",
    "by_domain",
    "check_fingerprint",
    "check_progress",
    "check_seal",
    "check_state",
    "from_domains",
    "seal",
    "stats_summary",
]


class LoaderStateError(ValueError):
    """A loader state that is malformed or belongs to other data or settings."""


def check_state(state: Any) -> None:
    """Raises `LoaderStateError` naming the first missing or wrong-typed entry of a state."""
    if not isinstance(state, Mapping):
        raise LoaderStateError(
            f"not a wf-data loader state: expected a dict, got {type(state).__name__}"
        )
    if "version" not in state:
        raise LoaderStateError(f"not a wf-data loader state: keys {sorted(map(str, state))[:8]}")
    if state["version"] != STATE_VERSION:
        raise LoaderStateError(
            f"loader state version {state['version']!r} is not supported (expected {STATE_VERSION})"
        )
    for key, kind in _STATE_KEYS.items():
        if key not in state:
            raise LoaderStateError(f"loader state is missing the entry {key!r}")
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise LoaderStateError(
                f"loader state entry {key!r} must be a {kind.__name__}, got "
                f"{type(value).__name__}: {json.dumps(value, default=str)[:80]}"
            )
    if state["step"] < 0:
        raise LoaderStateError(f"loader state entry 'step' must be >= 0, got {state['step']}")


def check_progress(state: Mapping[str, Any], global_batch_size: int) -> None:
    """Raises `LoaderStateError` unless the rows of "stats" add up to "step" global batches:
    the two entries a state holds at the top level about how far the stream went (each global
    batch serves ``global_batch_size`` rows, whichever rank or shard saved it)."""
    served = sum(int(pair[0]) for pair in state["stats"].values())
    if served != state["step"] * global_batch_size:
        raise LoaderStateError(
            f"loader state entries 'step' and 'stats' disagree: step {state['step']} means "
            f"{state['step'] * global_batch_size} rows served in global batches of "
            f"{global_batch_size}, 'stats' counts {served}; the state was edited or corrupted"
        )


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its "seal" entry: the digest of every other entry (``_digest``)."""
    state[SEAL_KEY] = {key: _digest(key, value) for key, value in state.items()}
    return state


def check_seal(state: Mapping[str, Any]) -> bool:
    """Raises `LoaderStateError` naming every entry that no longer matches the state's seal
    (edited or corrupted since it was saved), and entries added or removed since; returns
    False, with a warning, for a state saved before states were sealed (not checked)."""
    stored = state.get(SEAL_KEY)
    if stored is None:
        warnings.warn(
            "this loader state has no seal (it was saved by a wf-data version before states "
            "were sealed): it is restored without checking it for edits. Save a new checkpoint "
            "to seal it",
            UserWarning,
            stacklevel=3,
        )
        return False
    if not isinstance(stored, Mapping) or not all(isinstance(v, str) for v in stored.values()):
        raise LoaderStateError(
            f"loader state entry {SEAL_KEY!r} must map entry names to digests, got "
            f"{json.dumps(stored, default=str)[:120]}"
        )
    entries = set(state) - {SEAL_KEY}
    problems = [f"entry {key!r} was added" for key in sorted(entries - set(stored))]
    problems += [f"entry {key!r} was removed" for key in sorted(set(stored) - entries)]
    problems += [
        f"entry {key!r} differs from what was saved"
        for key in sorted(entries & set(stored))
        if _digest(key, state[key]) != stored[key]
    ]
    if problems:
        raise LoaderStateError(
            "loader state was edited or corrupted after it was saved (it does not match its "
            f"seal): {'; '.join(problems)}. Restore from an unmodified checkpoint; a state is "
            "never changed by hand (it would change the data stream)"
        )
    return True


def _digest(key: str, value: Any) -> str:
    """BLAKE2b-128 of ``value``'s canonical JSON: unchanged by a JSON round trip (key order,
    tuples as lists, whitespace), changed by any edit of a value."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        raise LoaderStateError(f"loader state entry {key!r} is not JSON ({error})") from error
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def by_domain(entry: Mapping[str, Any], key: str, names: Sequence[str], dtype) -> np.ndarray:
    """(2, K) array of the pairs `entry` (state[key]) holds per domain, in `names` order (0 for
    a domain added since)."""
    pairs = []
    for name, value in entry.items():
        if (
            not isinstance(value, list)
            or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int | float) for v in value)
        ):
            raise LoaderStateError(
                f"loader state entry {key!r}: domain {name!r} must map to two numbers, got "
                f"{value!r}"
            )
    for name in names:
        pairs.append(entry.get(name, [0, 0]))
    return np.array(pairs, dtype=dtype).T.reshape(2, len(names))


def from_domains(names: Sequence[str], pairs: np.ndarray, kind: type) -> dict[str, list]:
    """The state entry of a (2, K) array: {name: [first, second]}."""
    return {name: [kind(a), kind(b)] for name, a, b in zip(names, *pairs, strict=True)}


class PendingLosses:
    """Per-domain training-loss sums and row counts not yet handed to the mixture.

    The loader adds to it after each (micro-)batch and takes the means out when the trainer
    applies feedback; what is pending is the state entry "feedback" (`{name: [loss sum, rows]}`),
    so a checkpoint between the two calls loses nothing.
    """

    def __init__(self, names: Sequence[str], pairs: np.ndarray | None = None):
        self.names = tuple(names)
        self._pairs = np.zeros((2, len(self.names))) if pairs is None else pairs

    @classmethod
    def from_state(cls, entry: Mapping[str, Any], names: Sequence[str]) -> PendingLosses:
        """The pending losses of a state's "feedback" entry, in `names` order (a domain added
        since has none); `LoaderStateError` if malformed."""
        return cls(names, by_domain(entry, "feedback", names, np.float64))

    def to_state(self) -> dict[str, list[float]]:
        """The state entry: `{name: [loss sum, rows]}`."""
        return from_domains(self.names, self._pairs, float)

    def add(self, loss_sums: Any, row_counts: Any) -> None:
        """Adds (K,) per-domain loss sums and row counts (already all-reduced over ranks)."""
        self._pairs += np.stack(
            [np.asarray(loss_sums, np.float64), np.asarray(row_counts, np.float64)]
        )

    def take(self) -> np.ndarray | None:
        """(K,) mean loss per domain, NaN where none was observed, or None if no domain was;
        clears what is pending either way."""
        sums, counts = self._pairs
        self._pairs = np.zeros_like(self._pairs)
        if not counts.any():
            return None
        return np.divide(sums, counts, out=np.full(len(sums), np.nan), where=counts > 0)


def stats_summary(
    names: Sequence[str], served: np.ndarray, mixture: Mapping[str, float], seq_len: int
) -> dict[str, float]:
    """Flat `data/...` floats from (2, K) rows and real tokens served: fill, shares, weights."""
    rows, tokens = served
    rows_total, tokens_total = int(rows.sum()), int(tokens.sum())
    out = {
        "data/tokens_served": float(tokens_total),
        "data/rows_served": float(rows_total),
        "data/fill": tokens_total / (rows_total * seq_len) if rows_total else 0.0,
    }
    for index, name in enumerate(names):
        out[f"data/weight/{name}"] = float(mixture[name])
        out[f"data/row_share/{name}"] = float(rows[index] / max(rows_total, 1))
        out[f"data/token_share/{name}"] = float(tokens[index] / max(tokens_total, 1))
    return out


def check_fingerprint(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raises `LoaderStateError` naming every setting or source that differs.

    Per-source entries are compared only for sources present in both; added and removed
    sources are allowed (that is what re-weighting and extending a mixture needs). A setting
    of `LATER_SETTINGS` is compared only if the saved state records it.
    """
    differences = []
    for key in sorted(set(saved) | set(current)):
        if key in LATER_SETTINGS and key not in saved:
            continue
        if key != "sources" and saved.get(key) != current.get(key):
            differences.append(
                f"{key}: state has {saved.get(key)!r}, loader has {current.get(key)!r}"
            )
    saved_sources = saved.get("sources", {})
    current_sources = current.get("sources", {})
    for name in sorted(set(saved_sources) & set(current_sources)):
        if saved_sources[name] != current_sources[name]:
            differences.append(
                f"source {name!r}: state was made from {saved_sources[name]!r}, "
                f"loader reads {current_sources[name]!r}"
            )
    if differences:
        raise LoaderStateError(
            "loader state belongs to different data or settings:\n  " + "\n  ".join(differences)
        )
