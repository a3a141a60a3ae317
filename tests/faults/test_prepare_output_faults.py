"""Faults on `wf-data prepare`'s output side, for real (issue 19 cases 3, 8 and 9).

A write that the kernel refuses (a file size limit, a full file system), two prepares racing
into one `--out`, and a re-run whose inputs are spelled differently: one line, exit status 2,
the dataset in `--out` as it was; or, for the same files by another spelling, nothing to do.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.faults._prepare_helpers import (
    corpus,
    kill_9,
    run_cli,
    start_slow_prepare,
    wait_for,
    write_jsonl,
)
from wf_data import cli
from wf_data.data.prepare import OutDirError, out_guard, plan_prepare, prepare
from wf_data.data.prepare import out_dir as out_dir_lib
from wf_data.data.shards import sources


def _dataset_files(out_dir):
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir()) if p.is_file()}


def _big_inputs(directory, files=2):
    """`files` jsonl files of ~1 MB of text each: parts far over a 256 KiB file size limit."""
    for i in range(files):
        write_jsonl(
            directory / f"big{i}.jsonl",
            [{"text": f"doc {i} {j} " + "lorem ipsum dolor " * 60} for j in range(1000)],
        )
    return directory


# Runs argv[2:] with the file size limit argv[1] (bytes), by exec: no preexec_fn in pytest.
LIMITED = (
    "import os, resource, sys; limit = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); os.execv(sys.argv[2], sys.argv[2:])"
)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_file_size_limit_is_one_line_exit_2(tmp_path, workers):
    """The kernel refuses the write (EFBIG, RLIMIT_FSIZE; Python ignores SIGXFSZ): in the
    writer of array_record (a RuntimeError) or of Python; in a worker or in-process."""
    out = tmp_path / "out"
    prepare(corpus(tmp_path / "a", files=1, docs=20), out, progress=False)
    dataset = _dataset_files(out)
    inputs = _big_inputs(tmp_path / "b")
    argv = [sys.executable, "-m", "wf_data.cli", "prepare", str(inputs), "--out", str(out)]
    argv += ["--overwrite", "--quiet", "--workers", str(workers)]
    limited = [sys.executable, "-c", LIMITED, str(256 << 10), *argv]
    result = subprocess.run(limited, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"wf-data prepare: error: --out {out}: cannot write {tmp_path}/")
    assert "File too large (EFBIG)" in lines[0] and "ulimit -f" in lines[0]
    assert "The dataset in --out is unchanged; a re-run resumes" in lines[0]
    assert _dataset_files(out) == dataset and sources.verify_dataset(out) == []
    assert not out_guard.lock_path(out).exists()
    # the limit lifted, the same command finishes
    assert subprocess.run(argv, capture_output=True, timeout=120).returncode == 0
    assert len(sources.open_dataset(out)) == 2000


# Run inside a user and mount namespace, on a 1 MiB tmpfs mounted at sys.argv[1]: prepare a
# small dataset there, then a larger one over it with --overwrite; print what happened.
FULL_DISK = """
import json, os, pathlib, subprocess, sys
sys.path.insert(0, sys.argv[2])
from tests.faults._prepare_helpers import corpus
from wf_data.data.prepare import prepare
from wf_data.data.shards import sources

mount, inputs = pathlib.Path(sys.argv[1]), sys.argv[3]
out = mount / "out"
prepare(corpus(pathlib.Path(sys.argv[4])), out, progress=False)
before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
result = subprocess.run(
    [sys.executable, "-m", "wf_data.cli", "prepare", inputs, "--out", str(out), "--overwrite",
     "--quiet"], capture_output=True, text=True)
after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
print(json.dumps({"returncode": result.returncode, "stderr": result.stderr,
                  "unchanged": before == after, "problems": sources.verify_dataset(out)}))
"""


@pytest.mark.slow
def test_full_file_system_is_one_line_exit_2(tmp_path):
    """ENOSPC from a real full file system: a 1 MiB tmpfs in a user namespace (no root)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    mount = tmp_path / "mnt"
    mount.mkdir()
    probe = subprocess.run(
        ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces with mounts here: {probe.stderr.decode().strip()}")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = f'mount -t tmpfs -o size=1m tmpfs {mount} && exec {sys.executable} -c "$0" "$@"'
    inputs = _big_inputs(tmp_path / "b", files=3)
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, FULL_DISK, str(mount), root, str(inputs)]
        + [str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    lines = report["stderr"].strip().splitlines()
    assert report["returncode"] == 2 and len(lines) == 1, report["stderr"]
    assert "No space left on device (ENOSPC); free space on its file system" in lines[0]
    assert report["unchanged"] and report["problems"] == []


@pytest.mark.slow
def test_two_prepares_into_one_out(tmp_path):
    """The second prepare is refused at once, naming the first's pid; the first finishes.
    A kill -9 of the holder releases the lock (the kernel drops it)."""
    inputs = corpus(tmp_path / "in", files=4, docs=30)
    out = tmp_path / "out"
    first = start_slow_prepare(tmp_path, inputs, out, delay=0.3)
    work = out_dir_lib.build_dir(out) / ".wf-prepare"
    wait_for(lambda: work.exists(), first)
    second = run_cli("prepare", str(inputs), "--out", str(out), "--quiet")
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"another prepare (pid {first.pid}) is writing this dataset" in lines[0]
    assert first.wait(timeout=120) == 0
    assert sources.verify_dataset(out) == [] and len(sources.open_dataset(out)) == 120
    assert not out_guard.lock_path(out).exists()

    other = corpus(tmp_path / "other", files=4, docs=30, seed=3)
    killed = start_slow_prepare(tmp_path, other, out, delay=0.3)
    wait_for(lambda: any(work.glob("part-*.done.json")), killed)
    kill_9(killed)
    assert out_guard.lock_path(out).exists()  # left behind, but no longer locked
    manifest = prepare(other, out, num_shards=4, piece_bytes=600, progress=False, overwrite=True)
    assert manifest["summary"]["parts_run"] < len(plan_prepare(other, out, piece_bytes=600).tasks)
    assert not out_guard.lock_path(out).exists()


def test_lock_is_per_dataset(tmp_path):
    """A held lock refuses its own `--out` only; the message names this process."""
    inputs = corpus(tmp_path / "in", files=1, docs=5)
    with out_guard.writing(tmp_path / "a"):
        with pytest.raises(OutDirError, match=rf"another prepare \(pid {os.getpid()}\)"):
            prepare(inputs, tmp_path / "a", progress=False)
        prepare(inputs, tmp_path / "b", progress=False)
    prepare(inputs, tmp_path / "a", progress=False)


def test_rerun_with_inputs_spelled_differently_is_a_no_op(tmp_path, monkeypatch, capsys):
    inputs = corpus(tmp_path / "data" / "in", files=2, docs=10)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    out = tmp_path / "out"
    assert cli.main(["prepare", str(inputs), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    dataset = _dataset_files(out)
    monkeypatch.chdir(tmp_path)
    spellings = [
        "data/in",
        "data/in/",
        f"{inputs}/",
        "link/in",
        str(tmp_path / "link" / "in"),
        "./data/../data/in",
    ]
    for spelling in spellings:
        status = cli.main(["prepare", spelling, "--out", "out/", "--quiet"])
        printed = capsys.readouterr()
        assert status == 0, (spelling, printed.err)
        assert "parts run 0, shards written 0" in printed.out, spelling
    assert _dataset_files(out) == dataset
    # the same parts, so a killed run resumes whatever the spelling
    keys = {tuple(plan_prepare(spelling, out).part_keys) for spelling in spellings}
    assert len(keys) == 1


def test_refusal_always_names_a_reason(tmp_path):
    inputs = corpus(tmp_path / "in", files=2, docs=10)
    out = tmp_path / "out"
    prepare(inputs, out, progress=False)
    plan_file = out / ".wf-prepare" / "plan.json"
    plan = json.loads(plan_file.read_text())
    # a plan recorded under another key (an older wf-data) with the same inputs and settings
    plan_file.write_text(json.dumps(dict(plan, key="0" * 64)))
    assert prepare(inputs, out, progress=False)["summary"]["shards_written"] == 0
    os.utime(inputs / "f1.jsonl", ns=(1, 1))  # touched: the same bytes, another mtime
    with pytest.raises(OutDirError) as refused:
        prepare(inputs, out, progress=False)
    message = str(refused.value)
    assert f"(input changed (size or modification time): {inputs / 'f1.jsonl'})" in message
    del plan["inputs"]  # an unrecorded plan still gives a reason
    plan_file.write_text(json.dumps(plan))
    with pytest.raises(OutDirError, match=r"other inputs or settings \(the inputs and settings"):
        prepare(inputs, out, progress=False)


def test_write_failure_names_only_output_files(tmp_path):
    """Which errors are the output's: by path when one is given, else by errno."""
    out = tmp_path / "out"
    build = out_dir_lib.build_dir(out)
    riegeli = RuntimeError(
        f"write() failed: No space left on device; writing {build}/.wf-prepare/part-0.tmp; "
        "at byte 1945600; Failed to close chunk_writer"
    )
    assert "No space left on device (ENOSPC)" in str(out_guard.write_failure(riegeli, out))
    assert out_guard.write_failure(OSError(28, "No space left on device"), out) is not None
    not_ours = [
        PermissionError(13, "Permission denied", str(tmp_path / "input.jsonl")),
        RuntimeError("chunk data hash mismatch"),
        OSError(5, "Input/output error"),  # no file: could be the input's
        FileNotFoundError(2, "No such file", str(tmp_path / "outside" / "out")),
    ]
    for error in not_ours:
        assert out_guard.write_failure(error, out) is None, error
