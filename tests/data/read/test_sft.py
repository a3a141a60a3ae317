"""SFTDataset: assistant-only labels in packed rows, overlong policies, record errors, resume."""

import collections
import pickle

import numpy as np
import pytest

from wf_data.data.read.packing import IGNORE_INDEX, PackedDataset
from wf_data.data.read.sft import ChatDocuments, SFTDataset
from wf_data.data.shards.sources import InMemorySource
from wf_data.data.text.chat import render_with_mask
from wf_data.data.text.tokenization import TokenizerWrapper

WORDS = "hello there how are you fine thanks what is the answer to life and everything".split()


@pytest.fixture(scope="module")
def tokenizer():
    return TokenizerWrapper.from_pretrained(None)


def make_records(num_records, seed=0):
    """Distinct conversations of 1-3 exchanges, some with a system prompt."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(num_records):
        messages = [{"role": "system", "content": "be brief"}] if index % 3 == 0 else []
        for turn in range(int(rng.integers(1, 4))):
            question = " ".join(rng.choice(WORDS, int(rng.integers(1, 12))))
            answer = " ".join(rng.choice(WORDS, int(rng.integers(1, 25))))
            messages.append({"role": "user", "content": f"{question} {index}.{turn}?"})
            messages.append({"role": "assistant", "content": answer})
        records.append({"messages": messages})
    return records


def rendered(records, tokenizer, chat_template=None):
    """(ids, mask) per record, straight from render_with_mask (checked in test_chat)."""
    return [render_with_mask(r["messages"], tokenizer.hf_tokenizer, chat_template) for r in records]


def all_rows(dataset):
    rows = list(iter(dataset))
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def segments_of(rows):
    """(row, segment id, input_ids, labels, position_ids) of every segment of every row."""
    for r in range(len(rows["input_ids"])):
        segment_ids = rows["segment_ids"][r]
        for segment in range(1, int(segment_ids.max()) + 1):
            where = segment_ids == segment
            yield (
                r,
                segment,
                rows["input_ids"][r][where],
                rows["labels"][r][where],
                rows["position_ids"][r][where],
            )


def test_packed_rows_mask_non_assistant_padding_and_segment_starts(tokenizer):
    records = make_records(60)
    expected = {tuple(ids.tolist()): mask for ids, mask in rendered(records, tokenizer)}
    assert len(expected) == len(records)  # conversations are distinct: segments identify them
    seq_len = 256
    dataset = SFTDataset(
        InMemorySource(records, format="chat"),
        tokenizer=tokenizer,
        seq_len=seq_len,
        num_epochs=1,
        seed=5,
        window_size=16,
    )
    assert isinstance(dataset, PackedDataset) and dataset.method == "best_fit"
    rows = all_rows(dataset)
    assert rows["input_ids"].shape[1] == seq_len
    assert all(v.dtype == np.int32 for v in rows.values())
    padding = rows["segment_ids"] == 0
    assert padding.any()
    assert (rows["labels"][padding] == IGNORE_INDEX).all()
    assert (rows["input_ids"][padding] == tokenizer.pad_id).all()
    seen = collections.Counter()
    for _, _, ids, labels, positions in segments_of(rows):
        mask = expected[tuple(ids.tolist())]
        want = np.where(mask == 1, ids, IGNORE_INDEX)
        want[0] = IGNORE_INDEX  # first token of a segment is never predicted
        np.testing.assert_array_equal(labels, want)
        np.testing.assert_array_equal(positions, np.arange(len(ids)))
        seen[tuple(ids.tolist())] += 1
    assert seen == collections.Counter(list(expected))  # each conversation once per epoch
    # Loss only on assistant tokens: at most the masked tokens carry labels.
    assert (rows["labels"] != IGNORE_INDEX).sum() == sum(
        int(m[1:].sum()) for m in expected.values()
    )


def test_prefix_method_template_gives_the_same_packed_documents(tokenizer):
    from tests.data.text.test_chat import SHIPPED_WITH_MARKERS

    records = make_records(12, seed=1)
    source = InMemorySource(records, format="chat")
    # The shipped template has no markers (plain Jinja loads it): masks come from prefixes.
    prefixes = ChatDocuments(source, tokenizer=tokenizer, seq_len=512)
    marked = ChatDocuments(
        source, tokenizer=tokenizer, seq_len=512, chat_template=SHIPPED_WITH_MARKERS
    )
    newline = tokenizer.hf_tokenizer.encode("\n")
    for i, (ids, mask) in enumerate(rendered(records, tokenizer)):
        doc = prefixes[i]
        np.testing.assert_array_equal(doc["input_ids"], ids)
        np.testing.assert_array_equal(doc["loss_mask"], mask)
        # The same tokens and masks as with markers, but the markers template's final "\n".
        np.testing.assert_array_equal(marked[i]["input_ids"], [*ids, *newline])
        np.testing.assert_array_equal(marked[i]["loss_mask"], [*mask, 0])
    assert marked.fingerprint != prefixes.fingerprint
    np.testing.assert_array_equal(
        prefixes.lengths, [len(ids) for ids, _ in rendered(records, tokenizer)]
    )


@pytest.fixture(scope="module")
def overlong_case(tokenizer):
    records = make_records(40, seed=2)
    lengths = np.array([len(ids) for ids, _ in rendered(records, tokenizer)])
    seq_len = int(np.percentile(lengths, 70))
    overlong = np.flatnonzero(lengths > seq_len)
    assert 0 < overlong.size < len(records)
    return records, lengths, seq_len, overlong


def test_overlong_error_names_record_length_and_seq_len(tokenizer, overlong_case):
    records, lengths, seq_len, overlong = overlong_case
    first = int(overlong[0])
    with pytest.raises(
        ValueError,
        match=(
            rf"record {first}: conversation renders to {lengths[first]} tokens > seq_len {seq_len} "
            rf"\({overlong.size} of {len(records)} records"
        ),
    ):
        SFTDataset(InMemorySource(records, format="chat"), tokenizer=tokenizer, seq_len=seq_len)


def test_overlong_truncate_keeps_first_seq_len_tokens(tokenizer, overlong_case):
    records, lengths, seq_len, overlong = overlong_case
    dataset = SFTDataset(
        InMemorySource(records, format="chat"),
        tokenizer=tokenizer,
        seq_len=seq_len,
        overlong="truncate",
        num_epochs=1,
    )
    assert dataset.overlong_counts == {
        "truncated": overlong.size,
        "dropped": 0,
        "truncated_tokens": int((lengths[overlong] - seq_len).sum()),
    }
    assert dataset.stats["documents"] == len(records)
    np.testing.assert_array_equal(dataset.documents.lengths, np.minimum(lengths, seq_len))
    full = rendered(records, tokenizer)
    for i in overlong:
        doc = dataset.documents[int(i)]
        np.testing.assert_array_equal(doc["input_ids"], full[i][0][:seq_len])
        np.testing.assert_array_equal(doc["loss_mask"], full[i][1][:seq_len])
    rows = all_rows(dataset)
    assert (rows["segment_ids"] != 0).sum() == np.minimum(lengths, seq_len).sum()
    # A truncated conversation fills a row on its own.
    assert (rows["segment_ids"] != 0).all(axis=1).sum() >= overlong.size


def test_overlong_drop_skips_those_records(tokenizer, overlong_case):
    records, lengths, seq_len, overlong = overlong_case
    dataset = SFTDataset(
        InMemorySource(records, format="chat"),
        tokenizer=tokenizer,
        seq_len=seq_len,
        overlong="drop",
        num_epochs=1,
        seed=1,
    )
    assert dataset.overlong_counts == {
        "truncated": 0,
        "dropped": overlong.size,
        "truncated_tokens": 0,
    }
    kept = np.setdiff1d(np.arange(len(records)), overlong)
    np.testing.assert_array_equal(dataset.documents.record_indices, kept)
    np.testing.assert_array_equal(dataset.documents.lengths, lengths[kept])
    full = rendered(records, tokenizer)
    want = collections.Counter(tuple(full[i][0].tolist()) for i in kept)
    got = collections.Counter(
        tuple(ids.tolist()) for _, _, ids, _, _ in segments_of(all_rows(dataset))
    )
    assert got == want
    with pytest.raises(ValueError, match="all 40 conversations are longer than seq_len 4"):
        SFTDataset(
            InMemorySource(records, format="chat"), tokenizer=tokenizer, seq_len=4, overlong="drop"
        )


def test_bad_records_are_clear_errors(tokenizer):
    good = make_records(3)
    with pytest.raises(ValueError, match=r"record 2: no 'messages' field.*\['prompt'\]"):
        SFTDataset([*good[:2], {"prompt": "hi"}], tokenizer=tokenizer, seq_len=512)
    unknown_role = [*good, {"messages": [{"role": "bot", "content": "x"}]}]
    with pytest.raises(
        ValueError,
        match=r"record 3 message 0: unknown role 'bot'; valid roles: "
        r"system, user, assistant, tool",
    ):
        SFTDataset(unknown_role, tokenizer=tokenizer, seq_len=512)
    with pytest.raises(TypeError, match=r"holds 'text' records; SFTDataset needs a 'chat' source"):
        SFTDataset(InMemorySource(["some text"], format="text"), tokenizer=tokenizer, seq_len=64)
    with pytest.raises(TypeError, match=r"record 0: expected a chat record .*got str"):
        SFTDataset(["some text"], tokenizer=tokenizer, seq_len=64)
    with pytest.raises(ValueError, match=r"overlong must be one of \('error', 'truncate', "):
        SFTDataset(good, tokenizer=tokenizer, seq_len=64, overlong="split")
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        SFTDataset(good, tokenizer=tokenizer, seq_len=0)
    with pytest.raises(ValueError, match="the source has no records"):
        SFTDataset([], tokenizer=tokenizer, seq_len=64)


def test_template_failure_names_the_record(tokenizer):
    strict = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('no tools here') }}{% endif %}{% endfor %}" + tokenizer.chat_template
    )
    records = [*make_records(2), {"messages": [{"role": "tool", "content": "42"}]}]
    with pytest.raises(ValueError, match=r"record 2: the chat template failed: no tools here"):
        ChatDocuments(records, tokenizer=tokenizer, seq_len=512, chat_template=strict)


def test_nemotron_style_records(tokenizer):
    records = [
        {"input": "what is the answer?", "output": "42", "system_prompt": "be brief"},
        {"input": "hello", "output": "hello there", "system_prompt": ""},
    ]
    documents = ChatDocuments(records, tokenizer=tokenizer, seq_len=128)
    ids, mask = render_with_mask(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is the answer?"},
            {"role": "assistant", "content": "42"},
        ],
        tokenizer.hf_tokenizer,
    )
    np.testing.assert_array_equal(documents[0]["input_ids"], ids)
    np.testing.assert_array_equal(documents[0]["loss_mask"], mask)
    assert tokenizer.decode(documents[1]["input_ids"][documents[1]["loss_mask"] == 1]) == (
        "hello there<|im_end|>"
    )


def test_source_changed_after_construction_is_detected(tokenizer):
    records = make_records(4)
    documents = ChatDocuments(records, tokenizer=tokenizer, seq_len=512)
    records[3] = make_records(4, seed=9)[3]
    with pytest.raises(ValueError, match=r"record 3: renders to \d+ tokens now but \d+ at"):
        documents.__getitems__([1, 3])


def test_epochs_reshuffle_resume_and_pickle(tokenizer):
    records = make_records(30, seed=3)
    source = InMemorySource(records, format="chat")

    def build(seed):
        return SFTDataset(
            source, tokenizer=tokenizer, seq_len=256, seed=seed, num_epochs=2, window_size=8
        )

    dataset = build(seed=0)
    rows = list(iter(dataset))
    again = list(iter(build(seed=0)))
    other = list(iter(build(seed=1)))
    stack = lambda rs: np.stack([r["input_ids"] for r in rs])  # noqa: E731
    np.testing.assert_array_equal(stack(rows), stack(again))
    assert stack(rows).shape != stack(other).shape or (stack(rows) != stack(other)).any()
    # The two epochs cover the same conversations in different orders.
    first_epoch = dataset.epoch_order(0)
    assert sorted(first_epoch.tolist()) == sorted(dataset.epoch_order(1).tolist())
    assert (first_epoch != dataset.epoch_order(1)).any()
    # Exact resume from a mid-stream state, also in a pickled copy (as in a worker process).
    iterator = iter(dataset)
    for _ in range(5):
        next(iterator)
    state = iterator.get_state()
    copy = pickle.loads(pickle.dumps(dataset))
    resumed = iter(copy)
    resumed.set_state(state)
    np.testing.assert_array_equal(stack(list(resumed)), stack(rows[5:]))
    assert copy.fingerprint() == dataset.fingerprint()
    assert dataset.fingerprint() != build(seed=1).fingerprint()
