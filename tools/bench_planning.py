"""Planning at scale, from document lengths only: per-step cost per rank, and first batch latency.

    uv run python tools/bench_planning.py            # the README grid (a few minutes)
    uv run python tools/bench_planning.py --quick    # a small grid (smoke run)

Every data-parallel rank plans the *global* batch (domain draws + packing plans, from lengths)
and reads only its own rows, so what a rank pays for planning depends on the global batch
rows, the number of domains and the documents, never on the number of ranks. This tool
measures that cost on synthetic lengths (lognormal(6, 1.1), or lognormal(4, 1) with
`--lengths short`): one child process per grid cell (global batch rows x domains x total
documents), so that memory figures are the cell's own.

Per cell: planning ms/step (median of 3 rounds of steady-state steps; the first step,
building the planner included, is its own column), the share of a 1 s and a 10 s training
step, the lengths array every rank holds (input), the numpy arrays the planner holds after
the measurement (found by walking its objects, lengths excluded), and the RSS growth and peak
RSS growth over the lengths-loaded baseline. Token reads are excluded: the documents raise
if read. `bench_first_batch` (the `first_batch` section of `tools/bench.py`) times the first
batch at 1M/10M/100M documents over documents whose tokens cost no I/O.

`make_global_planner` and `first_batch_loader` are the only functions that build wf-data's
mixer by hand: adapt them when that API changes. `SECTIONS` are this module's sections of
`tools/bench.py`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

from tools.bench_common import (
    CACHE_DIR,
    LENGTHS,
    CutTo,
    LengthsOnly,
    SyntheticDocuments,
    grain_domain,
    grain_packer,
    synthetic_lengths,
)

NOISE_NOTE = "on a machine that others may share, figures are upper bounds"
STEP_SECONDS = (1.0, 10.0)


# --------------------------------------------------------------------------- synthetic data


# --------------------------------------------------------------------------- wf-data's sides


def _losses(num_domains: int, step: int) -> np.ndarray:
    """(K,) per-domain losses that move every step, so EXP3 keeps changing the mixture."""
    return np.linspace(1.0, 3.0, num_domains) + 0.1 * np.sin(step + np.arange(num_domains))


def make_global_planner(
    domain_lengths: list[np.ndarray], *, seq_len: int, rows: int, seed: int
) -> tuple[Callable[[int], int], object]:
    """What every rank runs each step: draw the domains of `rows` global rows, plan them
    (best_fit from lengths), then the EXP3 update. Returns (step(i) -> rows planned, the
    object holding all planning state)."""
    from wf_data.data import Exp3, Exp3Policy, batch_plans, mix_plans, plan_best_fit

    plans = {
        f"d{index}": plan_best_fit(
            LengthsOnly(lengths, f"d{index}"), seq_len, seed=seed + index, num_epochs=None
        )
        for index, lengths in enumerate(domain_lengths)
    }
    mixer = mix_plans(plans, Exp3Policy(Exp3(len(plans), seed=seed)), seed=seed)
    batches = iter(batch_plans(mixer, rows, domain_names=list(plans)))

    def step(index: int) -> int:
        planned = len(next(batches)["row_pieces"])
        mixer.update(_losses(len(plans), index))
        return planned

    return step, batches


def first_batch_loader(source, args) -> None:
    """The loader (best_fit + EXP3, numpy) over `source`, up to its first batch."""
    from wf_data.data import DataLoader, Exp3, Exp3Policy, mix_plans, pack

    packed = pack(source, args.seq_len, "best_fit", seed=args.seed, num_epochs=None)
    mixer = mix_plans({"synthetic": packed.plans}, Exp3Policy(Exp3(1)), seed=args.seed)
    loader = DataLoader(
        mixer, packed.reader, global_batch_size=args.batch_size, prefetch=args.prefetch
    )
    next(loader)
    loader.close()


def first_row_packer(source, args, method: str) -> None:
    """The bare packer `method` over `source`, up to its first row."""
    from wf_data.data import pack

    next(iter(pack(source, args.seq_len, method, seed=args.seed, num_epochs=None)))


def first_batch_grain(source, args) -> None:
    """Plain Grain over `source`: shuffle -> BestFit -> batch, up to its first batch."""
    packed = grain_packer(
        "BestFit",
        grain_domain(source, args.seed, CutTo(args.seq_len)),
        args.seq_len,
        args.grain_bins,
        args.seed,
    )
    next(iter(packed.batch(args.batch_size)))


# --------------------------------------------------------------------------- first batch


# A side whose first batch takes longer than this is not run again (its row says how often it
# ran): 3 rounds of a 20 s start-up would only measure the machine's load.
SLOW_FIRST_BATCH_S = 5.0


def bench_first_batch(args) -> list[dict]:
    """First batch latency vs documents (interleaved rounds, median and min-max)."""
    sides = {
        "wf-data loader best_fit+EXP3": first_batch_loader,
        "wf-data best_fit packer, first row": lambda s, a: first_row_packer(s, a, "best_fit"),
        "wf-data concat packer, first row": lambda s, a: first_row_packer(s, a, "concat"),
        f"grain shuffle+BestFit({args.grain_bins})+batch": first_batch_grain,
    }
    rows = []
    for num_docs in args.first_batch_docs:
        source = SyntheticDocuments(
            synthetic_lengths(num_docs, args.seed, args.cache_dir), "first-batch", args.seed
        )
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, side in sides.items():
                if seconds[name] and seconds[name][-1] > SLOW_FIRST_BATCH_S:
                    continue
                gc.collect()
                start = time.perf_counter()
                side(source, args)
                seconds[name].append(time.perf_counter() - start)
        for name, values in seconds.items():
            ms = [1e3 * value for value in values]
            row = {
                "name": name,
                "documents": num_docs,
                "rounds": len(ms),
                "first_ms": statistics.median(ms),
                "first_spread": (min(ms), max(ms)),
            }
            if name.startswith("wf-data loader") and num_docs >= 100_000_000:
                row["target"] = "< 100 ms"
            rows.append(row)
        del source
        gc.collect()
    return rows


# --------------------------------------------------------------------------- planning only


def _planning_round(domain_lengths: list[np.ndarray], rows: int, args) -> dict:
    """One round of one cell: a fresh global planner, its first step, then steady steps for
    `args.planning_seconds` (at least `args.min_steps`)."""
    gc.collect()
    start = time.perf_counter()
    step, _ = make_global_planner(domain_lengths, seq_len=args.seq_len, rows=rows, seed=args.seed)
    step(0)
    first = time.perf_counter() - start
    steps: list[float] = []
    cpu: list[float] = []  # this thread's CPU seconds: what the step costs whatever else runs
    begin = time.perf_counter()
    while len(steps) < args.min_steps or time.perf_counter() - begin < args.planning_seconds:
        tick, cpu_tick = time.perf_counter(), time.thread_time()
        if step(len(steps) + 1) != rows:
            raise RuntimeError(f"a step planned fewer than {rows} rows")
        steps.append(time.perf_counter() - tick)
        cpu.append(time.thread_time() - cpu_tick)
    mean, cpu_mean = sum(steps) / len(steps), sum(cpu) / len(cpu)
    return {
        "first": first,
        "mean": mean,
        "max": max(steps),
        "cpu_mean": cpu_mean,
        "cpu_max": max(cpu),
        "steps": len(steps),
    }


def bench_planning_only(args, corpora=None) -> list[dict]:
    """Planning alone, as every rank runs it: best_fit + EXP3 updated every step over 3 domains
    of synthetic long-document lengths (no token read), per global row and per step, with the
    worst step against the mean (interleaved rounds, median and min-max), in wall time and in
    this thread's CPU time (unaffected by other processes on a shared machine)."""
    del corpora
    cells = [(docs, rows) for docs in args.planning_docs for rows in args.planning_rows]
    lengths = {docs: synthetic_lengths(docs, args.seed, args.cache_dir) for docs, _ in cells}
    results: dict[tuple[int, int], list[dict]] = {cell: [] for cell in cells}
    for _ in range(args.rounds):
        for docs, rows in cells:
            domains = np.array_split(lengths[docs], 3)  # views: no copy
            results[docs, rows].append(_planning_round(domains, rows, args))
    table = []
    for (docs, rows), rounds in results.items():
        per_row = [1e6 * r["mean"] / rows for r in rounds]
        burst = [r["max"] / r["mean"] for r in rounds]
        table.append(
            {
                "name": f"best_fit + EXP3, 3 domains, {rows:,} rows a step",
                "documents": docs,
                "rounds": len(rounds),
                "us_per_row": statistics.median(per_row),
                "us_per_row_spread": (min(per_row), max(per_row)),
                "ms_per_step": statistics.median(1e3 * r["mean"] for r in rounds),
                "cpu_us_per_row": statistics.median(1e6 * r["cpu_mean"] / rows for r in rounds),
                "cpu_max_over_mean": statistics.median(
                    r["cpu_max"] / r["cpu_mean"] for r in rounds
                ),
                "max_over_mean": statistics.median(burst),
                "max_over_mean_spread": (min(burst), max(burst)),
                "first_ms": statistics.median(1e3 * r["first"] for r in rounds),
                "steps": statistics.median(r["steps"] for r in rounds),
                "target": "<= 1 us a row, worst step <= 3x mean",
            }
        )
    return table


SECTIONS = {
    "first_batch": lambda args, corpora: bench_first_batch(args),
    "planning": bench_planning_only,
}


# --------------------------------------------------------------------------- planning cost


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> None:
    """Linux: resets VmHWM to the current RSS, so the peak measured is this cell's own."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def held_array_bytes(root: object, exclude: list[np.ndarray]) -> int:
    """Bytes of the distinct numpy buffers reachable from `root`, minus those of `exclude`.

    Walks instance dicts, containers and closures; not classes, modules or
    functions' globals, so it counts what the planner holds, not the library.
    """
    excluded = {id(array) for array in exclude}
    seen: set[int] = set()
    buffers: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type | type(sys) | str | bytes | int | float):
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            base = obj
            while isinstance(base.base, np.ndarray):
                base = base.base
            if id(base) not in excluded:
                buffers[id(base)] = base.nbytes
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif callable(obj) and hasattr(obj, "__closure__"):
            stack.extend(cell.cell_contents for cell in obj.__closure__ or ())
        elif hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    return sum(buffers.values())


def measure_cell(num_docs: int, num_domains: int, rows: int, args) -> dict:
    """One grid cell, in this process: planning ms/step and memory (see the module doc)."""
    lengths = synthetic_lengths(num_docs, args.seed, args.cache_dir, args.lengths)
    domain_lengths = np.array_split(lengths, num_domains)  # views: no copy
    # Imports and first-call caches on a tiny planner, so the baseline is the library's.
    warm_step, _ = make_global_planner(
        [lengths[:10_000]] * num_domains, seq_len=args.seq_len, rows=rows, seed=args.seed
    )
    warm_step(0)
    del warm_step
    gc.collect()
    rss_base = _status_kb("VmRSS")
    _reset_peak_rss()
    start = time.perf_counter()
    step, holder = make_global_planner(
        domain_lengths, seq_len=args.seq_len, rows=rows, seed=args.seed
    )
    planned = step(0)
    first_ms = 1e3 * (time.perf_counter() - start)
    step_ms: list[float] = []
    round_means = []
    index = 1
    for _ in range(args.rounds):
        begin, count = time.perf_counter(), 0
        while count < args.min_steps or time.perf_counter() - begin < args.seconds:
            tick = time.perf_counter()
            planned = step(index)
            step_ms.append(1e3 * (time.perf_counter() - tick))
            if planned != rows:
                raise RuntimeError(f"step {index} planned {planned} rows, expected {rows}")
            index += 1
            count += 1
        round_means.append(1e3 * (time.perf_counter() - begin) / count)
    ms = statistics.median(round_means)
    return {
        "documents": num_docs,
        "domains": num_domains,
        "rows": rows,
        "steps": index,
        "ms_per_step": ms,
        "ms_spread": (min(round_means), max(round_means)),
        "max_step_ms": max(step_ms),
        "first_step_ms": first_ms,
        **{f"pct_{int(s)}s": 100 * ms / (1e3 * s) for s in STEP_SECONDS},
        "lengths_mb": lengths.nbytes / 2**20,
        "planner_arrays_mb": held_array_bytes(holder, [lengths]) / 2**20,
        "rss_delta_mb": (_status_kb("VmRSS") - rss_base) / 1024,
        "peak_rss_delta_mb": (_status_kb("VmHWM") - rss_base) / 1024,
    }


def run_grid(args) -> list[dict]:
    """Every cell in a child process (fresh memory); lengths files are made here first."""
    for num_docs in args.documents:
        synthetic_lengths(num_docs, args.seed, args.cache_dir, args.lengths)
    results = []
    for num_docs in args.documents:
        for num_domains in args.domains:
            for rows in args.rows:
                cell = [str(num_docs), str(num_domains), str(rows)]
                command = [sys.executable, __file__, "--cell", *cell, *_child_flags(args)]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode:
                    raise RuntimeError(f"cell {cell} failed:\n{done.stderr[-4000:]}")
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(format_row(results[-1]), flush=True)
    return results


def _child_flags(args) -> list[str]:
    return [
        "--seq-len",
        str(args.seq_len),
        "--seed",
        str(args.seed),
        "--rounds",
        str(args.rounds),
        "--seconds",
        str(args.seconds),
        "--min-steps",
        str(args.min_steps),
        "--cache-dir",
        str(args.cache_dir),
        "--lengths",
        args.lengths,
    ]


# --------------------------------------------------------------------------- output


HEADER = (
    "| documents | domains | global batch rows | planning ms/step | min-max | worst step | "
    "first step | % of 1 s step | % of 10 s step | lengths | planner arrays | RSS growth | "
    "peak RSS growth |"
)


def _count(value: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if value >= size and value % size == 0:
            return f"{value // size}{unit}"
    return f"{value:,}"


def format_row(cell: dict) -> str:
    """One markdown row of `HEADER` for a measured cell."""
    low, high = cell["ms_spread"]
    return (
        f"| {_count(cell['documents'])} | {cell['domains']} | {cell['rows']:,} | "
        f"{cell['ms_per_step']:.2f} | {low:.2f}-{high:.2f} | {cell['max_step_ms']:.1f} ms | "
        f"{cell['first_step_ms']:.0f} ms | {cell['pct_1s']:.2f}% | {cell['pct_10s']:.3f}% | "
        f"{cell['lengths_mb']:.0f} MB | {cell['planner_arrays_mb']:.1f} MB | "
        f"{cell['rss_delta_mb']:.0f} MB | {cell['peak_rss_delta_mb']:.0f} MB |"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; unset grid axes take their full or `--quick` defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small grid (smoke run)")
    parser.add_argument(
        "--documents",
        type=int,
        nargs="+",
        default=None,
        help="total documents (default 1M 10M 100M)",
    )
    parser.add_argument("--domains", type=int, nargs="+", default=None, help="default 1 8 64")
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=None,
        help="global batch rows (default 256 1024 4096)",
    )
    parser.add_argument(
        "--lengths",
        choices=sorted(LENGTHS),
        default="long",
        help="document lengths: long lognormal(6, 1.1), short lognormal(4, 1)",
    )
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="minimum seconds per round (default 1, --quick 0.1)",
    )
    parser.add_argument("--min-steps", type=int, default=5, help="minimum steps per round")
    parser.add_argument(
        "--cache-dir",
        type=pathlib.Path,
        default=CACHE_DIR,
    )
    parser.add_argument(
        "--cell",
        type=int,
        nargs=3,
        metavar=("DOCS", "DOMAINS", "ROWS"),
        help="measure one cell in this process and print it as JSON",
    )
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args(argv)
    defaults = {
        "documents": [100_000] if args.quick else [1_000_000, 10_000_000, 100_000_000],
        "domains": [1, 8] if args.quick else [1, 8, 64],
        "rows": [256] if args.quick else [256, 1024, 4096],
        "seconds": 0.1 if args.quick else 1.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the grid (or one `--cell`), prints the markdown table and returns the cells."""
    args = parse_args(argv)
    if args.cell:
        print(json.dumps(measure_cell(*args.cell, args)))
        return []
    print(
        f"# wf-data planning cost per rank ({NOISE_NOTE}; {os.cpu_count()} CPUs, load "
        f"average {os.getloadavg()[0]:.2f} at start)"
    )
    print(
        f"{args.lengths} documents: lognormal{LENGTHS[args.lengths]} lengths split evenly over "
        f"the domains, best_fit (default window) + EXP3 updated every step, "
        f"seq_len {args.seq_len}; {args.rounds} rounds of >= {args.seconds} s, median\n"
    )
    print(HEADER)
    print("|" + " ---: |" * (HEADER.count("|") - 1))
    results = run_grid(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
