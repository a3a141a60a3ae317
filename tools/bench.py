"""wf-data benchmarks: side by side with plain Grain in one process, one table per section.

    uv run python tools/bench.py                   # every section (a few minutes)
    uv run python tools/bench.py --quick           # tiny data, one round: a CI smoke run
    uv run python tools/bench.py --only vs_grain   # one section (repeatable)

Fairness rules every section follows:
- Both sides read the same ArrayRecord shards (written once under `--cache-dir` with
  `wf_data.data.shards.sources.write_shard`) in a shuffled order: ours through the packers' seeded
  epoch permutation, Grain's through `MapDataset.source(...).shuffle(seed)`. Neither reads in
  file order (random access costs both the same).
- Sides run in interleaved rounds (A, B, A, B, ...) so that load from other users of a shared
  machine hits both alike. A table shows the median of `--rounds` rounds (default 3) and the
  min-max spread; ratios are median / median, with the range of the per-round ratios. Never
  the best run.
- Throughput counts real (non-padding) tokens per wall second after the first batch; time to
  first batch (construction included) is its own column.

Each side is one small function (`loader_run`, `grain_mix_run`, `bare_concat_run`, ...) built
on public APIs only (`get_loader`, `pack`, `DataLoader`, Grain's own datasets), so that a
changed API means editing one function. Data: document lengths lognormal(6, 1.1) ("long") or
lognormal(4, 1) ("short"), rounded and clipped to [8, 32768], uniform random token ids.
Sections `memory`, `state` and `exp3` come from `tools/bench_loader.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Iterator

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from wf_data.data.shards import sources  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
import bench_loader  # noqa: E402
import bench_peers  # noqa: E402
import bench_planning  # noqa: E402
import bench_text  # noqa: E402
from bench_planning import LENGTHS, MAX_LENGTH, MIN_LENGTH  # noqa: E402

DOMAIN_WEIGHTS = {"web": 0.5, "code": 0.2, "math": 0.3}
NOISE_NOTE = (
    "compare ratios (same process, interleaved rounds), not absolute figures, on a machine "
    "that others may share"
)


# --------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Generated `tokens` datasets, one directory per domain of `DOMAIN_WEIGHTS`."""

    label: str
    domains: dict[str, pathlib.Path]
    num_docs: int
    num_tokens: int
    token_dtype: np.dtype

    @property
    def path(self) -> pathlib.Path:
        """The first domain: what single-dataset sections (packing, concat) read."""
        return next(iter(self.domains.values()))

    @property
    def flat_path(self) -> pathlib.Path:
        """The first domain's tokens as one flat file (the memmap bound)."""
        return self.path / "tokens.bin"

    def source(self, domain: str | None = None) -> sources.DocumentSource:
        """The dataset of `domain` (default: the first domain), freshly opened."""
        return sources.open_dataset(self.domains[domain] if domain else self.path)


def document_lengths(num_tokens: int, seed: int, mean: float, sigma: float) -> np.ndarray:
    """(N,) int64 lognormal lengths whose sum is the first to reach `num_tokens`."""
    rng = np.random.default_rng([seed, 0])
    draws = max(64, int(num_tokens / np.exp(mean)))
    lengths = np.empty(0, dtype=np.int64)
    while lengths.sum() < num_tokens:
        more = np.rint(rng.lognormal(mean, sigma, size=draws))
        lengths = np.concatenate([lengths, np.clip(more, MIN_LENGTH, MAX_LENGTH).astype(np.int64)])
    return lengths[: int(np.searchsorted(np.cumsum(lengths), num_tokens)) + 1]


def write_tokens_dataset(
    path: pathlib.Path,
    lengths: np.ndarray,
    seed: int,
    vocab_size: int,
    num_shards: int,
    flat: bool,
) -> None:
    """A `tokens` dataset at `path` (shards, lengths.npy, manifest last), unless it is there."""
    if (path / sources.MANIFEST_NAME).exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    dtype = sources.token_dtype_for_vocab(vocab_size)
    tokens = np.random.default_rng([seed, 1]).integers(0, vocab_size, lengths.sum(), dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    bounds = np.linspace(0, len(lengths), num_shards + 1).astype(np.int64)
    shards = []
    for shard in range(num_shards):
        file = sources.shard_name("bench", shard, num_shards)
        first, last = bounds[shard], bounds[shard + 1]
        records = (tokens[offsets[i] : offsets[i + 1]].tobytes() for i in range(first, last))
        info = sources.write_shard(path / file, records)
        shards.append(
            {
                "file": file,
                "records": info["records"],
                "tokens": int(offsets[last] - offsets[first]),
                "sha256": info["sha256"],
            }
        )
    np.save(path / sources.LENGTHS_NAME, lengths)
    if flat:
        tokens.tofile(path / "tokens.bin")
    # The manifest goes last: a run killed before it is redone, never half reused.
    sources.write_manifest(
        path,
        {
            "version": sources.MANIFEST_VERSION,
            "name": "bench",
            "format": "tokens",
            "token_dtype": dtype.name,
            "tokenizer": None,
            "append_eos": False,
            "shards": shards,
            "totals": {
                "records": len(lengths),
                "tokens": int(lengths.sum()),
                "dropped_empty": 0,
                "skipped_bad": 0,
            },
        },
    )


def make_corpus(args: argparse.Namespace, label: str) -> Corpus:
    """Writes (once; reused when present) one dataset per domain, `args.tokens` in total."""
    mean, sigma = LENGTHS[label]
    per_domain = args.tokens // len(DOMAIN_WEIGHTS)
    base = args.cache_dir / (
        f"bench-{label}-t{args.tokens}-s{args.seed}-v{args.vocab_size}-n{args.num_shards}"
        f"-m{sources.MANIFEST_VERSION}-w{zlib.crc32(sources.WRITER_OPTIONS['tokens'].encode()):x}"
    )
    domains, docs, tokens = {}, 0, 0
    for index, name in enumerate(DOMAIN_WEIGHTS):
        lengths = document_lengths(per_domain, args.seed + index, mean, sigma)
        write_tokens_dataset(
            base / name,
            lengths,
            args.seed + index,
            args.vocab_size,
            args.num_shards,
            flat=index == 0,
        )
        domains[name] = base / name
        docs += len(lengths)
        tokens += int(lengths.sum())
    dtype = sources.token_dtype_for_vocab(args.vocab_size)
    return Corpus(label, domains, docs, tokens, dtype)


# --------------------------------------------------------------------------- measuring


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


def interleaved(sides: dict[str, Callable[[], Timing]], rounds: int) -> dict[str, list[Timing]]:
    """Runs every side once per round, in turn, `rounds` times."""
    results: dict[str, list[Timing]] = {name: [] for name in sides}
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


def _real_tokens(segment_ids) -> int:
    """Non-padding tokens of a (B, L) numpy array or torch tensor of segment ids."""
    return int((segment_ids > 0).sum())


def _time_batches(
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
        real += _real_tokens(batch[key])
        if after_batch is not None:
            after_batch(step)
        if seconds is not None and time.perf_counter() - begin > seconds:
            break
    return Timing(real, time.perf_counter() - begin, first)


# --------------------------------------------------------------------------- our sides


def loader_config(
    corpus: Corpus,
    args,
    *,
    packing: str = "best_fit",
    mixing: str = "exp3",
    domains: tuple[str, ...] | None = None,
) -> dict:
    """A data config over the corpus's domain directories (EXP3 prior = `DOMAIN_WEIGHTS`)."""
    names = domains or tuple(corpus.domains)
    return {
        "name": f"bench-{corpus.label}",
        "tokenizer": None,
        "seq_len": args.seq_len,
        "global_batch_size": args.batch_size,
        "packing": packing,
        "seed": args.seed,
        "prefetch": args.prefetch,
        "mixing": {"kind": mixing},
        "sources": {
            name: {
                "path": str(corpus.domains[name]),
                "weight": DOMAIN_WEIGHTS[name],
                "format": "tokens",
            }
            for name in names
        },
    }


def _losses(names: tuple[str, ...], step: int) -> dict[str, float]:
    """Deterministic per-domain losses that move, so EXP3 keeps changing the mixture."""
    return {
        name: 2.0 + 0.3 * index + 0.1 * np.sin(step + index) for index, name in enumerate(names)
    }


def loader_run(
    config: dict,
    *,
    batches: int,
    num_workers: int = 0,
    framework: str = "torch",
    feedback: bool = True,
) -> Timing:
    """`get_loader(config)` end to end; with `feedback`, an EXP3 update after every batch."""
    from wf_data.data import get_loader

    names = tuple(config["sources"])
    start = time.perf_counter()
    loader = get_loader(config, framework=framework, num_workers=num_workers)
    update = (lambda step: loader.update_mixture(_losses(names, step))) if feedback else None
    try:
        return _time_batches(iter(loader), start, batches, None, "segment_ids", update)
    finally:
        loader.close()


def bare_concat_run(corpus: Corpus, args, rows: int) -> Timing:
    """The concat packer alone (`pack(..., "concat")`), rows one by one, first domain."""
    from wf_data.data import pack

    start = time.perf_counter()
    packed = pack(corpus.source(), args.seq_len, "concat", seed=args.seed, num_epochs=None)
    rows_iter = ({"segment_ids": row["segment_ids"]} for row in packed)
    return _time_batches(rows_iter, start, rows, None, "segment_ids")


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


def grain_mix_run(corpus: Corpus, args, *, batches: int, seconds: float) -> Timing:
    """Plain Grain: per domain shuffle -> BestFit packer -> mix (same weights) -> batch."""
    import grain

    start = time.perf_counter()
    packed = [
        grain_packer(
            "BestFit",
            grain_domain(corpus.source(name), args.seed + index, CutTo(args.seq_len)),
            args.seq_len,
            args.grain_bins,
            args.seed,
        )
        for index, name in enumerate(corpus.domains)
    ]
    pipeline = grain.IterDataset.mix(packed, list(DOMAIN_WEIGHTS.values())).batch(args.batch_size)
    # Grain's mix ends with its first exhausted domain: the corpus is sized well beyond
    # `seconds` of Grain's speed, and a short run still gives a rate.
    return _time_batches(iter(pipeline), start, batches, seconds, "tokens_segment_ids")


# --------------------------------------------------------------------------- sections


def bench_vs_grain(args, corpora: dict[str, Corpus]) -> list[dict]:
    """Loader (best_fit + EXP3 updated every batch, torch) vs plain Grain shuffle->BestFit->mix."""
    rows = []
    for label, target in (("long", ">= 25x"), ("short", ">= 50x")):
        corpus = corpora[label]
        config = loader_config(corpus, args)
        results = interleaved(
            {
                "ours": lambda config=config: loader_run(config, batches=args.loader_batches),
                "grain": lambda corpus=corpus: grain_mix_run(
                    corpus, args, batches=args.loader_batches, seconds=args.grain_seconds
                ),
            },
            args.rounds,
        )
        rows.append(
            summarize(
                f"{label} docs: wf-data loader best_fit+EXP3",
                results["ours"],
                results["grain"],
                target,
            )
        )
        rows.append(
            summarize(
                f"{label} docs: grain shuffle+BestFit({args.grain_bins})+mix+batch",
                results["grain"],
                results["grain"],
            )
        )
    return rows


def bench_concat(args, corpora: dict[str, Corpus]) -> list[dict]:
    """Loader with concat packing (one domain, static, numpy) vs the bare concat packer."""
    corpus = corpora["long"]
    config = loader_config(
        corpus, args, packing="concat", mixing="static", domains=(next(iter(corpus.domains)),)
    )
    batches = args.loader_batches
    results = interleaved(
        {
            "loader": lambda: loader_run(
                config, batches=batches, framework="numpy", feedback=False
            ),
            "bare": lambda: bare_concat_run(corpus, args, batches * args.batch_size),
        },
        args.rounds,
    )
    return [
        summarize("wf-data loader, concat", results["loader"], results["bare"], ">= 0.8x"),
        summarize("bare concat packer (pack(..., 'concat'))", results["bare"], results["bare"]),
    ]


def bench_workers(args, corpora: dict[str, Corpus]) -> list[dict]:
    """Loader num_workers=2 vs 0 (long docs, best_fit + EXP3, torch): speed and first batch."""
    config = loader_config(corpora["long"], args)
    results = interleaved(
        {
            workers: lambda workers=workers: loader_run(
                config, batches=args.loader_batches, num_workers=workers
            )
            for workers in (0, 2)
        },
        args.rounds,
    )
    return [
        summarize("num_workers=0", results[0], results[0]),
        summarize("num_workers=2", results[2], results[0], ">= 1.0x"),
    ]


def state_bytes(state) -> int:
    """Size of a checkpointed iterator state: its JSON bytes."""
    return len(json.dumps(state, default=str))


def _packing_timing(
    rows: Iterator,
    start: float,
    seconds: float | None,
    get_state,
    truncated: Callable[[int], tuple[int, int]],
) -> Timing:
    """Times rows (segment ids, (L,) or (B, L)) after the first, plus fill, truncation, state.

    `truncated(real_tokens_out)` returns (tokens truncated, tokens read) for the pass.
    """
    segments = next(rows)
    first = time.perf_counter() - start
    real = _real_tokens(segments)
    capacity, timed, begin = segments.size, 0, time.perf_counter()
    for segments in rows:
        count = _real_tokens(segments)
        real, timed, capacity = real + count, timed + count, capacity + segments.size
        if seconds is not None and time.perf_counter() - begin > seconds:
            break
    elapsed = time.perf_counter() - begin
    cut, read = truncated(real)
    extra = {
        "fill": real / capacity,
        "truncated_pct": 100 * cut / max(read, 1),
        "state_bytes": state_bytes(get_state()) if get_state else 0,
    }
    return Timing(timed, elapsed, first, extra)


def ours_packing_run(corpus: Corpus, args, method: str, **kwargs) -> Timing:
    """One full epoch of our packer over the first domain: truncation = tokens in - out."""
    from wf_data.data import pack

    start = time.perf_counter()
    source = corpus.source()
    iterator = iter(pack(source, args.seq_len, method, seed=args.seed, **kwargs))
    total = int(source.lengths.sum())
    rows = (row["segment_ids"] for row in iterator)
    return _packing_timing(
        rows, start, None, iterator.get_state, lambda real: (total - real, total)
    )


def grain_packing_run(corpus: Corpus, args, kind: str) -> Timing:
    """Grain's packer `kind` over the shuffled first domain, for `--grain-seconds`."""
    start = time.perf_counter()
    counter = CutTo(None if kind == "ConcatThenSplit" else args.seq_len)
    parent = grain_domain(corpus.source(), args.seed, counter)
    iterator = iter(grain_packer(kind, parent, args.seq_len, args.grain_bins, args.seed))
    rows = (row["tokens_segment_ids"] for row in iterator)
    return _packing_timing(
        rows,
        start,
        args.grain_seconds,
        iterator.get_state,
        lambda real: (counter.cut, counter.tokens_in),
    )


def memmap_run(corpus: Corpus, args) -> Timing:
    """Upper bound: flat tokens read in file order as (B, L) int32 rows (no packing)."""
    tokens = np.memmap(corpus.flat_path, dtype=corpus.token_dtype, mode="r")
    step = args.seq_len * args.batch_size
    begin = time.perf_counter()
    for start in range(0, len(tokens) - step + 1, step):
        tokens[start : start + step].reshape(args.batch_size, args.seq_len).astype(np.int32)
    seconds = time.perf_counter() - begin
    return Timing(len(tokens) // step * step, seconds, 0.0)


def bench_packing(args, corpora: dict[str, Corpus]) -> list[dict]:
    """Packers alone on the first long-docs domain: ours (full epoch) beside Grain's (shuffled)."""
    corpus = corpora["long"]
    sides: dict[str, Callable[[], Timing]] = {
        "numpy memmap bound (file order, no packing)": lambda: memmap_run(corpus, args),
        "wf-data concat": lambda: ours_packing_run(corpus, args, "concat"),
    }
    for window in args.window_sizes:
        sides[f"wf-data best_fit w={window}"] = lambda window=window: ours_packing_run(
            corpus, args, "best_fit", window_size=window
        )
    grain_kinds = ("ConcatThenSplit", "FirstFit", "BestFit")
    for kind in grain_kinds:
        sides[f"grain shuffle+{kind}"] = lambda kind=kind: grain_packing_run(corpus, args, kind)
    results = interleaved(sides, args.rounds)
    rows = []
    for name, timings in results.items():
        baseline = None
        if name.startswith("wf-data"):
            compare = "ConcatThenSplit" if "concat" in name else "BestFit"
            baseline = results[f"grain shuffle+{compare}"]
        rows.append(summarize(name, timings, baseline))
        if "memmap" in name:
            del rows[-1]["first_ms"], rows[-1]["first_spread"]
    return rows


def _first_batch_section(args, corpora):
    return bench_planning.bench_first_batch(args)


def _on_long(section):
    """A `bench_loader` section (it takes one corpus) run on the long-docs corpus."""
    return lambda args, corpora: section(args, corpora["long"])


SECTIONS: dict[str, Callable[[argparse.Namespace, dict[str, Corpus]], list[dict]]] = {
    "vs_grain": bench_vs_grain,
    "concat": bench_concat,
    "workers": bench_workers,
    "first_batch": _first_batch_section,
    "packing": bench_packing,
    "peers": bench_peers.bench_peers,
    "text": bench_text.bench_text,
    # bench_loader's `loader` section is superseded by `vs_grain` (Grain's reads now shuffled).
    **{
        name: _on_long(section)
        for name, section in bench_loader.SECTIONS.items()
        if name != "loader"
    },
}


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
    ("per batch", "us_per_batch", lambda us: f"{us:.1f} us"),
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; unset sizes take their full or `--quick` defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny data, 1 round (CI smoke)")
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="tokens per corpus, over 3 domains (default 30M, --quick 300k)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="default 3, --quick 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch rows")
    parser.add_argument(
        "--loader-batches",
        type=int,
        default=None,
        help="timed batches per loader round (default 2400, --quick 20)",
    )
    parser.add_argument("--vocab-size", type=int, default=32000, help=">65536 stores uint32")
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--window-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--grain-bins", type=int, default=64)
    parser.add_argument(
        "--grain-seconds",
        type=float,
        default=None,
        help="timed seconds per Grain round (default 4, --quick 0.3)",
    )
    parser.add_argument(
        "--first-batch-docs",
        type=int,
        nargs="+",
        default=None,
        help="documents for first_batch (default 1M 10M 100M, --quick 100k)",
    )
    parser.add_argument(
        "--cache-dir",
        type=pathlib.Path,
        default=bench_planning.CACHE_DIR,
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=bench_loader.LOADER_PREFETCH,
        help="loader: batches planned and read per group, minus one",
    )
    parser.add_argument(
        "--only",
        choices=sorted(SECTIONS),
        action="append",
        help="run only this section (repeatable)",
    )
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "tokens": 300_000 if quick else 30_000_000,
        "rounds": 1 if quick else 3,
        "loader_batches": 20 if quick else 2400,
        "grain_seconds": 0.3 if quick else 4.0,
        "window_sizes": [256] if quick else [1024, 4096, 16384],
        "first_batch_docs": [100_000] if quick else [1_000_000, 10_000_000, 100_000_000],
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    """Runs the selected sections, prints their tables and returns the raw results."""
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The environment beats the num_workers argument in get_loader: keep it out of the bench.
    os.environ.pop("WF_DATA_NUM_WORKERS", None)
    start = time.perf_counter()
    # Imported up front: a first import inside a timed side would count as its first batch.
    import grain  # noqa: F401
    import torch  # noqa: F401

    import wf_data.config  # noqa: F401
    import wf_data.data.deliver.interop  # noqa: F401
    import wf_data.data.deliver.loader  # noqa: F401

    imports = time.perf_counter() - start
    corpora = {label: make_corpus(args, label) for label in LENGTHS}
    print(
        f"# wf-data bench ({NOISE_NOTE}; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f} at start)"
    )
    for corpus in corpora.values():
        mean, sigma = LENGTHS[corpus.label]
        print(
            f"corpus {corpus.label}: lognormal({mean}, {sigma}), {corpus.num_docs:,} documents, "
            f"{corpus.num_tokens:,} {corpus.token_dtype.name} tokens, 3 domains x "
            f"{args.num_shards} shards under {corpus.path.parent}"
        )
    print(
        f"seq_len {args.seq_len}, global batch {args.batch_size} rows, seed {args.seed}, "
        f"{args.rounds} interleaved rounds per side, median (min-max); imports "
        f"{imports:.1f}s, data ready in {time.perf_counter() - start - imports:.1f}s\n",
        flush=True,
    )
    results = {}
    for name in args.only or SECTIONS:
        began = time.perf_counter()
        results[name] = SECTIONS[name](args, corpora)
        print(format_table(name, results[name]), flush=True)
        print(f"({time.perf_counter() - began:.1f}s)\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
