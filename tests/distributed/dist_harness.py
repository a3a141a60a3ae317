"""Shared pieces of the distributed tests: tiny models, a batch, and a gloo process-group runner.

Workers start from a multiprocessing fork server that imported torch, transformers and
wf_data.distributed once, so a group starts in about a second instead of ~15 s of imports per
process. (Forking pytest itself is not safe: once it has run torch ops, the children inherit a
dead OpenMP pool and crash.) Each worker has one CPU thread and a gloo group over a FileStore,
returns a picklable result, and an exception in a worker fails the test with its traceback.
Worker functions must be module-level functions of an importable module (pickled by name).
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


class Loader:
    """A minimal Stateful data loader: checkpoint tests save and restore its position."""

    def __init__(self, position: int = 0):
        self.position = position

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


TINY = dict(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    use_cache=False,
    attn_implementation="sdpa",
)


def tiny_model(family: str = "llama", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random-init transformers causal LM (same weights for the same seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    return model_class(config_class(**{**TINY, **overrides}))


def tiny_batch(rows: int = 4, seq_len: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    """`(rows, seq_len)` int64 input_ids/labels and packed position_ids (3 documents per row)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, TINY["vocab_size"], (rows, seq_len), generator=generator)
    cut1, cut2 = seq_len // 4, seq_len // 2 + 1
    positions = torch.cat(
        [torch.arange(cut1), torch.arange(cut2 - cut1), torch.arange(seq_len - cut2)]
    )
    return {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "position_ids": positions.repeat(rows, 1),
    }


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean next-token cross-entropy of `(B, L, V)` logits."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def train_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], rows: slice, steps: int = 3
) -> list[float]:
    """AdamW steps on `batch[rows]`; returns each step's loss averaged over the world."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = mean_loss(
            model(
                input_ids=batch["input_ids"][rows], position_ids=batch["position_ids"][rows]
            ).logits,
            batch["labels"][rows],
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(total)
            total /= dist.get_world_size()
        losses.append(total.item())
    return losses


def _entry(rank: int, fn: Callable, world_size: int, workdir: str, args: tuple) -> None:
    faulthandler.enable()  # a crash in a worker prints its Python stack
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/store",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=90),
    )
    try:
        result = fn(rank, world_size, Path(workdir), *args)
        torch.save({"result": result}, f"{workdir}/result-{rank}.pt")
    except BaseException:
        torch.save({"error": traceback.format_exc()}, f"{workdir}/result-{rank}.pt")
        raise
    finally:
        dist.destroy_process_group()


PRELOAD = [
    "torch",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "torch.distributed.pipelining",
    "torch.distributed.tensor.parallel",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "wf_data.distributed",
    "tests.distributed.dist_harness",
]


def run_group(fn: Callable, world_size: int, workdir: Path, *args: Any) -> list[Any]:
    """Run `fn(rank, world_size, workdir, *args)` on `world_size` gloo ranks."""
    workdir.mkdir(parents=True, exist_ok=True)
    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
    try:
        mp.start_processes(
            _entry,
            args=(fn, world_size, str(workdir), args),
            nprocs=world_size,
            start_method=os.environ.get("WF_TEST_START_METHOD", "forkserver"),
        )
    except mp.ProcessRaisedException:
        errors = [
            torch.load(workdir / f"result-{r}.pt", weights_only=False).get("error")
            for r in range(world_size)
            if (workdir / f"result-{r}.pt").exists()
        ]
        raise AssertionError("worker failed:\n" + "\n".join(e for e in errors if e)) from None
    return [
        torch.load(workdir / f"result-{r}.pt", weights_only=False)["result"]
        for r in range(world_size)
    ]
