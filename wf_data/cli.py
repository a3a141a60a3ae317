"""The `wf-data` command: `prepare` shards, `inspect` a prepared dataset.

Each subcommand is a pair of functions: `add_NAME_parser(subparsers)` declares its arguments and
`run_NAME(args) -> int` does the work, so subcommands are added without touching the others.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from wf_data.extras import MissingExtraError

PERCENTILES = (0, 10, 50, 90, 99, 100)
HISTOGRAM_WIDTH = 40
LENGTH_SAMPLE = 10_000  # text/chat: lengths measured on this many evenly spaced records


class CommandError(Exception):
    """A user-facing failure: printed as `wf-data CMD: error: MESSAGE`, exit status 1."""


# --------------------------------------------------------------------------- prepare


def add_prepare_parser(subparsers: Any) -> None:
    """`wf-data prepare INPUT... --out DIR`: inputs -> ArrayRecord shards + manifest."""
    parser = subparsers.add_parser(
        "prepare",
        help="write ArrayRecord shards + manifest.json from jsonl/parquet/txt inputs",
        description="Prepare jsonl, jsonl.gz, jsonl.zst, parquet and txt files (or directories "
        "of them) into a dataset directory. Deterministic and resumable: re-run the same "
        "command after an interruption and only unfinished shards are redone. The dataset is "
        "built beside --out and replaces it only once complete. Exit status 1 for a bad "
        "record; 2 for a damaged input file, an unusable --out, a failed write there (a full "
        "disk) or another prepare writing it.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories")
    parser.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    parser.add_argument(
        "--tokenizer",
        metavar="NAME_OR_PATH",
        help="store token arrays (format tokens); 'wf-data-demo' is the shipped tokenizer. "
        "Without it, text is stored for on-the-fly tokenization",
    )
    parser.add_argument(
        "--text-key",
        action="extend",
        type=_field_names,
        metavar="KEY",
        help="jsonl/parquet field holding the text (default text); repeat it or give KEY,KEY "
        "to join several fields with --text-separator, empty fields left out",
    )
    parser.add_argument(
        "--text-separator",
        default="\n\n",
        type=_unescape,
        metavar="SEP",
        help="between joined --text-key fields (default: a blank line); \\n, \\t, \\r and "
        "\\\\ are read as escapes, so '\\n\\n' is a blank line",
    )
    parser.add_argument(
        "--chat-key",
        metavar="KEY",
        help="store chat records {messages: [...]} from this field of [{role, content}] "
        "(e.g. messages); with --input-key/--output-key the default is messages",
    )
    parser.add_argument(
        "--input-key",
        metavar="KEY",
        help="Nemotron-style chat: records without --chat-key are [system, *KEY, assistant: "
        "--output-key], KEY a user string or a list of messages (default input)",
    )
    parser.add_argument(
        "--output-key",
        metavar="KEY",
        help="Nemotron-style chat: the assistant answer (default output)",
    )
    parser.add_argument(
        "--system-prompt-key",
        metavar="KEY",
        help="Nemotron-style chat: optional system prompt field (default system_prompt)",
    )
    parser.add_argument(
        "--shards", type=int, default=None, help="number of shards (default: one per 256 MiB)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--append-eos", action="store_true", help="end every document with eos")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad records instead of failing, each listed in DIR/skipped.jsonl (a damaged "
        "input file still fails)",
    )
    parser.add_argument(
        "--max-doc-bytes",
        type=int,
        default=None,
        metavar="N",
        help="records larger than N bytes are bad records (default 64 MiB; memory grows about "
        "4x with it)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset of other inputs or settings in --out (once the new one is "
        "complete)",
    )
    parser.add_argument("--name", default="data", help="shard file name prefix (default data)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--runner",
        choices=("local", "beam"),
        default="local",
        help="local: this machine with --workers processes (default); beam: an Apache Beam "
        "pipeline (pip install 'wf-data[beam]'), byte-identical output",
    )
    parser.add_argument(
        "--beam-options",
        default=None,
        metavar="OPTIONS",
        help="with --runner beam: Beam pipeline options in one string, given with '=' (its "
        "value starts with --), e.g. --beam-options='--runner=DirectRunner "
        "--direct_running_mode=multi_processing --direct_num_workers=2' (default: the "
        "in-process DirectRunner)",
    )
    parser.set_defaults(func=run_prepare)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _unescape(value: str) -> str:
    """`--text-separator` value with backslash escapes read: a shell passes '\\n' verbatim."""
    return re.sub(r"\\(.)", lambda match: _ESCAPES.get(match[1], match[0]), value)


def _field_names(value: str) -> list[str]:
    """`--text-key a,b` -> ["a", "b"]; an empty name is a usage error."""
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty field name in {value!r}")
    return names


def run_prepare(args: argparse.Namespace) -> int:
    """Run `prepare` (locally or on Beam) and print a closing summary; exit status 2 for a
    damaged or unreadable input file, an unusable --out, a failed write there (a full disk) or
    another prepare writing it (one line on stderr naming the file and the fix)."""
    prepare_module = importlib.import_module("wf_data.data.prepare")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _print_warning
            manifest = _prepare(args)
    except (prepare_module.InputFileError, prepare_module.OutDirError) as error:
        print(f"wf-data prepare: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an input (the output's failures are OutDirErrors)
        named = error.filename is not None and error.strerror is not None
        print(
            f"wf-data prepare: error: {f'{error.filename}: {error.strerror}' if named else error}",
            file=sys.stderr,
        )
        return 2
    _print_prepare_summary(args, manifest)
    return 0


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"wf-data prepare: warning: {message}", file=sys.stderr)


def _prepare(args: argparse.Namespace) -> dict:
    from wf_data.data.prepare import PrepareOptions

    options = PrepareOptions(
        tokenizer=args.tokenizer,
        text_key=args.text_key or "text",
        text_separator=args.text_separator,
        chat_key=args.chat_key,
        input_key=args.input_key,
        output_key=args.output_key,
        system_prompt_key=args.system_prompt_key,
        num_shards=args.shards,
        append_eos=args.append_eos,
        skip_bad=args.skip_bad,
        name=args.name,
        **({} if args.max_doc_bytes is None else {"max_doc_bytes": args.max_doc_bytes}),
    )
    if args.runner == "beam":
        return _prepare_on_beam(args, options)
    if args.beam_options is not None:
        raise CommandError("--beam-options applies to --runner beam")
    from wf_data.data.prepare import prepare

    return prepare(
        args.inputs,
        args.out,
        options,
        workers=args.workers,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )


def _print_prepare_summary(args: argparse.Namespace, manifest: dict) -> None:
    totals, summary = manifest["totals"], manifest["summary"]
    print(f"prepared {args.out}: format {manifest['format']}, {len(manifest['shards'])} shards")
    print(
        f"  records {totals['records']:,}  tokens {totals['tokens']:,}  "
        f"dropped empty {totals['dropped_empty']:,}  skipped bad {totals['skipped_bad']:,}"
    )
    print(
        f"  {summary['elapsed_s']:.1f} s  {summary['documents_per_s']:,.0f} docs/s  "
        f"{summary['tokens_per_s']:,.0f} tokens/s  "
        f"(parts run {summary['parts_run']}, shards written {summary['shards_written']})"
    )
    print(f"  fingerprint {manifest['fingerprint']}")
    if totals["skipped_bad"]:
        shown = summary.get("skipped", [])  # the Beam runner reports none
        print(f"  skipped records (first {len(shown)}; all in {args.out}/skipped.jsonl):")
        for entry in shown:
            print(f"    {entry['error']}")


def _prepare_on_beam(args: argparse.Namespace, options: Any) -> dict:
    """`prepare --runner beam`: the Beam pipeline of wf_data.data.prepare.beam, run to the end."""
    if args.workers != 1:
        raise CommandError(
            "--workers applies to --runner local; Beam sets its own parallelism "
            "(--beam-options='--direct_num_workers=N', or the cluster runner's worker options)"
        )
    from wf_data.data.prepare import beam as prepare_beam

    return prepare_beam.run(
        args.inputs,
        args.out,
        options,
        pipeline_options=args.beam_options,
        overwrite=args.overwrite,
    )


# --------------------------------------------------------------------------- inspect


def add_inspect_parser(subparsers: Any) -> None:
    """`wf-data inspect DIR`: counts, length percentiles and histogram, integrity, samples."""
    parser = subparsers.add_parser(
        "inspect",
        help="summarise a prepared dataset directory",
        description="Records, tokens, length percentiles and histogram, shard integrity "
        "(--verify checks every file's sha256 and each record's length) and decoded samples.",
    )
    parser.add_argument("path", metavar="DIR", help="dataset directory (with manifest.json)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check the sha256 of every file and recompute the token lengths from the records",
    )
    parser.add_argument("--samples", type=int, default=3, help="decoded samples to print")
    parser.add_argument(
        "--tokenizer",
        metavar="NAME_OR_PATH",
        help="decode with this tokenizer (default: the one named in the manifest)",
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="also save the length histogram and totals as a PNG"
    )
    parser.set_defaults(func=run_inspect)


def _lengths(source: Any) -> tuple[np.ndarray, str, bool]:
    """(lengths, unit, sampled): token counts, or characters on an even sample for text/chat."""
    if source.lengths is not None:
        return np.asarray(source.lengths), "tokens", False
    count = min(len(source), LENGTH_SAMPLE)
    indices = np.linspace(0, len(source) - 1, count).astype(np.int64) if count else []
    records = source.__getitems__(list(indices))
    if source.format == "chat":
        sizes = [sum(len(m["content"]) for m in record["messages"]) for record in records]
    else:
        sizes = [len(record) for record in records]
    return np.asarray(sizes, dtype=np.int64), "characters", count < len(source)


def length_histogram(lengths: np.ndarray, width: int = HISTOGRAM_WIDTH) -> list[str]:
    """Text histogram of `lengths` ((N,) ints) over power-of-two buckets, one line a bucket."""
    if lengths.size == 0:
        return ["  (no records)"]
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    counts = np.bincount(buckets - buckets.min())
    lines = []
    for offset, count in enumerate(counts):
        low = 1 << (int(buckets.min()) + offset)
        bar = "#" * int(round(width * count / counts.max()))
        lines.append(f"  [{low:>9,}, {2 * low:>9,})  {count:>10,}  {bar}")
    return lines


def _decoder(manifest: dict, tokenizer_name: str | None):
    """A `ids -> str` decoder for token samples, or None when no tokenizer can be loaded."""
    name = tokenizer_name or (manifest.get("tokenizer") or {}).get("name")
    if name is None:
        return None
    try:
        from wf_data.data.text.tokenization import TokenizerWrapper

        tokenizer = TokenizerWrapper.from_pretrained(name, add_bos=False, add_eos=False)
    except (ImportError, OSError, ValueError) as error:
        print(f"  (cannot load tokenizer {name!r} to decode samples: {error})")
        return None
    return tokenizer.decode


def _show(record: Any, decode: Any, limit: int = 300) -> str:
    if isinstance(record, np.ndarray):
        text = decode(record) if decode else f"ids {record[:40].tolist()}"
        text = f"[{record.size} tokens] {text}"
    elif isinstance(record, dict):
        text = " | ".join(f"{m['role']}: {m['content']}" for m in record["messages"])
    else:
        text = record
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + "..."


def run_inspect(args: argparse.Namespace) -> int:
    """Print the summary of a dataset directory; exit status 1 when integrity checks fail."""
    from wf_data.data.shards.sources import open_dataset, read_manifest, verify_dataset

    manifest = read_manifest(args.path)
    totals = manifest["totals"]
    tokenizer = manifest.get("tokenizer") or {}
    print(f"dataset {args.path}  name {manifest['name']}  format {manifest['format']}")
    if manifest["format"] == "tokens":
        print(
            f"  tokenizer {tokenizer.get('name')} (vocab {tokenizer.get('vocab_size')}, "
            f"eos {tokenizer.get('eos_id')})  dtype {manifest['token_dtype']}  "
            f"append_eos {manifest['append_eos']}"
        )
    print(
        f"  records {totals['records']:,}  tokens {totals['tokens']:,}  shards "
        f"{len(manifest['shards'])}  dropped empty {totals['dropped_empty']:,}  "
        f"skipped bad {totals['skipped_bad']:,}"
    )
    print(f"  fingerprint {manifest['fingerprint']}")
    # Verify before opening: opening refuses a dataset whose cheap checks fail, and --verify
    # should list every problem instead.
    problems = verify_dataset(args.path, contents=args.verify)
    checked = (
        "sha256 of every file, record counts and lengths"
        if args.verify
        else "record counts (--verify: sha256 and lengths)"
    )
    if problems:
        print(f"integrity: FAILED ({checked})")
        print("\n".join(f"  {problem}" for problem in problems))
        return 1  # reading records of a corrupt shard would only fail further down
    source = open_dataset(args.path)
    print(f"integrity: OK, {len(source.shard_paths)} shards ({checked})")
    lengths, unit, sampled = _lengths(source)
    if lengths.size:
        values = np.percentile(lengths, PERCENTILES).round().astype(np.int64)
        cells = "  ".join(f"p{p} {v:,}" for p, v in zip(PERCENTILES, values, strict=True))
        suffix = f" (sample of {lengths.size:,})" if sampled else ""
        print(f"length in {unit}{suffix}: mean {lengths.mean():,.1f}  {cells}")
    print(f"histogram of length in {unit}:")
    print("\n".join(length_histogram(lengths)))
    if args.plot and lengths.size:
        from wf_data import viz

        title = f"{manifest['name']}: length in {unit}" + (" (sample)" if sampled else "")
        print(f"plot: {viz.save_figure(viz.plot_dataset_summary(lengths, title), args.plot)}")
    if args.samples > 0 and len(source):
        decode = _decoder(manifest, args.tokenizer) if source.format == "tokens" else None
        indices = np.linspace(0, len(source) - 1, min(args.samples, len(source))).astype(int)
        print(f"samples ({len(indices)} evenly spaced):")
        for index, record in zip(indices, source.__getitems__(indices.tolist()), strict=True):
            print(f"  #{index}: {_show(record, decode)}")
    return 0


# --------------------------------------------------------------------------- demo


def add_demo_parser(subparsers: Any) -> None:
    """Registers `wf-data demo`; torch is imported only when the demo runs."""
    parser = subparsers.add_parser(
        "demo",
        help="the main job on the embedded corpus: train a tiny model with EXP3, save, resume",
        description="Prepares the embedded three-domain corpus (cached), trains a tiny "
        "random-init Llama on CPU with the EXP3 mixture fed by the per-domain loss, shows the "
        "weights move, saves and restores model + optimizer + loader, checks that the next "
        "batches are identical, and prints a summary. With --compare it also trains the same "
        "model on the static mixture and prints both arms' held-out losses.",
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 150)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 256)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default 8)")
    parser.add_argument("--seed", type=int, default=None, help="data and model seed (default 0)")
    parser.add_argument("--out", default=None, help="checkpoint directory (default: a temp dir)")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also train a static arm (same seed, model init and tokens) and say which won",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="demo data-config overrides for every arm, e.g. mixing.alpha=0.8",
    )
    parser.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from wf_data.demo import DemoOptions, run_demo

    given = {
        "steps": args.steps,
        "seq_len": args.seq_len,
        "global_batch_size": args.batch_size,
        "seed": args.seed,
        "out_dir": args.out,
    }
    options = DemoOptions(
        **{k: v for k, v in given.items() if v is not None},
        compare=args.compare,
        overrides=tuple(args.overrides),
    )
    summary = run_demo(options)
    return 0 if summary["resume_identical"] else 1


def add_stream_parser(subparsers: Any) -> None:
    """Registers `wf-data stream` (implemented in wf_data.stream)."""
    from wf_data.stream import add_stream_parser as add

    add(subparsers)


# --------------------------------------------------------------------------- the command

# Subcommand registry: (name, add-parser function), in the order `wf-data --help` lists them.
SUBCOMMANDS = [
    ("prepare", add_prepare_parser),
    ("inspect", add_inspect_parser),
    ("demo", add_demo_parser),
    ("stream", add_stream_parser),
]


def build_parser() -> argparse.ArgumentParser:
    """The `wf-data` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="wf-data", description="Deterministic, resumable data loading for LLM training."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _, add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `wf-data` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CommandError, ValueError, FileNotFoundError, MissingExtraError) as error:
        print(f"wf-data {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
