"""Tests for wf_data.data.shards.sources: manifest, shard naming, writers and random access."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from wf_data.data.shards import sources


def _write_dataset(out_dir, docs_per_shard, format="tokens", token_dtype="uint16", name="docs"):
    """A dataset directory with one shard per list in `docs_per_shard` (empty lists allowed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(token_dtype) if format == "tokens" else None
    shards, lengths = [], []
    for k, docs in enumerate(docs_per_shard):
        file = sources.shard_name(name, k, len(docs_per_shard))
        written = sources.write_shard(
            out_dir / file, [sources.encode_record(d, format, dtype) for d in docs]
        )
        tokens = sum(len(d) for d in docs) if format == "tokens" else 0
        shards.append(
            {
                "file": file,
                "records": written["records"],
                "tokens": tokens,
                "sha256": written["sha256"],
            }
        )
        lengths += [len(d) for d in docs]
    if format == "tokens":
        np.save(out_dir / sources.LENGTHS_NAME, np.array(lengths, dtype=np.int64))
    manifest = {
        "version": 1,
        "name": name,
        "format": format,
        "token_dtype": token_dtype if format == "tokens" else None,
        "tokenizer": None,
        "append_eos": False,
        "shards": shards,
        "totals": {
            "records": sum(s["records"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "dropped_empty": 0,
            "skipped_bad": 0,
        },
    }
    return sources.write_manifest(out_dir, manifest)


@pytest.fixture
def token_docs():
    rng = np.random.default_rng([7, 1])
    return [rng.integers(0, 60_000, rng.integers(1, 30)).astype(np.uint16) for _ in range(23)]


@pytest.fixture
def token_dataset(tmp_path, token_docs):
    # shard 1 is empty: global index -> (shard, local) must skip it
    _write_dataset(tmp_path / "ds", [token_docs[:9], [], token_docs[9:17], token_docs[17:]])
    return tmp_path / "ds"


def test_shard_name():
    assert sources.shard_name("docs", 3, 8) == "docs-00003-of-00008.array_record"
    with pytest.raises(ValueError, match="out of range"):
        sources.shard_name("docs", 8, 8)
    with pytest.raises(ValueError, match="name"):
        sources.shard_name("a/b", 0, 1)


@pytest.mark.parametrize(
    ("vocab_size", "dtype"), [(100, np.uint16), (65536, np.uint16), (65537, np.uint32)]
)
def test_token_dtype_for_vocab(vocab_size, dtype):
    assert sources.token_dtype_for_vocab(vocab_size) == dtype


def test_manifest_round_trip(token_dataset):
    manifest = sources.read_manifest(token_dataset)
    assert manifest["fingerprint"] == sources.compute_fingerprint(manifest)
    again = sources.write_manifest(token_dataset, {k: v for k, v in manifest.items()})
    assert again == manifest == sources.read_manifest(token_dataset / "manifest.json")
    # the file is deterministic JSON: same bytes when rewritten
    first = (token_dataset / "manifest.json").read_bytes()
    sources.write_manifest(token_dataset, manifest)
    assert (token_dataset / "manifest.json").read_bytes() == first
    assert not list(token_dataset.glob("*.tmp"))


def test_manifest_lists_every_file(token_dataset):
    manifest = sources.read_manifest(token_dataset)
    lengths = token_dataset / "lengths.npy"
    assert manifest["version"] == sources.MANIFEST_VERSION == 3
    for entry, path in (
        (manifest["lengths"], lengths),
        (manifest["mapped"]["offsets"], token_dataset / "record_offsets.npy"),
        (manifest["mapped"]["block_crc32"], token_dataset / "block_crc32.npy"),
    ):
        assert entry == {
            "file": path.name,
            "bytes": path.stat().st_size,
            "sha256": sources.file_sha256(path),
        }
    for shard in manifest["shards"]:
        assert shard["bytes"] == (token_dataset / shard["file"]).stat().st_size
    assert sources.verify_dataset(token_dataset) == []


def test_older_manifest_version_refused(token_dataset):
    path = token_dataset / "manifest.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), version=1)))
    with pytest.raises(ValueError, match=r"unsupported version 1.*prepare the dataset again"):
        sources.open_dataset(token_dataset)


def test_manifest_errors_name_the_file(token_dataset, tmp_path):
    path = token_dataset / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json: fingerprint does not match"):
        sources.read_manifest(token_dataset)
    del manifest["format"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json: missing keys \['format'\]"):
        sources.read_manifest(token_dataset)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json: not valid JSON"):
        sources.read_manifest(token_dataset)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        sources.open_dataset(tmp_path)


def test_manifest_totals_checked(token_dataset):
    manifest = sources.read_manifest(token_dataset)
    manifest["totals"]["records"] += 1
    with pytest.raises(ValueError, match=r"totals\.records"):
        sources.validate_manifest(manifest, where="x/manifest.json")


def test_random_access_across_shard_boundaries(token_dataset, token_docs):
    source = sources.open_dataset(token_dataset)
    assert len(source) == len(token_docs) == 23
    assert source.format == "tokens" and source.token_dtype == np.uint16
    np.testing.assert_array_equal(source.lengths, [len(d) for d in token_docs])
    for i in range(len(token_docs)):  # includes 8|9 (across the empty shard) and 16|17
        np.testing.assert_array_equal(source[i], token_docs[i])
    np.testing.assert_array_equal(source[-1], token_docs[-1])
    assert not source[0].flags.writeable and not source.lengths.flags.writeable
    with pytest.raises(IndexError, match="out of range"):
        source[23]


def test_getitems_keeps_order(token_dataset, token_docs):
    source = sources.open_dataset(token_dataset)
    indices = [22, 0, 9, 8, 17, 16, 3, 3, 21, 10]
    batch = source.__getitems__(indices)
    assert len(batch) == len(indices)
    for index, doc in zip(indices, batch, strict=True):
        np.testing.assert_array_equal(doc, token_docs[index])
    assert source.__getitems__([]) == []


class CountingReader:
    """Wraps a shard reader, recording `("seek", shard, record)` and `("batch", shard, n)`
    (a batched `read(indices)`)."""

    def __init__(self, shard, reader, calls):
        self.shard, self.reader, self.calls = shard, reader, calls

    def seek(self, local):
        self.calls.append(("seek", self.shard, local))
        self.reader.seek(local)

    def read(self, *args):
        if args:
            self.calls.append(("batch", self.shard, len(args[0])))
        return self.reader.read(*args)


def _counting(source):
    calls = []
    source[0], source[10], source[20]  # open all readers
    source._readers = [
        CountingReader(k, r, calls) if r else r for k, r in enumerate(source._readers)
    ]
    return calls


def test_reads_seek_record_by_record_in_request_order(token_dataset, token_docs):
    source = sources.open_dataset(token_dataset, memory_map=False)  # the record reader
    calls = _counting(source)
    wanted = [20, 1, 12, 2, 19, 10]
    got = source.__getitems__(wanted)
    # (shard, record within shard) of each request, in request order; no thread-pool batch.
    assert calls == [
        ("seek", 3, 3), ("seek", 0, 1), ("seek", 2, 3), ("seek", 0, 2), ("seek", 3, 2),
        ("seek", 2, 1),
    ]  # fmt: skip
    for index, doc in zip(wanted, got, strict=True):
        np.testing.assert_array_equal(doc, token_docs[index])


def test_read_tokens_joins_the_documents_asked_for(token_dataset, token_docs):
    source = sources.open_dataset(token_dataset)
    wanted = np.array([22, 0, 9, 8, 17, 16, 3, 21, 10])
    tokens, lengths = source.read_tokens(wanted)
    assert tokens.dtype == source.token_dtype and lengths.dtype == np.int64
    np.testing.assert_array_equal(lengths, [len(token_docs[index]) for index in wanted])
    np.testing.assert_array_equal(tokens, np.concatenate([token_docs[i] for i in wanted]))
    empty, no_lengths = source.read_tokens([])
    assert empty.size == 0 and no_lengths.size == 0


def test_pickle_is_cheap_and_reopens(token_dataset, token_docs):
    source = sources.open_dataset(token_dataset)
    source[5]  # readers are open now
    payload = pickle.dumps(source)
    assert len(payload) < 4000  # path + manifest, no readers, no lengths
    clone = pickle.loads(payload)
    np.testing.assert_array_equal(clone[12], token_docs[12])
    np.testing.assert_array_equal(clone.lengths, source.lengths)
    assert clone.fingerprint == source.fingerprint and repr(clone) == repr(source)


def test_is_a_grain_random_access_source(token_dataset):
    import grain.python as grain

    source = sources.open_dataset(token_dataset)
    assert isinstance(source, grain.RandomAccessDataSource)
    dataset = grain.MapDataset.source(source)
    np.testing.assert_array_equal(dataset[4], source[4])


def test_text_and_chat_formats(tmp_path):
    texts = ["héllo wörld", "second", "日本語"]
    _write_dataset(tmp_path / "t", [texts[:2], texts[2:]], format="text")
    source = sources.open_dataset(tmp_path / "t")
    assert source.lengths is None and source[2] == "日本語"
    assert source.__getitems__([2, 0]) == ["日本語", "héllo wörld"]
    chats = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    _write_dataset(tmp_path / "c", [chats], format="chat")
    assert sources.open_dataset(tmp_path / "c")[0] == chats[0]


def test_uint32_tokens(tmp_path):
    docs = [np.array([0, 70_000, 2**32 - 1], dtype=np.uint32)]
    _write_dataset(tmp_path / "d", [docs], token_dtype="uint32")
    source = sources.open_dataset(tmp_path / "d")
    assert source[0].dtype == np.uint32
    np.testing.assert_array_equal(source[0], docs[0])


def test_decode_record_rejects_bad_length():
    with pytest.raises(ValueError, match="shard x record 3: expected uint32 tokens, got 3 bytes"):
        sources.decode_record(b"abc", "tokens", np.uint32, where="shard x record 3")


def test_missing_lengths_and_shard_are_errors(token_dataset):
    (token_dataset / "lengths.npy").unlink()
    with pytest.raises(FileNotFoundError, match="lengths.npy"):
        sources.open_dataset(token_dataset)
    (token_dataset / "docs-00002-of-00004.array_record").unlink()
    with pytest.raises(FileNotFoundError, match="docs-00002-of-00004"):
        sources.open_dataset(token_dataset)


def test_write_shard_is_atomic_and_deterministic(tmp_path):
    records = [bytes([i]) * i for i in range(50)]
    a = sources.write_shard(tmp_path / "a.array_record", records)
    b = sources.write_shard(tmp_path / "b.array_record", records)
    assert a == b and a["records"] == 50
    assert (tmp_path / "a.array_record").read_bytes() == (tmp_path / "b.array_record").read_bytes()
    assert a["sha256"] == sources.file_sha256(tmp_path / "a.array_record")

    def failing():
        yield b"one"
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        sources.write_shard(tmp_path / "c.array_record", failing())
    assert not (tmp_path / "c.array_record").exists()
    assert sorted(os.listdir(tmp_path)) == ["a.array_record", "b.array_record"]  # temp removed


_SPECULATIVE_COPY = """
import sys
from wf_data import atomic
from wf_data.data.shards import sources
directory, byte = sys.argv[1], int(sys.argv[2])
records = [bytes([byte]) * 4096] * 64
for _ in range(25):
    written = sources.write_shard(directory + "/part.array_record", records)
    atomic.write_json(directory + "/part.done.json", dict(written, byte=byte), indent=2)
"""


def test_two_live_copies_of_one_task_write_the_same_shard(tmp_path):
    # Beam/Spark speculation: two copies of one task write the same part at once. Unique temp
    # names keep each shard whole; the last rename wins with a complete file.
    copies = [
        subprocess.Popen(
            [sys.executable, "-c", _SPECULATIVE_COPY, str(tmp_path), str(byte)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for byte in (1, 2)
    ]
    for copy in copies:
        assert copy.wait(timeout=60) == 0, copy.stderr.read()
    assert sorted(os.listdir(tmp_path)) == ["part.array_record", "part.done.json"]
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(tmp_path / "part.array_record"))
    records = reader.read_all()
    reader.close()
    assert len(records) == 64 and len({bytes(r) for r in records}) == 1
    assert len(set(records[0])) == 1 and records[0][0] in (1, 2)
    done = json.loads((tmp_path / "part.done.json").read_text())
    assert done["records"] == 64 and done["byte"] in (1, 2)


def test_in_memory_source():
    docs = [[1, 2, 3], [4], [5, 6]]
    source = sources.InMemorySource(docs, format="tokens", token_dtype=np.uint16)
    assert len(source) == 3 and source[1].dtype == np.uint16
    np.testing.assert_array_equal(source.lengths, [3, 1, 2])
    assert [d.tolist() for d in source.__getitems__([2, 0])] == [[5, 6], [1, 2, 3]]
    assert source.fingerprint == sources.InMemorySource(docs, token_dtype=np.uint16).fingerprint
    assert (
        source.fingerprint != sources.InMemorySource(docs[::-1], token_dtype=np.uint16).fingerprint
    )
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone[2], [5, 6])
    text = sources.InMemorySource(["a", "b"], format="text")
    assert text.lengths is None and text[1] == "b"
    with pytest.raises(TypeError, match="document 1"):
        sources.InMemorySource(["a", 3], format="text")
    with pytest.raises(TypeError, match="message 0"):
        sources.InMemorySource([{"messages": ["hi"]}], format="chat")


def test_token_shards_are_uncompressed_text_shards_compressed(tmp_path):
    from array_record.python.array_record_module import ArrayRecordReader

    sources.write_shard(tmp_path / "t.array_record", [b"\x01\x00\x02\x00"])
    sources.write_shard(tmp_path / "x.array_record", [b"some text"], format="text")
    options = {
        name: ArrayRecordReader(
            str(tmp_path / name), sources.READER_OPTIONS
        ).writer_options_string()
        for name in ("t.array_record", "x.array_record")
    }
    assert "uncompressed" in options["t.array_record"]
    assert "zstd" in options["x.array_record"]
    with pytest.raises(ValueError, match="unknown format 'bin'"):
        sources.write_shard(tmp_path / "b.array_record", [b""], format="bin")
