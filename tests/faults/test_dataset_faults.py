"""Faults injected into a prepared dataset for real: swapped lengths, flipped and truncated
shard bytes, edited manifest fields (issue 10 cases 6 and 7), a flipped byte read by the
loader (issue 19 case 6).

Each must be caught: by `wf-data inspect --verify` (naming the file), and by the loader at open
or at the read of the damaged record (naming shard and record), never read as silently wrong
data.
"""

import json
import shutil

import numpy as np
import pytest

from tests.faults._prepare_helpers import WORDS, WordTokenizer, corpus, write_jsonl
from wf_data import cli
from wf_data.data.prepare import prepare
from wf_data.data.shards import sources


@pytest.fixture(scope="module")
def tokens_dataset(tmp_path_factory):
    """A finished tokens dataset (3 shards of 40 records) to copy and damage."""
    root = tmp_path_factory.mktemp("dataset")
    prepare(
        corpus(root / "in"), root / "ds", tokenizer=WordTokenizer(), num_shards=3, progress=False
    )
    return root / "ds"


@pytest.fixture
def dataset(tokens_dataset, tmp_path):
    """A private copy of the dataset (without its work directory)."""
    copy = tmp_path / "ds"
    copy.mkdir()
    for path in tokens_dataset.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    assert sources.verify_dataset(copy) == []
    return copy


def _verify(path, capsys) -> tuple[int, str]:
    status = cli.main(["inspect", str(path), "--verify", "--samples", "0"])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def _swap(lengths_path, i, j):
    lengths = np.load(lengths_path)
    assert lengths[i] != lengths[j]
    lengths[[i, j]] = lengths[[j, i]]
    np.save(lengths_path, lengths)


def test_lengths_swapped_within_a_shard(dataset, capsys):
    lengths = np.load(dataset / "lengths.npy")
    i = 1
    j = next(k for k in range(2, 40) if lengths[k] != lengths[i])  # both in shard 0
    _swap(dataset / "lengths.npy", i, j)
    status, printed = _verify(dataset, capsys)
    assert status == 1 and "integrity: FAILED" in printed
    assert "lengths.npy: sha256 does not match the manifest" in printed
    assert f"data-00000-of-00003.array_record record {i}: {lengths[i]} tokens, " in printed
    source = sources.open_dataset(dataset)  # per-shard sums still hold: open succeeds
    np.testing.assert_array_equal(source[0], sources.open_dataset(dataset)[0])
    with pytest.raises(ValueError, match=rf"shard data-00000-of-00003\.array_record record {i}:"):
        source[i]


def test_lengths_swapped_across_shards(dataset, capsys):
    lengths = np.load(dataset / "lengths.npy")
    j = next(k for k in range(40, 80) if lengths[k] != lengths[0])
    _swap(dataset / "lengths.npy", 0, j)
    # Opening scans no lengths (100M documents open in O(shards)); the first read of each
    # shard checks its sum, so no record of a corrupted shard is ever returned.
    source = sources.open_dataset(dataset)
    for index in (5, 0, j):  # shard 0 (the swapped entry or not), then shard 1
        with pytest.raises(ValueError, match=r"lengths of shard data-0000[01]-of-00003"):
            source[index]
    status, printed = _verify(dataset, capsys)
    assert status == 1 and "lengths.npy: sha256 does not match" in printed


def test_flipped_shard_byte_named_by_verify(dataset, capsys):
    shard = dataset / "data-00001-of-00003.array_record"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    status, printed = _verify(dataset, capsys)
    assert status == 1
    problems = printed.split("integrity: FAILED")[1]
    assert "data-00001-of-00003.array_record: sha256 does not match the manifest" in problems
    assert "data-00000-of-00003" not in problems and "data-00002-of-00003" not in problems


def test_truncated_shard_refused_at_open(dataset, capsys):
    shard = dataset / "data-00002-of-00003.array_record"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"data-00002-of-00003\.array_record: \d+ bytes, the man"):
        sources.open_dataset(dataset)
    status, printed = _verify(dataset, capsys)
    assert status == 1 and "data-00002-of-00003.array_record" in printed


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (("tokenizer", "name"), "another-tokenizer"),
        (("tokenizer", "vocab_size"), 50_000),
        (("tokenizer", "eos_id"), 7),
        (("token_dtype",), "uint32"),
        (("append_eos",), True),
        (("input_fields", "text_key"), ["body"]),
        (("lengths", "sha256"), "0" * 64),
    ],
    ids=lambda value: ".".join(value) if isinstance(value, tuple) else None,
)
def test_manifest_edit_detected(dataset, capsys, field, value):
    path = dataset / "manifest.json"
    manifest = json.loads(path.read_text())
    target = manifest
    for key in field[:-1]:
        target = target[key]
    assert target[field[-1]] != value
    target[field[-1]] = value
    path.write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ValueError, match="fingerprint does not match the manifest contents"):
        sources.open_dataset(dataset)
    status, printed = _verify(dataset, capsys)
    assert status == 1 and "fingerprint does not match" in printed


def _flip_record_byte(dataset, shard_name: str, record: int) -> None:
    """Flip one byte in the stored bytes of `record` of a shard (uncompressed token records:
    its token bytes appear verbatim in the file), so that only the chunk hash can tell."""
    source = sources.open_dataset(dataset)
    shard_index = [path.name for path in source.shard_paths].index(shard_name)
    first = sum(s["records"] for s in source.manifest["shards"][:shard_index])
    payload = source[first + record].tobytes()
    source.close()
    path = dataset / shard_name
    data = bytearray(path.read_bytes())
    at = data.find(payload)
    assert at >= 0 and data.find(payload, at + 1) < 0, "record bytes not unique in the shard"
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def long_tokens_dataset(tmp_path_factory):
    """2 shards of records with distinct, long token runs (each findable in the file)."""
    root = tmp_path_factory.mktemp("long")
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(rng.choice(WORDS, 60 + i % 50))} for i in range(200)]
    write_jsonl(root / "in" / "docs.jsonl", rows)
    prepare(root / "in", root / "ds", tokenizer=WordTokenizer(), num_shards=2, progress=False)
    return root / "ds"


@pytest.mark.parametrize("workers", [0, 2])
def test_flipped_record_byte_named_at_read(long_tokens_dataset, tmp_path, workers):
    """A record whose bytes changed fails its check when read: the chunk hash on the record
    reader (Riegeli), the CRC-32 of its 64 KiB block from memory maps. Either way the error
    names the dataset, shard and record and says how to check the rest, and the records the
    damage does not reach still read (the neighbours in its chunk; from memory maps, those
    outside its block)."""
    dataset = tmp_path / "ds"
    shutil.copytree(long_tokens_dataset, dataset)
    _flip_record_byte(dataset, "data-00001-of-00002.array_record", 37)
    expected = rf"shard data-00001-of-00002\.array_record record 37: .*inspect {dataset} --verify"
    by_record = sources.open_dataset(dataset, memory_map=False)
    with pytest.raises(sources.ShardReadError, match=expected):
        by_record[100 + 37]
    assert len(by_record[100 + 38]) > 0 and len(by_record[36]) > 0
    mapped = sources.open_dataset(dataset)
    with pytest.raises(sources.ShardReadError, match=expected):
        mapped[100 + 37]
    assert len(mapped[36]) > 0  # another shard (here one block holds all of shard 1)
    # A loader names the record it was reading when it met the damaged block.
    expected = rf"shard data-00001-of-00002\.array_record record \d+: .*inspect {dataset} --verify"
    from wf_data.data import get_loader

    config = {
        "tokenizer": None,
        "seq_len": 64,
        "global_batch_size": 4,
        "packing": "concat",
        "num_epochs": 1,
        "sources": {"docs": {"path": str(dataset), "format": "tokens"}},
        "mixing": {"kind": "static"},
    }
    loader = get_loader(config, framework="numpy", num_workers=workers)
    with pytest.raises(sources.ShardReadError, match=expected):
        for _ in loader:
            pass
    loader.close()
