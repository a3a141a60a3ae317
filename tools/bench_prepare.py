"""Throughput of `wf-data prepare` beside the raw `encode_batch` throughput of its tokenizer.

    uv run python tools/bench_prepare.py                  # ~30 MB corpus, --workers 2
    uv run python tools/bench_prepare.py --mb 5 --workers 1 2

Corpus: the demo corpus (`wf_data.data.prepare.demo_corpus`: prose, code, math), repeated with a
deterministic per-copy prefix until `--mb` megabytes, written as `--files` jsonl files. Raw:
`TokenizerWrapper.encode_batch` over the same texts in batches of the size prepare uses, in one
process with the tokenizer's own thread pool on every core. Prepare: wall-clock of
`prepare(...)` into a fresh directory, spawned workers and shard assembly included. Target:
prepare >= 0.8x raw with `--workers 2`. The tokenizer is the shipped one
(`wf_data/assets/tokenizer`) when present, else a small BPE trained here on the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build_texts(megabytes: float) -> list[str]:
    """Deterministic documents totalling about `megabytes` MB of UTF-8."""
    from wf_data.data.prepare.demo_corpus import build_demo_corpus

    corpus = build_demo_corpus(seed=0)
    base = [text for domain in sorted(corpus) for text in corpus[domain] if text.strip()]
    target, texts, size, copy = int(megabytes * 1e6), [], 0, 0
    while size < target:
        for text in base:
            text = f"[copy {copy}] {text}"
            texts.append(text)
            size += len(text.encode())
            if size >= target:
                break
        copy += 1
    return texts


def write_corpus(texts: list[str], directory: pathlib.Path, files: int) -> None:
    """`files` jsonl files of contiguous slices of `texts`."""
    directory.mkdir(parents=True)
    per_file = -(-len(texts) // files)
    for index in range(files):
        with open(directory / f"corpus-{index:03d}.jsonl", "w", encoding="utf-8") as f:
            for text in texts[index * per_file : (index + 1) * per_file]:
                f.write(json.dumps({"text": text}) + "\n")


def tokenizer_path(texts: list[str], work: pathlib.Path) -> str:
    """The shipped tokenizer, else a 4k byte-level BPE trained on `texts` (offline)."""
    shipped = ROOT / "wf_data" / "assets" / "tokenizer"
    if (shipped / "tokenizer.json").exists():
        return str(shipped)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"])
    tokenizer.train_from_iterator(texts[:5000], trainer)
    directory = work / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(
        directory
    )
    return str(directory)


def raw_throughput(path: str, texts: list[str]) -> tuple[float, int]:
    """(seconds, tokens) of `encode_batch` over `texts`, batch by batch, all cores."""
    from wf_data.data.prepare.encoding import BATCH_DOCS
    from wf_data.data.text.tokenization import TokenizerWrapper

    tokenizer = TokenizerWrapper.from_pretrained(path, add_bos=False, add_eos=False)
    tokenizer.encode_batch(texts[:BATCH_DOCS])  # warm up the thread pool
    start, tokens = time.perf_counter(), 0
    for begin in range(0, len(texts), BATCH_DOCS):
        tokens += sum(ids.size for ids in tokenizer.encode_batch(texts[begin : begin + BATCH_DOCS]))
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one line per configuration."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=30.0, help="corpus size in MB")
    parser.add_argument("--files", type=int, default=8, help="jsonl files in the corpus")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="prepare --workers")
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # raw uses every core, as prepare's workers do

    from wf_data.data.prepare import prepare

    work = pathlib.Path(tempfile.mkdtemp(prefix="wf-bench-prepare-"))
    try:
        texts = build_texts(args.mb)
        write_corpus(texts, work / "corpus", args.files)
        path = tokenizer_path(texts, work)
        megabytes = sum(len(t.encode()) for t in texts) / 1e6
        print(
            f"corpus: {len(texts):,} documents, {megabytes:.1f} MB in {args.files} files; "
            f"tokenizer {path}; {os.cpu_count()} cores"
        )
        raw_s, raw_tokens = raw_throughput(path, texts)
        raw_rate = raw_tokens / raw_s
        print(
            f"raw encode_batch        : {raw_tokens:>12,} tokens {raw_s:7.2f} s "
            f"{raw_rate:>12,.0f} tokens/s"
        )
        for workers in args.workers:
            out = work / f"out-{workers}"
            start = time.perf_counter()
            manifest = prepare(
                [work / "corpus"],
                out,
                tokenizer=path,
                num_shards=args.shards,
                workers=workers,
                progress=False,
            )
            elapsed = time.perf_counter() - start
            tokens = manifest["totals"]["tokens"]
            assert tokens == raw_tokens, (tokens, raw_tokens)
            rate = tokens / elapsed
            print(
                f"prepare --workers {workers:<5}: {tokens:>12,} tokens {elapsed:7.2f} s "
                f"{rate:>12,.0f} tokens/s  = {rate / raw_rate:.2f}x raw (target >= 0.8x)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
