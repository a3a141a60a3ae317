"""Shared pieces of the prepare and dataset fault tests: inputs, a tiny tokenizer, processes."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

WORDS = "the a cat dog sat on mat ran far away big small red".split()


def write_jsonl(path: pathlib.Path, rows) -> pathlib.Path:
    """`rows` (dicts, or raw strings written as they are) one a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def corpus(directory: pathlib.Path, files: int = 3, docs: int = 40, seed: int = 0):
    """`files` jsonl files of `docs` short word documents; returns the directory."""
    for i in range(files):
        write_jsonl(
            directory / f"f{i}.jsonl",
            [
                {"text": " ".join(WORDS[(seed + i + j + k) % len(WORDS)] for k in range(1 + j % 9))}
                for j in range(docs)
            ],
        )
    return directory


class WordTokenizer:
    """A whitespace WordLevel tokenizer on the bare `tokenizers` library, with the interface
    `prepare` uses (name, ids, `fingerprint()`, `encode_batch`): no transformers or torch
    import, and tens of MB/s, so fault tests build token datasets in a second."""

    name, bos_id, eos_id, pad_id = "words", None, 1, 1

    def __init__(self, words=WORDS):
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {"[UNK]": 0, "</s>": 1, **{word: i + 2 for i, word in enumerate(words)}}
        self.backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        self.backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        self.vocab_size = len(vocab)

    def fingerprint(self) -> str:
        return f"words:{self.vocab_size}"

    def vocab_fingerprint(self) -> str:
        return f"word-vocab:{self.vocab_size}"

    def encode_batch(self, texts):
        import numpy as np

        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return [np.array(encoding.ids, dtype=np.int32) for encoding in encodings]


def run_cli(*args: str, env: dict | None = None, timeout: float = 120):
    """`wf-data ARGS` in a fresh Python process; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "wf_data.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )


# A prepare run slowed at every ArrayRecord file it writes. A file script, not `-c`: spawned
# workers re-import it (as __mp_main__), so the slowdown reaches them too.
SLOW_PREPARE = """
import sys, time
from wf_data.data.shards import sources

real_write_shard = sources.write_shard

def slow_write_shard(*args, **kwargs):
    time.sleep(float(sys.argv[3]))
    return real_write_shard(*args, **kwargs)

sources.write_shard = slow_write_shard

if __name__ == "__main__":
    from wf_data.data.prepare import prepare

    prepare(sys.argv[1], sys.argv[2], num_shards=4, piece_bytes=600, progress=False,
            workers=int(sys.argv[4]), overwrite=True)
"""


def start_slow_prepare(tmp_path, inputs, out, *, delay=0.05, workers=1, env=None):
    """Start `SLOW_PREPARE` as a subprocess; returns the Popen."""
    script = tmp_path / "slow_prepare.py"
    script.write_text(SLOW_PREPARE)
    return subprocess.Popen(
        [sys.executable, str(script), str(inputs), str(out), str(delay), str(workers)],
        env=dict(os.environ, **(env or {})),
    )


def wait_for(condition, process, timeout: float = 60.0) -> None:
    """Poll `condition()` until true; fails if `process` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert process.poll() is None, "the process ended before the fault could be injected"
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def kill_9(process) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def children(pid: int) -> list[int]:
    """Pids of the live processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] not in (b"Z", b"X"):
            found.append(int(entry.name))
    return found


def spawned_workers(pid: int) -> list[int]:
    """The children of `pid` that are multiprocessing spawn workers (not its helpers)."""
    found = []
    for child in children(pid):
        try:
            command = pathlib.Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:
            found.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as dead)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
