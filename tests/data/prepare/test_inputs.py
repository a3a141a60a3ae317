"""Tests for wf_data.data.prepare.inputs: tasks cut into chunks that add up to the task."""

import json

import pytest

from wf_data.data.prepare import inputs, iter_documents


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def _documents(tasks):
    return [doc for task in tasks for doc in iter_documents(task)]


def test_jsonl_chunks_cut_a_piece_at_line_starts(tmp_path):
    texts = [f"document {i} " + "word " * (i % 37) for i in range(500)]
    texts[123] = "long " * 2000  # a line longer than a chunk stays whole
    path = _jsonl(tmp_path / "a.jsonl", texts)
    data = path.read_bytes()
    for task in inputs.plan_tasks([path], piece_bytes=9000):
        chunks = inputs.plan_chunks(task, chunk_bytes=1000)
        assert len(chunks) > 3
        assert chunks[0].start == task.start and chunks[-1].stop == task.stop
        assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:], strict=False))
        assert all(data[chunk.start - 1 : chunk.start] == b"\n" for chunk in chunks[1:])
        assert all(chunk.stop - chunk.start < 1000 + 10_100 for chunk in chunks)
        assert _documents(chunks) == _documents([task])
    assert _documents(inputs.plan_chunks(inputs.plan_tasks([path])[0], 1000)) == texts


def test_parquet_chunks_are_row_groups_with_their_first_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"row {i}" for i in range(95)]
    texts[61] = None  # a bad record: named by its row (1-based) in whichever chunk holds it
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), tmp_path / "t.parquet", 10)
    (task,) = inputs.plan_tasks([tmp_path / "t.parquet"])
    chunks = inputs.plan_chunks(task)
    assert [(c.start, c.stop, c.first_row) for c in chunks] == [
        (group, group + 1, 10 * group) for group in range(10)
    ]
    skipped = []
    documents = [
        document
        for chunk in chunks
        for document in iter_documents(
            chunk, skip_bad=True, on_skip=lambda where, message: skipped.append(where)
        )
    ]
    assert documents == texts[:61] + texts[62:]
    assert skipped == [f"{tmp_path / 't.parquet'}: row 62"]


def test_compressed_and_small_inputs_stay_one_chunk(tmp_path):
    import gzip

    path = _jsonl(tmp_path / "s.jsonl", ["a", "b"])
    (task,) = inputs.plan_tasks([path])
    assert inputs.plan_chunks(task, chunk_bytes=1000) == [task]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": "x" * 100}) + "\n" for _ in range(100)))
    (task,) = inputs.plan_tasks([tmp_path / "c.jsonl.gz"])
    assert inputs.plan_chunks(task, chunk_bytes=100) == [task]


def test_line_counts_resume_from_earlier_counts(tmp_path, monkeypatch):
    path = _jsonl(tmp_path / "a.jsonl", [f"doc {i}" for i in range(1000)])
    data = path.read_bytes()
    offsets = [i for i in range(len(data)) if data[i - 1 : i] == b"\n"][::97]
    read = []
    real_open = open

    def counting_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if str(file) == str(path):
            real_read = handle.read
            handle.read = lambda n=-1: read.append(len(chunk := real_read(n))) or chunk
        return handle

    monkeypatch.setattr("builtins.open", counting_open)
    for offset in offsets:
        assert inputs._count_lines(str(path), offset) == data[:offset].count(b"\n")
    assert sum(read) <= len(data)  # each count went on from the one before
