"""Reading several batches in one call: `ReadSlice.many` and `ProcessMap`'s inline groups."""

from __future__ import annotations

import itertools

import grain
import numpy as np
import pytest

from tests.data.deliver.test_loader import make_loader, mixing
from tests.data.workers.process_map_fns import CountingRows, rows
from wf_data.data.plan.batching import batch_plans
from wf_data.data.read.rows import ROW_KEYS, ReadSlice, SliceRows
from wf_data.data.workers.process_map import ProcessMap


def assert_results_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.keys() == b.keys(), index
        for key in b:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"element {index} {key}")


@pytest.mark.parametrize("rank_rows", [(0, 4), (1, 3)])
def test_many_equals_one_batch_at_a_time(rank_rows):
    mixer, reader = mixing("static")
    plans = list(itertools.islice(batch_plans(mixer, 4, domain_names=mixer.names), 9))
    # One batch planned under other domain names (before a restore) is read by name too.
    plans[4] = dict(plans[4], domain_names='["c", "b", "a"]', domain_ids=2 - plans[4]["domain_ids"])
    read = ReadSlice(reader, SliceRows(*rank_rows), mixer.names)
    assert_results_equal(read.many(plans), [read(plan) for plan in plans])


def assert_rows_of_the_stream(got: list[dict]) -> None:
    """`got` equals `rows` of every plan of `plan_stream()`, the `many` group tags aside."""
    for result in got:
        result.pop("group", None)
    assert_results_equal(got, [rows(plan) for plan in plan_stream()])


def plan_stream() -> grain.IterDataset:
    return (
        grain.MapDataset.range(20)
        .map(
            lambda i: {"index": np.int64(i), "docs": np.arange(i % 3), "weight": i / 2, "name": "p"}
        )
        .to_iter_dataset()
    )


@pytest.mark.parametrize("lookahead", [0, 2, 5])
def test_inline_groups_of_lookahead_plus_one_same_stream(lookahead):
    fn = CountingRows()
    assert_rows_of_the_stream(
        list(ProcessMap(plan_stream(), fn, num_workers=0, lookahead=lookahead))
    )
    if lookahead:
        assert fn.groups[0] == lookahead + 1 and max(fn.groups) == lookahead + 1
        assert sum(fn.groups) == 20


def test_a_failing_group_fails_at_its_element_and_resumes_exactly():
    fn = CountingRows(fail_at=7)
    iterator = iter(ProcessMap(plan_stream(), fn, num_workers=0, lookahead=3))
    delivered = []
    with pytest.raises(ValueError, match="element 7 is bad") as error:
        while True:
            delivered.append(next(iterator))
    assert len(delivered) == 7  # every element before the bad one, none after
    assert any("element 7" in note for note in error.value.__notes__)
    state = iterator.get_state()
    fn.fail_at = None
    resumed = iter(ProcessMap(plan_stream(), fn, num_workers=0, lookahead=3))
    resumed.set_state(state)
    assert_rows_of_the_stream(delivered + list(resumed))


def test_loader_without_workers_reads_prefetch_plus_one_batches_per_call(monkeypatch):
    calls = []
    many = ReadSlice.many

    def counting(self, plans):
        calls.append(len(plans))
        return many(self, plans)

    monkeypatch.setattr(ReadSlice, "many", counting)
    grouped = make_loader("static", prefetch=2)
    got = [next(grouped) for _ in range(6)]
    assert calls == [3, 3]
    one_by_one = make_loader("static", prefetch=0)
    assert_results_equal(got, [next(one_by_one) for _ in range(6)])


@pytest.mark.slow
def test_workers_compute_waiting_tasks_together_same_stream_and_errors():
    with iter(ProcessMap(plan_stream(), CountingRows(), num_workers=2, lookahead=5)) as grouped:
        got = list(grouped)
    assert max(int(result.get("group", [1])[0]) for result in got) > 1  # some computed together
    assert_rows_of_the_stream(got)
    failing = iter(ProcessMap(plan_stream(), CountingRows(fail_at=7), num_workers=2, lookahead=5))
    delivered = []
    with pytest.raises(ValueError, match="element 7 is bad"):
        while True:
            delivered.append(next(failing))
    assert len(delivered) == 7
    state = failing.get_state()
    failing.close()
    resumed = iter(ProcessMap(plan_stream(), CountingRows(), num_workers=2, lookahead=5))
    resumed.set_state(state)
    rest = list(resumed)
    resumed.close()
    assert_rows_of_the_stream(delivered + rest)


@pytest.mark.parametrize("with_masks", [False, True])
def test_slice_and_gather_paths_build_the_same_rows(monkeypatch, with_masks):
    from wf_data.data.read.packing import pack
    from wf_data.data.shards import sources

    rng = np.random.default_rng(5)
    docs = []
    for n in rng.integers(1, 90, size=60).tolist():
        tokens = rng.integers(0, 1000, n).astype(np.int32)
        docs.append(
            {"input_ids": tokens, "loss_mask": rng.random(n) < 0.7} if with_masks else tokens
        )
    packed = pack(docs, 64, "best_fit", window_size=16, seed=2)
    plans = list(itertools.islice(batch_plans(packed.plans, 5), 6))
    built = {}
    for name, threshold in (("slices", 0), ("gather", 1 << 30)):
        monkeypatch.setattr(sources, "_SLICE_COPY_MIN_TOKENS", threshold)
        built[name] = [packed.reader.read_batch(plan) for plan in plans]
    assert_results_equal(built["slices"], built["gather"])
    if with_masks:
        assert any(
            (batch["labels"] == -100).sum() > (batch["segment_ids"] == 0).sum()
            for batch in built["gather"]
        )


def test_int64_labels_are_built_as_such_with_the_same_values():
    mixer, reader = mixing("static")
    plans = list(itertools.islice(batch_plans(mixer, 4, domain_names=mixer.names), 4))
    narrow = ReadSlice(reader, SliceRows(0, 4), mixer.names).many(plans)
    wide = ReadSlice(reader, SliceRows(0, 4), mixer.names, labels_dtype="int64").many(plans)
    for a, b in zip(narrow, wide, strict=True):
        assert a["labels"].dtype == np.int32 and b["labels"].dtype == np.int64
        np.testing.assert_array_equal(a["labels"], b["labels"])
        assert all(b[key].dtype == np.int32 for key in ("input_ids", "position_ids"))


def test_a_plan_outside_its_documents_is_refused_naming_the_value():
    mixer, reader = mixing("static")
    plan = next(iter(batch_plans(mixer, 4, domain_names=mixer.names)))
    for key, value, match in (
        ("offsets", -3, "offset -3"),
        ("doc_ids", -1, "document -1"),
        ("lengths", 0, "pieces of 0 tokens"),
    ):
        bad = dict(plan, **{key: plan[key].copy()})
        bad[key][0] = value
        with pytest.raises(ValueError, match=match):
            reader.read_batch(bad)
    beyond = dict(plan, offsets=plan["offsets"].copy())
    beyond["offsets"][0] += 10_000
    with pytest.raises(ValueError, match="tokens but the plan needs"):
        reader.read_batch(beyond)


def test_rows_built_in_lent_memory_lie_there_and_equal_the_others():
    mixer, reader = mixing("static")
    plan = next(iter(batch_plans(mixer, 4, domain_names=mixer.names)))
    read = ReadSlice(reader, SliceRows(0, 4), mixer.names, labels_dtype="int64")
    lent = []

    def allocate(nbytes):
        lent.append(np.full(nbytes, 0xAB, np.uint8))  # garbage: every byte must be written
        return lent[-1]

    got = read.many([plan], allocate=allocate)
    assert_results_equal(got, read.many([plan]))
    for key in ROW_KEYS:
        assert any(np.shares_memory(got[0][key], block) for block in lent), key
