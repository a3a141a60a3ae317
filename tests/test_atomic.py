"""Tests for wf_data.atomic's file writers: complete-or-absent files, unique temp names, and
concurrent writers of one path (the checkpoint directory functions are tested with the
checkpoints, in tests/data/test_checkpoint.py and tests/faults/)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from wf_data import atomic


def test_writers_round_trip_and_leave_only_the_file(tmp_path):
    atomic.write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic.write_text(tmp_path / "b.txt", "naïve\n")
    atomic.write_json(tmp_path / "c.json", {"b": 1, "a": [1.5, None]})
    atomic.write_npy(tmp_path / "d.npy", np.arange(5, dtype=np.int64))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "naïve\n"
    assert (tmp_path / "c.json").read_text() == '{"a": [1.5, null], "b": 1}'
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), np.arange(5))
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.txt", "c.json", "d.npy"]
    assert (tmp_path / "a.bin").stat().st_mode & 0o044  # readable by others (no 0600 mkstemp)


def test_indented_json_is_for_people_and_the_compact_form_is_unchanged(tmp_path):
    value = {"name": "café", "shards": [{"records": 3}]}
    atomic.write_json(tmp_path / "manifest.json", value, indent=2)
    text = (tmp_path / "manifest.json").read_text(encoding="utf-8")
    assert text == '{\n  "name": "café",\n  "shards": [\n    {\n      "records": 3\n    }\n  ]\n}\n'
    # The compact form, which checkpoint digests are taken over, stays ASCII on one line.
    assert atomic.json_text(value, "x") == '{"name": "caf\\u00e9", "shards": [{"records": 3}]}'
    with pytest.raises(TypeError, match="manifest.json.*not JSON-safe"):
        atomic.write_json(tmp_path / "manifest.json", {"mean": float("inf")}, indent=2)
    assert atomic.read_json(tmp_path / "manifest.json") == value


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic.write_json(path, {"step": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.AtomicWriter(path) as file:
            file.write(b"{half")
            raise RuntimeError("disk full")

    def disk_full(tmp, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "publish_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic.write_json(path, {"step": 2})
    monkeypatch.undo()
    with pytest.raises(TypeError, match="state.json.*not JSON-safe"):
        atomic.write_json(path, {"loss": float("nan")})
    assert atomic.read_json(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["state.json"]


def test_temp_names_are_unique_siblings(tmp_path):
    names = {atomic.temp_path(tmp_path / "shard.array_record") for _ in range(100)}
    assert len(names) == 100
    for name in names:
        assert name.parent == tmp_path and name.name.startswith("shard.array_record.")
        assert name.name.endswith(".tmp")
    with pytest.raises(ValueError, match="mode"):
        atomic.AtomicWriter(tmp_path / "x", "a")


def test_temp_files_lists_only_what_killed_writers_left(tmp_path):
    killed = atomic.AtomicWriter(tmp_path / "manifest.json")  # never committed nor discarded
    killed.file.close()
    atomic.write_json(tmp_path / "state.json", {})
    for name in ("notes.tmp", "plan.json.tmp", "data.1-xyz.tmp"):
        (tmp_path / name).write_bytes(b"not ours")
    (tmp_path / "checkpoint.tmp").mkdir()  # a staging directory is recover()'s business
    assert atomic.temp_files(tmp_path) == [killed.tmp]
    assert atomic.temp_files(tmp_path / "missing") == []


_WRITER = textwrap.dedent(
    """
    import sys
    from wf_data import atomic
    path, byte = sys.argv[1], int(sys.argv[2])
    payload = bytes([byte]) * (1 << 18)
    for _ in range(150):
        atomic.write_bytes(path, payload)
    """
)


def test_two_concurrent_writers_of_one_path_never_collide(tmp_path):
    # Two live copies of one task (Beam/Spark speculation) write the same file at once: with a
    # shared temp name one would rename or truncate the other's half-written file.
    path = tmp_path / "part.bin"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(byte)], stderr=subprocess.PIPE, text=True
        )
        for byte in (1, 2)
    ]
    seen = set()
    while any(writer.poll() is None for writer in writers):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        assert len(data) == 1 << 18 and len(set(data)) == 1, "a reader saw a torn file"
        seen.add(data[0])
    for writer in writers:
        assert writer.wait() == 0, writer.stderr.read()
    data = path.read_bytes()
    assert len(data) == 1 << 18 and set(data) in ({1}, {2})
    assert os.listdir(tmp_path) == ["part.bin"]
    assert seen <= {1, 2}
