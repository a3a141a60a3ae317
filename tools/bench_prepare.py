"""`wf-data prepare` beside the raw tokenizer it calls, on the same text in the same run.

    uv run python tools/bench_prepare.py                     # ~50 MB, 1 and os.cpu_count() workers
    uv run python tools/bench_prepare.py --mb 10 --workers 2 --no-beam

Corpus: the demo corpus (`wf_data.data.prepare.demo_corpus`: prose, code, math), repeated with
a per-copy prefix up to `--mb` megabytes of text, written as ONE jsonl file (users often have
one big file; it is also the hardest case to spread over workers). Tokenizer: the shipped
`wf-data-demo`.

Sides, each timed in a fresh process (so spawned workers re-import only this light script), run
in turn once per round, `--rounds` rounds:
- raw: `tokenizers` `encode_batch_fast` (the call prepare makes) over the texts already in
  memory, in batches of prepare's `BATCH_DOCS`, ids fetched, on 1 and on N rayon threads;
- prepare: `prepare(..., workers=1 | N)` into a fresh directory: reading, parsing, encoding,
  writing parts, assembling shards, spawning workers; tokenizer loading excluded;
- beam: the same on Apache Beam's DirectRunner in multi_processing mode with 1 and N workers,
  the runner's start-up and each worker's tokenizer loading included.

Rows give median tokens/s with the min-max over rounds, CPU seconds over wall seconds, the
median of the per-round ratios with their min-max (each ratio pairs two sides of one round),
and the ratio of tokens per CPU second: on a machine busy with other work, where more
processes need not get more CPU time, it still shows what prepare spends beside the tokenizer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TOKENIZER = "wf-data-demo"
DEFAULT_MB = 50.0


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


def write_corpus(megabytes: float, directory: pathlib.Path) -> pathlib.Path:
    """One jsonl file of `build_texts(megabytes)` in `directory`; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for text in build_texts(megabytes):
            f.write(json.dumps({"text": text}) + "\n")
    return path


# --------------------------------------------------------------------------- sides (children)


def _cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _raw_side(corpus: pathlib.Path, threads: int) -> dict:
    from wf_data.data.prepare.encoding import BATCH_DOCS, _load_tokenizer

    backend = _load_tokenizer(TOKENIZER).backend
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    backend.encode_batch_fast(texts[:BATCH_DOCS], add_special_tokens=False)  # start the threads
    start, cpu, tokens = time.perf_counter(), _cpu_seconds(), 0
    for begin in range(0, len(texts), BATCH_DOCS):
        batch = texts[begin : begin + BATCH_DOCS]
        tokens += sum(
            len(e.ids) for e in backend.encode_batch_fast(batch, add_special_tokens=False)
        )
    return {"seconds": time.perf_counter() - start, "cpu": _cpu_seconds() - cpu, "tokens": tokens}


def _prepare_side(corpus: pathlib.Path, out: pathlib.Path, workers: int, beam: bool) -> dict:
    from wf_data.data.prepare import prepare
    from wf_data.data.prepare.encoding import _load_tokenizer

    _load_tokenizer(TOKENIZER)  # loading is not what this measures (cached by name)
    start, cpu = time.perf_counter(), _cpu_seconds()
    if beam:
        from wf_data.data.prepare import beam as prepare_beam

        options = (
            "--runner=DirectRunner --direct_running_mode=multi_processing "
            f"--direct_num_workers={workers}"
        )
        manifest = prepare_beam.run(corpus, out, tokenizer=TOKENIZER, pipeline_options=options)
    else:
        manifest = prepare(corpus, out, tokenizer=TOKENIZER, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu": _cpu_seconds() - cpu, "tokens": manifest["totals"]["tokens"]}


def run_side(side: str, workers: int, corpus: pathlib.Path, work: pathlib.Path) -> dict:
    """Time one side in a fresh process: {"seconds", "cpu", "tokens", "load"}."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(workers))
    env["TOKENIZERS_PARALLELISM"] = "true" if side == "raw" and workers > 1 else "false"
    out = work / f"out-{side}-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    child = subprocess.run(
        [sys.executable, __file__, "--side", side, "--workers", str(workers)]
        + ["--corpus", str(corpus), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    shutil.rmtree(out, ignore_errors=True)
    if child.returncode != 0:
        raise RuntimeError(f"bench side {side} x{workers} failed:\n{child.stderr[-3000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    return dict(result, load=os.getloadavg()[0])


# --------------------------------------------------------------------------- the section


def _summary(name: str, runs: list[dict], baseline: list[dict] | None, target: str | None):
    rates = [run["tokens"] / run["seconds"] for run in runs]
    row = {
        "name": name,
        "rounds": len(runs),
        "tokens_per_s": statistics.median(rates),
        "spread": (min(rates), max(rates)),
        "cpu_per_wall": statistics.median(run["cpu"] / run["seconds"] for run in runs),
        "load": statistics.median(run["load"] for run in runs),
        "runs": runs,
    }
    if baseline is not None:
        pairs = list(zip(runs, baseline, strict=True))  # same tokens on both sides (checked)
        paired = [b["seconds"] / run["seconds"] for run, b in pairs]
        row["ratio"] = statistics.median(paired)
        row["ratio_spread"] = (min(paired), max(paired))
        # Tokens per CPU second against the baseline's: what a busy machine cannot hide.
        row["cpu_ratio"] = statistics.median(b["cpu"] / run["cpu"] for run, b in pairs)
    if target is not None:
        row["target"] = target
    return row


def prepare_vs_raw(
    megabytes: float = DEFAULT_MB,
    workers: int | None = None,
    rounds: int = 3,
    beam: bool = True,
    work: pathlib.Path | None = None,
) -> list[dict]:
    """The section "prepare vs the raw tokenizer": table rows (see the module docstring).

    `workers` N defaults to the CPU count (at least 2). Rows: raw on 1 and N threads; prepare
    and (with `beam`) Beam with 1 and N workers, each against raw on as many threads, and N
    workers against 1. Targets are issue 20's: >= 0.9x raw on as many threads, N workers >=
    0.9 * N times 1 worker.
    """
    workers = workers or max(2, os.cpu_count() or 2)
    own_work = work is None
    work = work or pathlib.Path(tempfile.mkdtemp(prefix="wf-bench-prepare-"))
    try:
        corpus = write_corpus(megabytes, work / "corpus")
        sides = [("raw", 1), ("raw", workers), ("prepare", 1), ("prepare", workers)]
        if beam:
            sides += [("beam", 1), ("beam", workers)]
        runs: dict[tuple[str, int], list[dict]] = {side: [] for side in sides}
        for _ in range(rounds):
            for side in sides:
                runs[side].append(run_side(*side, corpus, work))
        tokens = {run["tokens"] for side_runs in runs.values() for run in side_runs}
        if len(tokens) != 1:
            raise RuntimeError(f"the sides counted different token totals: {sorted(tokens)}")
        scaling = f">= {0.9 * workers:.1f}x"
        rows = [
            _summary("raw encode_batch_fast, 1 thread", runs["raw", 1], None, None),
            _summary(
                f"raw encode_batch_fast, {workers} threads",
                runs["raw", workers],
                runs["raw", 1],
                None,
            ),
        ]
        for side, label in [
            ("prepare", "prepare --workers"),
            ("beam", "prepare --runner beam, workers"),
        ]:
            if (side, 1) not in runs:
                continue
            rows += [
                _summary(f"{label} 1 / raw 1 thread", runs[side, 1], runs["raw", 1], ">= 0.9x"),
                _summary(
                    f"{label} {workers} / raw {workers} threads",
                    runs[side, workers],
                    runs["raw", workers],
                    ">= 0.9x",
                ),
                _summary(
                    f"{label} {workers} / {label} 1", runs[side, workers], runs[side, 1], scaling
                ),
            ]
        for row in rows:
            row["documents"] = sum(1 for _ in open(corpus, "rb"))
        return rows
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def section(args: argparse.Namespace, corpora: object = None) -> list[dict]:
    """`tools/bench.py`'s section signature; `--quick` leaves out the Beam sides."""
    quick = getattr(args, "quick", False)
    return prepare_vs_raw(
        megabytes=getattr(args, "prepare_mb", None) or (2.0 if quick else DEFAULT_MB),
        rounds=getattr(args, "rounds", None) or (1 if quick else 3),
        beam=not quick,
    )


# --------------------------------------------------------------------------- standalone


def main(argv: list[str] | None = None) -> int:
    """Run the section and print its table (or, with `--side`, time one side as a child)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=DEFAULT_MB, help="corpus size in MB")
    parser.add_argument("--workers", type=int, default=None, help="N (default: CPU count)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-beam", action="store_true", help="leave out the Beam sides")
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows (and runs) here")
    parser.add_argument("--side", choices=["raw", "prepare", "beam"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side == "raw":
        print(json.dumps(_raw_side(args.corpus, args.workers)))
        return 0
    if args.side is not None:
        print(json.dumps(_prepare_side(args.corpus, args.out, args.workers, args.side == "beam")))
        return 0
    began, load = time.perf_counter(), os.getloadavg()
    rows = prepare_vs_raw(args.mb, args.workers, args.rounds, beam=not args.no_beam)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    # Imported here: spawned prepare workers re-import this script and must stay light.
    from tools.bench_common import format_table

    print(format_table("prepare vs the raw tokenizer", rows))
    print(
        f"\n{datetime.date.today()}, {platform.node()}: "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average "
        f"{load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; {args.mb:g} MB of text in one "
        f"jsonl file, {rows[0]['documents']:,} documents; {args.rounds} interleaved rounds, "
        f"{time.perf_counter() - began:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
