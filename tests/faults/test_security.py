"""Crafted checkpoints are refused without running anything; unsafe loading cannot come back.

Each payload is a pickle that would create a marker file if it were ever unpickled: the test
checks both the refusal and that the marker does not exist.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

from tests.distributed.dist_harness import Loader
from wf_data import atomic

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this creates `marker` (a stand-in for any code an attacker wants run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _model_and_optimizer():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "a crafted checkpoint ran code"


def test_old_pickled_metadata_is_refused(tmp_path, marker):
    """The format before this fix: DCP with pickled `meta` bytes, which load used to unpickle."""
    from wf_data.distributed import load_checkpoint

    model, optimizer = _model_and_optimizer()
    with atomic.dcp_call() as no_dist:
        import torch.distributed.checkpoint as dcp

        dcp.save(
            {"model": model.state_dict(), "meta": pickle.dumps(Payload(marker))},
            checkpoint_id=str(tmp_path / "ckpt" / "step-1"),
            no_dist=no_dist,
        )
    with pytest.raises(atomic.CheckpointFormatError, match="has no meta.json.*could run code"):
        load_checkpoint(tmp_path / "ckpt", model=model, optimizer=None)


@pytest.mark.parametrize("document", ["meta.json", atomic.LOADER_STATE_FILE])
def test_pickle_in_place_of_a_json_document_is_refused(tmp_path, marker, document):
    from wf_data.distributed import load_checkpoint, save_checkpoint

    model, optimizer = _model_and_optimizer()
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer, dataloader=Loader(3))
    (path / document).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(atomic.CheckpointFormatError, match=f"{document} has 1.. bytes"):
        load_checkpoint(tmp_path, model=model, optimizer=optimizer, dataloader=Loader())
    atomic.write_checksums(path)  # whoever can write the file can write its checksum too
    with pytest.raises(atomic.CheckpointFormatError, match=f"{document}: not a JSON document"):
        load_checkpoint(tmp_path, model=model, optimizer=optimizer, dataloader=Loader())


@pytest.mark.parametrize("writer", ["dcp", "fsdp2"])
def test_crafted_dcp_metadata_is_refused(tmp_path, marker, writer):
    from wf_data.distributed import load_checkpoint, save_checkpoint
    from wf_data.integrations.checkpoint import load_with_dcp, save_with_dcp

    model, optimizer = _model_and_optimizer()
    if writer == "dcp":
        path = save_with_dcp(tmp_path / "ckpt", Loader(), {"model": model.state_dict()})
    else:
        path = save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer)
    (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    atomic.write_checksums(path)  # whoever can write the file can write its checksum too
    with pytest.raises(atomic.CheckpointFormatError, match=r"refers to io\.open, which DCP"):
        if writer == "dcp":
            load_with_dcp(path, Loader(), {"model": model.state_dict()})
        else:
            load_checkpoint(path, model=model, optimizer=None)


def test_crafted_non_tensor_value_is_refused(tmp_path, marker):
    """DCP stores non-tensor values (optimizer hyper-parameters) as pickles: a crafted one is
    refused by the weights_only load, and genuine ones still load."""
    from wf_data.integrations.checkpoint import load_with_dcp, save_with_dcp

    save_with_dcp(tmp_path / "good", Loader(), {"config": {"lr": 0.5, "betas": (0.9, 0.95)}})
    state = {"config": {"lr": 0.0, "betas": (0.0, 0.0)}}
    load_with_dcp(tmp_path / "good", Loader(), state)
    assert state == {"config": {"lr": 0.5, "betas": (0.9, 0.95)}}

    save_with_dcp(tmp_path / "bad", Loader(), {"config": {"lr": Payload(marker)}})
    with pytest.raises(atomic.CheckpointFormatError, match="'config.lr' holds a type that"):
        load_with_dcp(tmp_path / "bad", Loader(), {"config": {"lr": 0.0}})


# Code that loads data from disk in a way that can run it, or runs code a download brings.
UNSAFE = {
    r"\bpickle\.loads?\(": "pickle.load/loads (use JSON, or a restricted Unpickler)",
    r"\b(?:c?pickle|dill|cloudpickle|marshal|shelve)\.(?:loads?|open)\(": "pickle-like loads",
    r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)": "torch.load without weights_only=True",
    r"weights_only\s*=\s*False": "weights_only=False",
    r"trust_remote_code\s*=\s*True": "trust_remote_code=True",
    r"\byaml\.(?:unsafe_load|full_load|load_all)\(": "unsafe YAML loading",
    r"\byaml\.load\((?![^)]*SafeLoader)": "yaml.load without SafeLoader",
    r"allow_pickle\s*=\s*True": "np.load(allow_pickle=True) unpickles object arrays",
}


# The worker transport pickles between the trainer's process and the workers it forked, over
# pipes it created: nothing there comes from disk. Such lines carry IPC_MARK, only in these files.
IPC_MARK = "# ipc-pickle"
IPC_FILES = {
    "wf_data/data/workers/zygote.py",
    "wf_data/data/workers/pool.py",
    "wf_data/data/workers/shm_ring.py",
}


def _allowed(file: str, line: str) -> bool:
    return file in IPC_FILES and line.rstrip().endswith(IPC_MARK)


def test_no_unsafe_loading_in_the_package_or_tools():
    files = sorted([*(REPO / "wf_data").rglob("*.py"), *(REPO / "tools").rglob("*.py")])
    assert len(files) > 10
    found = [
        f"{file.relative_to(REPO)}:{number}: {why}: {line.strip()}"
        for file in files
        for number, line in enumerate(file.read_text().splitlines(), 1)
        for pattern, why in UNSAFE.items()
        if re.search(pattern, line) and not _allowed(str(file.relative_to(REPO)), line)
    ]
    assert not found, "\n".join(found)


def test_the_ipc_mark_is_honoured_only_in_the_worker_transport():
    line = f"value = pickle.loads(blob)  {IPC_MARK}"
    assert _allowed("wf_data/data/workers/zygote.py", line)
    assert not _allowed("wf_data/data/checkpoint.py", line)
    assert not _allowed("wf_data/data/workers/zygote.py", "value = pickle.loads(blob)")


@pytest.mark.parametrize(
    "line",
    [
        "state = pickle.loads(blob)",
        "torch.load(path)",
        "torch.load(path, weights_only=False)",
        "AutoTokenizer.from_pretrained(name, trust_remote_code=True)",
        "yaml.load(text)",
        "marshal.loads(code)",
        "lengths = np.load(path, allow_pickle=True)",
    ],
)
def test_the_patterns_catch_unsafe_lines(line):
    assert any(re.search(pattern, line) for pattern in UNSAFE)


@pytest.mark.parametrize(
    "line",
    [
        "torch.load(value, weights_only=True)",
        "yaml.load(text, Loader=yaml.SafeLoader)",
        "pickle.dumps(state)",
        "RestrictedUnpickler(file, where).load()",
    ],
)
def test_the_patterns_allow_safe_lines(line):
    assert not any(re.search(pattern, line) for pattern in UNSAFE)
