"""The public planning, reading and mixing API on inputs nobody tried first: empty and huge
documents, odd dtypes, tiny windows and rows, empty domains. Each case once failed (a hang,
a misleading error, a silent stop) or guards the exactly-once coverage it relies on."""

import json

import numpy as np
import pytest

from wf_data.data import (
    InMemorySource,
    batch_plans,
    mix_plans,
    pack,
    plan_best_fit,
    plan_concat,
    read_rows,
)

# Zero-length documents, documents several times seq_len, and one-token ones.
EDGE_LENGTHS = [0, 5, 0, 37, 3, 0, 100, 1, 16, 0]


def _planner(kind: str, lengths, seq_len: int, window: int = 3, **kwargs):
    if kind == "concat":
        return plan_concat(lengths, seq_len, **kwargs)
    return plan_best_fit(lengths, seq_len, window, **kwargs)


def _pieces(plan):
    """(document, offset, size) of each piece of a row plan."""
    return zip(plan["doc_ids"], plan["offsets"], plan["lengths"], strict=True)


def _coverage(plans, lengths) -> list[np.ndarray]:
    """Times each token of each document is planned."""
    counts = [np.zeros(int(n), np.int64) for n in lengths]
    for plan in plans:
        for doc, offset, size in _pieces(plan):
            assert size >= 1, plan
            counts[doc][offset : offset + size] += 1
    return counts


@pytest.mark.parametrize("kind", ["concat", "best_fit"])
@pytest.mark.parametrize(
    ("seq_len", "window", "num_epochs"),
    [(1, 3, 1), (4, 1, 1), (16, 100, 1), (10, 3, 2)],
    ids=["seq_len_1", "window_1", "window_over_corpus", "two_epochs"],
)
def test_every_token_planned_once_per_epoch(kind, seq_len, window, num_epochs):
    plans = list(
        _planner(
            kind, np.array(EDGE_LENGTHS, np.int32), seq_len, window, seed=7, num_epochs=num_epochs
        )
    )
    assert all(int(plan["lengths"].sum()) <= seq_len for plan in plans)
    for counts in _coverage(plans, EDGE_LENGTHS):
        assert (counts == num_epochs).all()


@pytest.mark.parametrize("kind", ["concat", "best_fit"])
def test_lengths_dtypes_plan_alike(kind):
    reference = [p["doc_ids"].tolist() for p in _planner(kind, EDGE_LENGTHS, 8, seed=1)]
    for lengths in (
        np.array(EDGE_LENGTHS, np.uint64),
        np.array(EDGE_LENGTHS, np.int32),
        tuple(EDGE_LENGTHS),
    ):
        assert [p["doc_ids"].tolist() for p in _planner(kind, lengths, 8, seed=1)] == reference


@pytest.mark.timeout(20)
@pytest.mark.parametrize("seed", [None, 3])
def test_best_fit_of_only_empty_documents_ends_even_forever(seed):
    # Every window empty: the iterator used to look for a row in epoch after epoch, forever.
    for lengths in ([0, 0, 0, 0, 0], [0]):
        plans = plan_best_fit(lengths, 4, 2, seed=seed, num_epochs=None)
        assert list(plans) == []


@pytest.mark.parametrize("kind", ["concat", "best_fit"])
@pytest.mark.parametrize(
    "lengths",
    [[3.0, 1.0], np.array([3.0, 1.0]), [True, False], np.array([[1, 2]], np.float32)],
    ids=["float_list", "float_array", "bool_list", "float_2d"],
)
def test_non_integer_lengths_name_the_problem(kind, lengths):
    # They used to be taken for a document source: "needs document lengths" (concat) or an
    # error about document 0 at the first read (best_fit).
    with pytest.raises(ValueError, match=r"lengths must be .*int"):
        _planner(kind, lengths, 4)


@pytest.mark.parametrize("kind", ["concat", "best_fit"])
def test_negative_length_names_the_document(kind):
    with pytest.raises(ValueError, match=r"lengths\[1\] is -1"):
        list(_planner(kind, np.array([3, -1, 2]), 4, 2))


@pytest.mark.parametrize("kind", ["concat", "best_fit"])
def test_state_through_json_at_every_position(kind):
    lengths = np.random.default_rng(0).integers(0, 40, 60)
    plans = _planner(kind, lengths, 16, 7, seed=5, num_epochs=2)
    expected = list(plans)
    iterator = iter(plans)
    for position in range(len(expected) + 1):
        restored = iter(_planner(kind, lengths, 16, 7, seed=5, num_epochs=2))
        restored.set_state(json.loads(json.dumps(iterator.get_state())))
        rest = list(restored)
        assert len(rest) == len(expected) - position
        if rest:
            assert rest[0]["doc_ids"].tolist() == expected[position]["doc_ids"].tolist()
            assert rest[0]["offsets"].tolist() == expected[position]["offsets"].tolist()
        if position < len(expected):
            next(iterator)


@pytest.mark.parametrize("on_exhausted", ["restart", "stop"])
@pytest.mark.parametrize("empty", [[], [0, 0]], ids=["no_documents", "empty_documents"])
def test_mixing_an_empty_domain_is_an_error(on_exhausted, empty):
    # Under "stop" the stream used to end silently at the empty domain's first draw.
    full = plan_concat([5, 9, 3] * 10, 4)
    for empty_plans in (plan_concat(empty, 4), plan_best_fit(empty, 4)):
        mixer = mix_plans(
            {"full": full, "empty": empty_plans}, {"full": 1, "empty": 1}, on_exhausted=on_exhausted
        )
        with pytest.raises(ValueError, match="domain 'empty' has no rows.*weight 0"):
            list(mixer)


def test_stop_still_ends_at_an_exhausted_domain():
    mixer = mix_plans(
        {"a": plan_concat([8] * 4, 4), "b": plan_concat([8] * 40, 4)},
        {"a": 1, "b": 1},
        seed=2,
        on_exhausted="stop",
    )
    plans = list(mixer)
    assert sum(plan["domain"] == 0 for plan in plans) == 8  # every row of "a", then the end
    assert sum(plan["domain"] == 1 for plan in plans) < 80  # "b" not exhausted


def test_an_empty_domain_of_weight_zero_is_never_drawn():
    mixer = mix_plans(
        {"a": plan_concat([8] * 4, 4, num_epochs=None), "b": plan_concat([], 4)}, {"a": 1, "b": 0}
    )
    iterator = iter(mixer)
    assert {next(iterator)["domain"] for _ in range(50)} == {0}


@pytest.mark.parametrize("documents", ["int32", "uint16", "dict_loss_mask", "dict_lists"])
@pytest.mark.parametrize("kind", ["concat", "best_fit"])
def test_rows_reassemble_the_documents(documents, kind):
    tokens = [np.arange(100 * i + 1, 100 * i + 1 + n) for i, n in enumerate(EDGE_LENGTHS)]
    source = {
        "int32": [t.astype(np.int32) for t in tokens],
        "uint16": [t.astype(np.uint16) for t in tokens],
        "dict_loss_mask": [{"input_ids": t, "loss_mask": t % 2 == 0} for t in tokens],
        "dict_lists": [{"input_ids": t.tolist()} for t in tokens],
    }[documents]
    reader = read_rows([source], 8, pad_id=-1)
    pieces = {i: [] for i in range(len(tokens))}
    for plan in _planner(kind, EDGE_LENGTHS, 8, 3, seed=4):
        row = reader(plan)
        start = 0
        for doc, offset, size in _pieces(plan):
            pieces[int(doc)].append((int(offset), row["input_ids"][start : start + size]))
            assert row["position_ids"][start : start + size].tolist() == list(range(size))
            assert row["labels"][start] == -100
            start += size
        assert (row["input_ids"][start:] == -1).all() and (row["labels"][start:] == -100).all()
    for doc, expected in enumerate(tokens):
        got = np.concatenate(
            [piece for _, piece in sorted(pieces[doc], key=lambda p: p[0])] or [np.empty(0)]
        )
        assert got.tolist() == expected.tolist()


# Fixed on main (rows.py): a list of token lists is one source, an empty first one too.
@pytest.mark.parametrize("first", [[1, 2], []], ids=["nonempty_first", "empty_first"])
def test_read_rows_of_a_list_of_token_lists(first):
    documents = [first, [3, 4, 5]]
    row = read_rows(documents, 8)(next(iter(plan_concat([len(d) for d in documents], 8))))
    assert row["input_ids"][:5].tolist() == first + [3, 4, 5] + [0] * (2 - len(first))


def test_batch_plans_without_the_mixers_names_says_how_to_fix():
    mixer = mix_plans(
        {"a": plan_concat([8] * 8, 4), "b": plan_concat([8] * 8, 4)}, {"a": 1, "b": 1}
    )
    with pytest.raises(ValueError, match=r"domain 1, but domain_names \[''\].*mixer.names"):
        next(iter(batch_plans(mixer, 8)))
    batch = next(iter(batch_plans(mixer, 8, domain_names=mixer.names)))
    assert set(batch["domain_ids"].tolist()) == {0, 1}


@pytest.mark.parametrize("container", ["arrays", "lists", "dicts", "tuple"])
def test_concat_packs_a_python_list_of_documents(container):
    # pack(docs, L, "concat") over a plain list (the README's composition snippet) used to
    # fail: "concat packing needs document lengths, and list has no `.lengths`".
    tokens = [np.arange(1, n + 1) + 1000 * i for i, n in enumerate(EDGE_LENGTHS)]
    docs = {
        "arrays": [t.astype(np.int32) for t in tokens],
        "lists": [t.tolist() for t in tokens],
        "dicts": [{"input_ids": t} for t in tokens],
        "tuple": tuple(t.astype(np.int32) for t in tokens),
    }[container]
    packed = pack(docs, 8, "concat", seed=3)
    reference = pack(InMemorySource(tokens), 8, "concat", seed=3)
    assert len(packed) == len(reference) == -(-sum(EDGE_LENGTHS) // 8)
    for got, want in zip(packed, reference, strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_concat_plans_wrap_indices_like_grain_sources():
    # Grain's `.repeat()` indexes past the parent's length and expects it to wrap; a
    # ConcatPlans used to raise IndexError at the second epoch.
    plans = plan_concat(EDGE_LENGTHS, 8, seed=2)
    once = [p["doc_ids"].tolist() for p in plans]
    twice = [p["doc_ids"].tolist() for p in plans.repeat(2)]
    assert twice == once + once
    assert plans[-1]["doc_ids"].tolist() == once[-1]
    with pytest.raises(IndexError, match="has no rows"):
        plan_concat([0, 0], 8)[0]
