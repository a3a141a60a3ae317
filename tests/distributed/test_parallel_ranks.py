"""FSDP2, DDP, HSDP, TP, PP and DCP checkpoints on 2 and 4 CPU ranks (gloo) vs one process.

Each process group runs once per module (a fixture) and records what every check needs; the
tests then compare with single-process references computed here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.dist_harness import (
    Loader,
    mean_loss,
    run_group,
    tiny_batch,
    tiny_model,
    train_losses,
)
from wf_data.distributed import (
    ParallelDims,
    apply_fsdp,
    apply_tp,
    build_pipeline,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

pytestmark = pytest.mark.slow
SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits


def _two_rank_worker(rank: int, world: int, workdir: Path) -> dict:
    batch, out = tiny_batch(), {}
    for name, degrees in {"fsdp": {}, "ddp": {"dp_replicate": 2, "dp_shard": 1}}.items():
        dims = ParallelDims(**degrees)
        dims.build_mesh("cpu")
        model = apply_fsdp(tiny_model(), dims.dp_mesh(), activation_checkpointing=name == "fsdp")
        out[name] = train_losses(model, batch, slice(2 * dims.dp_rank, 2 * dims.dp_rank + 2))
        if name == "fsdp":  # checkpoint saved by 2 ranks, reloaded on 1 in the test
            # (An optimizer must be built before any forward: after a forward without backward
            # FSDP's root exposes its unsharded parameters.)
            optimizer = torch.optim.AdamW(model.parameters())
            save_checkpoint(
                workdir / "ckpt2",
                step=3,
                model=model,
                optimizer=optimizer,
                dataloader=Loader(7),
                parallel_dims=dims,
            )
            out["fsdp_logits"] = _logits(model, batch).detach()
            future = save_checkpoint(
                workdir / "async", step=1, model=model, optimizer=optimizer, async_save=True
            )
            out["async_path"] = str(future.result())

    # Checkpoint saved by 1 process (the test) -> FSDP over 2 ranks.
    dims = ParallelDims()
    dims.build_mesh("cpu")
    model = apply_fsdp(tiny_model(seed=5), dims.dp_mesh())
    loader = Loader()
    out["ckpt1_step"] = load_checkpoint(
        workdir.parent / "ckpt1", model=model, optimizer=None, dataloader=loader, parallel_dims=dims
    )
    out["ckpt1_logits"], out["ckpt1_loader"] = _logits(model, batch), loader.position

    tp_dims = ParallelDims(dp_shard=1, tp=2)
    tp_mesh = tp_dims.build_mesh("cpu")["tp"]
    out["tp"] = _logits(apply_tp(tiny_model(), tp_mesh), batch)
    out["tp_sp"] = _logits(apply_tp(tiny_model(), tp_mesh, sequence_parallel=True), batch)
    out["tp_qwen2"] = _logits(apply_tp(tiny_model("qwen2"), tp_mesh), batch)
    tied = apply_tp(tiny_model(tie_word_embeddings=True), tp_mesh)
    out["tp_tied"] = _logits(tied, batch)
    out["tp_tied_shared"] = tied.lm_head.weight is tied.model.embed_tokens.weight
    from torch.distributed.tensor.parallel import loss_parallel

    model = apply_tp(tiny_model(), tp_mesh, loss_parallel=True)
    with loss_parallel():
        loss = mean_loss(
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits,
            batch["labels"],
        )
        loss.backward()
    out["tp_loss_parallel"] = loss.full_tensor().item()
    out["tp_grad_q0"] = model.model.layers[0].self_attn.q_proj.weight.grad.full_tensor()

    pp_mesh = ParallelDims(dp_shard=1, pp=2).build_mesh("cpu")["pp"]
    for schedule in SCHEDULES:
        pipeline = build_pipeline(
            tiny_model(), pp_mesh, schedule=schedule, n_microbatches=2, loss_fn=mean_loss
        )
        losses = pipeline.step(
            batch["input_ids"], batch["labels"], position_ids=batch["position_ids"]
        )
        out[schedule] = {
            "losses": [loss.item() for loss in losses],
            "grads": {
                name: param.grad
                for module in pipeline.modules
                for name, param in module.named_parameters()
            },
        }

    try:
        ParallelDims(tp=3)
    except ValueError as error:
        out["bad_dims"] = str(error)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ranks")
    # A checkpoint saved by a single process, for the 2-rank group to load.
    model = tiny_model(seed=3)
    save_checkpoint(
        root / "ckpt1",
        step=11,
        model=model,
        optimizer=torch.optim.AdamW(model.parameters()),
        dataloader=Loader(42),
        extra={"note": "one process"},
    )
    return root


@pytest.fixture(scope="module")
def two_ranks(workdir) -> list[dict]:
    return run_group(_two_rank_worker, 2, workdir / "group2")


@pytest.fixture(scope="module")
def reference() -> dict:
    batch = tiny_batch()
    model = tiny_model()
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = mean_loss(logits, batch["labels"])
    loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    return {
        "losses": train_losses(tiny_model(), batch, slice(None)),
        "logits": logits.detach(),
        "loss": loss.item(),
        "grads": grads,
    }


@pytest.mark.parametrize("name", ["fsdp", "ddp"])
def test_data_parallel_losses_match_single_process(two_ranks, reference, name):
    for result in two_ranks:
        assert result[name] == pytest.approx(reference["losses"], abs=1e-5)
    assert reference["losses"][2] < reference["losses"][0]  # it trains


@pytest.mark.parametrize("key", ["tp", "tp_sp"])
def test_tensor_parallel_logits_match_unsharded(two_ranks, reference, key):
    for result in two_ranks:
        torch.testing.assert_close(result[key], reference["logits"], atol=1e-5, rtol=0)


def test_tensor_parallel_qwen2_tied_and_loss_parallel(two_ranks, reference):
    batch = tiny_batch()
    qwen2 = _logits(tiny_model("qwen2"), batch)
    tied = _logits(tiny_model(tie_word_embeddings=True), batch)
    for result in two_ranks:
        torch.testing.assert_close(result["tp_qwen2"], qwen2, atol=1e-5, rtol=0)
        torch.testing.assert_close(result["tp_tied"], tied, atol=1e-5, rtol=0)
        assert result["tp_tied_shared"]
        assert result["tp_loss_parallel"] == pytest.approx(reference["loss"], abs=1e-5)
        torch.testing.assert_close(
            result["tp_grad_q0"],
            reference["grads"]["model.layers.0.self_attn.q_proj.weight"],
            atol=1e-6,
            rtol=1e-5,
        )


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pipeline_loss_and_grads_match_unsplit(two_ranks, reference, schedule):
    first, last = (result[schedule] for result in two_ranks)
    assert first["losses"] == []
    # Two equal-size microbatches: the mean of their mean losses is the full-batch loss.
    assert sum(last["losses"]) / 2 == pytest.approx(reference["loss"], abs=1e-5)
    grads = {**first["grads"], **last["grads"]}
    assert set(grads) == set(reference["grads"])  # each parameter on exactly one stage
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference["grads"][name], atol=1e-6, rtol=1e-4)


def test_checkpoint_saved_by_two_ranks_loads_on_one(two_ranks, workdir):
    batch = tiny_batch()
    model = tiny_model(seed=9)
    loader = Loader()
    step, extra = load_checkpoint(
        workdir / "group2" / "ckpt2",
        model=model,
        optimizer=torch.optim.AdamW(model.parameters()),
        dataloader=loader,
    )
    assert (step, extra, loader.position) == (3, None, 7)
    torch.testing.assert_close(
        _logits(model, batch), two_ranks[0]["fsdp_logits"], atol=1e-6, rtol=0
    )


def test_checkpoint_saved_by_one_loads_on_two_ranks(two_ranks):
    batch = tiny_batch()
    expected = _logits(tiny_model(seed=3), batch)
    for result in two_ranks:
        assert result["ckpt1_step"] == (11, {"note": "one process"})
        assert result["ckpt1_loader"] == 42
        torch.testing.assert_close(result["ckpt1_logits"], expected, atol=1e-6, rtol=0)


def test_async_checkpoint_on_two_ranks(two_ranks, workdir):
    root = workdir / "group2" / "async"
    assert two_ranks[0]["async_path"] == str(root / "step-1")
    assert latest_checkpoint(root) == root / "step-1"
    assert not (root / "step-1.tmp").exists()


def test_bad_dims_fail_on_every_rank_with_the_numbers(two_ranks):
    for result in two_ranks:
        assert (
            "world_size 2 is not divisible by pp(1) * dp_replicate(1) * tp(3) = 3"
            in (result["bad_dims"])
        )


# ----------------------------------------------------------------------------- 4 ranks


def _four_rank_worker(rank: int, world: int, workdir: Path) -> dict:
    batch, out = tiny_batch(), {}
    dims = ParallelDims(dp_shard=2, tp=2)
    mesh = dims.build_mesh("cpu")
    out["dp_rank"], out["tp_rank"] = dims.dp_rank, dims.tp_rank
    rows = slice(2 * dims.dp_rank, 2 * dims.dp_rank + 2)
    model = apply_fsdp(apply_tp(tiny_model(), mesh["tp"]), dims.dp_mesh())
    out["fsdp_tp"] = train_losses(model, batch, rows)
    # The 2-rank FSDP checkpoint, resharded onto a 2 x 2 (dp_shard, tp) mesh.
    model = apply_fsdp(apply_tp(tiny_model(seed=9), mesh["tp"]), dims.dp_mesh())
    load_checkpoint(workdir.parent / "group2" / "ckpt2", model=model, optimizer=None)
    out["resharded_logits"] = _logits(model, batch)

    dims = ParallelDims(dp_replicate=2, dp_shard=2)
    dims.build_mesh("cpu")
    model = apply_fsdp(tiny_model(), dims.dp_mesh())
    out["hsdp"] = train_losses(model, batch, slice(dims.dp_rank, dims.dp_rank + 1))
    return out


@pytest.fixture(scope="module")
def four_ranks(workdir, two_ranks) -> list[dict]:
    return run_group(_four_rank_worker, 4, workdir / "group4")


def test_fsdp_tp_2x2_matches_single_process(four_ranks, reference):
    assert [(r["dp_rank"], r["tp_rank"]) for r in four_ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for result in four_ranks:
        assert result["fsdp_tp"] == pytest.approx(reference["losses"], abs=1e-5)


def test_hsdp_2x2_matches_single_process(four_ranks, reference):
    for result in four_ranks:
        assert result["hsdp"] == pytest.approx(reference["losses"], abs=1e-5)


def test_checkpoint_reshards_from_fsdp_to_fsdp_tp(four_ranks, two_ranks):
    for result in four_ranks:
        torch.testing.assert_close(
            result["resharded_logits"], two_ranks[0]["fsdp_logits"], atol=1e-6, rtol=0
        )
