"""`wf-data stream`: run a loader for N steps with a live bar (tokens/s, fill, mixture)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from tqdm import tqdm


def _positive_int(text: str) -> int:
    """An int >= 1, for --steps (0 used to stream one batch anyway)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def add_stream_parser(subparsers: Any) -> None:
    """Registers `wf-data stream [--config NAME] [--steps N] [overrides...]`."""
    parser = subparsers.add_parser(
        "stream",
        help="run the loader for N steps with a live progress bar",
        description="Runs get_loader(config) for --steps batches and reports tokens/s, fill and "
        "the mixture weights. Positional arguments are Hydra-style overrides of the data config "
        "(seq_len=512 mixing.kind=static ...).",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--config", default="demo", help="data config name or YAML path")
    parser.add_argument("--steps", type=_positive_int, default=200, help="batches to stream")
    parser.add_argument("--dp-rank", type=int, default=0)
    parser.add_argument("--dp-world-size", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None, help="worker processes")
    parser.add_argument(
        "--framework", choices=("numpy", "torch", "jax"), default="numpy", help="batch arrays"
    )
    parser.set_defaults(func=run_stream)


def run_stream(args: argparse.Namespace) -> int:
    from wf_data.data.deliver.factory import get_loader

    if args.config == "demo":
        from wf_data.data.prepare.demo_corpus import ensure_demo_data

        ensure_demo_data()
    loader = get_loader(
        args.config,
        overrides=args.overrides,
        dp_rank=args.dp_rank,
        dp_world_size=args.dp_world_size,
        num_workers=args.workers,
        framework=args.framework,
    )
    started = time.perf_counter()
    steps = 0
    with loader, tqdm(total=args.steps, desc="streaming", unit="batch") as bar:
        for _ in loader:
            steps += 1
            stats = loader.stats()
            elapsed = time.perf_counter() - started
            weights = " ".join(f"{n}={w:.2f}" for n, w in loader.mixture.items())
            bar.update(1)
            bar.set_postfix_str(
                f"{stats['data/tokens_served'] / elapsed / 1e6:.2f}M tok/s "
                f"fill={stats['data/fill']:.3f} {weights}"
            )
            if steps >= args.steps:
                break
    elapsed = time.perf_counter() - started
    stats = loader.stats()
    print(
        f"{steps} batches, {stats['data/tokens_served']:.0f} real tokens in {elapsed:.2f} s "
        f"({stats['data/tokens_served'] / elapsed / 1e6:.2f}M tokens/s over all ranks' rows), "
        f"fill {stats['data/fill']:.4f}"
    )
    if steps < args.steps:
        print(
            f"the data ended after {steps} of {args.steps} batches (num_epochs "
            f"{loader.recipe.config.num_epochs}; a partial last global batch is dropped)"
        )
    for name in loader.domain_names:
        print(
            f"  {name:<16} weight {stats[f'data/weight/{name}']:.3f}  row share "
            f"{stats[f'data/row_share/{name}']:.3f}  token share "
            f"{stats[f'data/token_share/{name}']:.3f}"
        )
    return 0
