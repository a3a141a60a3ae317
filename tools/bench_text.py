"""Text tokenized on the fly: `tools/bench.py --only text` (the section is `bench_text`).

One `text` dataset (written once under `--cache-dir`: words of 2-8 letters, lognormal(5.5,
1.1) words a document, about as many tokens as the long-docs corpus's first domain) read by
`get_loader` with the shipped tokenizer, best_fit, no worker processes:

- with the default best-fit window (4096 documents) and with a window of 64, which shows what
  the first batch costs once planning needs few documents measured; each reads batches for
  80% of an epoch (of an endless stream);
- beside the bound: the same documents through the raw `encode_batch` the loader calls.

Tokens per second here count from the loader's construction, first batch included: the first
batch tokenizes a whole window, which a rate after it would leave out.

Each row counts the documents the tokenizer encoded per distinct document it encoded (1.00:
each tokenized once). The tokenizer is loaded before the timing: its first load (imports)
is not the loader's.
"""

from __future__ import annotations

import pathlib
import statistics
import time

import numpy as np

from wf_data.data.shards import sources

__all__ = ["bench_text"]

TEXT_SEED = 11


def bench_text(args, corpora) -> list[dict]:
    """The `text` section of tools/bench.py: one row per side (see the module)."""
    from wf_data.data.text.tokenization import TokenizerWrapper

    path = _text_dataset(args, corpora["long"].num_tokens // 3)
    tokenizer = TokenizerWrapper.from_pretrained("wf-data-demo")
    epoch_tokens = _raw(path, tokenizer)[0]
    batches = max(1, int(0.8 * epoch_tokens / (args.seq_len * args.batch_size)))
    sides = {
        "get_loader best_fit, window 4096": lambda: _loader(path, args, 4096, batches),
        "get_loader best_fit, window 64": lambda: _loader(path, args, 64, batches),
        "raw encode_batch of the same documents (bound)": lambda: _raw(path, tokenizer),
    }
    runs: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            runs[name].append(side())
    rows = []
    for name, results in runs.items():
        speeds = [tokens / seconds for tokens, seconds, _, _ in results]
        firsts = [1e3 * first for _, _, first, _ in results]
        encodes = statistics.median(per_doc for *_, per_doc in results)
        rows.append(
            {
                "name": f"{name}; {encodes:.2f} encodes a document",
                "rounds": len(results),
                "tokens_per_s": statistics.median(speeds),
                "spread": (min(speeds), max(speeds)),
                "first_ms": statistics.median(firsts),
                "first_spread": (min(firsts), max(firsts)),
            }
        )
    return rows


def _text_dataset(args, num_tokens: int) -> pathlib.Path:
    out = pathlib.Path(args.cache_dir) / f"text-t{num_tokens}-s{TEXT_SEED}"
    if (out / sources.MANIFEST_NAME).exists():
        return out
    rng = np.random.default_rng(TEXT_SEED)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(5000)]
    docs, words = [], 0
    while words < num_tokens * 2 // 3:  # about 1.5 tokens a word
        count = int(np.clip(rng.lognormal(5.5, 1.1), 4, 20_000))
        docs.append(" ".join(rng.choice(vocab, count)) + ".")
        words += count
    out.mkdir(parents=True, exist_ok=True)
    file = sources.shard_name("text", 0, 1)
    written = sources.write_shard(out / file, [doc.encode() for doc in docs], format="text")
    shard = {"file": file, "records": written["records"], "tokens": 0}
    sources.write_manifest(
        out,
        {
            "name": "text",
            "format": "text",
            "token_dtype": None,
            "tokenizer": None,
            "append_eos": False,
            "shards": [dict(shard, sha256=written["sha256"])],
            "totals": {"records": len(docs), "tokens": 0, "dropped_empty": 0, "skipped_bad": 0},
        },
    )
    return out


class _Counting:
    """Counts the documents `TokenizedDocuments` encodes while it is entered, and the
    distinct ones."""

    def __enter__(self):
        from wf_data.data.read.pretrain import TokenizedDocuments

        self.encoded, self.distinct, real = 0, set(), TokenizedDocuments._tokenize

        def tokenize(documents, indices):
            self.encoded += len(indices)
            self.distinct.update(indices)
            return real(documents, indices)

        self._restore = lambda: setattr(TokenizedDocuments, "_tokenize", real)
        TokenizedDocuments._tokenize = tokenize
        return self

    def __exit__(self, *exc):
        self._restore()


def _loader(path: pathlib.Path, args, window: int, batches: int):
    """(real tokens, seconds from construction, first batch seconds, encodes a document)."""
    from wf_data.data import get_loader

    config = {
        "name": "text",
        "tokenizer": "wf-data-demo",
        "seq_len": args.seq_len,
        "global_batch_size": args.batch_size,
        "packing": "best_fit",
        "window_size": window,
        "seed": args.seed,
        "prefetch": args.prefetch,
        "mixing": {"kind": "static"},
        "sources": {"text": {"path": str(path), "weight": 1.0, "format": "text"}},
    }
    with _Counting() as counting:
        start = time.perf_counter()
        loader = get_loader(config, framework="numpy", num_workers=0)
        count, batches = batches, iter(loader)
        next(batches)
        first = time.perf_counter() - start
        tokens = 0
        for _ in range(count):
            tokens += int(np.count_nonzero(next(batches)["segment_ids"]))
        seconds = time.perf_counter() - start
        loader.close()
    return tokens, seconds, first, counting.encoded / len(counting.distinct)


def _raw(path: pathlib.Path, tokenizer):
    source = sources.open_dataset(path)
    start = time.perf_counter()
    tokens = 0
    for begin in range(0, len(source), 4096):
        texts = source.__getitems__(range(begin, min(begin + 4096, len(source))))
        tokens += sum(ids.size for ids in tokenizer.encode_batch(texts))
    return tokens, time.perf_counter() - start, 0.0, 1.0
