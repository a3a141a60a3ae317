"""Tests for wf_data.data.read.packing: lossless coverage, row schema, resume, epochs and errors.

Token values encode (document, position): `doc * 2**16 + position`, so every real token of a
row says where it came from and coverage is checked exactly.
"""

import json
import pickle
import sys

import grain
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wf_data.data.plan.plans import plan_best_fit, plan_concat
from wf_data.data.read import packing
from wf_data.data.read.packing import (
    IGNORE_INDEX,
    BestFitPackedDataset,
    ConcatPackedDataset,
    best_fit_decreasing,
    pack,
)
from wf_data.data.read.rows import read_rows
from wf_data.data.shards.sources import InMemorySource

SHIFT = 1 << 16
METHODS = ["concat", "best_fit"]


def encoded_docs(lengths):
    return [np.arange(n, dtype=np.uint32) + i * SHIFT for i, n in enumerate(lengths)]


def source_of(lengths):
    return InMemorySource(encoded_docs(lengths))


class NoLengths:
    """A source without `.lengths` (like text tokenized on the fly); counts reads."""

    def __init__(self, docs):
        self.docs = docs
        self.reads = 0

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices):
        self.reads += len(indices)
        return [self.docs[i] for i in indices]


class CountingSource(InMemorySource):
    """InMemorySource that records every batched read."""

    def __init__(self, docs):
        super().__init__(docs)
        self.calls = []

    def __getitems__(self, indices):
        self.calls.append(list(indices))
        return super().__getitems__(indices)


def all_rows(dataset):
    return list(iter(dataset))


def stack(rows, key):
    return np.stack([row[key] for row in rows]) if rows else np.zeros((0, 0), np.int32)


def check_row_schema(row, seq_len, pad_id):
    """Schema rules for one row; returns its segments as (doc, first position, length)."""
    ids, labels = row["input_ids"], row["labels"]
    positions, segments = row["position_ids"], row["segment_ids"]
    for key in packing.ROW_KEYS:
        assert row[key].dtype == np.int32 and row[key].shape == (seq_len,), key
    real = segments > 0
    used = int(real.sum())
    assert real[:used].all() and not real[used:].any(), "padding must be a suffix"
    assert (ids[used:] == pad_id).all()
    assert (labels[used:] == IGNORE_INDEX).all()
    assert (positions[used:] == 0).all()
    found = []
    starts = np.flatnonzero(np.diff(segments[:used], prepend=0) != 0)
    bounds = list(starts) + [used]
    assert list(segments[starts]) == list(range(1, len(starts) + 1))
    for k, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        piece = ids[start:stop].astype(np.int64)
        doc, first = divmod(int(piece[0]), SHIFT)
        assert (piece == piece[0] + np.arange(stop - start)).all(), "one piece, in order"
        assert (positions[start:stop] == np.arange(stop - start)).all()
        assert labels[start] == IGNORE_INDEX
        assert (labels[start + 1 : stop] == ids[start + 1 : stop]).all()
        assert (segments[start:stop] == k + 1).all()
        found.append((doc, first, stop - start))
    return found


def token_counts(rows):
    """Multiset of real token values over `rows`: (values, counts)."""
    ids = stack(rows, "input_ids")
    real = ids[stack(rows, "segment_ids") > 0] if rows else np.zeros(0, np.int32)
    return np.unique(real, return_counts=True)


def expected_tokens(lengths):
    docs = encoded_docs(lengths)
    return np.sort(np.concatenate(docs).astype(np.int32)) if docs else np.zeros(0, np.int32)


# --------------------------------------------------------------------------- coverage


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(0, 90), max_size=40),
    seq_len=st.integers(1, 64),
    method=st.sampled_from(METHODS),
    seed=st.one_of(st.none(), st.integers(0, 2**31)),
    window_size=st.integers(1, 12),
    num_epochs=st.integers(1, 3),
    pad_id=st.integers(0, 5),
)
def test_every_token_exactly_once_per_epoch(
    lengths, seq_len, method, seed, window_size, num_epochs, pad_id
):
    docs = source_of(lengths)
    packed = pack(
        docs,
        seq_len,
        method,
        pad_id=pad_id,
        window_size=window_size,
        seed=seed,
        num_epochs=num_epochs,
    )
    rows = all_rows(packed)
    values, counts = token_counts(rows)
    expected = np.unique(expected_tokens(lengths))
    assert np.array_equal(values, expected)
    assert (counts == num_epochs).all()
    for row in rows:
        for doc, first, size in check_row_schema(row, seq_len, pad_id):
            if method == "best_fit":
                # documents are cut only at multiples of seq_len, so short ones stay whole
                assert first % seq_len == 0 and size == min(seq_len, lengths[doc] - first)
    total = num_epochs * sum(lengths)
    if method == "concat":
        assert len(rows) == len(packed) == -(-total // seq_len)
        # 100% fill: only the very last row may hold padding
        assert all((row["segment_ids"] > 0).all() for row in rows[:-1])
    assert sum(int((row["segment_ids"] > 0).sum()) for row in rows) == total


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 60), min_size=1, max_size=30),
    seq_len=st.integers(1, 40),
    seed=st.one_of(st.none(), st.integers(0, 1000)),
    window_size=st.integers(1, 8),
)
def test_best_fit_windows_never_cross_epochs(lengths, seq_len, seed, window_size):
    packed = pack(
        source_of(lengths), seq_len, "best_fit", window_size=window_size, seed=seed, num_epochs=3
    )
    plans = list(iter(packed.plans))
    per_epoch = {epoch: [] for epoch in range(3)}
    for plan in plans:
        docs = set(plan["doc_ids"].tolist())
        windows = {
            int(np.flatnonzero(packed.plans.epoch_order(plan["epoch"]) == d)[0]) // window_size
            for d in docs
        }
        assert len(windows) == 1, "a row mixes documents of two windows"
        per_epoch[plan["epoch"]].extend(pieces_of(plan))
    for pieces in per_epoch.values():
        tokens = sorted((d, p) for d, a, b in pieces for p in range(a, b))
        assert tokens == [(d, p) for d, n in enumerate(lengths) for p in range(n)]


def pieces_of(plan):
    """(doc, start, stop) triples of a row plan."""
    stops = plan["offsets"] + plan["lengths"]
    return list(
        zip(plan["doc_ids"].tolist(), plan["offsets"].tolist(), stops.tolist(), strict=True)
    )


def test_no_lengths_source_best_fit_plans_each_window_once():
    lengths = [5, 0, 17, 3, 40, 9, 1, 12]
    docs = NoLengths(encoded_docs(lengths))
    packed = pack(docs, 16, "best_fit", window_size=3, seed=4, num_epochs=2)
    assert packed.lengths is None
    # planning reads every window once per epoch to measure it
    plans = list(iter(packed.plans))
    assert docs.reads == 2 * len(lengths)
    rows = all_rows(packed)
    values, counts = token_counts(rows)
    assert np.array_equal(values, np.unique(expected_tokens(lengths))) and (counts == 2).all()
    assert len(rows) == len(plans)


def test_concat_needs_lengths():
    with pytest.raises(ValueError, match="wf-data prepare --tokenizer"):
        pack(NoLengths(encoded_docs([3, 4])), 8, "concat")


# --------------------------------------------------------------------------- schema


def test_row_schema_by_hand():
    docs = source_of([3, 5, 2])
    (row,) = all_rows(pack(docs, 12, "best_fit", pad_id=7))
    # best-fit-decreasing: 5 tokens of doc 1, then doc 0 (3), then doc 2 (2), then 2 pads
    d = [SHIFT * 1 + i for i in range(5)] + [i for i in range(3)] + [SHIFT * 2, SHIFT * 2 + 1]
    assert row["input_ids"].tolist() == d + [7, 7]
    assert row["labels"].tolist() == (
        [IGNORE_INDEX] + d[1:5] + [IGNORE_INDEX] + d[6:8] + [IGNORE_INDEX, d[9]] + [-100, -100]
    )
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 0, 0]
    assert row["segment_ids"].tolist() == [1] * 5 + [2] * 3 + [3] * 2 + [0, 0]


def test_concat_continuation_is_a_new_segment():
    rows = all_rows(pack(source_of([6, 4]), 4, "concat"))
    assert [r["segment_ids"].tolist() for r in rows] == [[1, 1, 1, 1], [1, 1, 2, 2], [1, 1, 0, 0]]
    assert rows[1]["labels"][0] == IGNORE_INDEX  # piece continuing doc 0: not predicted
    assert rows[1]["position_ids"].tolist() == [0, 1, 0, 1]
    assert rows[2]["labels"].tolist() == [IGNORE_INDEX, SHIFT + 3, IGNORE_INDEX, IGNORE_INDEX]


@pytest.mark.parametrize("method", METHODS)
def test_overlong_documents_are_split_not_truncated(method):
    lengths = [50, 3, 21]
    rows = all_rows(pack(source_of(lengths), 8, method, seed=1))
    values, counts = token_counts(rows)
    assert np.array_equal(values, expected_tokens(lengths)) and (counts == 1).all()
    pieces = [seg for row in rows for seg in check_row_schema(row, 8, 0)]
    if method == "best_fit":
        assert sorted(p for p in pieces if p[0] == 0) == [(0, 8 * k, 8) for k in range(6)] + [
            (0, 48, 2)
        ]


@pytest.mark.parametrize("method", METHODS)
def test_loss_mask_documents(method):
    docs = [
        {
            "input_ids": np.arange(6, dtype=np.int32) + 100,
            "loss_mask": np.array([0, 0, 1, 1, 0, 1]),
        },
        {"input_ids": np.arange(3, dtype=np.int32) + 200, "loss_mask": np.ones(3, dtype=bool)},
        np.arange(4, dtype=np.int32) + 300,  # a plain document: loss everywhere
    ]
    lengths = np.array([6, 3, 4])

    class Docs(list):
        pass

    source = Docs(docs)
    source.lengths = lengths
    rows = all_rows(pack(source, 16, method))
    (row,) = rows
    by_token = dict(zip(row["input_ids"].tolist(), row["labels"].tolist(), strict=True))
    assert [by_token[100 + i] for i in range(6)] == [-100, -100, 102, 103, -100, 105]
    assert [by_token[200 + i] for i in range(3)] == [-100, 201, 202]
    assert [by_token[300 + i] for i in range(4)] == [-100, 301, 302, 303]


def test_best_fit_fill_on_lognormal_lengths():
    rng = np.random.default_rng(0)
    lengths = np.clip(np.rint(rng.lognormal(6, 1.1, 20_000)), 8, 32768).astype(np.int64)

    class LengthsOnly:
        def __len__(self):
            return len(lengths)

        def __getitem__(self, index):
            raise AssertionError("planning must not read documents")

    source = LengthsOnly()
    source.lengths = lengths
    plans = list(iter(pack(source, 2048, "best_fit", window_size=4096, seed=0).plans))
    assert len(list(plan_best_fit(lengths, 2048, 4096, seed=0))) == len(plans)  # lengths only
    fill = lengths.sum() / (len(plans) * 2048)
    assert fill >= 0.99


# --------------------------------------------------------------------------- best fit


def naive_best_fit_decreasing(items, capacity):
    order = sorted(range(len(items)), key=lambda i: -items[i])
    room, bins = [], [0] * len(items)
    for i in order:
        fits = [b for b in range(len(room)) if room[b] >= items[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
        else:
            b = len(room)
            room.append(capacity)
        room[b] -= items[i]
        bins[i] = b
    return bins


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 50).flatmap(
        lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=60))
    )
)
def test_best_fit_decreasing_matches_reference(case):
    capacity, items = case
    bins = best_fit_decreasing(np.array(items, dtype=np.int64), capacity)
    assert bins.tolist() == naive_best_fit_decreasing(items, capacity)
    if items:
        assert np.bincount(bins, weights=items).max() <= capacity


def test_best_fit_decreasing_rejects_oversized_items():
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        best_fit_decreasing(np.array([5]), 4)


# --------------------------------------------------------------------------- plans and reads


def batch_of(plans):
    return {
        "doc_ids": np.concatenate([p["doc_ids"] for p in plans]),
        "offsets": np.concatenate([p["offsets"] for p in plans]),
        "lengths": np.concatenate([p["lengths"] for p in plans]),
        "row_pieces": np.array([len(p["doc_ids"]) for p in plans]),
    }


@pytest.mark.parametrize("method", METHODS)
def test_plans_and_read_rows_match_iteration(method):
    lengths = np.random.default_rng(3).integers(0, 70, 60).tolist()
    packed = pack(source_of(lengths), 32, method, seed=5, window_size=7, num_epochs=2)
    expected = all_rows(packed)
    plans = list(iter(packed.plans))
    assert all(set(plan) == {"doc_ids", "offsets", "lengths", "epoch"} for plan in plans)
    assert len(plans) == len(expected)
    # rows read by a pickled reader (a worker process), in an arbitrary order, one batch
    reader = pickle.loads(pickle.dumps(packed.reader))
    order = np.random.default_rng(0).permutation(len(plans))
    batch = reader(batch_of([pickle.loads(pickle.dumps(plans[i])) for i in order]))
    for key in packing.ROW_KEYS:
        assert batch[key].shape == (len(plans), 32) and batch[key].dtype == np.int32
        assert np.array_equal(batch[key], stack(expected, key)[order])
    # and row by row: one plan gives one row
    row = reader(plans[order[0]])
    for key in packing.ROW_KEYS:
        assert np.array_equal(row[key], expected[order[0]][key])


def test_read_rows_reads_only_needed_documents_in_one_call():
    lengths = [10] * 40
    docs = CountingSource(encoded_docs(lengths))
    plans = list(iter(pack(docs, 16, "concat").plans))[:25]
    assert docs.calls == []  # planning reads nothing when lengths are known
    rows = read_rows(docs, 16)(batch_of(plans[20:23]))
    assert len(docs.calls) == 1
    needed = sorted({d for plan in plans[20:23] for d in plan["doc_ids"].tolist()})
    assert sorted(docs.calls[0]) == needed
    assert rows["input_ids"].shape == (3, 16)


def test_concat_is_a_random_access_map_dataset():
    lengths = np.random.default_rng(1).integers(0, 50, 30).tolist()
    packed = pack(source_of(lengths), 16, "concat", seed=2, num_epochs=2)
    assert isinstance(packed, grain.MapDataset) and isinstance(packed, ConcatPackedDataset)
    rows = all_rows(packed)
    assert len(packed) == len(rows)
    for i in (len(rows) - 1, 0, 17, 3):
        for key in packing.ROW_KEYS:
            assert np.array_equal(packed[i][key], rows[i][key])
    sliced = packed[5:8]
    assert len(sliced) == 3 and np.array_equal(sliced[0]["input_ids"], rows[5]["input_ids"])
    # Indices wrap around, as in Grain's sources (`.repeat()` relies on it).
    assert np.array_equal(packed[len(rows)]["input_ids"], rows[0]["input_ids"])
    assert np.array_equal(packed[-1]["input_ids"], rows[-1]["input_ids"])


def test_best_fit_is_an_iter_dataset():
    packed = pack(source_of([3, 4]), 8, "best_fit")
    assert isinstance(packed, grain.IterDataset) and isinstance(packed, BestFitPackedDataset)
    assert isinstance(iter(packed), packing.PackedRowsIterator)


# --------------------------------------------------------------------------- state


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 80), min_size=1, max_size=50),
    seq_len=st.integers(1, 48),
    method=st.sampled_from(METHODS),
    seed=st.one_of(st.none(), st.integers(0, 100)),
    window_size=st.integers(1, 9),
    level=st.sampled_from(["rows", "plans"]),
    cut=st.integers(0, 120),
)
def test_resume_equality_at_random_points(lengths, seq_len, method, seed, window_size, level, cut):
    packed = pack(
        source_of(lengths), seq_len, method, seed=seed, window_size=window_size, num_epochs=2
    )
    dataset = packed if level == "rows" else packed.plans
    iterator = iter(dataset)
    for _ in range(cut):
        if next(iterator, None) is None:
            break
    state = json.loads(json.dumps(iterator.get_state()))
    rest = all_rows_from(iterator)
    restored = iter(dataset)
    restored.set_state(state)
    again = all_rows_from(restored)
    assert len(rest) == len(again)
    for a, b in zip(rest, again, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key])


def all_rows_from(iterator):
    return list(iterator)


def test_resume_mid_window_replans_one_window():
    lengths = np.random.default_rng(2).integers(1, 200, 300)
    source = CountingSource(encoded_docs(lengths.tolist()))
    packed = pack(source, 64, "best_fit", window_size=50, seed=9)
    iterator = iter(packed)
    for _ in range(123):
        next(iterator)
    state = iterator.get_state()
    assert 0 < state["row"] and state["window"] > 0  # mid-window
    expected = next(iterator)
    restored = iter(packed.plans)
    plan_calls = []
    original = packed.plans.plan_window
    packed.plans.plan_window = lambda *args: plan_calls.append(args) or original(*args)
    restored.set_state(state)
    plan = next(restored)
    assert plan_calls == [(state["epoch"], state["window"])]
    row = packed.reader(plan)
    assert np.array_equal(row["input_ids"], expected["input_ids"])


@pytest.mark.parametrize("method", METHODS)
def test_state_is_small_and_does_not_grow(method):
    packed = pack(source_of([37] * 50), 16, method, seed=1, window_size=8, num_epochs=None)
    iterator = iter(packed)
    sizes = [len(json.dumps(iterator.get_state()))]
    for _ in range(10):
        for _ in range(98):
            next(iterator)
        sizes.append(len(json.dumps(iterator.get_state())))
    assert max(sizes) < 160
    assert max(sizes) - min(sizes) <= 6  # only the digits of the counters change
    assert all(isinstance(v, int | str) for v in iterator.get_state().values())


@pytest.mark.parametrize("method", METHODS)
def test_state_from_another_configuration_is_refused(method):
    docs = source_of([5, 9, 13])
    state = iter(pack(docs, 8, method, seed=1)).get_state()
    for other in (
        pack(docs, 16, method, seed=1),
        pack(docs, 8, method, seed=2),
        pack(source_of([5, 9, 14]), 8, method, seed=1),
        pack(docs, 8, "best_fit" if method == "concat" else "concat", seed=1),
    ):
        with pytest.raises(ValueError, match="does not match"):
            iter(other).set_state(state)
    iter(pack(docs, 8, method, seed=1, pad_id=3)).set_state(state)  # pad_id may change


@pytest.mark.parametrize("method", METHODS)
def test_state_at_the_end_stays_exhausted(method):
    packed = pack(source_of([4, 9, 2]), 4, method)
    iterator = iter(packed)
    all_rows_from(iterator)
    restored = iter(packed)
    restored.set_state(iterator.get_state())
    assert list(restored) == []
    plans = iter(packed.plans)
    plans.set_state(iterator.get_state())
    assert list(plans) == []


# --------------------------------------------------------------------------- epochs


@pytest.mark.parametrize("method", METHODS)
def test_epoch_reshuffle_is_deterministic(method):
    lengths = [7] * 40

    def first_docs(seed):
        iterator = iter(pack(source_of(lengths), 7, method, seed=seed, num_epochs=None).plans)
        plans = [next(iterator) for _ in range(120)]  # three epochs of one-document rows
        return [
            [int(plan["doc_ids"][0]) for plan in plans[e * 40 : (e + 1) * 40]] for e in range(3)
        ]

    epochs = first_docs(11)
    assert epochs == first_docs(11)
    assert epochs != first_docs(12)
    assert epochs[0] != epochs[1] != epochs[2]
    assert all(sorted(docs) == list(range(40)) for docs in epochs)
    if method == "concat":  # documents in the epoch's (lazy) order
        order = pack(source_of(lengths), 7, method, seed=11).epoch_order(1)
        assert epochs[1] == order.tolist()
    assert first_docs(None)[0] == list(range(40)) and first_docs(None)[1] == list(range(40))


@pytest.mark.parametrize("method", METHODS)
def test_num_epochs_none_repeats_forever(method):
    lengths = [3, 8, 5]
    packed = pack(source_of(lengths), 8, method, seed=0, num_epochs=None)
    if method == "concat":
        assert len(packed) == sys.maxsize
        assert packed[10**12]["segment_ids"].sum() > 0
    iterator = iter(packed)
    rows = [next(iterator) for _ in range(40)]  # 20 epochs of 16 tokens
    values, counts = token_counts(rows)
    assert np.array_equal(values, expected_tokens(lengths)) and (counts == 20).all()


# --------------------------------------------------------------------------- scale


class LengthsOnlyLarge:
    """A source of `n` documents known by their lengths only (planning never reads)."""

    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, index):
        raise AssertionError("planning must not read documents")


@pytest.mark.parametrize("method", METHODS)
def test_first_plans_at_100m_documents_are_fast(method):
    import time

    lengths = np.broadcast_to(np.int64(3), (100_000_000,))  # a view: no 800 MB array
    packed = pack(LengthsOnlyLarge(lengths), 2048, method, seed=1, window_size=4096)
    best = float("inf")
    for epoch_seed in range(3):  # min of 3: the machine is shared
        plans = (
            pack(LengthsOnlyLarge(lengths), 2048, method, seed=epoch_seed, window_size=4096).plans
            if epoch_seed
            else packed.plans
        )
        start = time.perf_counter()
        iterator = iter(plans)
        batch = [next(iterator) for _ in range(64)]
        best = min(best, time.perf_counter() - start)
    assert all(plan["lengths"].sum() > 0 for plan in batch)
    assert best < 0.1, f"first 64 row plans took {best * 1e3:.0f} ms"


@pytest.mark.parametrize("seed", [None, 3])
@pytest.mark.parametrize("num_epochs", [1, 2])
def test_concat_covers_every_token_once_per_epoch_across_order_chunks(seed, num_epochs):
    from wf_data.data.plan.plans import ORDER_CHUNK, plan_concat

    lengths = np.random.default_rng(seed).integers(0, 4, size=2 * ORDER_CHUNK + 123)
    plans = plan_concat(lengths, 1000, seed=seed, num_epochs=num_epochs)
    rows = list(iter(plans))
    assert len(rows) == len(plans)
    doc_ids = np.concatenate([p["doc_ids"] for p in rows])
    covered = np.bincount(
        doc_ids, weights=np.concatenate([p["lengths"] for p in rows]), minlength=len(lengths)
    )
    np.testing.assert_array_equal(covered, num_epochs * lengths)
    # random access agrees with iteration, also past the first order chunk
    for index in (0, len(rows) // 2, len(rows) - 1):
        np.testing.assert_array_equal(plans[index]["doc_ids"], rows[index]["doc_ids"])
    first_docs = doc_ids[:50]
    shuffled = not np.array_equal(first_docs, np.sort(first_docs))
    assert shuffled == (seed is not None)


# --------------------------------------------------------------------------- errors


def test_argument_errors():
    docs = source_of([3])
    with pytest.raises(ValueError, match="unknown packing method 'greedy'.*best_fit"):
        pack(docs, 8, "greedy")
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        pack(docs, 0)
    with pytest.raises(ValueError, match="window_size"):
        pack(docs, 8, window_size=0)
    with pytest.raises(ValueError, match="num_epochs"):
        pack(docs, 8, num_epochs=0)
    with pytest.raises(ValueError, match="seed"):
        pack(docs, 8, seed=-1)
    with pytest.raises(TypeError, match="random-access"):
        pack(iter([np.arange(3)]), 8)


def test_text_documents_are_refused_with_a_hint():
    texts = ["hello", "world"]
    with pytest.raises(TypeError, match="NoLengths.* document 0 is text.*tokenize"):
        all_rows(pack(NoLengths(texts), 8, "best_fit"))


@pytest.mark.parametrize(
    "doc, match",
    [
        ({"tokens": np.arange(3)}, "without 'input_ids'"),
        ({"input_ids": np.arange(3), "loss_mask": np.ones(2)}, "document 1: field 'loss_mask'"),
        (np.zeros((2, 2), np.int32), "1-D integer"),
        ({"input_ids": ["a", "b"]}, "document 1: field 'input_ids' must be a 1-D integer"),
        (np.zeros(3, np.float32), "1-D integer"),
    ],
)
def test_bad_documents_are_named(doc, match):
    with pytest.raises((TypeError, ValueError), match=match):
        all_rows(pack(NoLengths([np.arange(2), doc]), 8, "best_fit"))


@pytest.mark.parametrize("method", METHODS)
def test_lengths_that_do_not_match_records_are_named(method):
    docs = [np.arange(4), np.arange(3)]

    class Lying(list):
        lengths = np.array([4, 5])

    with pytest.raises(ValueError, match="Lying.*document 1 has 3 tokens.*do not match"):
        all_rows(pack(Lying(docs), 16, method))


def test_negative_length_fails_naming_the_document():
    """Concat checks all lengths up front; best_fit (no O(N) scan at open) checks each window
    as it is planned, naming the document, before any row of that window is yielded."""
    lengths = np.array([5, 3, 6, 2, -2, 4], dtype=np.int64)
    with pytest.raises(ValueError, match=r"lengths\[4\] is -2: lengths must be >= 0"):
        plan_concat(lengths, 8)
    rows = iter(plan_best_fit(lengths, 8, window_size=3))
    first_window = [next(rows) for _ in range(2)]  # docs 0-2: 5, 3 | 6 -> two rows
    assert sorted(int(row["lengths"].sum()) for row in first_window) == [6, 8]
    with pytest.raises(ValueError, match=r"lengths\[4\] is -2: lengths must be >= 0"):
        next(rows)
