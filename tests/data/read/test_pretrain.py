"""Tests for wf_data.data.read.pretrain: shuffle -> tokenize -> pack over real sources."""

import json

import numpy as np
import pytest

from wf_data.data.read.packing import IGNORE_INDEX, ROW_KEYS, BestFitPackedDataset, pack
from wf_data.data.read.pretrain import PretrainDataset, TokenizedDocuments
from wf_data.data.shards import sources
from wf_data.data.shards.sources import InMemorySource

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Packing puts many short documents into one row.",
    "",
    "A longer document " + "with many repeated words " * 30,
    "Short.",
    "Tokens appear exactly once per epoch, never truncated.",
]


@pytest.fixture(scope="module")
def tokenizer():
    from wf_data.data.text.tokenization import TokenizerWrapper

    return TokenizerWrapper.from_pretrained(None)


def write_token_dataset(out_dir, docs, tokenizer_identity=None):
    """A prepared `tokens` dataset directory (two shards) holding `docs`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    halves = [docs[: len(docs) // 2], docs[len(docs) // 2 :]]
    shards = []
    for k, part in enumerate(halves):
        file = sources.shard_name("docs", k, 2)
        written = sources.write_shard(
            out_dir / file, [sources.encode_record(d, "tokens", np.uint16) for d in part]
        )
        shards.append(
            {
                "file": file,
                "records": written["records"],
                "tokens": int(sum(len(d) for d in part)),
                "sha256": written["sha256"],
            }
        )
    np.save(out_dir / sources.LENGTHS_NAME, np.array([len(d) for d in docs], dtype=np.int64))
    sources.write_manifest(
        out_dir,
        {
            "version": 1,
            "name": "docs",
            "format": "tokens",
            "token_dtype": "uint16",
            "tokenizer": tokenizer_identity,
            "append_eos": False,
            "shards": shards,
            "totals": {
                "records": len(docs),
                "tokens": int(sum(len(d) for d in docs)),
                "dropped_empty": 0,
                "skipped_bad": 0,
            },
        },
    )
    return sources.open_dataset(out_dir)


def real_tokens(rows):
    return np.sort(np.concatenate([row["input_ids"][row["segment_ids"] > 0] for row in rows]))


@pytest.mark.parametrize("packing", ["best_fit", "concat"])
def test_prepared_tokens_source(tmp_path, packing):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60_000, n).astype(np.uint16) for n in rng.integers(1, 300, 40)]
    source = write_token_dataset(tmp_path / "ds", docs)
    dataset = PretrainDataset(source, seq_len=64, packing=packing, seed=3, num_epochs=2)
    assert dataset.method == packing and dataset.seed == 3
    rows = list(dataset)
    expected = np.sort(np.concatenate(docs * 2).astype(np.int32))
    assert np.array_equal(real_tokens(rows), expected)
    # identical to packing the source directly with the same seed
    direct = list(pack(source, 64, packing, seed=3, num_epochs=2))
    assert all(
        np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(rows, direct, strict=True)
    )
    # resume from a JSON state in the middle
    iterator = iter(dataset)
    for _ in range(len(rows) // 3):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    restored = iter(PretrainDataset(source, seq_len=64, packing=packing, seed=3, num_epochs=2))
    restored.set_state(state)
    for a, b in zip(iterator, restored, strict=True):
        for key in ROW_KEYS:
            assert np.array_equal(a[key], b[key])


def test_text_source_is_tokenized_on_the_fly(tokenizer):
    source = InMemorySource(TEXTS, format="text")
    dataset = PretrainDataset(
        source, seq_len=32, tokenizer=tokenizer, seed=1, num_epochs=1, window_size=4
    )
    assert isinstance(dataset, BestFitPackedDataset)
    assert dataset.pad_id == tokenizer.pad_id
    rows = list(dataset)
    expected = np.sort(np.concatenate(tokenizer.encode_batch(TEXTS)))
    assert np.array_equal(real_tokens(rows), expected)
    for row in rows:
        starts = np.flatnonzero(np.diff(row["segment_ids"], prepend=0) > 0)
        assert (row["labels"][starts] == IGNORE_INDEX).all()
        assert (row["position_ids"][starts] == 0).all()
    # a tokenizer name works too, and the fingerprint names source and tokenizer
    by_name = PretrainDataset(
        source, seq_len=32, tokenizer="wf-data-demo", seed=1, num_epochs=1, window_size=4
    )
    assert by_name.fingerprint() == dataset.fingerprint()
    assert isinstance(dataset.docs, TokenizedDocuments)


class CountingTokenizer:
    """Wraps a tokenizer, counting the documents it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.encoded = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode_batch(self, texts):
        self.encoded += len(texts)
        return self.tokenizer.encode_batch(texts)


@pytest.mark.parametrize("method", ["rows", "loader"])
def test_best_fit_tokenizes_each_text_document_once(tokenizer, method):
    texts = [f"document {i} " + "word " * (i % 17) for i in range(40)]
    counting = CountingTokenizer(tokenizer)
    dataset = PretrainDataset(
        InMemorySource(texts, format="text"),
        seq_len=32,
        tokenizer=counting,
        seed=3,
        num_epochs=1,
        window_size=8,
    )
    if method == "rows":
        rows = list(dataset)
    else:  # batch plans read by the loader's reader, rows of several batches at once
        from wf_data.data.plan.batching import batch_plans
        from wf_data.data.read.rows import ReadSlice, SliceRows

        read = ReadSlice(dataset.reader, SliceRows(0, 3), [""])
        batches = read.many(list(batch_plans(dataset.plans, 3)))
        rows = [{key: batch[key][i] for key in ROW_KEYS} for batch in batches for i in range(3)]
    tokens = real_tokens(rows)
    assert np.array_equal(
        tokens, np.sort(np.concatenate(tokenizer.encode_batch(texts)))[: len(tokens)]
    )
    # Planning measures every window (40 documents); reading takes their kept tokens, which
    # go once read.
    assert counting.encoded == 40
    if method == "rows":  # every row read: nothing kept
        assert dataset.docs._kept._tokens == 0


def test_tokenized_documents_cache_is_bounded_and_not_pickled(tokenizer):
    import pickle

    texts = ["a b c d e f g h"] * 50
    docs = TokenizedDocuments(InMemorySource(texts, format="text"), tokenizer, cache_tokens=64)
    for start in range(0, 50, 5):  # batches of 45 tokens: at most max(64, 2 * 45) kept
        docs.__getitems__(list(range(start, start + 5)))
    assert docs._kept._tokens <= 90 and len(docs._kept._arrays) <= 10
    clone = pickle.loads(pickle.dumps(docs))
    assert not clone._kept._arrays
    np.testing.assert_array_equal(clone[7], docs[7])


def test_text_source_errors(tokenizer):
    source = InMemorySource(TEXTS, format="text")
    with pytest.raises(ValueError, match="holds text: pass tokenizer="):
        PretrainDataset(source, seq_len=32)
    with pytest.raises(ValueError, match="concat packing needs them.*prepare --tokenizer"):
        PretrainDataset(source, seq_len=32, tokenizer=tokenizer, packing="concat")

    class MislabelledText:
        format = "text"
        fingerprint = "x"

        def __len__(self):
            return 2

        def __getitem__(self, index):
            return np.arange(3, dtype=np.int32)  # tokens where text is expected

    dataset = PretrainDataset(MislabelledText(), seq_len=8, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="record 0: expected text"):
        next(iter(dataset))


def test_chat_source_is_refused():
    source = InMemorySource([{"messages": [{"role": "user", "content": "hi"}]}], format="chat")
    with pytest.raises(ValueError, match="format 'chat'.*SFTDataset"):
        PretrainDataset(source, seq_len=16)


def test_pad_id_defaults(tmp_path, tokenizer):
    docs = [np.arange(5, dtype=np.uint16)]
    bare = write_token_dataset(tmp_path / "bare", docs)
    assert PretrainDataset(bare, seq_len=8).pad_id == 0
    identity = {
        "name": "t",
        "vocab_size": 100,
        "bos_id": None,
        "eos_id": 2,
        "pad_id": 7,
        "sha256": "0" * 64,
    }
    named = write_token_dataset(tmp_path / "named", docs, tokenizer_identity=identity)
    assert PretrainDataset(named, seq_len=8).pad_id == 7
    with pytest.warns(UserWarning, match="allowed by allow_tokenizer_mismatch"):
        mismatched = PretrainDataset(
            named, seq_len=8, tokenizer=tokenizer, allow_tokenizer_mismatch=True
        )
    assert mismatched.pad_id == tokenizer.pad_id
    dataset = PretrainDataset(named, seq_len=8, pad_id=5)
    assert dataset.pad_id == 5 and next(iter(dataset))["input_ids"].tolist()[-3:] == [5, 5, 5]


@pytest.mark.parametrize("packing", ["best_fit", "concat"])
def test_each_epoch_is_a_new_deterministic_shuffle(packing):
    docs = InMemorySource([np.full(8, i, dtype=np.uint32) for i in range(30)])

    def epochs(seed):
        iterator = iter(PretrainDataset(docs, seq_len=8, packing=packing, seed=seed))
        rows = [next(iterator)["input_ids"][0] for _ in range(90)]  # num_epochs=None: forever
        return [rows[:30], rows[30:60], rows[60:]]

    first = epochs(0)
    assert first == epochs(0)
    assert first != epochs(1)
    assert first[0] != first[1] and first[1] != first[2]
    assert all(sorted(epoch) == list(range(30)) for epoch in first)
