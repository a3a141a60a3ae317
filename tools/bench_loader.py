"""Loader sections of `tools/bench.py`: end to end against plain Grain, memory, state, EXP3 cost.

Every figure is measured in one process on the same generated shards as the packing section
(three domains cut from it), so ratios against Grain hold on a noisy shared machine.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from wf_data.data.deliver.factory import reader_of
from wf_data.data.deliver.loader import DataLoader
from wf_data.data.mix.exp3 import Exp3
from wf_data.data.mix.mixing import Exp3Policy, RowUniforms, draw_domains, mix_plans
from wf_data.data.read.pretrain import PretrainDataset
from wf_data.data.shards.sources import DocumentSource

DOMAINS = ("web", "code", "math")
# The data configs' default: batches planned and read in groups of 3.
LOADER_PREFETCH = 2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Slice:
    """Every `stride`-th document of a source from `start`: a cheap disjoint 'domain'."""

    def __init__(self, source: DocumentSource, start: int, stride: int):
        self.source = source
        self.indices = np.arange(start, len(source), stride)
        self.lengths = source.lengths[self.indices]
        self.fingerprint = f"{source.fingerprint}:{start}/{stride}"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.source[int(self.indices[index])]

    def __getitems__(self, indices):
        return self.source.__getitems__(self.indices[np.asarray(indices)].tolist())


def make_loader(corpus, args, framework="torch", **kwargs) -> DataLoader:
    """Three domains, best_fit, EXP3, torch tensors: what a trainer runs."""
    source = DocumentSource(corpus.path)
    datasets = {
        name: PretrainDataset(
            _Slice(source, index, len(DOMAINS)), seq_len=args.seq_len, seed=args.seed + index
        )
        for index, name in enumerate(DOMAINS)
    }
    policy = Exp3Policy(Exp3(len(DOMAINS), prior=[0.5, 0.2, 0.3], seed=args.seed))
    mixer = mix_plans({name: ds.plans for name, ds in datasets.items()}, policy, seed=args.seed)
    return DataLoader(
        mixer,
        reader_of(datasets),
        global_batch_size=args.batch_size,
        framework=framework,
        prefetch=args.prefetch,
        num_workers=getattr(args, "workers", 0),
        **kwargs,
    )


def _losses(step: int) -> np.ndarray:
    return np.array([2.5, 1.5, 2.0]) + 0.1 * np.sin(step)


def _run_loader(loader: DataLoader, batches: int) -> tuple[float, int]:
    start = time.perf_counter()
    real = 0
    for step in range(batches):
        batch = next(loader)
        real += int((batch["segment_ids"] > 0).sum())
        loader.update_mixture(_losses(step))
    return time.perf_counter() - start, real


def _grain_best_fit(corpus, args, batches: int, seconds: float = 20.0) -> tuple[float, int]:
    """Plain Grain: per-domain shuffle -> BestFitPack -> mix -> batch, as its docs build it.

    The first batch (bins filling) is not timed; the run stops after ``batches`` batches or
    ``seconds``, whichever comes first.
    """
    import grain

    source = DocumentSource(corpus.path)
    packed = []
    for index in range(len(DOMAINS)):
        domain = (
            grain.MapDataset.source(_Slice(source, index, len(DOMAINS)))
            .shuffle(seed=args.seed + index)
            .map(lambda tokens: {"tokens": np.asarray(tokens[: args.seq_len], np.int32)})
            .to_iter_dataset()
        )
        packed.append(
            grain.experimental.BestFitPackIterDataset(
                domain,
                length_struct={"tokens": args.seq_len},
                num_packing_bins=args.grain_bins,
                shuffle_bins=False,
            )
        )
    pipeline = grain.IterDataset.mix(packed, [0.5, 0.2, 0.3]).batch(args.batch_size)
    iterator = iter(pipeline)
    next(iterator)
    start = time.perf_counter()
    real = 0
    # Grain's mix ends with its first exhausted domain: a small corpus may end the run early.
    for batch, _ in zip(iterator, range(batches), strict=False):
        real += int((batch["tokens_segment_ids"] > 0).sum())
        if time.perf_counter() - start > seconds:
            break
    return time.perf_counter() - start, real


def bench_loader(args, corpus) -> list[dict]:
    """End-to-end loader throughput (torch tensors, EXP3 updates) beside plain Grain."""
    batches = 60 if args.quick else 400
    rows = []
    loader = make_loader(corpus, args)
    next(loader)  # planning caches warm, as in training
    seconds, real = _run_loader(loader, batches)
    ours = real / seconds
    grain_batches = max(20, batches // 10)
    grain_seconds, grain_real = _grain_best_fit(corpus, args, grain_batches)
    grain_speed = grain_real / grain_seconds
    rows.append(
        {
            "name": "wf-data loader (best_fit, EXP3, torch)",
            "tokens_per_s": ours,
            "batches": batches,
            "vs_grain": ours / grain_speed,
        }
    )
    rows.append(
        {
            "name": f"grain shuffle+BestFit({args.grain_bins})+mix+batch",
            "tokens_per_s": grain_speed,
            "batches": grain_batches,
            "vs_grain": 1.0,
        }
    )
    return rows


def bench_memory(args, corpus) -> list[dict]:
    """Resident memory after 1k and after 10k batches (must stay flat: < 5% growth)."""
    total = 2_000 if args.quick else 10_000
    loader = make_loader(corpus, args, framework="numpy")
    _run_loader(loader, 1_000 if not args.quick else 200)
    before = _rss_bytes()
    _run_loader(loader, total - (1_000 if not args.quick else 200))
    after = _rss_bytes()
    return [
        {
            "name": f"RSS after {total:,} batches",
            "rss_before_mb": before / 2**20,
            "rss_after_mb": after / 2**20,
            "growth": after / before - 1,
        }
    ]


def _state_at(corpus, args, steps: int) -> dict:
    """The state after `steps` batches, planned but only the last one read (a step shard)."""
    loader = make_loader(corpus, args, framework="numpy", step_shard=(steps - 1, steps))
    next(loader)
    return json.loads(json.dumps(loader.state_dict()))


def bench_state(args, corpus) -> list[dict]:
    """State size and restore time (restore + first batch) at step 1 and step 100k."""
    rows = []
    for steps in (1, 10_000 if args.quick else 100_000):
        state = _state_at(corpus, args, steps)
        fresh = make_loader(corpus, args, framework="numpy")
        start = time.perf_counter()
        fresh.load_state_dict(state)
        next(fresh)
        restore = time.perf_counter() - start
        rows.append(
            {
                "name": f"state at step {steps:,}",
                "state_bytes": len(json.dumps(state)),
                "restore_ms": 1e3 * restore,
            }
        )
    return rows


def bench_exp3_overhead(args, corpus) -> list[dict]:
    """Drawing a batch's domains plus one bandit update, K = 22 (target < 50 us per batch)."""
    del corpus
    bandit = Exp3(22, seed=args.seed)
    uniforms = RowUniforms(args.seed)
    losses = np.linspace(1.0, 3.0, 22)
    repeats = 2_000 if args.quick else 20_000
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for step in range(repeats):
            draw_domains(bandit.policy(), uniforms.take(step * args.batch_size, args.batch_size))
            bandit.update(losses)
        best = min(best, (time.perf_counter() - start) / repeats)
    name = f"EXP3 draw {args.batch_size} rows + update, K=22"
    return [{"name": name, "us_per_batch": 1e6 * best}]


SECTIONS = {
    "loader": bench_loader,
    "memory": bench_memory,
    "state": bench_state,
    "exp3": bench_exp3_overhead,
}
