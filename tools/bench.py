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
Sections `memory`, `state` and `exp3` come from `tools/bench_loader.py`; `prepare` (text
through `wf-data prepare`, its baseline the raw tokenizer) from `tools/bench_prepare.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import time
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from tools import bench_loader, bench_peers, bench_planning, bench_prepare, bench_text
from tools.bench_common import (
    CACHE_DIR,
    LENGTHS,
    MAX_LENGTH,
    MIN_LENGTH,
    CutTo,
    Timing,
    format_table,
    grain_domain,
    grain_packer,
    interleaved,
    real_tokens,
    summarize,
    time_batches,
)
from wf_data.data.shards import sources

BENCH_PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
PAGE_HEADER = """# Benchmarks

<!-- The tables below are written by tools/bench.py, which regenerates this page from a bench
run: edit the tool, not the tables. Code blocks on this page are run by tests/test_docs.py. -->

This page has the latest benchmark tables, each with the date, the machine and its load at
the start of the run that made it. `tools/bench.py` measures wf-data beside its baseline in
the same process and writes this page again (a run replaces the tables of the sections it
ran; `--only NAME` runs one):

<!-- docs-test: skip measures for several minutes -->
```bash
uv run python tools/bench.py            # every section; --quick for a smoke run
```

How it measures, in every section:

- Both sides read the same data in the same (shuffled) order.
- The sides run in interleaved rounds, so that a busy machine slows both alike. Every figure is
  the median of 3 rounds with its min-max spread, never the best run; ratios are median over
  median, with the range of the per-round ratios. Compare ratios, not absolute figures, on a
  shared machine.
- What each section measures and how it stays fair is in the docstrings of `tools/bench.py`
  and of the section functions.

"""
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
        timing = time_batches(iter(loader), start, batches, None, "segment_ids", update)
    finally:
        loader.close()
    timing.extra["batches"] = loader.step - 1  # after the first
    return timing


def plans_run(config: dict, *, batches: int) -> Timing:
    """Planning alone for `loader_run`'s loader: its batch plans, an EXP3 update after each,
    no read. `extra["batches"]` counts the timed batches."""
    from wf_data.data import batch_plans, get_loader

    names = tuple(config["sources"])
    start = time.perf_counter()
    loader = get_loader(config, framework="numpy")
    plans = iter(batch_plans(loader.mixer, loader.global_batch_size, domain_names=names))
    next(plans)
    first = time.perf_counter() - start
    begin = time.perf_counter()
    for step in range(batches):
        next(plans)
        loader.update_mixture(_losses(names, step))
    return Timing(0, time.perf_counter() - begin, first, {"batches": batches})


def bare_concat_run(corpus: Corpus, args, rows: int) -> Timing:
    """The concat packer alone (`pack(..., "concat")`), rows one by one, first domain."""
    from wf_data.data import pack

    start = time.perf_counter()
    packed = pack(corpus.source(), args.seq_len, "concat", seed=args.seed, num_epochs=None)
    rows_iter = ({"segment_ids": row["segment_ids"]} for row in packed)
    return time_batches(rows_iter, start, rows, None, "segment_ids")


# --------------------------------------------------------------------------- Grain's sides


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
    return time_batches(iter(pipeline), start, batches, seconds, "tokens_segment_ids")


# --------------------------------------------------------------------------- sections


def bench_vs_grain(args, corpora: dict[str, Corpus]) -> list[dict]:
    """Loader (best_fit + EXP3 updated every batch, torch) vs plain Grain shuffle->BestFit->mix."""
    rows = []
    for label, target in (("long", ">= 50x"), ("short", ">= 80x")):
        corpus = corpora[label]
        config = loader_config(corpus, args)
        results = interleaved(
            {
                "ours": lambda config=config: loader_run(config, batches=args.loader_batches),
                "plans": lambda config=config: plans_run(config, batches=args.loader_batches),
                "grain": lambda corpus=corpus: grain_mix_run(
                    corpus, args, batches=args.loader_batches, seconds=args.grain_seconds
                ),
            },
            args.rounds,
        )
        row = summarize(
            f"{label} docs: wf-data loader best_fit+EXP3",
            results["ours"],
            results["grain"],
            target,
        )
        # Of the loader's time per batch, the share its planning alone takes (same batches).
        shares = [
            (plans.seconds / max(plans.extra["batches"], 1))
            / (ours.seconds / max(ours.extra["batches"], 1))
            for ours, plans in zip(results["ours"], results["plans"], strict=True)
        ]
        row["planning_pct"] = 100 * statistics.median(shares)
        row["us_per_batch"] = statistics.median(
            1e6 * t.seconds / max(t.extra["batches"], 1) for t in results["ours"]
        )
        rows.append(row)
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
    real = real_tokens(segments)
    capacity, timed, begin = segments.size, 0, time.perf_counter()
    for segments in rows:
        count = real_tokens(segments)
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


def _loader_state_after(config: dict, batches: int) -> dict:
    """The loader state after `batches` batches, all planned but only the last one read."""
    from wf_data.data import get_loader

    loader = get_loader(config, framework="numpy", step_shard=(batches - 1, batches))
    next(loader)
    loader.close()
    return json.loads(json.dumps(loader.state_dict()))


def restore_run(config: dict, state: dict) -> dict[str, float]:
    """Seconds to build a loader, restore `state` into it and read its first batch."""
    from wf_data.data import get_loader

    start, cpu_start = time.perf_counter(), time.thread_time()
    loader = get_loader(config, framework="numpy")
    built = time.perf_counter()
    loader.load_state_dict(state)
    restored = time.perf_counter()
    next(loader)
    done, cpu = time.perf_counter(), time.thread_time() - cpu_start
    loader.close()
    return {
        "build": built - start,
        "restore": restored - built,
        "first": done - restored,
        "cpu": cpu,
    }


def bench_restore(args, corpora: dict[str, Corpus]) -> list[dict]:
    """Build + restore + first batch of the loader (best_fit + EXP3, long docs, numpy) from
    states saved after 10, 1k and 10k batches."""
    config = loader_config(corpora["long"], args)
    states = {depth: _loader_state_after(config, depth) for depth in args.restore_depths}
    results = interleaved(
        {depth: lambda state=state: restore_run(config, state) for depth, state in states.items()},
        args.rounds,
    )
    rows = []
    for depth, rounds in results.items():
        total = [1e3 * (r["build"] + r["restore"] + r["first"]) for r in rounds]
        rows.append(
            {
                "name": f"restore after {depth:,} batches + first batch, build included",
                "rounds": len(rounds),
                "restore_ms": statistics.median(total),
                "restore_spread": (min(total), max(total)),
                "build_ms": statistics.median(1e3 * r["build"] for r in rounds),
                "restore_ms_part": statistics.median(1e3 * r["restore"] for r in rounds),
                "first_ms_part": statistics.median(1e3 * r["first"] for r in rounds),
                "cpu_restore_ms": statistics.median(1e3 * r["cpu"] for r in rounds),
                "state_bytes": state_bytes(states[depth]),
                "target": "<= 5 ms",
            }
        )
    return rows


def in_memory_documents(corpus: Corpus, count: int) -> list[np.ndarray]:
    """The first `count` documents of the long corpus's first domain, read into memory."""
    source = corpus.source()
    return source.__getitems__(list(range(min(count, len(source)))))


def bare_best_fit_run(docs, args) -> Timing:
    """`pack(docs, best_fit)`, row by row, one epoch."""
    from wf_data.data import pack

    start = time.perf_counter()
    rows = (row["segment_ids"] for row in pack(docs, args.seq_len, "best_fit", seed=args.seed))
    return _packing_timing(rows, start, None, None, lambda real: (0, real))


def grain_best_fit_run(docs, args) -> Timing:
    """Grain's `BestFitPackIterDataset` over the same Grain source, shuffled, row by row."""
    start = time.perf_counter()
    counter = CutTo(args.seq_len)
    parent = grain_domain(docs, args.seed, counter)
    packer = grain_packer("BestFit", parent, args.seq_len, args.grain_bins, args.seed)
    rows = (row["tokens_segment_ids"] for row in packer)
    return _packing_timing(
        rows, start, args.grain_seconds, None, lambda real: (counter.cut, counter.tokens_in)
    )


def bench_bare_packer(args, corpora: dict[str, Corpus]) -> list[dict]:
    """The bare best_fit packer row by row over documents held in memory, beside Grain's
    `BestFitPackIterDataset` over `grain.MapDataset.source(list of token arrays)`: ours over
    `InMemorySource` (the same arrays, lengths known, as from a prepared dataset) and over the
    very Grain source (no lengths: best_fit reads each window to measure it, then again to
    build the rows)."""
    import grain

    from wf_data.data import InMemorySource

    arrays = in_memory_documents(corpora["long"], args.bare_docs)
    in_memory = InMemorySource(arrays, token_dtype=arrays[0].dtype)
    grain_source = grain.MapDataset.source(arrays)
    results = interleaved(
        {
            "ours": lambda: bare_best_fit_run(in_memory, args),
            "ours over grain": lambda: bare_best_fit_run(grain_source, args),
            "grain": lambda: grain_best_fit_run(grain_source, args),
        },
        args.rounds,
    )
    count = f"{len(arrays):,} documents"
    return [
        summarize(
            f"wf-data best_fit packer, InMemorySource, {count}",
            results["ours"],
            results["grain"],
            ">= 25x",
        ),
        summarize(
            f"wf-data best_fit packer, grain.MapDataset.source, {count}",
            results["ours over grain"],
            results["grain"],
        ),
        summarize(
            f"grain shuffle+BestFit({args.grain_bins}), grain.MapDataset.source",
            results["grain"],
            results["grain"],
        ),
    ]


def _on_long(section):
    """A `bench_loader` section (it takes one corpus) run on the long-docs corpus."""
    return lambda args, corpora: section(args, corpora["long"])


# Every section: name -> function(args, corpora) -> table rows (dicts with `COLUMNS` keys).
# Another module's sections join with one line here: `**other_module.SECTIONS`, where
# `other_module.SECTIONS` maps names to such functions (build rows with `tools.bench_common`;
# a section that needs no corpus ignores it). Its options: read with `getattr(args, name,
# default)`, or add them to `parse_args`.
SECTIONS: dict[str, Callable[[argparse.Namespace, dict[str, Corpus]], list[dict]]] = {
    "vs_grain": bench_vs_grain,
    "concat": bench_concat,
    "workers": bench_workers,
    "packing": bench_packing,
    "bare_packer": bench_bare_packer,
    "restore": bench_restore,
    "peers": bench_peers.bench_peers,
    "text": bench_text.bench_text,
    "prepare": bench_prepare.section,
    **bench_planning.SECTIONS,  # first_batch, planning
    # bench_loader's `loader` section is superseded by `vs_grain` (Grain's reads now shuffled).
    **{
        name: _on_long(section)
        for name, section in bench_loader.SECTIONS.items()
        if name != "loader"
    },
}


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
        "--restore-depths",
        type=int,
        nargs="+",
        default=None,
        help="restore: batches before the saved state (default 10 1000 10000, --quick 2 20)",
    )
    parser.add_argument(
        "--bare-docs",
        type=int,
        default=None,
        help="bare_packer: documents held in memory (default 20000, --quick 2000)",
    )
    parser.add_argument(
        "--planning-docs",
        type=int,
        nargs="+",
        default=None,
        help="planning: total documents (default 1M 10M 100M, --quick 100k)",
    )
    parser.add_argument(
        "--planning-rows", type=int, nargs="+", default=[256, 4096], help="global rows a step"
    )
    parser.add_argument(
        "--planning-seconds",
        type=float,
        default=None,
        help="planning: steady-state seconds per round (default 1, --quick 0.1)",
    )
    parser.add_argument("--min-steps", type=int, default=5, help="planning: steps per round")
    parser.add_argument(
        "--prepare-mb", type=float, default=None, help="prepare: MB of text (default 50, --quick 2)"
    )
    parser.add_argument(
        "--cache-dir",
        type=pathlib.Path,
        default=CACHE_DIR,
    )
    parser.add_argument(
        "--markdown",
        type=pathlib.Path,
        default=None,
        help=f"the page whose section tables this run replaces (default {BENCH_PAGE}; "
        "--quick: none)",
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
        "restore_depths": [2, 20] if quick else [10, 1_000, 10_000],
        "bare_docs": 2_000 if quick else 20_000,
        "planning_docs": [100_000] if quick else [1_000_000, 10_000_000, 100_000_000],
        "planning_seconds": 0.1 if quick else 1.0,
        "prepare_mb": 2.0 if quick else bench_prepare.DEFAULT_MB,
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
    setting = (
        f"seq_len {args.seq_len}, global batch {args.batch_size} rows, {args.rounds} "
        f"interleaved rounds, median (min-max)"
    )
    results, tables = {}, {}
    for name in args.only or SECTIONS:
        began = time.perf_counter()
        load = os.getloadavg()[0]
        results[name] = SECTIONS[name](args, corpora)
        tables[name] = format_table(name, results[name])
        print(tables[name], flush=True)
        print(f"({time.perf_counter() - began:.1f}s)\n", flush=True)
        tables[name] += f"\n\n_{measured_on(load)}; {setting}._"
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    page = args.markdown or (None if args.quick else BENCH_PAGE)
    if page is not None:
        update_page(page, tables)
        print(f"tables written to {page}")
    return results


def measured_on(load: float) -> str:
    """When and where a table was measured: date, OS, CPU model and count, load average."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"measured {date} on {platform.system()} {platform.machine()}, {model}, "
        f"{os.cpu_count()} CPUs, load average {load:.2f} at start"
    )


def update_page(path: pathlib.Path, tables: dict[str, str]) -> None:
    """Writes `tables` into the markdown page at `path`, each between its section's markers,
    replacing that section's previous table and keeping the others (sections in `SECTIONS`
    order); written atomically."""
    from wf_data import atomic

    old = path.read_text() if path.exists() else ""
    blocks = {}
    for name in SECTIONS:
        begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        if name in tables:
            blocks[name] = f"{begin}\n{tables[name]}\n{end}"
        elif begin in old and end in old:
            blocks[name] = old[old.index(begin) : old.index(end) + len(end)]
    text = PAGE_HEADER + "\n\n".join(blocks.values()) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, text)


if __name__ == "__main__":
    main()
