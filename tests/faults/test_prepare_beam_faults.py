"""Beam prepare killed with SIGKILL in the middle of a part, then run again: same output.

A child process runs the Beam pipeline (in-process DirectRunner) and kills itself with SIGKILL
right after one task has written its part under the attempt's own name, before the rename: the
state a worker lost mid-task leaves behind. The re-run must produce the local run's bytes and
remove the dead attempt's files.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("apache_beam", reason="the optional extra wf-data[beam]")

from wf_data.data.prepare import beam as prepare_beam  # noqa: E402
from wf_data.data.prepare import out_dir as out_dir_lib  # noqa: E402  # noqa: E402
from wf_data.data.prepare import run as prepare_lib  # noqa: E402

OPTIONS = {"num_shards": 2, "piece_bytes": 1500}

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from wf_data.data.prepare import parts
    from wf_data.data.prepare import beam as prepare_beam

    inputs, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    real = parts.prepare_file

    def prepare_then_die(task, part_path, **kwargs):
        result = real(task, part_path, **kwargs)
        if os.path.basename(part_path).startswith("part-000002.array_record.attempt-"):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    parts.prepare_file = prepare_then_die
    prepare_beam.run(inputs, out, **options)
""")


def _output_files(out_dir: Path) -> dict[str, str]:
    return {
        str(path.relative_to(out_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out_dir.rglob("*"))
        if path.is_file() and out_dir_lib.WORK_DIR_NAME not in path.parts
    }


@pytest.mark.slow
def test_rerun_after_sigkill_mid_part_is_identical_and_clean(tmp_path):
    inputs = tmp_path / "in.jsonl"
    words = "the a cat dog sat on mat ran far away".split()
    inputs.write_text(
        "".join(json.dumps({"text": " ".join(words[: 1 + i % 10])}) + "\n" for i in range(300))
    )
    assert len(prepare_lib.plan_tasks([inputs], OPTIONS["piece_bytes"])) > 3
    out = tmp_path / "beam"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(inputs), str(out), json.dumps(OPTIONS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    work = out_dir_lib.build_dir(out) / out_dir_lib.WORK_DIR_NAME  # built beside --out
    assert list(work.glob("part-000002.array_record.attempt-*"))  # what the kill left
    assert not out.exists()

    prepare_beam.run(inputs, out, **OPTIONS)
    prepare_lib.prepare(inputs, tmp_path / "local", progress=False, **OPTIONS)
    assert _output_files(out) == _output_files(tmp_path / "local")
    assert not list((out / out_dir_lib.WORK_DIR_NAME).glob("*.attempt-*"))
    assert not work.exists()
