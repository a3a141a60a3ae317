"""DCP checkpoints in one process: round trip, atomic publication, latest, loader-state rules.

Kill -9 during a save and crafted checkpoints are in tests/faults/.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.dist_harness import mean_loss, tiny_batch, tiny_model
from wf_data import atomic
from wf_data.distributed import latest_checkpoint, load_checkpoint, save_checkpoint


class Loader:
    """A Stateful loader; `GrainLike` below uses Grain's get_state/set_state instead."""

    def __init__(self, position: int = 0):
        self.position = position

    def state_dict(self) -> dict:
        return {"position": self.position, "weights": [0.25, 0.75]}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class GrainLike:
    def __init__(self, position: int = 0):
        self.position = position

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = state["position"]


def _trained(seed: int = 0, steps: int = 2):
    model = tiny_model(seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = tiny_batch()
    for _ in range(steps):
        mean_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _outputs(model):
    with torch.no_grad():
        return model(input_ids=tiny_batch()["input_ids"]).logits


@pytest.mark.parametrize("loader_class", [Loader, GrainLike])
def test_round_trip_restores_model_optimizer_loader_and_extra(tmp_path, loader_class):
    model, optimizer = _trained()
    path = save_checkpoint(
        tmp_path,
        step=7,
        model=model,
        optimizer=optimizer,
        dataloader=loader_class(5),
        extra={"loss": 1.5},
    )
    assert path == tmp_path / "step-7" and (path / ".metadata").is_file()
    assert not (tmp_path / "step-7.tmp").exists()

    restored, restored_optimizer = _trained(seed=1, steps=1)
    loader = loader_class()
    assert load_checkpoint(
        tmp_path, model=restored, optimizer=restored_optimizer, dataloader=loader
    ) == (7, {"loss": 1.5})
    assert loader.position == 5
    torch.testing.assert_close(_outputs(restored), _outputs(model), atol=0, rtol=0)
    expected = optimizer.state_dict()["state"]
    for index, state in restored_optimizer.state_dict()["state"].items():
        torch.testing.assert_close(state["exp_avg_sq"], expected[index]["exp_avg_sq"])
        assert state["step"].item() == expected[index]["step"].item() == 2


def test_interrupted_save_is_never_picked_up(tmp_path, monkeypatch):
    model, optimizer = _trained()
    save_checkpoint(tmp_path, step=2, model=model, optimizer=optimizer)
    expected = _outputs(model)

    def crash(tmp, final):
        raise KeyboardInterrupt("killed before the rename")

    later_model, later_optimizer = _trained(seed=4, steps=1)
    monkeypatch.setattr(atomic, "publish_directory", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, step=3, model=later_model, optimizer=later_optimizer)
    assert not (tmp_path / "step-3").exists()
    (tmp_path / "step-9").mkdir()  # a directory without .metadata is not a checkpoint either
    assert latest_checkpoint(tmp_path) == tmp_path / "step-2"

    restored = tiny_model(seed=5)
    assert load_checkpoint(tmp_path, model=restored, optimizer=None) == (2, None)
    torch.testing.assert_close(_outputs(restored), expected, atol=0, rtol=0)

    monkeypatch.undo()
    (tmp_path / "step-1.tmp").mkdir()  # as a kill -9 mid-save leaves it
    save_checkpoint(tmp_path, step=3, model=model, optimizer=optimizer)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3", "step-9"]


def test_saving_a_step_again_replaces_it_and_an_old_copy_counts(tmp_path):
    model, optimizer = _trained()
    save_checkpoint(tmp_path, step=5, model=model, optimizer=optimizer, dataloader=Loader(1))
    save_checkpoint(tmp_path, step=5, model=model, optimizer=optimizer, dataloader=Loader(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-5"]
    # A replacement killed between its two renames leaves only step-5.old: it is the checkpoint.
    (tmp_path / "step-5").rename(tmp_path / "step-5.old")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-5.old"
    loader = Loader()
    assert load_checkpoint(
        tmp_path / "step-5", model=tiny_model(), optimizer=None, dataloader=loader
    ) == (5, None)
    assert loader.position == 2


def test_checkpoint_metadata_is_json(tmp_path):
    model, optimizer = _trained(steps=1)
    path = save_checkpoint(
        tmp_path,
        step=4,
        model=model,
        optimizer=optimizer,
        dataloader={"position": 3},
        extra={"loss": 0.5},
    )
    assert json.loads((path / "meta.json").read_text()) == {"step": 4, "extra": {"loss": 0.5}}
    assert json.loads((path / "loader_state.json").read_text()) == {"position": 3}


@pytest.mark.parametrize("extra", [{"obj": object()}, {"loss": float("nan")}])
def test_non_json_extra_is_refused_before_writing(tmp_path, extra):
    model, optimizer = _trained(steps=1)
    with pytest.raises(TypeError, match=r"step-1/meta.json: the value to save is not JSON-safe"):
        save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer, extra=extra)
    assert list(tmp_path.iterdir()) == []


def test_latest_checkpoint_orders_steps_numerically(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for name in ("step-9", "step-10", "step-11.tmp", "step-x", "notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".metadata").touch()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-10"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "step-11.tmp" / "none", model=tiny_model(), optimizer=None)


@pytest.mark.slow
def test_async_save_publishes_after_the_write(tmp_path):
    model, optimizer = _trained()
    future = save_checkpoint(
        tmp_path, step=4, model=model, optimizer=optimizer, dataloader=Loader(3), async_save=True
    )
    # A save started meanwhile cleans up leftovers of killed saves, not the one in flight.
    save_checkpoint(tmp_path, step=3, model=model, optimizer=optimizer)
    assert future.result(timeout=60) == tmp_path / "step-4"
    restored, loader = tiny_model(seed=2), Loader()
    assert load_checkpoint(tmp_path, model=restored, optimizer=None, dataloader=loader)[0] == 4
    assert loader.position == 3
    torch.testing.assert_close(_outputs(restored), _outputs(model), atol=0, rtol=0)


def test_loading_a_loader_from_a_checkpoint_without_one_fails(tmp_path):
    model, optimizer = _trained(steps=1)
    save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer)
    with pytest.raises(ValueError, match="holds no data loader state"):
        load_checkpoint(tmp_path, model=model, optimizer=None, dataloader=Loader())
