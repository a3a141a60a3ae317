"""ProcessMap throughput and start-up: results/s for 0, 1, 2 workers, time to first result.

    uv run python tools/bench_process_map.py [--results 300] [--work 0] [--rounds 3]

Each element is a plan ``{"row": r}``; ``fn`` reads rows ``r..r+8`` of a ``(rows, 2048)`` int32
memmap and returns four ``(8, 2048)`` int32 arrays (input_ids, labels, position_ids,
segment_ids: 256 KiB per result), after ``--work`` extra passes of sorting one row (a stand-in
for decoding and packing). Medians of ``--rounds``; first-result time includes the pool start.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

ROWS, SEQ_LEN, BATCH = 4096, 2048, 8
_MEMMAPS: dict[str, np.ndarray] = {}


class MemmapRows:
    """``fn``: a (8, 2048) int32 batch read from a memmap, plus three derived arrays."""

    def __init__(self, path: str, work: int):
        self.path = path
        self.work = work

    def __call__(self, plan: dict) -> dict[str, np.ndarray]:
        tokens = _MEMMAPS.get(self.path)
        if tokens is None:
            tokens = _MEMMAPS[self.path] = np.memmap(self.path, np.int32, "r").reshape(-1, SEQ_LEN)
        input_ids = np.array(tokens[plan["row"] : plan["row"] + BATCH])
        for _ in range(self.work):
            np.sort(input_ids[0])
        labels = np.roll(input_ids, -1, axis=1)
        labels[:, -1] = -100
        position_ids = np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), input_ids.shape)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": np.ascontiguousarray(position_ids),
            "segment_ids": np.ones_like(input_ids),
        }


def run_once(fn, num_workers: int, num_results: int) -> tuple[float, ...]:
    """Seconds to the first result and CPU seconds worker 0 spent to get there (start-up),
    then over the results after the first: results/s, this process's and the workers' CPU ms
    per result. CPU times hold on a loaded machine, wall times do not."""
    import grain

    from wf_data.data.workers.process_map import ProcessMap

    rows = np.random.default_rng(0).integers(0, ROWS - BATCH, size=num_results + 1)
    plans = grain.MapDataset.source(rows).map(lambda row: {"row": int(row)})  # no reader threads
    start = time.perf_counter()
    with iter(ProcessMap(plans, fn, num_workers=num_workers, lookahead=2 * num_workers + 2)) as it:
        next(it)
        first = time.perf_counter()
        start_cpu = _cpu_seconds(it.worker_pids[:1])  # worker 0 computed the first result
        main_cpu, worker_cpu = time.process_time(), _cpu_seconds(it.worker_pids)
        for _ in it:
            pass
        end = time.perf_counter()
        main_cpu = time.process_time() - main_cpu
        worker_cpu = _cpu_seconds(it.worker_pids) - worker_cpu
    ms = 1e3 / num_results
    return first - start, start_cpu, num_results / (end - first), main_cpu * ms, worker_cpu * ms


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of processes ``pids`` so far (Linux /proc)."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=300)
    parser.add_argument("--work", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from tools import bench_process_map  # workers unpickle fn from a module, not __main__

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokens.int32")
        np.random.default_rng(0).integers(0, 32000, (ROWS, SEQ_LEN), dtype=np.int32).tofile(path)
        fn = bench_process_map.MemmapRows(path, args.work)
        print(f"cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}, work {args.work}")
        print(
            "workers  first_result_s  worker_start_cpu_s  results_per_s  MiB_per_s  "
            "main_cpu_ms  worker_cpu_ms"
        )
        for num_workers in (0, 1, 2):
            runs = [run_once(fn, num_workers, args.results) for _ in range(args.rounds)]
            medians = (statistics.median(column) for column in zip(*runs, strict=True))
            first, start_cpu, rate, main_cpu, worker_cpu = medians
            mib = rate * 4 * BATCH * SEQ_LEN * 4 / 2**20
            print(
                f"{num_workers:7d}  {first:14.3f}  {start_cpu:18.3f}  {rate:13.0f}  {mib:9.0f}  "
                f"{main_cpu:11.3f}  {worker_cpu:13.3f}"
            )


if __name__ == "__main__":
    main()
