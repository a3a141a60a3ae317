"""Checkpoint saves killed with SIGKILL at random moments, and damaged checkpoint files.

A child process saves checkpoints in a loop (each save's tensors, loader state and metadata
all encode the save's counter `i`); the test kills it at a seeded random moment, checks that the
latest checkpoint loads and is exactly one save, not older than the last save the child
reported done, then starts a new child on the same directory (its first save recovers what the
kill left) and kills it again. Children are forked from one process that imported torch once,
so each kill costs a fraction of a second rather than a torch import.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from wf_data import atomic

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
KILLS = 5

# Reads "root writer start" lines; forks a child per line that saves in a loop, appending each
# finished counter to root/progress, and answers with the child's pid.
FORK_SERVER = textwrap.dedent("""
    import itertools, os, signal, sys
    import torch
    from wf_data.integrations.checkpoint import save_with_dcp
    from wf_data.distributed import save_checkpoint

    class Loader:
        def __init__(self, i):
            self.i = i

        def state_dict(self):
            return {"i": self.i, "history": list(range(self.i % 50))}

    def save_one(root, writer, i, model, optimizer):
        with torch.no_grad():
            model.weight.fill_(i)
        if writer == "dcp":  # one directory, replaced by every save
            save_with_dcp(f"{root}/ckpt", Loader(i), {"model": model.state_dict()})
        else:  # step-N directories, each step saved twice (the second replaces the first)
            optimizer = optimizer or torch.optim.AdamW(model.parameters())
            save_checkpoint(root, step=i // 2, model=model, optimizer=optimizer,
                            dataloader=Loader(i), extra={"i": i})

    def save_forever(root, writer, start):
        model = torch.nn.Linear(32, 32)
        optimizer = torch.optim.AdamW(model.parameters())
        with open(f"{root}/progress", "a") as progress:
            for i in itertools.count(start):
                save_one(root, writer, i, model, optimizer)
                progress.write(f"{i}\\n")
                progress.flush()

    # One save of each kind first, so lazy imports (DCP takes seconds) happen before forking.
    for writer in ("dcp", "fsdp2"):
        save_one(sys.argv[1], writer, 0, torch.nn.Linear(32, 32), None)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed children need no reaping
    print("ready", flush=True)
    for line in sys.stdin:
        root, writer, start = line.split()
        pid = os.fork()
        if pid == 0:
            save_forever(root, writer, int(start))
        print(pid, flush=True)
""")


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    warm_up = tmp_path_factory.mktemp("warm-up")
    server = subprocess.Popen(
        [sys.executable, "-c", FORK_SERVER, str(warm_up)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert server.stdout.readline() == "ready\n"
    yield server
    server.kill()
    server.wait()


class Loader:
    def __init__(self):
        self.state = None

    def load_state_dict(self, state):
        self.state = state


def _load_latest(root: Path, writer: str) -> int:
    """The counter `i` of the latest checkpoint, after checking every part agrees with it."""
    from wf_data.distributed import load_checkpoint
    from wf_data.integrations.checkpoint import load_with_dcp

    loader, model = Loader(), torch.nn.Linear(32, 32)
    if writer == "dcp":
        state = {"model": model.state_dict()}
        load_with_dcp(root / "ckpt", loader, state)
        weight = state["model"]["weight"]
        i = loader.state["i"]
    else:
        step, extra = load_checkpoint(root, model=model, optimizer=None, dataloader=loader)
        weight, i = model.weight.detach(), extra["i"]
        assert step == i // 2
    assert loader.state == {"i": i, "history": list(range(i % 50))}
    np.testing.assert_array_equal(weight.numpy(), np.full((32, 32), i, dtype=np.float32))
    return i


def _reported(progress: Path) -> list[int]:
    return [int(line) for line in progress.read_text().split()] if progress.exists() else []


def _run_until_killed(server, root: Path, writer: str, start: int, delay: float) -> int:
    """Fork a saving child, kill -9 it `delay` s after its first completed save; returns the
    last counter it reported saved."""
    progress = root / "progress"
    progress.unlink(missing_ok=True)
    server.stdin.write(f"{root} {writer} {start}\n")
    server.stdin.flush()
    pid = int(server.stdout.readline())
    deadline = time.monotonic() + 60
    while not _reported(progress):
        assert time.monotonic() < deadline, "the saving child made no save in 60 s"
        time.sleep(0.01)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    while Path(f"/proc/{pid}").exists():  # gone once the kernel has torn it down
        time.sleep(0.01)
    return max(_reported(progress))


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["dcp", "fsdp2"])
def test_kill_9_during_saves_keeps_the_latest_complete_checkpoint(tmp_path, fork_server, writer):
    rng = np.random.default_rng(10)
    start, interrupted = 1, 0
    for _ in range(KILLS):
        delay = float(rng.uniform(0.0, 0.3))
        reported = _run_until_killed(fork_server, tmp_path, writer, start, delay)
        interrupted += any(path.suffix in (".tmp", ".old") for path in tmp_path.rglob("*"))
        loaded = _load_latest(tmp_path, writer)
        # The last save the child reported is durable; one more may have been published
        # between the rename and the report.
        assert reported <= loaded <= reported + 1
        start = loaded + 1
    # The child saves back to back, so kills land mid-save: check that some did.
    assert interrupted > 0


# ----------------------------------------------------------------- interrupted publication


def _write_version(path: Path, version: int) -> None:
    path.mkdir()
    atomic.write_json(path / "state.json", {"version": version})


def _version(path: Path) -> int:
    return atomic.read_json(atomic.readable(path) / "state.json")["version"]


@pytest.mark.parametrize("moment", ["filling_tmp", "after_old_aside", "after_new_in"])
def test_every_moment_of_a_publish_leaves_one_complete_version(tmp_path, moment):
    """The disk states a kill leaves between the steps of `publish_directory`, replayed."""
    path = tmp_path / "ckpt"
    _write_version(path, 1)
    tmp, old = tmp_path / "ckpt.tmp", tmp_path / "ckpt.old"
    tmp.mkdir()
    (tmp / "state.json").write_text('{"vers')  # a new version cut short
    if moment != "filling_tmp":
        (tmp / "state.json").write_text('{"version": 2}')
        path.rename(old)
    if moment == "after_new_in":
        tmp.rename(path)
    expected = 2 if moment == "after_new_in" else 1
    assert _version(path) == expected  # readers, before any recovery
    atomic.recover(path)  # the next writer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert _version(path) == expected
    with atomic.staging_directory(path, {"state.json": {"version": 3}}):
        pass
    assert _version(path) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_failed_save_leaves_the_previous_one(tmp_path):
    path = tmp_path / "ckpt"
    with atomic.staging_directory(path, {"state.json": {"version": 1}}):
        pass
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.staging_directory(path, {"state.json": {"version": 2}}) as tmp:
            (tmp / "partial").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert _version(path) == 1


# ----------------------------------------------------------------------- damaged files


@pytest.fixture
def saved(tmp_path):
    from wf_data.integrations.checkpoint import save_with_dcp

    class State:
        def state_dict(self):
            return {"i": 5}

    model = torch.nn.Linear(4, 4)
    return save_with_dcp(tmp_path / "ckpt", State(), {"model": model.state_dict()})


def _damage(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # one flipped byte in the middle
        data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_damaged_loader_state_is_an_error_naming_the_file(saved, how):
    from wf_data.integrations.checkpoint import load_with_dcp

    file = saved / atomic.LOADER_STATE_FILE
    if how == "flipped":  # flip a byte of the JSON syntax, not of a digit
        file.write_text(file.read_text().replace("{", "\x84", 1))
    else:
        _damage(file, how)
    with pytest.raises(atomic.CheckpointFormatError, match=f"{file} has "):
        load_with_dcp(saved, Loader())
    # Saved before checkpoints carried checksums: the JSON reader still names the file.
    (saved / atomic.CHECKSUMS_FILE).unlink()
    with pytest.warns(UserWarning, match="no checksums.json"):
        with pytest.raises(atomic.CheckpointFormatError, match=f"{file}: not a JSON document"):
            load_with_dcp(saved, Loader())


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_damaged_dcp_metadata_is_an_error_naming_the_file(saved, how):
    from wf_data.integrations.checkpoint import load_with_dcp

    _damage(saved / ".metadata", how)
    state = {"model": torch.nn.Linear(4, 4).state_dict()}
    with pytest.raises(atomic.CheckpointFormatError, match=rf"{saved / '.metadata'} has "):
        load_with_dcp(saved, Loader(), state)
    # Saved before checkpoints carried checksums: the safe metadata reader still refuses it.
    (saved / atomic.CHECKSUMS_FILE).unlink()
    with pytest.warns(UserWarning, match="no checksums.json"):
        with pytest.raises(atomic.CheckpointFormatError, match=r"\.metadata: "):
            load_with_dcp(saved, Loader(), state)


def test_loader_state_is_written_once_as_json(saved):
    assert json.loads((saved / atomic.LOADER_STATE_FILE).read_text()) == {"i": 5}


# ----------------------------------------------------------------- damaged tensor files


class State:
    def __init__(self, i=5):
        self.i = i

    def state_dict(self):
        return {"i": self.i}


def _save(root: Path, writer: str, model, async_save=False) -> Path:
    """A checkpoint of ``model`` (and an AdamW state, a loader state) by ``writer``."""
    from wf_data.distributed import save_checkpoint
    from wf_data.integrations.checkpoint import save_with_dcp

    if writer == "dcp":
        return save_with_dcp(root / "ckpt", State(), {"model": model.state_dict()})
    optimizer = torch.optim.AdamW(model.parameters())
    saved = save_checkpoint(
        root, step=1, model=model, optimizer=optimizer, dataloader=State(), async_save=async_save
    )
    return saved.result() if async_save else saved


def _load(directory: Path, writer: str) -> torch.nn.Module:
    """The model loaded back from ``directory``."""
    from wf_data.distributed import load_checkpoint
    from wf_data.integrations.checkpoint import load_with_dcp

    model = torch.nn.Linear(64, 64)
    if writer == "dcp":
        state = {"model": model.state_dict()}
        load_with_dcp(directory, Loader(), state)
        model.load_state_dict(state["model"])
    else:
        load_checkpoint(directory, model=model, optimizer=None, dataloader=Loader())
    return model


def _damage_tensor_file(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "garbage":
        data = bytearray(b"not a checkpoint file " * (len(data) // 22 + 1))[: len(data)]
    else:  # one byte of the weights, past the header: the file still parses
        data[-len(data) // 3] ^= 0x01
    file.write_bytes(bytes(data))


WRITERS = ["dcp", "fsdp2", "fsdp2-async"]


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("how", ["truncated", "garbage", "flipped"])
def test_damaged_tensor_file_is_an_error_naming_it(tmp_path, writer, how):
    """A truncated, garbage or bit-flipped .distcp: a CheckpointFormatError (an Exception)
    naming the file, and nothing loaded. Issue 19 case 4: truncated and garbage files raised
    torch's CheckpointException, a BaseException that `except Exception` does not catch, and
    a flipped byte loaded other weights without a word."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    directory = _save(tmp_path, writer.removesuffix("-async"), model, writer.endswith("-async"))
    kind = writer.removesuffix("-async")
    torch.testing.assert_close(_load(directory, kind).weight, model.weight)
    (tensor_file,) = sorted(directory.glob("*.distcp"))[:1]
    _damage_tensor_file(tensor_file, how)
    with pytest.raises(atomic.CheckpointFormatError, match=f"{tensor_file} has "):
        _load(directory, kind)


@pytest.mark.parametrize("writer", ["dcp", "fsdp2"])
def test_checkpoint_saved_before_checksums_loads_with_a_warning(tmp_path, writer):
    """No manifest (saved before this version): loads unverified with a warning, and damage
    DCP notices is still an Exception naming the checkpoint, not a BaseException."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    directory = _save(tmp_path, writer, model)
    (directory / atomic.CHECKSUMS_FILE).unlink()
    with pytest.warns(UserWarning, match="load unverified"):
        torch.testing.assert_close(_load(directory, writer).weight, model.weight)
    (tensor_file,) = sorted(directory.glob("*.distcp"))[:1]
    _damage_tensor_file(tensor_file, "truncated")
    with pytest.warns(UserWarning, match="load unverified"):
        with pytest.raises(atomic.CheckpointFormatError, match="could not load it"):
            _load(directory, writer)


def test_every_file_of_a_checkpoint_has_a_checksum(tmp_path):
    directory = _save(tmp_path, "fsdp2", torch.nn.Linear(8, 8))
    manifest = json.loads((directory / atomic.CHECKSUMS_FILE).read_text())
    files = {p.name for p in directory.iterdir()} - {atomic.CHECKSUMS_FILE}
    assert manifest["algorithm"] == "crc32" and set(manifest["files"]) == files
    assert {".metadata", "meta.json", atomic.LOADER_STATE_FILE} <= files
    for name, entry in manifest["files"].items():
        assert entry == atomic.file_checksum(directory / name)


def test_damaged_orbax_loader_item_is_an_error_naming_the_file(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    import orbax.checkpoint as ocp

    from wf_data.integrations.checkpoint import restore_with_orbax, save_with_orbax

    with ocp.CheckpointManager(tmp_path / "orbax") as manager:
        save_with_orbax(manager, 1, State(1234))
        loader = Loader()
        restore_with_orbax(manager, loader)
        assert loader.state == {"i": 1234}
        (state_file,) = (tmp_path / "orbax").rglob(atomic.LOADER_STATE_FILE)
        state_file.write_text(state_file.read_text().replace("1234", "1235"))  # still JSON
        with pytest.raises(atomic.CheckpointFormatError, match=f"{state_file} has CRC-32"):
            restore_with_orbax(manager, Loader())
