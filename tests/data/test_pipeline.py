"""A user's own Grain pipeline from wf-data parts (issue 11, "done when").

Plain Grain calls sit between every stage: a `.filter` on one domain's plans, a `.shuffle`
on another's, a `.map` on the rows. The pipeline runs with 0 and 2 worker processes with EXP3
updates in between, is checkpointed with `get_state/set_state` and with Grain's own Orbax
handler (`grain.checkpoint.CheckpointSave/CheckpointRestore`), and resumes exactly.
"""

from __future__ import annotations

import contextlib
import json

import grain
import numpy as np
import pytest

from wf_data.data.mix.exp3 import Exp3
from wf_data.data.mix.mixing import Exp3Policy, mix_plans
from wf_data.data.plan.batching import batch_plans
from wf_data.data.read.packing import pack
from wf_data.data.read.rows import read_rows
from wf_data.data.shards.sources import InMemorySource
from wf_data.data.workers.process_map import ProcessMap

SEQ_LEN = 24
NAMES = ("prose", "code", "math")


def domain_docs(domain: int) -> InMemorySource:
    rng = np.random.default_rng([5, domain])
    return InMemorySource(
        [
            (domain * 100_000 + doc * 100 + np.arange(n) % 100).astype(np.uint32)
            for doc, n in enumerate(rng.integers(2, 60, size=70))
        ]
    )


DOCS = [domain_docs(k) for k in range(3)]


def real_tokens(row_batch):
    """A user's map on rows: count the real tokens of each row."""
    return {**row_batch, "real_tokens": (row_batch["segment_ids"] > 0).sum(axis=1)}


def build(num_workers: int):
    """(mixer, pipeline): plans with user transformations -> mix -> batch -> workers -> map."""
    prose = pack(DOCS[0], SEQ_LEN, "concat", seed=0, num_epochs=None).plans
    code = pack(DOCS[1], SEQ_LEN, "best_fit", window_size=16, seed=1, num_epochs=None).plans
    math = pack(DOCS[2], SEQ_LEN, "concat", seed=2, num_epochs=None).plans
    parents = {
        "prose": prose.filter(lambda plan: plan["doc_ids"].size > 1),  # multi-document rows
        "code": code,
        "math": math.shuffle(seed=7),  # a MapDataset transformation on a MapDataset planner
    }
    mixer = mix_plans(parents, Exp3Policy(Exp3(3, prior=[0.5, 0.3, 0.2])), seed=11)
    batches = batch_plans(mixer, 4, domain_names=NAMES)
    rows = ProcessMap(batches, read_rows(DOCS, SEQ_LEN), num_workers=num_workers, lookahead=2)
    return mixer, rows.map(real_tokens)


def run(mixer, iterator, start, steps):
    out = []
    for step in range(start, start + steps):
        out.append(next(iterator))
        mixer.update({"prose": 1.0 + step % 3, "code": 3.0, "math": 0.5})
    return out


def assert_same(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_user_pipeline_workers_checkpoints_and_orbax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    mixer, pipeline = build(num_workers=0)
    inline = iter(pipeline)
    expected = run(mixer, inline, 0, 12)
    batch = expected[0]
    assert batch["input_ids"].shape == (4, SEQ_LEN)
    np.testing.assert_array_equal(batch["real_tokens"], (batch["segment_ids"] > 0).sum(axis=1))
    prose_rows = np.concatenate([b["segment_ids"][b["domain_ids"] == 0] for b in expected])
    assert prose_rows.size and (prose_rows.max(axis=1) > 1).all(), "the plan filter held"

    # Two worker processes: the same batches, EXP3 updates in between.
    mixer2, pipeline2 = build(num_workers=2)
    with contextlib.closing(iter(pipeline2)) as workers:
        assert_same(run(mixer2, workers, 0, 5), expected[:5])
        state = json.loads(json.dumps(workers.get_state()))
        # Grain's Orbax handler saves the very same iterator state.
        with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
            manager.save(5, args=grain.checkpoint.CheckpointSave(workers))
            manager.wait_until_finished()
        assert_same(run(mixer2, workers, 5, 7), expected[5:])

    # get_state/set_state: a fresh inline pipeline resumes at batch 5.
    mixer3, pipeline3 = build(num_workers=0)
    resumed = iter(pipeline3)
    resumed.set_state(state)
    assert_same(run(mixer3, resumed, 5, 7), expected[5:])

    # Orbax restore into a fresh 2-worker pipeline resumes at batch 5 too.
    mixer4, pipeline4 = build(num_workers=2)
    with contextlib.closing(iter(pipeline4)) as restored:
        with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
            manager.restore(5, args=grain.checkpoint.CheckpointRestore(restored))
        assert_same(run(mixer4, restored, 5, 7), expected[5:])
