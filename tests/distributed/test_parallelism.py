"""ParallelDims, validation, layer splitting and pipeline stage modules in one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.distributed.dist_harness import TINY, tiny_batch, tiny_model
from wf_data.distributed import (
    ParallelDims,
    PipelineStageModule,
    apply_tp,
    decoder_layers,
    split_layers,
    validate_pp,
    validate_tp,
)


@pytest.mark.parametrize(
    ("degrees", "world_size", "expected"),
    [
        ({}, 8, {"pp": 1, "dp_replicate": 1, "dp_shard": 8, "tp": 1}),
        ({"tp": 2}, 8, {"pp": 1, "dp_replicate": 1, "dp_shard": 4, "tp": 2}),
        ({"dp_replicate": 2, "pp": 2}, 8, {"pp": 2, "dp_replicate": 2, "dp_shard": 2, "tp": 1}),
        (
            {"dp_replicate": -1, "dp_shard": 1},
            4,
            {"pp": 1, "dp_replicate": 4, "dp_shard": 1, "tp": 1},
        ),
        ({"dp_shard": 1, "tp": -1}, 2, {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 2}),
    ],
)
def test_parallel_dims_resolve_the_rest(degrees, world_size, expected):
    dims = ParallelDims(**degrees, world_size=world_size, rank=0)
    assert dims.degrees() == expected


@pytest.mark.parametrize(
    ("degrees", "world_size", "message"),
    [
        (
            {"dp_shard": 2, "tp": 2},
            2,
            "pp(1) * dp_replicate(1) * dp_shard(2) * tp(2) = 4 != world_size 2",
        ),
        ({"tp": 3}, 4, "world_size 4 is not divisible by pp(1) * dp_replicate(1) * tp(3) = 3"),
        ({"dp_replicate": -1}, 4, "at most one degree may be -1"),
        ({"tp": 0}, 4, "ParallelDims.tp must be an int >= 1 or -1, got 0"),
    ],
)
def test_parallel_dims_errors_name_the_numbers(degrees, world_size, message):
    with pytest.raises(ValueError, match=None) as error:
        ParallelDims(**degrees, world_size=world_size, rank=0)
    assert message in str(error.value)


def test_parallel_dims_validate_from_torchrun_env_without_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"tp\(3\) = 3"):
        ParallelDims(tp=3)
    dims = ParallelDims(tp=2)
    assert (dims.world_size, dims.rank, dims.dp_shard) == (4, 3, 2)
    assert (dims.tp_rank, dims.dp_rank) == (1, 1)
    with pytest.raises(RuntimeError, match="initialised"):
        dims.build_mesh()


def test_dp_rank_is_shared_by_tensor_and_pipeline_groups():
    dims = [
        ParallelDims(dp_replicate=2, dp_shard=2, tp=2, pp=2, world_size=16, rank=r)
        for r in range(16)
    ]
    # Row-major over (pp, dp_replicate, dp_shard, tp): tp neighbours, pp outermost.
    assert [d.coordinate()["tp"] for d in dims[:4]] == [0, 1, 0, 1]
    assert [d.pp_rank for d in dims] == [0] * 8 + [1] * 8
    assert [d.dp_rank for d in dims] == [0, 0, 1, 1, 2, 2, 3, 3] * 2
    assert {d.dp_world_size for d in dims} == {4}
    assert dims[0].fsdp_enabled and dims[0].dp_replicate_enabled
    assert dims[0].tp_enabled and dims[0].pp_enabled
    single = ParallelDims(world_size=1, rank=0)
    assert not (single.dp_enabled or single.tp_enabled or single.pp_enabled)


def test_validate_tp_names_the_sizes_it_does_not_divide():
    config = tiny_model().config
    validate_tp(config, 2)
    with pytest.raises(ValueError) as error:
        validate_tp(config, 4)
    assert str(error.value) == "tensor parallel degree tp=4 does not divide num_key_value_heads=2"
    with pytest.raises(
        ValueError,
        match="tp=3 does not divide num_attention_heads=4, "
        "num_key_value_heads=2, intermediate_size=64",
    ):
        validate_tp(config, 3)


def test_validate_pp_rejects_tied_embeddings_and_too_few_layers():
    validate_pp(tiny_model().config, 2)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        validate_pp(tiny_model(tie_word_embeddings=True).config, 2)
    with pytest.raises(ValueError, match="cannot split 4 decoder layers into 8 pipeline stages"):
        validate_pp(tiny_model().config, 4, stages_per_rank=2)


def test_split_layers_even_and_at_split_points():
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_layers(4, 2, [1]) == [range(0, 1), range(1, 4)]
    for bad in ([0], [4], [2, 2], [1, 2]):
        with pytest.raises(ValueError, match="split_points"):
            split_layers(4, 2, bad)


def test_apply_tp_rejects_unknown_architectures_naming_the_modules():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(4, 4)
            self.ffn = nn.Linear(4, 4)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block()])

    with pytest.raises(ValueError) as error:
        apply_tp(Model(), tp_mesh=None)
    assert "layer 0 (Block) is not a Llama-family decoder layer" in str(error.value)
    assert "self_attn.q_proj" in str(error.value) and "['attn', 'ffn']" in str(error.value)
    holder = nn.Module()
    holder.h = nn.ModuleList()
    with pytest.raises(ValueError, match=r"no decoder layers found .* top-level modules: \['h'\]"):
        decoder_layers(holder)


def test_pipeline_stage_modules_compose_to_the_full_model():
    model, batch = tiny_model(), tiny_batch()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        stages = [
            PipelineStageModule(model, layers, is_first=index == 0, is_last=index == 2)
            for index, layers in enumerate(split_layers(TINY["num_hidden_layers"], 3))
        ]
        hidden = batch["input_ids"]
        for stage in stages:
            hidden = stage(hidden, position_ids=batch["position_ids"])
    torch.testing.assert_close(hidden, expected, atol=1e-6, rtol=0)
    names = [name for stage in stages for name in stage.state_dict()]
    assert sorted(names) == sorted(model.state_dict())  # same names, each on one stage


@pytest.mark.slow
def test_distributed_package_imports_nothing_from_data():
    code = (
        "import sys, wf_data.distributed, wf_data.distributed.fsdp2, "
        "wf_data.distributed.parallelism; "
        "print(sorted(m for m in sys.modules if m.startswith('wf_data.data')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.stdout.strip() == "[]"
