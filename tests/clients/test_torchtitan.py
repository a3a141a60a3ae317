"""torchtitan: the adapter is a BaseDataLoader, yields its layout, round-trips CheckpointManager."""

import numpy as np
import pytest
import torch
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig

from wf_data.data.deliver.factory import get_loader
from wf_data.integrations.torchtitan import WfDataTitanLoader

SEQ_LEN = 64  # torchtitan's training.seq_len; wf-data rows are one token longer
OVERRIDES = [f"seq_len={SEQ_LEN + 1}", "global_batch_size=4", "mixing.kind=static"]


def titan_loader(rank=0, world=1):
    config = WfDataTitanLoader.Config(data="demo", overrides=OVERRIDES)
    return config.build(
        dp_world_size=world, dp_rank=rank, seq_len=SEQ_LEN, local_batch_size=4 // world
    )


def take(loader, count):
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def assert_same(got, want):
    for (inputs, labels), (want_inputs, want_labels) in zip(got, want, strict=True):
        assert torch.equal(inputs["input"], want_inputs["input"])
        assert torch.equal(inputs["positions"], want_inputs["positions"])
        assert torch.equal(labels, want_labels)


def test_layout_is_torchtitans(demo_cache):
    loader = titan_loader()
    assert isinstance(loader, BaseDataLoader)
    ((inputs, labels),) = take(loader, 1)
    rows = next(get_loader("demo", overrides=OVERRIDES, framework="numpy"))
    assert inputs["input"].shape == labels.shape == (4, SEQ_LEN)
    assert inputs["input"].dtype == labels.dtype == torch.int64
    np.testing.assert_array_equal(inputs["input"].numpy(), rows["input_ids"][:, :-1])
    np.testing.assert_array_equal(inputs["positions"].numpy(), rows["position_ids"][:, :-1])
    np.testing.assert_array_equal(labels.numpy(), rows["labels"][:, 1:])
    # A label is -100 exactly where the next token starts a document or is padding.
    next_starts = rows["position_ids"][:, 1:] == 0
    assert ((labels.numpy() == -100) >= next_starts).all()


def test_mismatched_sizes_name_the_override(demo_cache):
    config = WfDataTitanLoader.Config(data="demo", overrides=["seq_len=64"])
    with pytest.raises(ValueError, match="'seq_len=65'"):
        config.build(dp_world_size=1, dp_rank=0, seq_len=64)
    config = WfDataTitanLoader.Config(data="demo", overrides=OVERRIDES)
    with pytest.raises(ValueError, match="'global_batch_size=16'"):
        config.build(dp_world_size=2, dp_rank=0, seq_len=64, local_batch_size=8)


class VocabOnly:
    """Just the torchtitan tokenizer call the adapter makes."""

    def __init__(self, size):
        self.size = size

    def get_vocab_size(self):
        return self.size


def test_tokenizer_of_another_vocabulary_is_refused(demo_cache):
    config = WfDataTitanLoader.Config(data="demo", overrides=OVERRIDES)
    config.build(dp_world_size=1, dp_rank=0, seq_len=SEQ_LEN, tokenizer=VocabOnly(8192))
    with pytest.raises(ValueError, match="32000 tokens.*'wf-data-demo' \\(8192 tokens\\)"):
        config.build(dp_world_size=1, dp_rank=0, seq_len=SEQ_LEN, tokenizer=VocabOnly(32000))


def test_state_protocol_keys_the_global_state_by_rank_0(demo_cache):
    loader = titan_loader(rank=1, world=2)
    take(loader, 2)
    state = loader.state_dict()
    assert set(state) == {"dp_rank_0", "world_size"} and state["world_size"] == 2
    other = titan_loader(rank=0, world=2)
    other.load_state_dict({})  # nothing saved yet: a valid no-op in torchtitan
    other.load_state_dict(state)  # the state is global: rank 1's state restores rank 0
    assert other.loader.step == 2
    # Saved by an earlier version, which keyed each rank's copy by its own rank.
    other.load_state_dict({"dp_rank_1": state["dp_rank_0"], "world_size": 2})
    assert other.loader.step == 2
    with pytest.raises(ValueError, match="no 'dp_rank_<r>' entry"):
        other.load_state_dict({"world_size": 2})


def make_manager(folder, loader):
    model = torch.nn.Linear(4, 4)
    groups = [ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3})]
    optimizers = OptimizersContainer(
        OptimizersContainer.Config(param_groups=groups), model_parts=[model]
    )
    schedulers = LRSchedulersContainer(optimizers, lambda step: 1.0)
    config = CheckpointManager.Config(enable=True, folder="checkpoint", interval=1, keep_latest_k=0)
    return CheckpointManager(
        config,
        dataloader=loader,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={},
        sd_adapter=None,
        base_folder=str(folder),
    )


def test_checkpoint_manager_round_trip(demo_cache, tmp_path):
    straight = take(titan_loader(), 5)
    loader = titan_loader()
    iterator = iter(loader)
    for _ in range(2):
        next(iterator)
    manager = make_manager(tmp_path, loader)
    assert manager.save(curr_step=2)
    manager.close()
    fresh = titan_loader()
    restored = make_manager(tmp_path, fresh)
    assert restored.load(step=2)
    restored.close()
    assert fresh.loader.step == 2
    assert_same(take(fresh, 3), straight[2:])


@pytest.mark.parametrize(("saved_world", "loaded_world"), [(1, 2), (2, 1)])
def test_checkpoint_manager_restores_on_another_dp_world_size(
    demo_cache, tmp_path, saved_world, loaded_world
):
    """Issue 19 case 14: a checkpoint saved by 1 data-parallel rank restored on 2 through
    CheckpointManager.load failed with "Missing key in checkpoint state_dict:
    dataloader.dp_rank_1" (DCP plans the load from the current state's keys). Each rank of the
    new world size continues with its rows of the same global batches."""
    per_rank = [take(titan_loader(r, saved_world), 5) for r in range(saved_world)]
    global_batches = [
        torch.cat([labels for _, labels in parts]) for parts in zip(*per_rank, strict=True)
    ]
    saving = titan_loader(rank=saved_world - 1, world=saved_world)
    take(saving, 2)
    manager = make_manager(tmp_path, saving)
    assert manager.save(curr_step=2)
    manager.close()
    rows = 4 // loaded_world
    for rank in range(loaded_world):
        fresh = titan_loader(rank, loaded_world)
        restored = make_manager(tmp_path, fresh)
        assert restored.load(step=2)
        restored.close()
        assert fresh.loader.step == 2
        labels = [batch[1] for batch in take(fresh, 3)]
        for got, want in zip(labels, global_batches[2:], strict=True):
            assert torch.equal(got, want[rank * rows : (rank + 1) * rows])
