"""Loader state through Orbax and torch DCP: exact continuation after restore, one JSON copy.

Kill -9 during a save, damaged and crafted checkpoints: tests/faults/.
"""

import json

import numpy as np
import pytest

from tests.data.deliver.test_loader import assert_batches_equal, make_loader, run
from wf_data import atomic
from wf_data.integrations.checkpoint import (
    load_with_dcp,
    restore_with_orbax,
    save_with_dcp,
    save_with_orbax,
)


@pytest.mark.parametrize("kind", ["static", "exp3"])
def test_orbax_round_trip_with_model_state(tmp_path, kind):
    ocp = pytest.importorskip("orbax.checkpoint")
    loader = make_loader(kind, prefetch=1)
    run([loader], 7)
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        assert save_with_orbax(manager, 7, loader, params=ocp.args.StandardSave(weights))
    expected = run([loader], 6, start_step=7)

    restored = make_loader(kind, prefetch=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        result = restore_with_orbax(manager, restored, params=ocp.args.StandardRestore(weights))
    np.testing.assert_array_equal(result["params"]["w"], weights["w"])
    assert restored.step == 7
    assert_batches_equal(run([restored], 6, start_step=7), expected)


def test_orbax_restore_without_checkpoint_fails(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    with ocp.CheckpointManager(tmp_path / "empty") as manager:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            restore_with_orbax(manager, make_loader())


@pytest.mark.parametrize("kind", ["static", "exp3"])
def test_dcp_round_trip_with_model_state(tmp_path, kind):
    torch = pytest.importorskip("torch")
    loader = make_loader(kind, prefetch=2)
    run([loader], 9)
    model = torch.nn.Linear(3, 2)
    save_with_dcp(tmp_path / "step-9", loader, {"model": model.state_dict()})
    expected = run([loader], 5, start_step=9)

    restored = make_loader(kind, prefetch=2)
    fresh = torch.nn.Linear(3, 2)
    state = {"model": fresh.state_dict()}
    load_with_dcp(tmp_path / "step-9", restored, state)
    fresh.load_state_dict(state["model"])
    torch.testing.assert_close(fresh.weight, model.weight)
    assert restored.step == 9
    assert_batches_equal(run([restored], 5, start_step=9), expected)


def test_orbax_loader_item_is_one_json_document(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    loader = make_loader("exp3", prefetch=1)
    run([loader], 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        assert save_with_orbax(manager, 3, loader)
    written = tmp_path / "ckpt" / "3" / "loader" / atomic.LOADER_STATE_FILE
    assert json.loads(written.read_text()) == json.loads(json.dumps(loader.state_dict()))


def test_dcp_save_replaces_the_previous_checkpoint_and_stores_json(tmp_path):
    loader = make_loader("static", prefetch=1)
    path = save_with_dcp(tmp_path / "ckpt", loader)
    run([loader], 4)
    assert save_with_dcp(tmp_path / "ckpt", loader) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert json.loads((path / atomic.LOADER_STATE_FILE).read_text())["step"] == loader.step == 4


def test_a_state_that_is_not_json_is_refused_before_writing(tmp_path):
    class Unsafe:
        def state_dict(self):
            return {"rng": np.random.default_rng(0)}

    with pytest.raises(TypeError, match=r"loader.state_dict\(\): the value to save is not JSON"):
        save_with_dcp(tmp_path / "ckpt", Unsafe())
    assert list(tmp_path.iterdir()) == []
