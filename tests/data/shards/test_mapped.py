"""Tests for wf_data.data.shards.mapped: memory-mapped reads of token shards and their index."""

import json
import pickle

import numpy as np
import pytest

from tests.data.shards.test_sources import _write_dataset
from wf_data.data.shards import mapped, sources


def _docs(dtype, seed=0):
    """Documents of 1 token to 3 blocks (uint16: 96K tokens), so pieces cross block headers at
    even and odd byte positions."""
    rng = np.random.default_rng([seed, 5])
    top = np.iinfo(dtype).max
    sizes = [1, 2, 3, 40_000, 5, 96_000, 127, 128, 8_191, 8_192, 70_000, 9, 33_000]
    sizes += rng.integers(1, 3_000, 40).tolist()
    return [rng.integers(0, top, size, dtype=np.uint64).astype(dtype) for size in sizes]


@pytest.fixture(params=["uint16", "uint32"])
def dataset(request, tmp_path):
    docs = _docs(np.dtype(request.param))
    _write_dataset(
        tmp_path / "ds", [docs[:20], [], docs[20:41], docs[41:]], token_dtype=request.param
    )
    return tmp_path / "ds", docs


def _random_pieces(docs, count, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(docs), count)
    lengths = np.array([len(docs[i]) for i in ids])
    offsets = rng.integers(0, lengths)
    sizes = rng.integers(1, lengths - offsets + 1)
    return ids, offsets, sizes


def test_pieces_equal_the_record_reader_and_the_documents(dataset):
    path, docs = dataset
    fast = sources.open_dataset(path)
    slow = sources.open_dataset(path, memory_map=False)
    assert fast.memory_map and not slow.memory_map
    for seed in range(5):
        ids, offsets, sizes = _random_pieces(docs, 60, seed)
        expected = np.concatenate(
            [docs[i][o : o + s] for i, o, s in zip(ids, offsets, sizes, strict=True)]
        )
        got = fast.read_pieces(ids, offsets, sizes)
        assert got.dtype == fast.token_dtype and not got.flags.writeable
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(slow.read_pieces(ids, offsets, sizes), expected)
    order = np.random.default_rng(9).permutation(len(docs))
    for index, doc in zip(order, fast.__getitems__(order), strict=True):
        np.testing.assert_array_equal(doc, docs[index])
    tokens, lengths = fast.read_tokens(order)
    np.testing.assert_array_equal(tokens, np.concatenate([docs[i] for i in order]))
    np.testing.assert_array_equal(lengths, [len(docs[i]) for i in order])
    assert fast.__getitems__([]) == [] and fast.read_tokens([])[0].size == 0


def test_a_pickled_source_maps_again(dataset):
    path, docs = dataset
    source = sources.open_dataset(path)
    source[3]
    clone = pickle.loads(pickle.dumps(source))
    assert clone._mapped is None and clone.memory_map
    np.testing.assert_array_equal(clone[5], docs[5])
    source.close()
    np.testing.assert_array_equal(source[12], docs[12])  # maps again after close


def _payload_position(path, record):
    """(shard file, byte offset of record `record`'s tokens in it)."""
    manifest = sources.read_manifest(path)
    offsets = np.load(path / sources.OFFSETS_NAME)
    starts = np.cumsum([0] + [shard["records"] for shard in manifest["shards"]])
    shard = int(np.searchsorted(starts, record, side="right")) - 1
    return path / manifest["shards"][shard]["file"], int(offsets[record])


def test_a_flipped_token_byte_fails_at_its_first_read(dataset):
    path, docs = dataset
    shard, position = _payload_position(path, 45)  # shard 3, record 4
    data = bytearray(shard.read_bytes())
    data[position + 3] ^= 0x10
    shard.write_bytes(bytes(data))
    source = sources.open_dataset(path)
    np.testing.assert_array_equal(source[0], docs[0])  # other shards read
    with pytest.raises(ValueError, match=r"shard docs-00003-of-00004\.array_record record \d+: "):
        source[45]
    with pytest.raises(ValueError, match=r"do not match their CRC-32 .* --verify"):
        source.read_pieces([45], [0], [1])  # the same block, still refused
    assert any("docs-00003-of-00004" in line for line in sources.verify_dataset(path))


def test_damaged_offsets_fail_naming_shard_and_record(dataset):
    path, docs = dataset
    offsets = np.load(path / sources.OFFSETS_NAME)
    offsets[22] += 2
    np.save(path / sources.OFFSETS_NAME, offsets)  # same size: passes the open check
    source = sources.open_dataset(path)
    np.testing.assert_array_equal(source[21], docs[21])
    with pytest.raises(
        ValueError, match=r"shard docs-00002-of-00004\.array_record record 2: \d+ bytes, but"
    ):
        source[22]
    assert "record_offsets.npy: sha256 does not match the manifest" in sources.verify_dataset(path)


def test_a_version_2_dataset_reads_with_the_record_reader(dataset):
    path, docs = dataset
    manifest = sources.read_manifest(path)
    manifest.pop("mapped")
    manifest["version"] = 2
    manifest["fingerprint"] = sources.compute_fingerprint(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    for name in (sources.OFFSETS_NAME, sources.CRC_NAME):
        (path / name).unlink()
    source = sources.open_dataset(path)
    assert not source.memory_map
    ids, offsets, sizes = _random_pieces(docs, 30, 1)
    np.testing.assert_array_equal(
        source.read_pieces(ids, offsets, sizes),
        np.concatenate([docs[i][o : o + s] for i, o, s in zip(ids, offsets, sizes, strict=True)]),
    )
    assert sources.verify_dataset(path) == []


def test_shards_of_another_layout_get_no_index(tmp_path, monkeypatch):
    docs = _docs(np.dtype(np.uint16))[:8]
    compressed = dict(sources.WRITER_OPTIONS, tokens="group_size:1")  # zstd
    monkeypatch.setattr(sources, "WRITER_OPTIONS", compressed)
    manifest = _write_dataset(tmp_path / "z", [docs])
    assert manifest["mapped"] is None and manifest["version"] == 3
    assert not (tmp_path / "z" / sources.OFFSETS_NAME).exists()
    source = sources.open_dataset(tmp_path / "z")
    assert not source.memory_map
    np.testing.assert_array_equal(source[5], docs[5])


def test_the_index_refuses_a_shard_changed_since_it_was_written(tmp_path):
    docs = _docs(np.dtype(np.uint16))[:6]
    manifest = _write_dataset(tmp_path / "ds", [docs])
    shard = tmp_path / "ds" / manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sha256 .* differs .* changed since"):
        sources.write_manifest(tmp_path / "ds", manifest)


def test_layout_arithmetic():
    content = np.array([0, 1, mapped.USABLE - 1, mapped.USABLE, 5 * mapped.USABLE + 7])
    physical = mapped.to_physical(content)
    np.testing.assert_array_equal(physical, [24, 25, 65535, 65560, 5 * 65536 + 31])
    np.testing.assert_array_equal(mapped.to_content(physical), content)
    sizes = [0, 1, 127, 128, 2**14 - 1, 2**14, 2**21, 2**35]
    np.testing.assert_array_equal(mapped.varint_size(sizes), [1, 1, 1, 2, 2, 3, 4, 6])


def test_reader_threads_read_right_and_check_each_record_once(dataset):
    from concurrent.futures import ThreadPoolExecutor

    path, docs = dataset
    source = sources.open_dataset(path)
    pieces = [_random_pieces(docs, 40, seed) for seed in range(16)]

    def read(piece):
        ids, offsets, sizes = piece
        return source.read_pieces(ids, offsets, sizes)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(read, pieces))
    for (ids, offsets, sizes), got in zip(pieces, results, strict=True):
        want = [docs[i][o : o + s] for i, o, s in zip(ids, offsets, sizes, strict=True)]
        np.testing.assert_array_equal(got, np.concatenate(want))
    distinct = len(set(np.concatenate([ids for ids, _, _ in pieces]).tolist()))
    mapped = source._mapped  # each record counted once: as many ready bits as counted
    ready = int(np.unpackbits(mapped._ready).sum())
    assert 0 <= mapped._unready <= len(docs) - distinct and ready == len(docs) - mapped._unready


def test_records_beside_a_checked_one_are_ready_but_only_a_bad_one_read_fails(dataset):
    path, docs = dataset
    lengths = np.load(path / sources.LENGTHS_NAME)
    lengths[[21, 22]] = lengths[[22, 21]]  # shard 2 records 1 and 2
    np.save(path / sources.LENGTHS_NAME, lengths)
    source = sources.open_dataset(path)
    np.testing.assert_array_equal(source[23], docs[23])  # shard 2 record 3
    ready = np.unpackbits(source._mapped._ready, bitorder="little")
    assert ready[23] and not ready[21] and not ready[22]  # bad framing: never ready
    assert ready.sum() >= 2  # records beside record 3, checked with its block
    with pytest.raises(ValueError, match=r"shard docs-00002-of-00004\.array_record record 1: "):
        source[21]
