"""Planners: endless concat plans at the far end of int64, best-fit-decreasing against a one by
one reference, and the block hand-off (`next_block`) against row by row."""

from __future__ import annotations

import itertools
import json
import sys

import grain
import numpy as np
import pytest

from tests.data.read.test_packing import naive_best_fit_decreasing
from wf_data.data.mix.exp3 import Exp3
from wf_data.data.mix.mixing import Exp3Policy, mix_plans
from wf_data.data.plan.batching import batch_plans
from wf_data.data.plan.blocks import RowBlock, next_rows
from wf_data.data.plan.plans import best_fit_decreasing, plan_best_fit, plan_concat

LENGTHS = np.random.default_rng(3).integers(0, 90, 60)


def reference_row(plans, row: int) -> list[tuple[int, int, int]]:
    """(doc, offset, length) pieces of concat row `row`, with Python ints (no overflow)."""
    tokens, seq_len = int(LENGTHS.sum()), plans.seq_len
    start, pieces = row * seq_len, []
    while len(pieces) == 0 or sum(p[2] for p in pieces) < seq_len:
        epoch, within = divmod(start, tokens)
        order = plans.epoch_order(epoch).tolist()
        ends = np.cumsum(LENGTHS[order]).tolist()
        for doc, end in zip(order, ends, strict=True):
            length = int(LENGTHS[doc])
            if end > within and length:
                offset = within - (end - length) if within > end - length else 0
                take = min(length - offset, seq_len - sum(p[2] for p in pieces))
                pieces.append((doc, offset, take))
                start += take
                within += take
                if sum(p[2] for p in pieces) == seq_len:
                    break
    return pieces


def pieces_of(plan) -> list[tuple[int, int, int]]:
    return list(
        zip(*(plan[key].tolist() for key in ("doc_ids", "offsets", "lengths")), strict=True)
    )


@pytest.mark.parametrize("seed", [None, 5])
def test_endless_concat_plans_its_last_rows_and_shuffles(seed):
    """Rows near `len(plans) == sys.maxsize` start past int64 token positions; they used to
    fail (`expected non-negative integer`) or come out with a negative epoch."""
    plans = plan_concat(LENGTHS, 16, seed=seed, num_epochs=None)
    assert len(plans) == sys.maxsize
    for row in (len(plans) - 1, len(plans) - 2, 2**62 + 7, 0):
        plan = plans[row]
        assert plan["epoch"] == row * 16 // int(LENGTHS.sum())
        assert pieces_of(plan) == reference_row(plans, row)
    shuffled = plans.shuffle(7)
    for index in range(5):
        plan = shuffled[index]
        assert plan["epoch"] >= 0 and int(plan["lengths"].sum()) == 16
        assert ((plan["offsets"] + plan["lengths"]) <= LENGTHS[plan["doc_ids"]]).all()
    assert pieces_of(plans[-1]) == pieces_of(plans[len(plans) - 1])


@pytest.mark.parametrize("capacity", [1, 2, 7, 64, 100])
def test_best_fit_decreasing_places_items_as_one_by_one(capacity):
    rng = np.random.default_rng(capacity)
    for _ in range(150):
        items = rng.integers(1, capacity + 1, rng.integers(0, 70))
        if rng.random() < 0.5:  # many equal lengths: the runs placed a bin at a time
            items = np.minimum(items, rng.integers(1, capacity + 1))
        assert best_fit_decreasing(items, capacity).tolist() == naive_best_fit_decreasing(
            items.tolist(), capacity
        )


def planners():
    return {
        "concat": plan_concat(LENGTHS, 16, seed=1, num_epochs=2),
        "best_fit": plan_best_fit(LENGTHS, 16, window_size=9, seed=2, num_epochs=2),
    }


@pytest.mark.parametrize("method", ["concat", "best_fit"])
def test_next_block_gives_the_rows_and_states_of_next(method):
    rows = iter(planners()[method])
    expected, states = [], []
    while True:
        states.append(rows.get_state())
        try:
            expected.append(pieces_of(next(rows)))
        except StopIteration:
            break
    blocks = iter(planners()[method])
    got, sizes = [], iter(np.random.default_rng(0).integers(1, 40, 1000).tolist())
    while True:
        try:
            block = blocks.next_block(next(sizes))
        except StopIteration:
            break
        got += [pieces_of(block.row(i)) for i in range(len(block))]
        assert blocks.get_state() == states[len(got)]
    assert got == expected


def mixer(parents, policy_seed=0, **kwargs):
    policy = Exp3Policy(Exp3(len(parents), seed=policy_seed))
    return mix_plans(parents, policy, seed=3, **kwargs)


def drive(iterator, mix, take, steps=12):
    """`take(iterator, n)` rows for `steps` steps of various sizes, an EXP3 update after each;
    returns (row pieces with domain, state after each step)."""
    rows, states = [], []
    for step, count in enumerate([5, 1, 17, 64, 3, 40, 2, 9, 33, 1, 70, 8][:steps]):
        try:
            block = take(iterator, count)
        except StopIteration:
            break
        rows += [(block.domains[i], pieces_of(block.row(i))) for i in range(len(block))]
        mix.update({"d0": 1.0 + step % 3, "d1": 3.0, "d2": 0.5 + step / 10})
        states.append(json.dumps(iterator.get_state(), sort_keys=True))
    return rows, states


def one_by_one(iterator, count):
    """Up to `count` rows by `next()`, as a block (StopIteration when none is left)."""
    plans = list(itertools.islice(iterator, count))
    if not plans:
        raise StopIteration
    return RowBlock.from_rows(plans)


@pytest.mark.parametrize("on_exhausted", ["restart", "stop"])
def test_mixed_blocks_equal_rows_one_by_one(on_exhausted):
    def parents():
        plans = planners()
        return {
            "d0": plans["concat"],
            "d1": plans["best_fit"],
            # A plain Grain map between planner and mixer: no blocks, read row by row.
            # Few rows: it runs out within the steps (restarted, or the stream stops).
            "d2": plan_best_fit(LENGTHS[:10], 16, window_size=5, seed=9).map(
                lambda plan: {**plan, "offsets": plan["offsets"].copy()}
            ),
        }

    by_row = mixer(parents(), on_exhausted=on_exhausted)
    by_block = mixer(parents(), on_exhausted=on_exhausted)
    expected = drive(iter(by_row), by_row, one_by_one)
    assert drive(iter(by_block), by_block, next_rows) == expected
    assert len(expected[0]) < 253 if on_exhausted == "stop" else len(expected[0]) == 253
    assert by_row.mixture == by_block.mixture


def test_batches_are_the_same_through_a_plain_grain_map_after_the_mixer():
    def batches(map_rows: bool):
        plans = planners()
        mix = mixer({"d0": plans["concat"], "d1": plans["best_fit"]})
        parent = mix.map(lambda plan: plan) if map_rows else mix
        iterator = iter(batch_plans(parent, 7, domain_names=("d0", "d1")))
        out = []
        for step in range(9):
            out.append(next(iterator))
            mix.update({"d0": 1.0 + step, "d1": 2.0})
        return out, iterator.get_state()

    (blocks, block_state), (rows, row_state) = batches(False), batches(True)
    for a, b in zip(blocks, rows, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert block_state == row_state


def test_grain_map_parent_is_read_row_by_row():
    parent = iter(
        grain.MapDataset.range(5)
        .map(
            lambda i: {
                "doc_ids": np.array([i]),
                "offsets": np.array([0]),
                "lengths": np.array([3]),
                "epoch": 0,
            }
        )
        .to_iter_dataset()
    )
    block = next_rows(parent, 3)
    assert block.doc_ids.tolist() == [0, 1, 2] and block.epochs.tolist() == [0, 0, 0]
    assert next_rows(parent, 9).doc_ids.tolist() == [3, 4]
    with pytest.raises(StopIteration):
        next_rows(parent, 1)
