"""`prepare --workers N`: one input file is encoded by every worker, in chunks, and the output,
errors, skipped records and resume are those of one worker."""

import importlib
import json
import os
import pathlib
import time

import pytest

from tests.data.prepare.test_prepare import (
    SimulatedKill,
    _files,
    _make_tokenizer,
    _run,
    _texts,
    _write_jsonl,
)
from wf_data.data.prepare import BadInputError, inputs

prepare_module = importlib.import_module("wf_data.data.prepare.run")

PID_DIR = "WF_TEST_PREPARE_PID_DIR"


def _encode_where_two_workers_meet(chunk, options):
    """`_encode_in_worker` that first waits until two worker processes hold a chunk at once:
    it returns only if the pool encodes chunks of one task in parallel."""
    directory = pathlib.Path(os.environ[PID_DIR])
    (directory / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(directory.iterdir())) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("no second worker encoded a chunk of this task in 60 s")
        time.sleep(0.01)
    return prepare_module._encode_in_worker(chunk, options)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return _make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def one_file(tmp_path, monkeypatch):
    """One jsonl file of 400 documents: one task, cut into chunks of about 2 KB."""
    monkeypatch.setattr(inputs, "CHUNK_BYTES", 2000)
    path = _write_jsonl(tmp_path / "in" / "one.jsonl", [{"text": t} for t in _texts(7, 400)])
    task = inputs.plan_tasks([path])[0]
    assert len(inputs.plan_tasks([path])) == 1 and len(inputs.plan_chunks(task)) > 10
    return path


@pytest.mark.slow
def test_one_task_is_encoded_by_two_workers_at_once(
    one_file, tmp_path, tiny_tokenizer, monkeypatch
):
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv(PID_DIR, str(pids))
    monkeypatch.setattr(prepare_module, "_encode_in_worker", _encode_where_two_workers_meet)
    options = dict(tokenizer=tiny_tokenizer, num_shards=2, append_eos=True)
    two = _run([one_file], tmp_path / "two", workers=2, **options)
    assert len({path.name for path in pids.iterdir()} - {str(os.getpid())}) == 2
    one = _run([one_file], tmp_path / "one", workers=1, **options)
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    assert two["summary"]["tokens_per_s"] > 0 and two["totals"] == one["totals"]


BAD_LINES = (3, 77, 78, 250, 399)  # 1-based lines of `one_file` made bad, spread over chunks


def _spoil(path: pathlib.Path) -> None:
    lines = path.read_text().splitlines()
    for line in BAD_LINES:
        lines[line - 1] = "{oops" if line % 2 else json.dumps({"text": 5})
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_records_named_by_line_across_chunks(one_file, tmp_path, workers):
    _spoil(one_file)
    with pytest.raises(BadInputError, match=rf"one\.jsonl:{BAD_LINES[0]}: malformed JSON"):
        _run([one_file], tmp_path / "strict", workers=workers)
    manifest = _run([one_file], tmp_path / "out", workers=workers, skip_bad=True)
    skipped = [entry["record"] for entry in manifest["summary"]["skipped"]]
    assert skipped == [f"{one_file}:{line}" for line in BAD_LINES]
    assert manifest["totals"]["records"] == 400 - len(BAD_LINES)


@pytest.mark.slow
def test_resume_with_workers_redoes_only_unfinished_parts(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(inputs, "CHUNK_BYTES", 500)  # several chunks a part
    for i in range(2):
        _write_jsonl(tmp_path / "in" / f"{i}.jsonl", [{"text": t} for t in _texts(i, 150)])
    options = dict(tokenizer=tiny_tokenizer, num_shards=2, piece_bytes=1500, workers=2)
    real_prepare_file = prepare_module.prepare_file
    calls, killed = [], []

    def killed_in_the_middle_of_the_third_part(task, part_path, **kwargs):
        calls.append(pathlib.Path(part_path).name)
        if len(calls) == 3 and not killed:
            killed.append(next(kwargs["encoded"]))  # this part's and the next chunks in flight
            raise SimulatedKill()
        return real_prepare_file(task, part_path, **kwargs)

    monkeypatch.setattr(prepare_module, "prepare_file", killed_in_the_middle_of_the_third_part)
    with pytest.raises(SimulatedKill):
        _run([tmp_path / "in"], tmp_path / "out", **options)
    calls.clear()
    _run([tmp_path / "in"], tmp_path / "out", **options)
    total_parts = len(inputs.plan_tasks(inputs.expand_inputs([tmp_path / "in"]), 1500))
    assert calls[0] == "part-000002.array_record" and len(calls) == total_parts - 2
    _run([tmp_path / "in"], tmp_path / "clean", **dict(options, workers=1))
    assert _files(tmp_path / "out") == _files(tmp_path / "clean")


def test_saved_encoder_loads_as_json_and_encodes_alike(tiny_tokenizer, tmp_path):
    """What workers start from: the tokenizer's JSON and a few fields (nothing unpickled)."""
    from wf_data.data.prepare.encoding import _BackendEncoder, _load_tokenizer

    encoder = _load_tokenizer(tiny_tokenizer)
    path, fields = encoder.save(tmp_path / "encoder.json")
    json.loads(pathlib.Path(path).read_text())  # JSON, not a pickle
    loaded = _BackendEncoder.load(path, fields)
    texts = _texts(3, 20)
    assert [ids.tolist() for ids in loaded.encode_batch(texts)] == [
        ids.tolist() for ids in encoder.encode_batch(texts)
    ]
    assert loaded.fingerprint() == encoder.fingerprint()
    assert loaded.vocab_fingerprint() == encoder.vocab_fingerprint()


def test_workers_leave_no_scratch_files(one_file, tmp_path, tiny_tokenizer, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(prepare_module.tempfile, "tempdir", str(scratch))
    _run([one_file], tmp_path / "out", workers=2, tokenizer=tiny_tokenizer)
    assert list(scratch.iterdir()) == []
