"""tools/train.py: Hydra composition, resume, and every distributed config vs one process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.distributed.dist_harness import run_group

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "data=synthetic",
    "model=tiny_llama",
    "model.vocab_size=256",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_hidden_layers=2",
    "data.seq_len=32",
    "data.global_batch_size=4",
    "data.mean_document_length=8",
    "checkpoint_every=2",
    "log_every=100",
]


def load_train():
    """tools/train.py as a module (tools/ is not a package), loaded once per process."""
    name = "wf_data_train_tool"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "train.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


def compose(train, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    train.register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def run(overrides: list[str]) -> list[float]:
    train = load_train()
    return [entry["loss"] for entry in train.run(compose(train, SMALL + overrides))]


def test_synthetic_batches_follow_the_schema_and_shard_by_dp_rank():
    train = load_train()
    options = dict(seq_len=32, global_batch_size=4, vocab_size=256, mean_document_length=8)
    full = next(train.SyntheticBatches(**options))
    halves = [next(train.SyntheticBatches(**options, dp_rank=r, dp_world_size=2)) for r in range(2)]
    for key, value in full.items():
        assert value.dtype == np.int32
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)
    assert full["input_ids"].shape == (4, 32) and full["domain_ids"].shape == (4,)
    starts = full["position_ids"] == 0
    assert (full["labels"][starts] == -100).all()
    padding = full["segment_ids"] == 0
    assert (full["input_ids"][padding] == 0).all() and (full["labels"][padding] == -100).all()
    loader = train.SyntheticBatches(**options)
    next(loader)
    state = loader.state_dict()
    second = next(loader)
    loader.load_state_dict(state)
    np.testing.assert_array_equal(next(loader)["input_ids"], second["input_ids"])


@pytest.mark.slow
def test_resume_continues_the_uninterrupted_run(tmp_path):
    straight = run(["steps=4", f"checkpoint_dir={tmp_path / 'a'}"])
    first = run(["steps=2", f"checkpoint_dir={tmp_path / 'b'}"])
    resumed = run(["steps=4", f"checkpoint_dir={tmp_path / 'b'}"])
    assert first == straight[:2]
    assert resumed == pytest.approx(straight[2:], abs=1e-6)
    assert straight[-1] < straight[0]  # the synthetic data is learnable


def _trainer_worker(rank: int, world: int, workdir: Path) -> dict[str, list[float]]:
    results = {}
    for name, extra in {
        "fsdp2": [],
        "ddp": [],
        "tp": ["distributed.loss_parallel=true"],
        "pp": ["distributed.pp_microbatches=2"],
    }.items():
        steps = 2 if name == "fsdp2" else 3
        results[name] = run(
            [f"distributed={name}", f"steps={steps}", f"checkpoint_dir={workdir / name}", *extra]
        )
    return results


@pytest.mark.slow
def test_trainer_distributed_configs_match_one_process(tmp_path):
    reference = run(["steps=4", f"checkpoint_dir={tmp_path / 'single'}"])
    results = run_group(_trainer_worker, 2, tmp_path / "group")
    for result in results:
        assert result["fsdp2"] == pytest.approx(reference[:2], abs=1e-5)
        for name in ("ddp", "tp", "pp"):
            assert result[name] == pytest.approx(reference[:3], abs=1e-5), name
    # A checkpoint written by 2 FSDP ranks resumes in one process.
    resumed = run(["steps=4", f"checkpoint_dir={tmp_path / 'group' / 'fsdp2'}"])
    assert resumed == pytest.approx(reference[2:], abs=1e-5)
