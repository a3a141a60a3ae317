"""What every bench section shares: timings in interleaved rounds, Grain's sides, synthetic data.

A section is a function `(args, corpora) -> list[dict]` (see `tools/bench.py`); its rows are
made by `summarize` (tokens/s, first batch, ratio to a baseline) or written directly with the
keys of `COLUMNS`. Sections in any module build on this one, never on
`tools/bench.py`, so that no two bench modules import each other.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wf_data import atomic

MIN_LENGTH, MAX_LENGTH = 8, 32768
# name -> (lognormal mean, sigma) of document lengths in tokens.
LENGTHS = {"long": (6.0, 1.1), "short": (4.0, 1.0)}
# Generated data of every bench section (shards, lengths files), reused across runs.
CACHE_DIR = Path(tempfile.gettempdir()) / "wf-data-bench"


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
    """One round of one side: real tokens after the first batch, their seconds, first batch."""

    tokens: int
    seconds: float
    first_s: float
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Real tokens per wall second after the first batch."""
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def interleaved(sides: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[Any]]:
    """Runs every side once per round, in turn, `rounds` times: {side: [result per round]}."""
    results: dict[str, list[Any]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, side in sides.items():
            results[name].append(side())
    return results


def summarize(
    name: str,
    timings: list[Timing],
    baseline: list[Timing] | None = None,
    target: str | None = None,
) -> dict:
    """A table row: median tokens/s and first batch with min-max, ratio to `baseline`."""
    speeds = [t.tokens_per_s for t in timings]
    firsts = [1e3 * t.first_s for t in timings]
    row = {
        "name": name,
        "rounds": len(timings),
        "tokens_per_s": statistics.median(speeds),
        "spread": (min(speeds), max(speeds)),
        "first_ms": statistics.median(firsts),
        "first_spread": (min(firsts), max(firsts)),
    }
    if baseline is not None:
        base = [t.tokens_per_s for t in baseline]
        row["ratio"] = row["tokens_per_s"] / statistics.median(base)
        paired = [ours / theirs for ours, theirs in zip(speeds, base, strict=True)]
        row["ratio_spread"] = (min(paired), max(paired))
    if target is not None:
        row["target"] = target
    for key in timings[0].extra:
        row[key] = statistics.median(t.extra[key] for t in timings)
    return row


def real_tokens(segment_ids) -> int:
    """Non-padding tokens of a (B, L) numpy array or torch tensor of segment ids."""
    return int((segment_ids > 0).sum())


def time_batches(
    batches: Iterator,
    start: float,
    count: int,
    seconds: float | None,
    key: str,
    after_batch: Callable[[int], None] | None = None,
) -> Timing:
    """Times up to `count` batches (or `seconds`) after the first; `start` = construction."""
    next(batches)
    first = time.perf_counter() - start
    if after_batch is not None:
        after_batch(0)
    real, begin = 0, time.perf_counter()
    for step in range(1, count + 1):
        try:
            batch = next(batches)
        except StopIteration:
            break
        real += real_tokens(batch[key])
        if after_batch is not None:
            after_batch(step)
        if seconds is not None and time.perf_counter() - begin > seconds:
            break
    return Timing(real, time.perf_counter() - begin, first)


# --------------------------------------------------------------------------- Grain's sides


class CutTo:
    """Grain map: token record -> {"tokens": int32}, cut to `max_len` when given (Grain's fit
    packers reject longer sequences: cutting is the usual recipe). Counts the tokens it reads
    and those it cuts, which Grain's side then never emits."""

    def __init__(self, max_len: int | None):
        self.max_len = max_len
        self.tokens_in = self.cut = 0

    def __call__(self, tokens: np.ndarray) -> dict:
        self.tokens_in += len(tokens)
        if self.max_len is not None:
            self.cut += max(0, len(tokens) - self.max_len)
        return {"tokens": np.asarray(tokens[: self.max_len], dtype=np.int32)}


def grain_domain(source, seed: int, cut: CutTo):
    """Plain Grain's reading of one domain: source -> shuffle(seed) -> map(cut) -> iter."""
    import grain

    return grain.MapDataset.source(source).shuffle(seed=seed).map(cut).to_iter_dataset()


def grain_packer(kind: str, parent, seq_len: int, bins: int, seed: int):
    """Grain's own packer `kind` (ConcatThenSplit, FirstFit, BestFit) over `parent`."""
    import grain

    lengths = {"tokens": seq_len}
    if kind == "ConcatThenSplit":
        return grain.experimental.ConcatThenSplitIterDataset(parent, length_struct=lengths)
    packer = getattr(grain.experimental, f"{kind}PackIterDataset")
    return packer(parent, length_struct=lengths, num_packing_bins=bins, seed=seed)


# --------------------------------------------------------------------------- synthetic data


def synthetic_lengths(
    num_docs: int, seed: int, cache_dir: Path | None = None, kind: str = "long"
) -> np.ndarray:
    """(num_docs,) int64 lognormal `LENGTHS[kind]` lengths clipped to [8, 32768], cached."""
    name = f"lengths-{kind}-{num_docs}-s{seed}.npy"
    path = None if cache_dir is None else cache_dir / name
    if path is not None and path.exists():
        return np.load(path).astype(np.int64)
    lengths = np.empty(num_docs, dtype=np.int64)
    rng = np.random.default_rng([seed, 2])
    chunk = 10_000_000  # bounds the float64 temporaries at 100M documents
    for start in range(0, num_docs, chunk):
        draws = np.rint(rng.lognormal(*LENGTHS[kind], min(chunk, num_docs - start)))
        lengths[start : start + len(draws)] = np.clip(draws, MIN_LENGTH, MAX_LENGTH)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_npy(path, lengths.astype(np.uint16))
    return lengths


class LengthsOnly:
    """A document source known by its lengths alone: reading a document is an error.

    `lengths` (N,) int64. Used to time planning with no token reads (a read would raise).
    """

    def __init__(self, lengths: np.ndarray, name: str):
        self.lengths = lengths
        self.fingerprint = f"synthetic:{name}:{len(lengths)}"

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int):
        raise RuntimeError(f"{self.fingerprint}: planning read document {index}'s tokens")

    __getitems__ = __getitem__


class SyntheticDocuments(LengthsOnly):
    """`LengthsOnly` whose reads return views of one random token buffer: documents, no I/O."""

    def __init__(self, lengths: np.ndarray, name: str, seed: int = 0):
        super().__init__(lengths, name)
        self._tokens = np.random.default_rng([seed, 3]).integers(
            1, 32000, MAX_LENGTH, dtype=np.uint16
        )

    def __getitem__(self, index: int) -> np.ndarray:
        return self._tokens[: self.lengths[index]]

    def __getitems__(self, indices) -> list[np.ndarray]:
        return [self._tokens[:length] for length in self.lengths[np.asarray(indices)].tolist()]


# --------------------------------------------------------------------------- output


def _rate(value: float) -> str:
    return f"{value / 1e6:.2f}M"


def _range(low_high: tuple[float, float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(low_high[0])}-{fmt(low_high[1])}"


# (header, result key, format): a section's rows may leave any key out ("-").
COLUMNS = [
    ("run", "name", str),
    ("documents", "documents", lambda count: f"{count:,}"),
    ("real tokens/s (median)", "tokens_per_s", _rate),
    ("min-max", "spread", lambda spread: _range(spread, _rate)),
    ("ratio (median)", "ratio", lambda ratio: f"{ratio:.2f}x"),
    ("per-round ratios", "ratio_spread", lambda spread: _range(spread, lambda r: f"{r:.2f}x")),
    ("target", "target", str),
    ("first batch (median)", "first_ms", lambda ms: f"{ms:.1f} ms"),
    ("first batch min-max", "first_spread", lambda spread: _range(spread, lambda ms: f"{ms:.1f}")),
    ("fill", "fill", lambda fill: f"{100 * fill:.2f}%"),
    ("truncated", "truncated_pct", lambda pct: f"{pct:.2f}%"),
    ("state size", "state_bytes", lambda size: f"{size:.0f} B" if size else "-"),
    ("rounds", "rounds", str),
    ("batches", "batches", lambda count: f"{count:,}"),
    ("RSS before", "rss_before_mb", lambda mb: f"{mb:.1f} MB"),
    ("RSS after", "rss_after_mb", lambda mb: f"{mb:.1f} MB"),
    ("RSS growth", "growth", lambda growth: f"{100 * growth:+.2f}%"),
    ("restore + first batch", "restore_ms", lambda ms: f"{ms:.1f} ms"),
    ("min-max", "restore_spread", lambda spread: _range(spread, lambda ms: f"{ms:.1f}")),
    ("build", "build_ms", lambda ms: f"{ms:.1f} ms"),
    ("load_state_dict", "restore_ms_part", lambda ms: f"{ms:.1f} ms"),
    ("first next()", "first_ms_part", lambda ms: f"{ms:.1f} ms"),
    ("per batch", "us_per_batch", lambda us: f"{us:.1f} us"),
    ("planning share", "planning_pct", lambda pct: f"{pct:.0f}%"),
    ("us / global row", "us_per_row", lambda us: f"{us:.2f}"),
    ("min-max", "us_per_row_spread", lambda spread: _range(spread, lambda us: f"{us:.2f}")),
    ("ms / step", "ms_per_step", lambda ms: f"{ms:.2f}"),
    ("worst step / mean", "max_over_mean", lambda ratio: f"{ratio:.1f}x"),
    ("min-max", "max_over_mean_spread", lambda s: _range(s, lambda r: f"{r:.1f}x")),
    ("CPU us / global row", "cpu_us_per_row", lambda us: f"{us:.2f}"),
    ("CPU worst step / mean", "cpu_max_over_mean", lambda ratio: f"{ratio:.1f}x"),
    ("CPU restore + first batch", "cpu_restore_ms", lambda ms: f"{ms:.1f} ms"),
    ("steps", "steps", lambda count: f"{count:,.0f}"),
    ("CPU / wall", "cpu_per_wall", lambda ratio: f"{ratio:.2f}"),
    ("tokens per CPU s, ratio", "cpu_ratio", lambda ratio: f"{ratio:.2f}x"),
    ("load", "load", lambda load: f"{load:.1f}"),
]


def format_table(title: str, rows: list[dict]) -> str:
    """A markdown table of a section's results (the `COLUMNS` its rows have)."""
    columns = [c for c in COLUMNS if any(c[1] in row for row in rows)]
    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(header for header, _, _ in columns) + " |",
        "| --- |" + " ---: |" * (len(columns) - 1),
    ]
    for row in rows:
        cells = [fmt(row[key]) if key in row else "-" for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
