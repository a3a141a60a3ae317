"""`RowReader.read_batch` against a row-by-row reference, and the errors of bad plans.

The reader builds rows with whole-batch numpy and reads each domain once; the reference
here builds them one piece at a time, so any shortcut in the reader (deduplicated reads,
per-domain buffers, the slice and gather branches, padded and full batches) shows as a
difference.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.data.shards.test_sources import _write_dataset
from wf_data.data.read.rows import IGNORE_INDEX, ROW_KEYS, RowReader
from wf_data.data.shards import sources

SEQ_LEN = 96
PAD_IDS = (7, 0, 3)


def reference_rows(docs, plan, seq_len, pad_ids, labels_dtype=np.int32):
    """The rows of `plan`, built piece by piece in Python from `docs[domain][doc_id]`."""
    fields = {key: [] for key in ROW_KEYS}
    doc_ids, offsets, sizes = (plan[key].tolist() for key in ("doc_ids", "offsets", "lengths"))
    piece = 0
    for domain, count in zip(plan["domain_ids"].tolist(), plan["row_pieces"].tolist(), strict=True):
        row = {key: [] for key in ROW_KEYS}
        for segment in range(1, count + 1):
            doc = docs[domain][doc_ids[piece]]
            tokens = doc["input_ids"] if isinstance(doc, dict) else doc
            mask = doc["loss_mask"] if isinstance(doc, dict) else np.ones(len(tokens), bool)
            span = range(offsets[piece], offsets[piece] + sizes[piece])
            row["input_ids"] += [int(tokens[i]) for i in span]
            row["labels"] += [IGNORE_INDEX] + [
                int(tokens[i]) if mask[i] else IGNORE_INDEX for i in span[1:]
            ]
            row["position_ids"] += list(range(sizes[piece]))
            row["segment_ids"] += [segment] * sizes[piece]
            piece += 1
        padding = seq_len - len(row["input_ids"])
        row["input_ids"] += [pad_ids[domain]] * padding
        row["labels"] += [IGNORE_INDEX] * padding
        row["position_ids"] += [0] * padding
        row["segment_ids"] += [0] * padding
        for key in ROW_KEYS:
            fields[key].append(row[key])
    built = {key: np.array(fields[key], dtype=np.int32) for key in ROW_KEYS}
    built["labels"] = built["labels"].astype(labels_dtype)
    built["domain_ids"] = np.asarray(plan["domain_ids"], dtype=np.int32)
    return built


def random_plan(rng, doc_lengths, seq_len):
    """A batch plan of 1-6 rows over random domains: pieces of random documents (repeats
    included) from random offsets; rows padded, or all rows full (an unpadded batch)."""
    full = rng.random() < 0.3
    row_pieces, domain_ids, doc_ids, offsets, sizes = [], [], [], [], []
    for _ in range(int(rng.integers(1, 7))):
        domain = int(rng.integers(len(doc_lengths)))
        room = seq_len if full else int(rng.integers(1, seq_len + 1))
        pieces = 0
        while room and (full or not pieces or rng.random() < 0.7):
            doc = int(rng.integers(len(doc_lengths[domain])))
            offset = int(rng.integers(doc_lengths[domain][doc]))
            size = int(rng.integers(1, min(doc_lengths[domain][doc] - offset, room) + 1))
            doc_ids.append(doc)
            offsets.append(offset)
            sizes.append(size)
            room -= size
            pieces += 1
        row_pieces.append(pieces)
        domain_ids.append(domain)
    return {
        "doc_ids": np.array(doc_ids, dtype=np.int64),
        "offsets": np.array(offsets, dtype=np.int64),
        "lengths": np.array(sizes, dtype=np.int64),
        "row_pieces": np.array(row_pieces, dtype=np.int64),
        "domain_ids": np.array(domain_ids, dtype=np.int32),
    }


def random_docs(rng, count, dtype, max_length=300):
    return [
        rng.integers(0, 60_000, rng.integers(1, max_length)).astype(dtype) for _ in range(count)
    ]


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Three domains' documents and sources: prepared datasets of uint16 (4 shards, one
    empty) and uint32 tokens (2 shards), and an in-memory list of SFT dicts with loss masks."""
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("rows")
    narrow, wide = random_docs(rng, 40, np.uint16), random_docs(rng, 25, np.uint32)
    _write_dataset(root / "a", [narrow[:15], [], narrow[15:22], narrow[22:]], name="a")
    _write_dataset(root / "b", [wide[:12], wide[12:]], token_dtype="uint32", name="b")
    chat = [
        {"input_ids": tokens, "loss_mask": rng.random(tokens.size) < 0.6}
        for tokens in random_docs(rng, 30, np.int32, max_length=120)
    ]
    docs = [narrow, wide, chat]
    found = [sources.open_dataset(root / "a"), sources.open_dataset(root / "b"), chat]
    return docs, found


@pytest.mark.parametrize("memory_map", [True, False])
@pytest.mark.parametrize("branch", ["slices", "gather"])
@pytest.mark.parametrize("domain_count", [1, 2, 3])
def test_read_batch_equals_the_row_by_row_reference(
    domains, monkeypatch, branch, domain_count, memory_map
):
    docs, found = domains
    docs, found = docs[:domain_count], found[:domain_count]
    found = [
        sources.open_dataset(source.path, memory_map=memory_map)
        if isinstance(source, sources.DocumentSource)
        else source
        for source in found
    ]
    threshold = 0 if branch == "slices" else 1 << 30  # pieces copied a slice each, or gathered
    monkeypatch.setattr(sources, "_SLICE_COPY_MIN_TOKENS", threshold)
    reader = RowReader(found, SEQ_LEN, PAD_IDS[:domain_count])
    doc_lengths = [[len(d["input_ids"] if isinstance(d, dict) else d) for d in ds] for ds in docs]
    rng = np.random.default_rng([domain_count, len(branch)])
    padded = repeated = 0
    for _ in range(60):
        plan = random_plan(rng, doc_lengths, SEQ_LEN)
        piece_domains = plan["domain_ids"].repeat(plan["row_pieces"]).tolist()
        pieces = list(zip(piece_domains, plan["doc_ids"].tolist(), strict=True))
        repeated += len(set(pieces)) < len(pieces)  # a document read once for two pieces
        got = reader.read_batch(plan)
        want = reference_rows(docs, plan, SEQ_LEN, PAD_IDS)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        padded += bool((got["segment_ids"] == 0).any())
    assert 0 < padded < 60 and repeated  # padded and full batches, repeated documents


def test_int64_labels_and_single_row_plans_match_the_reference(domains):
    docs, found = domains
    reader = RowReader(found, SEQ_LEN, PAD_IDS)
    doc_lengths = [[len(d["input_ids"] if isinstance(d, dict) else d) for d in ds] for ds in docs]
    rng = np.random.default_rng(3)
    for _ in range(10):
        plan = random_plan(rng, doc_lengths, SEQ_LEN)
        got = reader.read_batch(plan, np.int64)
        want = reference_rows(docs, plan, SEQ_LEN, PAD_IDS, np.int64)
        assert got["labels"].dtype == np.int64
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        first = int(plan["row_pieces"][0])
        row_plan = {key: plan[key][:first] for key in ("doc_ids", "offsets", "lengths")}
        row = reader({**row_plan, "domain": int(plan["domain_ids"][0])})
        for key in ROW_KEYS:
            np.testing.assert_array_equal(row[key], want[key][0], err_msg=key)


def _plan(doc_ids, offsets, sizes, row_pieces, domain_ids):
    return {
        "doc_ids": np.array(doc_ids),
        "offsets": np.array(offsets),
        "lengths": np.array(sizes),
        "row_pieces": np.array(row_pieces),
        "domain_ids": np.array(domain_ids, dtype=np.int32),
    }


@pytest.mark.parametrize(
    "plan, error, match",
    [
        (_plan([0], [0], [1], [1], [3]), ValueError, "plan names domain 3; this reader has 3"),
        (
            _plan([0, 0], [0, 0], [1, 1], [1, 1], [0, -1]),
            ValueError,
            "names domain -1; this reader",
        ),
        (_plan([0, 1], [0, 0], [1, 1], [1], [0]), ValueError, "plan has 1 pieces by row_pieces"),
        (_plan([0], [0], [1], [1, 0], [0, 0]), ValueError, "plan rows of 0 pieces"),
        (_plan([0], [0], [0], [1], [0]), ValueError, "pieces of 0 tokens"),
        (_plan([-2], [0], [1], [1], [0]), ValueError, "document -2"),
        (_plan([0], [-1], [1], [1], [0]), ValueError, "offset -1"),
        (_plan([0, 1], [0, 0], [90, 7], [2], [2]), ValueError, "plan rows hold 97 to 97 tokens"),
        (_plan([40], [0], [1], [1], [0]), IndexError, "record 40 out of range for .* 40 records"),
        (_plan([30], [0], [1], [1], [2]), IndexError, "list index out of range"),
    ],
)
def test_bad_plans_are_refused_naming_the_value(domains, plan, error, match):
    with pytest.raises(error, match=match):
        RowReader(domains[1], SEQ_LEN, PAD_IDS).read_batch(plan)


@pytest.mark.parametrize("domain", [0, 1, 2])
def test_a_piece_beyond_its_document_is_refused(domains, domain):
    docs, found = domains
    doc = docs[domain][5]
    length = len(doc["input_ids"] if isinstance(doc, dict) else doc)
    size = min(length, SEQ_LEN)
    plan = _plan([0, 5], [0, length - size + 1], [1, size], [1, 1], [domain, domain])
    with pytest.raises(ValueError, match=f"document 5 has {length} tokens but the plan needs"):
        RowReader(found, SEQ_LEN, PAD_IDS).read_batch(plan)


def test_a_record_of_another_size_than_lengths_npy_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    docs = random_docs(rng, 12, np.uint16)
    _write_dataset(tmp_path / "ds", [docs[:6], docs[6:]], name="ds")
    lengths = np.load(tmp_path / "ds" / sources.LENGTHS_NAME)
    j = next(k for k in range(2, 6) if lengths[k] != lengths[1])
    lengths[[1, j]] = lengths[[j, 1]]  # the shard's sum still holds: found at the read
    np.save(tmp_path / "ds" / sources.LENGTHS_NAME, lengths)
    source = sources.open_dataset(tmp_path / "ds")
    where = r"shard ds-00000-of-00002\.array_record record 1: \d+ bytes, but lengths.npy plans"
    with pytest.raises(ValueError, match=where):
        source.read_tokens([8, 0, 1])
    reader = RowReader([source], SEQ_LEN)
    with pytest.raises(ValueError, match=where):
        reader.read_batch(_plan([8, 1], [0, 0], [1, 1], [1, 1], [0, 0]))
    np.testing.assert_array_equal(
        source.read_tokens([8, 0])[0], np.concatenate(docs[8:9] + docs[:1])
    )
