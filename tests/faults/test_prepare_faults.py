"""Faults injected into `wf-data prepare` for real: kill -9, damaged inputs, unusable --out.

Issue 10 cases 1 (a failing prepare keeps the dataset in --out), 3 (workers die with a killed
prepare), 8 and 11 (damaged compressed inputs are file errors, exit 2), 9 (inputs given twice)
and 13 (memory of a 45 MB document); issue 19 case 12 (a 1 GB single-line record).
"""

import gzip
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
import zstandard

from tests.faults._prepare_helpers import (
    alive,
    children,
    corpus,
    kill_9,
    run_cli,
    spawned_workers,
    start_slow_prepare,
    wait_for,
    write_jsonl,
)
from wf_data import cli
from wf_data.data.prepare import out_dir as out_dir_lib
from wf_data.data.prepare import prepare
from wf_data.data.shards import sources


def _dataset_files(out_dir):
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir()) if p.is_file()}


def _records(out_dir):
    source = sources.open_dataset(out_dir)
    return source.__getitems__(range(len(source)))


@pytest.mark.slow
def test_killed_or_failing_prepare_keeps_the_finished_dataset(tmp_path):
    out = tmp_path / "out"
    prepare(corpus(tmp_path / "a", files=2, docs=30), out, num_shards=2, progress=False)
    dataset_a, records_a = _dataset_files(out), _records(out)
    b_inputs = corpus(tmp_path / "b", files=4, docs=30, seed=5)

    refused = run_cli("prepare", str(b_inputs), "--out", str(out), "--shards", "2", "--quiet")
    assert refused.returncode == 2
    assert "input added" in refused.stderr and "--overwrite" in refused.stderr

    # B killed -9 in the middle of its parts
    process = start_slow_prepare(tmp_path, b_inputs, out)
    work = out_dir_lib.build_dir(out) / ".wf-prepare"
    wait_for(lambda: len(list(work.glob("*.done.json"))) >= 3, process)
    kill_9(process)
    assert _dataset_files(out) == dataset_a and _records(out) == records_a
    assert sources.verify_dataset(out) == []

    # B failing on a bad record
    write_jsonl(b_inputs / "zz-bad.jsonl", ['{"text": "fine"}', '{"text": 3}'])
    failed = run_cli("prepare", str(b_inputs), "--out", str(out), "--overwrite", "--quiet")
    assert failed.returncode == 1 and "zz-bad.jsonl:2: field 'text'" in failed.stderr
    assert _dataset_files(out) == dataset_a and sources.verify_dataset(out) == []

    # B completing (resuming the killed run): swapped in, nothing left beside it
    (b_inputs / "zz-bad.jsonl").unlink()
    manifest = prepare(b_inputs, out, num_shards=4, piece_bytes=600, progress=False, overwrite=True)
    assert manifest["totals"]["records"] == 120 and len(_records(out)) == 120
    assert sources.verify_dataset(out) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_swap_killed_between_its_renames_is_completed(tmp_path):
    """The state a kill leaves between the two renames of the portable swap, then a re-run."""
    out = tmp_path / "out"
    inputs = corpus(tmp_path / "in")
    prepare(inputs, out, num_shards=2, progress=False)
    new = prepare(inputs, tmp_path / "new", num_shards=3, progress=False)
    os.replace(out, tmp_path / ".out.wf-replaced")  # first rename done
    os.replace(tmp_path / "new", out_dir_lib.build_dir(out))  # the finished build
    again = prepare(inputs, out, num_shards=3, progress=False)
    assert again["fingerprint"] == new["fingerprint"]
    assert again["summary"]["shards_written"] == 0  # recovered, not rebuilt
    assert not (tmp_path / ".out.wf-replaced").exists()
    # killed before the first rename completed: the old dataset comes back
    os.replace(out, tmp_path / ".out.wf-replaced")
    out_dir_lib.build_dir(out).mkdir()
    out_dir_lib.recover(out)
    assert sources.read_manifest(out)["fingerprint"] == new["fingerprint"]


@pytest.mark.slow
def test_workers_die_with_a_killed_prepare(tmp_path):
    inputs = corpus(tmp_path / "in", files=6, docs=60)
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    process = start_slow_prepare(
        tmp_path, inputs, out, delay=0.3, workers=2, env={"TMPDIR": str(tmp)}
    )
    work = out_dir_lib.build_dir(out) / ".wf-prepare"
    wait_for(
        lambda: len(spawned_workers(process.pid)) == 2 and any(work.glob("part-*.done.json")),
        process,
    )
    family = children(process.pid)  # the two workers and multiprocessing's resource tracker
    kill_9(process)
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in family if alive(pid)] == []
    written = {path: path.stat().st_mtime_ns for path in work.parent.rglob("*")}
    time.sleep(0.7)  # longer than a slowed write: a live worker would have written by now
    assert {path: path.stat().st_mtime_ns for path in work.parent.rglob("*")} == written
    assert list(tmp.glob("pymp-*")) == []


def _zst(rows, keep=1.0):
    data = zstandard.ZstdCompressor(write_checksum=True).compress("".join(rows).encode())
    return data[: int(len(data) * keep)]


def _gz(rows, keep=1.0):
    data = gzip.compress("".join(rows).encode())
    return data[: int(len(data) * keep)]


DOCS_2000 = [
    json.dumps({"text": f"document {i} " + "word " * (i % 50)}) + "\n" for i in range(2000)
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("docs.jsonl.zst", _zst(DOCS_2000, keep=0.6), "truncated zstd stream"),
        ("docs.jsonl.gz", _gz(DOCS_2000, keep=0.6), "truncated gzip stream"),
        ("docs.jsonl.zst", bytes(range(256)) * 8, "corrupt zstd stream"),
        ("docs.jsonl.gz", b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8, "corrupt gzip stream"),
    ],
    ids=["truncated-zst", "truncated-gz", "garbage-zst", "garbage-gz"],
)
def test_damaged_compressed_input_is_a_file_error(tmp_path, name, content, message):
    out = tmp_path / "out"
    prepare(corpus(tmp_path / "a"), out, progress=False)
    dataset = _dataset_files(out)
    path = tmp_path / "in" / name
    path.parent.mkdir()
    path.write_bytes(content)
    result = run_cli(
        "prepare", str(path), "--out", str(out), "--skip-bad", "--overwrite", "--quiet"
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wf-data prepare: error: ")
    assert str(path) in lines[0] and message in lines[0] and "re-" in lines[0]  # the fix
    assert _dataset_files(out) == dataset  # never a partial dataset, the old one kept


def test_damaged_parquet_is_a_file_error(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(100)]}), path)
    path.write_bytes(path.read_bytes()[:-40])  # the footer cut off
    assert cli.main(["prepare", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert f"{path}: not a readable parquet file" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["empty.jsonl.zst", "empty.jsonl.gz"])
def test_zero_byte_compressed_input_is_a_file_error(tmp_path, capsys, name):
    (tmp_path / name).write_bytes(b"")
    argv = ["prepare", str(tmp_path / name), "--out", str(tmp_path / "out"), "--skip-bad"]
    assert cli.main(argv + ["--quiet"]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / name}: empty file (0 bytes)" in error
    assert not (tmp_path / "out").exists()


def test_skip_bad_lists_every_skipped_record(tmp_path, capsys):
    rows = ['{"text": "bad' if i % 4 == 1 else json.dumps({"text": f"doc {i}"}) for i in range(100)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert cli.main(["prepare", str(path), "--out", str(out), "--skip-bad", "--quiet"]) == 0
    printed = capsys.readouterr().out
    bad_lines = [i + 1 for i in range(100) if i % 4 == 1]  # 25 of them
    assert "skipped bad 25" in printed and "first 20" in printed
    shown = [line for line in printed.splitlines() if "malformed JSON" in line]
    assert [line.split(":")[1] for line in shown] == [str(n) for n in bad_lines[:20]]
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [entry["record"] for entry in skipped] == [f"{path}:{n}" for n in bad_lines]
    assert len(sources.open_dataset(out)) == 75


def test_same_input_twice_is_prepared_once(tmp_path, capsys):
    inputs = corpus(tmp_path / "in", files=2, docs=10)
    (tmp_path / "link.jsonl").symlink_to(inputs / "f1.jsonl")
    argv = ["prepare", str(inputs), str(inputs / "f0.jsonl"), str(tmp_path / "link.jsonl")]
    assert cli.main(argv + ["--out", str(tmp_path / "out"), "--quiet"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 2 and all("given more than once" in w for w in warnings)
    assert len(sources.open_dataset(tmp_path / "out")) == 20


def test_unusable_out_is_one_line_exit_2(tmp_path):
    inputs = corpus(tmp_path / "in", files=1)
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "file" / "out", "file")]
    if os.geteuid() != 0:  # root writes into read-only directories
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
        cases.append((read_only / "out", "not writable"))
    for out, message in cases:
        result = run_cli("prepare", str(inputs), "--out", str(out), "--quiet")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert str(out.parent) in lines[0] and message in lines[0]


# Long documents go through prepare's own code (parse, pieces, encode, write, copy); the
# tokenizer is `WordTokenizer` on the bare `tokenizers` library, so that the tests run at tens
# of MB/s rather than the shipped BPE's ~1 MB/s, and measure prepare, not torch imports.
PREPARE_WITH_WORDS = """
import sys
sys.path.insert(0, sys.argv[1])
from tests.faults._prepare_helpers import WordTokenizer
from wf_data.data.prepare import prepare

prepare(sys.argv[2], sys.argv[3], tokenizer=WordTokenizer(sys.argv[4].split()), skip_bad=True,
        progress=False)
"""

# A fresh, small measuring process: its children's peak is the prepare's alone. (A child forked
# from the test process would count the test's pages: Linux keeps the peak across exec.)
MEASURE = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def _prepare_peak_mib(inputs, out, words) -> float:
    """Peak resident memory (MiB) of `prepare(inputs, out)` with a `WordTokenizer(words)`."""
    root = pathlib.Path(__file__).resolve().parents[2]
    command = [sys.executable, "-c", PREPARE_WITH_WORDS, root, inputs, out, " ".join(words)]
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, *map(str, command)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return int(result.stdout.split()[-1]) / 1024


@pytest.mark.slow
def test_45mb_document_in_bounded_memory(tmp_path):
    words = [f"{w}{w[::-1]}{i}" for i, w in enumerate("alpha bravo charlie delta echo".split())]
    rng = np.random.default_rng(0)
    count = 45_000_000 // 13
    ids = rng.integers(0, len(words), count)
    with open(tmp_path / "long.jsonl", "w") as f:
        f.write('{"text": "' + " ".join(np.array(words)[ids]) + '"}\n{"text": "short"}\n')
    peak_mib = _prepare_peak_mib(tmp_path / "long.jsonl", tmp_path / "out", words)
    assert peak_mib < 512, f"prepare peaked at {peak_mib:.0f} MiB"  # 246 MiB measured
    source = sources.open_dataset(tmp_path / "out")
    assert source.lengths.tolist() == [count, 1]
    np.testing.assert_array_equal(source[0][:1000], ids[:1000] + 2)
    np.testing.assert_array_equal(source[0][-1000:], ids[-1000:] + 2)


@pytest.mark.slow
def test_one_gigabyte_line_in_bounded_memory(tmp_path):
    """A 1 GB record (over max_doc_bytes) in a file that prepare cuts into pieces: refused by
    its size as it streams by, never held whole (issue 19 case 12: it peaked at 1.8 GiB)."""
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "')
        chunk = b"word " * 200_000
        for _ in range(1000):
            f.write(chunk)
        f.write(b'"}\n{"text": "short word"}\n')
    assert path.stat().st_size > 1_000_000_000
    peak_mib = _prepare_peak_mib(path, tmp_path / "out", ["word", "short"])
    # about one read chunk plus max_doc_bytes (64 MiB) held until the line is known too long
    assert peak_mib < 256, f"prepare peaked at {peak_mib:.0f} MiB"  # 113 MiB measured
    manifest = sources.read_manifest(tmp_path / "out")
    assert manifest["totals"]["records"] == 1 and manifest["totals"]["skipped_bad"] == 1
