"""Peers on fixed rows: `tools/bench.py --only peers` (the section is `bench_peers`).

Fixed `seq_len`-token rows of the first long-docs domain, read without worker processes:

- wf-data `get_loader` with concat packing (numpy): input ids, labels, positions and segments
  of documents shuffled at document level (a new permutation each epoch);
- wf-data's bare concat packer (`pack(..., "concat")`, rows one by one);
- litdata `StreamingDataset` + `TokensLoader(block_size=seq_len)` + `StreamingDataLoader`:
  token ids only, in the dataset's dtype, of blocks pre-cut at optimise time, shuffled by
  chunk and by block within a chunk;
- MosaicML Streaming (MDS), where it is installed: token ids only, one sample per pre-cut
  block. It is not in the `bench` dependency group: every release needs numpy < 2.2 or
  transformers < 5, which the lock does not allow;
- the bound: random `seq_len`-token chunks of the flat token file (`numpy.memmap`), as int32.

All read the same tokens: the peers' files are written once from the same documents, in file
order (cached under `--cache-dir`); each peer shuffles in its own way, as its users would. The
peers are imported only here (install them with `uv sync --group bench`); a missing one is a
row that says so. Rows are medians of `--rounds` interleaved rounds with the min-max spread;
ratios are against litdata.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import pathlib
import time
from collections.abc import Callable, Iterator

import numpy as np

from tools.bench_common import Timing, interleaved, summarize
from wf_data.data.shards.sources import open_dataset

__all__ = ["bench_peers"]


def bench_peers(args, corpora) -> list[dict]:
    """The `peers` section of tools/bench.py: one table row per side (see the module)."""
    corpus = corpora["long"]
    batches = args.loader_batches
    sides: dict[str, Callable[[], Iterator[dict]]] = {
        "wf-data get_loader, concat (input/labels/positions/segments)": lambda: _loader(
            corpus, args
        ),
        "wf-data pack(..., 'concat') rows (same fields)": lambda: _packed_rows(corpus, args),
    }
    missing = {}
    peers = (
        ("litdata TokensLoader (tokens only)", _litdata, "uv sync --group bench"),
        ("MDS", _mds, "not installable beside uv.lock (numpy < 2.2 or transformers < 5)"),
    )
    for name, make, how in peers:
        try:
            sides[name] = make(corpus, args)
        except ImportError as error:
            missing[name] = f"not installed ({error.name}): {how}"
    sides["numpy memmap random chunks (bound, tokens only)"] = lambda: _memmap_chunks(corpus, args)
    timings = interleaved(
        {name: lambda side=side: _time(side, batches) for name, side in sides.items()}, args.rounds
    )
    baseline = timings.get("litdata TokensLoader (tokens only)")
    loader_side = next(iter(sides))
    rows = [
        summarize(
            name,
            runs,
            baseline,
            # get_loader concat at least litdata's speed
            ">= 1.0x" if baseline and name == loader_side else None,
        )
        for name, runs in timings.items()
    ]
    rows += [{"name": f"{name}: {why}"} for name, why in missing.items()]
    return rows


def _time(make: Callable[[], Iterator[dict]], batches: int) -> Timing:
    """One round of a side: `batches` batches after the first (each says its real tokens)."""
    start = time.perf_counter()
    iterator = make()
    next(iterator)
    first = time.perf_counter() - start
    tokens, begin = 0, time.perf_counter()
    for _ in range(batches):
        tokens += next(iterator)["tokens"]
    return Timing(tokens, time.perf_counter() - begin, first)


# --------------------------------------------------------------------------- our sides


def _config(corpus, args) -> dict:
    return {
        "name": f"peers-{corpus.label}",
        "tokenizer": None,
        "seq_len": args.seq_len,
        "global_batch_size": args.batch_size,
        "packing": "concat",
        "seed": args.seed,
        "prefetch": args.prefetch,
        "mixing": {"kind": "static"},
        "sources": {"web": {"path": str(corpus.path), "weight": 1.0, "format": "tokens"}},
    }


def _loader(corpus, args) -> Iterator[dict]:
    from wf_data.data import get_loader

    loader = get_loader(_config(corpus, args), framework="numpy", num_workers=0)
    try:
        for batch in loader:
            yield {"tokens": int(np.count_nonzero(batch["segment_ids"]))}
    finally:
        loader.close()


def _packed_rows(corpus, args) -> Iterator[dict]:
    from wf_data.data import pack

    source = open_dataset(corpus.path)
    rows = iter(pack(source, args.seq_len, "concat", seed=args.seed, num_epochs=None))
    while True:  # batches of rows one by one, as a Grain user iterates them
        yield {
            "tokens": sum(
                int(np.count_nonzero(next(rows)["segment_ids"])) for _ in range(args.batch_size)
            )
        }


def _memmap_chunks(corpus, args) -> Iterator[dict]:
    tokens = np.memmap(corpus.flat_path, dtype=corpus.token_dtype, mode="r")
    rng = np.random.default_rng(args.seed)
    chunks = len(tokens) // args.seq_len
    while True:
        for chunk in rng.integers(0, chunks, (1024, args.batch_size)).tolist():
            rows = np.stack([tokens[c * args.seq_len : (c + 1) * args.seq_len] for c in chunk])
            yield {"tokens": rows.astype(np.int32).size}


# --------------------------------------------------------------------------- peers


def _documents(corpus) -> Iterator[np.ndarray]:
    source = open_dataset(corpus.path)
    for start in range(0, len(source), 4096):
        yield from source.__getitems__(range(start, min(start + 4096, len(source))))


def _peer_dir(args, corpus, peer: str) -> pathlib.Path:
    return pathlib.Path(args.cache_dir) / f"{corpus.path.parent.name}-{peer}"


def _litdata(corpus, args) -> Callable[[], Iterator[dict]]:
    """litdata's optimised token chunks of the corpus (written once) and their reader."""
    import litdata
    from litdata.streaming.item_loader import TokensLoader

    out = _peer_dir(args, corpus, "litdata")
    if not (out / "index.json").exists():
        source = open_dataset(corpus.path)
        with contextlib.redirect_stdout(io.StringIO()):
            litdata.optimize(
                fn=_litdata_document,
                inputs=[(str(corpus.path), start) for start in range(0, len(source), 4096)],
                output_dir=str(out),
                chunk_size=(1 << 25) // corpus.token_dtype.itemsize,  # 32 MiB of tokens
                item_loader=TokensLoader(),
                num_workers=1,
                verbose=False,
            )

    def batches() -> Iterator[dict]:
        dataset = litdata.StreamingDataset(
            str(out),
            item_loader=TokensLoader(block_size=args.seq_len),
            shuffle=True,
            drop_last=True,
            seed=args.seed,
        )
        loader = litdata.StreamingDataLoader(dataset, batch_size=args.batch_size, num_workers=0)
        while True:
            for batch in loader:
                yield {"tokens": int(batch.numel())}

    return batches


def _litdata_document(task: tuple[str, int]) -> Iterator[np.ndarray]:
    """litdata's optimise function: the documents of records [start, start + 4096)."""
    path, start = task
    source = open_dataset(path)
    yield from source.__getitems__(range(start, min(start + 4096, len(source))))


def _mds(corpus, args) -> Callable[[], Iterator[dict]]:
    """MosaicML Streaming's shards of the same blocks (written once) and their reader."""
    from streaming import MDSWriter, StreamingDataset

    out = _peer_dir(args, corpus, "mds")
    if not (out / "index.json").exists():
        flat = np.memmap(corpus.flat_path, dtype=corpus.token_dtype, mode="r")
        column = {"tokens": f"ndarray:{corpus.token_dtype.name}"}
        with MDSWriter(out=str(out), columns=column) as writer:
            for start in range(0, len(flat) - args.seq_len + 1, args.seq_len):
                writer.write({"tokens": np.asarray(flat[start : start + args.seq_len])})

    def batches() -> Iterator[dict]:
        dataset = StreamingDataset(
            local=str(out), shuffle=True, shuffle_seed=args.seed, batch_size=args.batch_size
        )
        while True:
            samples = iter(dataset)
            while rows := [row["tokens"] for row in itertools.islice(samples, args.batch_size)]:
                yield {"tokens": sum(row.size for row in rows)}

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return batches
