"""wf-data benchmarks: one process, deterministic generated data, one table per section.

    uv run python tools/bench.py                 # every section, 44M tokens
    uv run python tools/bench.py --quick         # ~1.5M tokens: a CI smoke run
    uv run python tools/bench.py --only packing  # one section

Data: document lengths lognormal(mean 6, sigma 1.1) rounded and clipped to [8, 32768], uniform
random token ids (vocab 32000: uint16), written once as a `tokens` dataset (ArrayRecord shards,
manifest, lengths; `wf_data.data.sources` writers) under `--cache-dir`, read back through
`open_dataset`. Sections are functions `section(args, corpus) -> list[dict]` in `SECTIONS`,
printed with the `COLUMNS` their rows have; add one to add a table. The loader sections
(`loader`, `memory`, `state`, `exp3`) live in `tools/bench_loader.py`.

packing columns: real (non-padding) tokens per wall second and per CPU second of this process,
fill (real / row capacity), tokens truncated (read but never emitted), state size (JSON bytes
of `get_state()`), and wall throughput relative to the Grain packer of the same kind
(concat: ConcatThenSplit, best_fit: BestFit). Our rows are the best of `--repeat` passes over
the whole data with `seed` shuffling; Grain's packers read the source in order, documents cut
to `seq_len` for the fit packers (they reject longer ones), `--grain-bins` bins.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import pickle
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from wf_data.data import packing, sources  # noqa: E402
from wf_data.data.batching import batch_plans  # noqa: E402
from wf_data.data.packing import pack  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
import bench_loader  # noqa: E402

FULL_TOKENS = 44_000_000
QUICK_TOKENS = 1_500_000
LENGTH_MEAN, LENGTH_SIGMA, MIN_LENGTH, MAX_LENGTH = 6.0, 1.1, 8, 32768


# --------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A generated `tokens` dataset on disk plus a flat copy of its tokens for the memmap bound."""

    path: pathlib.Path
    flat_path: pathlib.Path
    num_docs: int
    num_tokens: int
    token_dtype: np.dtype

    def source(self) -> sources.DocumentSource:
        return sources.open_dataset(self.path)


def document_lengths(num_tokens: int, seed: int) -> np.ndarray:
    """(N,) int64 lognormal lengths whose sum is the first to reach `num_tokens`."""
    rng = np.random.default_rng([seed, 0])
    draws = max(64, int(num_tokens / 600))
    lengths = np.empty(0, dtype=np.int64)
    while lengths.sum() < num_tokens:
        more = np.rint(rng.lognormal(LENGTH_MEAN, LENGTH_SIGMA, size=draws))
        lengths = np.concatenate([lengths, np.clip(more, MIN_LENGTH, MAX_LENGTH).astype(np.int64)])
    return lengths[: int(np.searchsorted(np.cumsum(lengths), num_tokens)) + 1]


def make_corpus(
    cache_dir: pathlib.Path, num_tokens: int, seed: int, vocab_size: int, num_shards: int
) -> Corpus:
    """Writes (once; reused when present) the benchmark dataset and returns it."""
    dtype = sources.token_dtype_for_vocab(vocab_size)
    name = f"bench-t{num_tokens}-s{seed}-v{vocab_size}-n{num_shards}"
    path = cache_dir / name
    flat_path = path / "tokens.bin"
    lengths = document_lengths(num_tokens, seed)
    if not (path / sources.MANIFEST_NAME).exists():
        path.mkdir(parents=True, exist_ok=True)
        tokens = np.random.default_rng([seed, 1]).integers(0, vocab_size, lengths.sum(), dtype)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        bounds = np.linspace(0, len(lengths), num_shards + 1).astype(np.int64)
        shards = []
        for shard in range(num_shards):
            file = sources.shard_name("bench", shard, num_shards)
            first, last = bounds[shard], bounds[shard + 1]
            records = (
                tokens[offsets[i] : offsets[i + 1]].tobytes() for i in range(first, last)
            )
            info = sources.write_shard(path / file, records)
            shards.append({
                "file": file,
                "records": info["records"],
                "tokens": int(offsets[last] - offsets[first]),
                "sha256": info["sha256"],
            })
        np.save(path / sources.LENGTHS_NAME, lengths)
        tokens.tofile(flat_path)
        sources.write_manifest(path, {
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
        })
    return Corpus(path, flat_path, len(lengths), int(lengths.sum()), dtype)


# --------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class Run:
    """One pass of a packer: batches of (rows, real tokens, row length), state, truncation."""

    batches: Iterator[tuple[int, int, int]]
    state: Callable[[], object] | None = None
    truncated: Callable[[], int] = lambda: 0
    packs: bool = True  # False: a bound (reads, memmap), fill and truncation do not apply


def state_bytes(state) -> int:
    """Size of a checkpointed state: its JSON bytes (pickle bytes if it is not JSON)."""
    try:
        return len(json.dumps(state))
    except TypeError:
        return len(pickle.dumps(state))


def measure(name: str, make_run: Callable[[], Run], repeat: int = 1,
            time_limit: float | None = None) -> dict:
    """Runs `make_run()` `repeat` times (best wall time kept); returns one table row.

    `time_limit` stops a pass early: throughput and fill are then those of a prefix (the
    `rows` column says how many rows it reached).
    """
    best = None
    for _ in range(repeat):
        run = make_run()
        rows = real = capacity = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        for batch_rows, batch_real, row_len in run.batches:
            rows += batch_rows
            real += batch_real
            capacity += batch_rows * row_len
            if time_limit is not None and time.perf_counter() - start > time_limit:
                break
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        size = state_bytes(run.state()) if run.state is not None else 0
        result = {
            "name": name,
            "rows": rows,
            "tokens_per_s": real / seconds if seconds else float("nan"),
            "tokens_per_cpu_s": real / cpu_seconds if cpu_seconds else float("nan"),
            "fill": real / capacity if capacity else float("nan"),
            "truncated": run.truncated(),
            "state_bytes": size,
            "seconds": seconds,
        }
        if not run.packs:
            del result["fill"], result["truncated"]
        if best is None or result["tokens_per_s"] > best["tokens_per_s"]:
            best = result
    return best


def _row_batches(iterator):
    """Our packers row by row (`__next__`)."""
    for row in iterator:
        yield 1, int(np.count_nonzero(row["segment_ids"])), row["segment_ids"].shape[0]


def _read_batches(reader, plan_batches):
    """Our packers batch by batch: one `read_rows` call per batch plan."""
    for plan in plan_batches:
        segments = reader(plan)["segment_ids"]
        yield segments.shape[0], int(np.count_nonzero(segments)), segments.shape[1]


def _memmap_rows(corpus: Corpus, seq_len: int, batch_size: int):
    tokens = np.memmap(corpus.flat_path, dtype=corpus.token_dtype, mode="r")
    step = seq_len * batch_size
    for start in range(0, len(tokens) - step + 1, step):
        batch = tokens[start : start + step].reshape(batch_size, seq_len).astype(np.int32)
        yield batch_size, batch.size, seq_len


def _reads_only(source, packed, read_rows: int):
    """Only the source reads our concat iterator makes (same documents, same batches)."""
    for plan in batch_plans(packed.plans, read_rows):
        docs = source.__getitems__(np.unique(plan["doc_ids"]).tolist())
        yield len(plan["row_pieces"]), int(plan["lengths"].sum()), packed.seq_len
        del docs


class _CountingMap:
    """Grain map to a feature dict that counts the tokens read and those it truncates.

    Grain's fit packers reject sequences longer than the row, so for them documents are cut to
    `max_len` here (the usual recipe): that is where their truncated tokens go.
    """

    def __init__(self, max_len: int | None = None):
        self.tokens_in = self.truncated = 0
        self.max_len = max_len

    def __call__(self, tokens: np.ndarray) -> dict:
        self.tokens_in += len(tokens)
        if self.max_len is not None and len(tokens) > self.max_len:
            self.truncated += len(tokens) - self.max_len
            tokens = tokens[: self.max_len]
        return {"tokens": np.asarray(tokens, dtype=np.int32)}


def _grain_run(kind: str, corpus: Corpus, seq_len: int, bins: int, batch_size: int) -> Run:
    import grain

    counter = _CountingMap(None if kind == "ConcatThenSplit" else seq_len)
    parent = grain.MapDataset.source(corpus.source()).map(counter).to_iter_dataset()
    lengths = {"tokens": seq_len}
    if kind == "ConcatThenSplit":
        packed = grain.experimental.ConcatThenSplitIterDataset(parent, length_struct=lengths)
    else:
        packer = getattr(grain.experimental, f"{kind}PackIterDataset")
        packed = packer(parent, length_struct=lengths, num_packing_bins=bins, shuffle_bins=False)
    iterator = iter(packed)

    def batches():
        pending = real = 0
        for row in iterator:
            pending += 1
            real += int(np.count_nonzero(row["tokens_segment_ids"]))
            if pending == batch_size:
                yield pending, real, seq_len
                pending = real = 0

    return Run(batches(), iterator.get_state, lambda: counter.truncated)


def bench_packing(args: argparse.Namespace, corpus: Corpus) -> list[dict]:
    """Packing throughput, fill, truncation and state size: ours beside Grain's packers."""
    seq_len, batch, repeat = args.seq_len, args.batch_size, args.repeat

    def ours(label, method, batch_size=1, **kwargs):
        def make_run():
            packed = pack(corpus.source(), seq_len, method, seed=args.seed, **kwargs)
            if batch_size == 1:
                iterator = iter(packed)
                return Run(_row_batches(iterator), iterator.get_state)
            iterator = iter(batch_plans(packed.plans, batch_size))
            return Run(_read_batches(packed.reader, iterator), iterator.get_state)

        row = measure(label, make_run, repeat)
        row["compare"] = "ConcatThenSplit" if method == "concat" else "BestFit"
        return row

    def reads_only(label):
        def make_run():
            source = corpus.source()
            concat = pack(source, seq_len, "concat", seed=args.seed)
            rows_per_read = max(1, packing.READ_TOKENS // seq_len)
            return Run(_reads_only(source, concat, rows_per_read), packs=False)

        return measure(label, make_run, repeat)

    largest = max(args.window_sizes)
    results = [
        measure("numpy memmap bound",
                lambda: Run(_memmap_rows(corpus, seq_len, batch), packs=False), repeat),
        reads_only("DocumentSource reads alone (concat's)"),
        ours("wf-data concat", "concat"),
        ours(f"wf-data concat, read_rows batch {batch}", "concat", batch),
    ]
    results += [ours(f"wf-data best_fit w={w}", "best_fit", window_size=w)
                for w in args.window_sizes]
    results.append(ours(f"wf-data best_fit w={largest}, read_rows batch {batch}",
                        "best_fit", batch, window_size=largest))
    for kind in ("ConcatThenSplit", "FirstFit", "BestFit"):
        bins = "" if kind == "ConcatThenSplit" else f" ({args.grain_bins} bins)"
        label = f"grain {kind}{bins}"
        row = measure(
            label,
            lambda kind=kind: _grain_run(kind, corpus, seq_len, args.grain_bins, batch),
            time_limit=args.grain_seconds,
        )
        row["grain"] = kind
        results.append(row)
    grain_speed = {row["grain"]: row["tokens_per_s"] for row in results if "grain" in row}
    for row in results:
        if "compare" in row:
            row["vs_grain"] = row["tokens_per_s"] / grain_speed[row["compare"]]
    return results


SECTIONS: dict[str, Callable[[argparse.Namespace, Corpus], list[dict]]] = {
    "packing": bench_packing,
    **bench_loader.SECTIONS,
}


# --------------------------------------------------------------------------- output


def _millions(value: float) -> str:
    return f"{value / 1e6:.1f}M"


# (header, result key, format): a section's rows may leave any key out ("-").
COLUMNS = [
    ("run", "name", str),
    ("real tokens/s", "tokens_per_s", _millions),
    ("per CPU-s", "tokens_per_cpu_s", _millions),
    ("fill", "fill", lambda fill: f"{100 * fill:.2f}%"),
    ("truncated tokens", "truncated", lambda count: f"{count:,}"),
    ("state size", "state_bytes", lambda size: f"{size} B" if size else "-"),
    ("vs Grain", "vs_grain", lambda ratio: f"{ratio:.1f}x"),
    ("rows", "rows", lambda count: f"{count:,}"),
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TOKENS:,} tokens (CI smoke)")
    parser.add_argument("--tokens", type=int, default=None, help=f"default {FULL_TOKENS:,}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=32000, help=">65536 stores uint32")
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--window-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--grain-bins", type=int, default=64)
    parser.add_argument("--grain-seconds", type=float, default=None,
                        help="stop each Grain packer after this long (default: full data)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="passes per wf-data row, best kept (default 3, --quick 1)")
    parser.add_argument("--cache-dir", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / "wf-data-bench")
    parser.add_argument("--prefetch", type=int, default=bench_loader.LOADER_PREFETCH,
                        help="loader sections: batches planned and read per group, minus one")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append",
                        help="run only this section (repeatable)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = QUICK_TOKENS if args.quick else FULL_TOKENS
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.window_sizes is None:
        args.window_sizes = [256, 1024, 4096] if args.quick else [256, 1024, 4096, 16384]
    return args


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    """Runs the selected sections, prints their tables and returns the raw results."""
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    corpus = make_corpus(args.cache_dir, args.tokens, args.seed, args.vocab_size, args.num_shards)
    print(
        f"corpus: {corpus.num_docs:,} documents, {corpus.num_tokens:,} {corpus.token_dtype.name} "
        f"tokens in {args.num_shards} shards at {corpus.path} "
        f"({time.perf_counter() - start:.1f}s); seq_len {args.seq_len}, seed {args.seed}\n"
    )
    results = {}
    for name in args.only or SECTIONS:
        results[name] = SECTIONS[name](args, corpus)
        print(format_table(name, results[name]) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
