"""Example trainer: config -> ParallelDims -> mesh -> model -> parallelise -> batches -> loop.

    uv run python tools/train.py data=synthetic                      # one process
    uv run torchrun --standalone --nproc-per-node 2 tools/train.py \
        distributed=fsdp2 data=synthetic model=tiny_llama steps=10  # FSDP2 over 2 ranks

Hydra reads `configs/` (groups data/, model/, distributed/); the schema and every default are the
dataclasses below. The loss is computed per row; rows' losses reach the data mixture through
`MixtureFeedback` (all-reduced, so every rank's bandit agrees): `observe` every step, `apply`
every `mixing.update_every` steps. A checkpoint (model,
optimizer, loader state) is written every `checkpoint_every` steps and the run resumes from the
latest complete one in `checkpoint_dir`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from wf_data.data import IGNORE_INDEX
from wf_data.data.deliver.loader_state import PendingLosses
from wf_data.distributed import (
    ParallelDims,
    apply_fsdp,
    apply_tp,
    build_pipeline,
    clip_grad_norm_,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    validate_pp,
    validate_tp,
)

log = logging.getLogger("train")
DTYPES = {
    None: None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class DistributedConfig:
    """`configs/distributed/*.yaml`: the ParallelDims degrees and the FSDP/TP/PP options."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    loss_parallel: bool = False
    pp_schedule: str = "1F1B"
    pp_microbatches: int = 2
    pp_split_points: list[int] | None = None
    param_dtype: str | None = None
    reduce_dtype: str | None = None
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    activation_checkpointing: bool = False


@dataclass
class TrainConfig:
    """The trainer's schema; `data` and `model` are free-form groups (DataConfig, LlamaConfig)."""

    defaults: list[Any] = field(
        default_factory=lambda: [
            "_self_",
            {"data": "demo"},
            {"model": "tiny_llama"},
            {"distributed": "single"},
        ]
    )
    data: Any = None
    model: Any = None
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    steps: int = 20
    lr: float = 3e-3
    weight_decay: float = 0.1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    device: str = "auto"  # auto = cuda when available, else cpu
    checkpoint_dir: str = "outputs/train/checkpoints"
    checkpoint_every: int = 10
    async_checkpoint: bool = False
    resume: bool = True
    log_every: int = 1


# ----------------------------------------------------------------------------- setup


def init_distributed(device: str) -> torch.device:
    """Initialise torch.distributed under torchrun (gloo on CPU, nccl on CUDA); pick the device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return (
        torch.device(device, torch.cuda.current_device())
        if device == "cuda"
        else (torch.device(device))
    )


def model_config(model_cfg: Any) -> Any:
    """The `LlamaConfig` of `configs/model/*.yaml` (its keys are LlamaConfig fields)."""
    from omegaconf import OmegaConf
    from transformers import LlamaConfig

    config = LlamaConfig(**OmegaConf.to_container(model_cfg, resolve=True))
    config.use_cache = False  # a KV cache would also turn off the packed-document mask
    return config


def build_model(config: Any, seed: int, device: torch.device) -> torch.nn.Module:
    """A randomly initialised `LlamaForCausalLM`, identical on every rank (same seed)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device)


def parallelize(
    model: torch.nn.Module, dims: ParallelDims, options: DistributedConfig, loss_fn: Any
) -> tuple[list[torch.nn.Module], Any]:
    """TP, then FSDP/HSDP, per pipeline stage when pp > 1: (this rank's model parts, pipeline)."""

    def parallelize_part(part: torch.nn.Module) -> torch.nn.Module:
        if dims.tp_enabled:
            apply_tp(
                part,
                dims.mesh["tp"],
                sequence_parallel=options.sequence_parallel,
                loss_parallel=options.loss_parallel,
            )
        if dims.dp_enabled:
            apply_fsdp(
                part,
                dims.dp_mesh(),
                param_dtype=DTYPES[options.param_dtype],
                reduce_dtype=DTYPES[options.reduce_dtype],
                reshard_after_forward=options.reshard_after_forward,
                cpu_offload=options.cpu_offload,
                activation_checkpointing=options.activation_checkpointing,
            )
        return part

    if not dims.pp_enabled:
        return [parallelize_part(model)], None
    pipeline = build_pipeline(
        model,
        dims.mesh["pp"],
        schedule=options.pp_schedule,
        n_microbatches=options.pp_microbatches,
        loss_fn=loss_fn,
        split_points=options.pp_split_points,
        parallelize_fn=parallelize_part,
        scale_grads=False,
    )
    return pipeline.modules, pipeline


def build_batches(data_cfg: Any, model_cfg: Any, dims: ParallelDims) -> Any:
    """This rank's batch iterator (a Stateful that takes `MixtureFeedback`).

    `data=synthetic` gives seeded random packed rows; any other data config goes to
    `wf_data.data.get_loader` (the lead's loader).
    """
    if data_cfg.get("name") == "synthetic":
        return SyntheticBatches(
            seq_len=data_cfg.seq_len,
            global_batch_size=data_cfg.global_batch_size,
            vocab_size=data_cfg.get("vocab_size") or model_cfg.vocab_size,
            num_domains=data_cfg.num_domains,
            seed=data_cfg.seed,
            mean_document_length=data_cfg.mean_document_length,
            dp_rank=dims.dp_rank,
            dp_world_size=dims.dp_world_size,
        )
    from wf_data.data import get_loader

    return get_loader(data_cfg, dp_rank=dims.dp_rank, dp_world_size=dims.dp_world_size)


class SyntheticBatches:
    """Seeded random packed batches in the wf-data schema, until the real loader lands.

    Global batch `step` is a pure function of (seed, step): rows cut into documents (mean length
    `mean_document_length`) and a padded tail; a document of domain d counts from a random start
    in strides of d + 1 (mod vocab), with 10% of tokens replaced at random, so the loss can fall
    and differs per domain. Labels are -100 on padding and on each document's first token;
    positions restart per document.
    This rank gets rows [dp_rank * b, (dp_rank + 1) * b), b = global_batch_size / dp_world_size.
    State: {"step": int}, the same on every rank.
    """

    def __init__(
        self,
        *,
        seq_len: int,
        global_batch_size: int,
        vocab_size: int,
        num_domains: int = 3,
        seed: int = 0,
        mean_document_length: int = 32,
        dp_rank: int = 0,
        dp_world_size: int = 1,
    ):
        if global_batch_size % dp_world_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by "
                f"dp_world_size {dp_world_size}"
            )
        self.seq_len, self.vocab_size, self.seed = seq_len, vocab_size, seed
        self.global_batch_size, self.num_domains = global_batch_size, num_domains
        self.mean_document_length = mean_document_length
        self.local_batch_size = global_batch_size // dp_world_size
        self.rows = slice(dp_rank * self.local_batch_size, (dp_rank + 1) * self.local_batch_size)
        self.step = 0
        self.last_domain_loss: np.ndarray | None = None
        self._pending = PendingLosses([str(domain) for domain in range(num_domains)])

    def __iter__(self) -> SyntheticBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        shape = (self.global_batch_size, self.seq_len)
        columns = np.broadcast_to(np.arange(self.seq_len), shape)
        starts = rng.random(shape) < 1.0 / self.mean_document_length
        starts[:, 0] = True
        valid = columns < self.seq_len - rng.integers(0, self.seq_len // 4 + 1, size=(shape[0], 1))
        segment_ids = np.cumsum(starts, axis=1)
        position_ids = columns - np.maximum.accumulate(np.where(starts, columns, 0), axis=1)
        domain_ids = rng.integers(0, self.num_domains, size=shape[0])
        first_token = rng.integers(0, self.vocab_size, size=(shape[0], self.seq_len + 1))
        counting = (
            np.take_along_axis(first_token, segment_ids, axis=1)
            + position_ids * (domain_ids[:, None] + 1)
        ) % (self.vocab_size - 1) + 1
        noise = rng.integers(1, self.vocab_size, size=shape)
        input_ids = np.where(valid, np.where(rng.random(shape) < 0.1, noise, counting), 0)
        batch = {
            "input_ids": input_ids,
            "labels": np.where(valid & ~starts, input_ids, IGNORE_INDEX),
            "position_ids": np.where(valid, position_ids, 0),
            "segment_ids": np.where(valid, segment_ids, 0),
            "domain_ids": domain_ids,
        }
        return {key: value[self.rows].astype(np.int32) for key, value in batch.items()}

    def observe_losses(self, loss_sums: np.ndarray, row_counts: np.ndarray) -> None:
        """Mixture feedback: (K,) per-domain loss sums and row counts, all-reduced."""
        self._pending.add(loss_sums, row_counts)

    def apply_observed(self) -> None:
        """Keeps the (K,) mean loss per domain, NaN where unobserved (not used), if any was."""
        means = self._pending.take()
        if means is not None:
            self.last_domain_loss = means

    def state_dict(self) -> dict[str, int]:
        """Loader state: the number of batches served."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume after `state["step"]` batches."""
        self.step = int(state["step"])


# ----------------------------------------------------------------------------- step


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`(B, L - 1)` float32 next-token cross-entropy, 0 where `labels[:, 1:]` is -100.

    `logits` may be vocab-sharded DTensors (loss parallel; call under `loss_parallel()`).
    """
    from torch.distributed.tensor import DTensor

    batch, length = labels.shape
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    )
    if isinstance(losses, DTensor):
        losses = losses.to_local()
    return losses.view(batch, length - 1)


class LossScale:
    """Turns token losses into the objective every rank backpropagates.

    The objective is the global token mean; FSDP averages gradients over the `dp` ranks, so
    each rank scales its local token-loss sum by dp_world_size / global_tokens. Each call also
    records the `(B,)` per-row mean losses and the token-loss sum, for the mixture and the log;
    `collect(n)` returns the last `n` calls' (pipelines call the loss once more, on their
    first step, to infer gradient shapes).
    """

    def __init__(self, dp_world_size: int):
        self.dp_world_size = dp_world_size
        self.global_tokens = 1
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def start(self, global_tokens: int) -> None:
        """Begin a step whose global batch has `global_tokens` tokens with a label."""
        self.global_tokens, self.calls = max(global_tokens, 1), []

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = token_loss(logits, labels)
        counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
        # A row without labelled tokens gets NaN, which per_domain_loss leaves out.
        self.calls.append((losses.detach().sum(1) / counts, losses.detach().sum()))
        return losses.sum() * (self.dp_world_size / self.global_tokens)

    def collect(self, n_calls: int) -> tuple[torch.Tensor | None, torch.Tensor | float]:
        """`(B,)` row losses and the token-loss sum of the last `n_calls` calls (None, 0.0 on
        ranks that never computed the loss: pipeline stages before the last)."""
        calls = self.calls[-n_calls:] if self.calls else []
        if not calls:
            return None, 0.0
        return torch.cat([rows for rows, _ in calls]), sum(total for _, total in calls)


def forward_backward(
    parts: list[torch.nn.Module],
    pipeline: Any,
    batch: dict[str, torch.Tensor],
    loss_scale: LossScale,
    options: DistributedConfig,
):
    """One forward + backward; returns this rank's `(B,)` row losses (None on pipeline stages
    before the last) and its token-loss sum."""
    if pipeline is not None:
        pipeline.step(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
        return loss_scale.collect(options.pp_microbatches)
    with _loss_context(options.loss_parallel):
        logits = parts[0](input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        loss_scale(logits, batch["labels"]).backward()
    return loss_scale.collect(1)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """numpy int32 batch -> int64 torch tensors on `device`."""
    return {
        key: torch.as_tensor(np.asarray(value)).to(device, torch.long, non_blocking=True)
        for key, value in batch.items()
    }


def world_sum(value: float | torch.Tensor, device: torch.device) -> float:
    """Sum of a scalar over every rank (the value itself without torch.distributed)."""
    total = torch.as_tensor(value, dtype=torch.float64, device=device).detach().clone()
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.item()


# ----------------------------------------------------------------------------- run


def run(cfg: Any) -> list[dict[str, float]]:
    """Train for `cfg.steps` steps (resuming when a checkpoint exists); returns the step log."""
    from wf_data.data.mix.feedback import MixtureFeedback

    options = cfg.distributed
    dims = ParallelDims(
        dp_replicate=options.dp_replicate, dp_shard=options.dp_shard, tp=options.tp, pp=options.pp
    )
    config = model_config(cfg.model)
    validate_tp(config, dims.tp)  # both before any collective
    validate_pp(
        config,
        dims.pp,
        stages_per_rank=2 if options.pp_schedule == "Interleaved1F1B" else 1,
        split_points=options.pp_split_points,
    )
    if dims.pp_enabled and options.loss_parallel:
        raise ValueError("loss_parallel is not supported with pp > 1")
    device = init_distributed(cfg.device)
    if dist.is_initialized():
        dims.build_mesh(device.type)
    elif dims.world_size > 1:
        raise ValueError(f"world_size {dims.world_size} needs torchrun (RANK is not set)")

    loss_scale = LossScale(dims.dp_world_size)
    parts, pipeline = parallelize(build_model(config, cfg.seed, device), dims, options, loss_scale)
    optimizers = [
        torch.optim.AdamW(part.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        for part in parts
    ]
    loader = build_batches(cfg.data, cfg.model, dims)
    # Mixture feedback all-reduced over every rank (the default group): tp copies of a row and
    # pipeline stages that see no loss leave each domain's mean loss unchanged.
    feedback = MixtureFeedback(loader)
    update_every = cfg.data.get("mixing", {}).get("update_every", 1)

    start = 0
    checkpoint = latest_checkpoint(cfg.checkpoint_dir) if cfg.resume else None
    if checkpoint is not None:
        start, _ = load_checkpoint(
            checkpoint, model=parts, optimizer=optimizers, dataloader=loader, parallel_dims=dims
        )
        _log0(f"resumed from {checkpoint} at step {start}")

    history, pending_save = [], None
    for step in range(start + 1, cfg.steps + 1):
        began = time.perf_counter()
        batch = to_device(next(loader), device)
        local_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        # tp and pp ranks hold copies of their data-parallel rank's batch.
        loss_scale.start(round(world_sum(local_tokens, device) / (dims.tp * dims.pp)))
        row_loss, loss_sum = forward_backward(parts, pipeline, batch, loss_scale, options)
        if row_loss is None:  # a pipeline stage without the loss still joins the all-reduce
            row_loss, batch["domain_ids"] = np.zeros(0), np.zeros(0, dtype=np.int64)
        feedback.observe(row_loss, batch["domain_ids"])
        if cfg.max_grad_norm:
            clip_grad_norm_(
                [p for part in parts for p in part.parameters()],
                cfg.max_grad_norm,
                pp_mesh=dims.mesh["pp"] if dims.pp_enabled else None,
            )
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        if step % update_every == 0:
            feedback.apply()
        loss = world_sum(loss_sum, device) / (dims.tp * loss_scale.global_tokens)
        seconds = time.perf_counter() - began
        tokens = batch["input_ids"].numel() * dims.dp_world_size
        history.append({"step": step, "loss": loss, "tokens_per_s": tokens / seconds})
        if step % cfg.log_every == 0:
            _log0(f"step {step:5d}  loss {loss:.5f}  {tokens / seconds:,.0f} tok/s")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            if pending_save is not None:
                pending_save.result()
            pending_save = save_checkpoint(
                cfg.checkpoint_dir,
                step=step,
                model=parts,
                optimizer=optimizers,
                dataloader=loader,
                parallel_dims=dims,
                async_save=cfg.async_checkpoint,
                extra={"loss": loss},
            )
            if not cfg.async_checkpoint:
                pending_save = None
    if pending_save is not None:
        pending_save.result()
    return history


def _loss_context(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def _log0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info(message)


def register_configs() -> None:
    """Register the primary config `train` (the typed schema + Hydra's run directory)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(
        name="train",
        node={
            "defaults": ["train_schema", "_self_"],
            "hydra": {"run": {"dir": "outputs/train/hydra/${now:%Y-%m-%d_%H-%M-%S}"}},
        },
    )


def main() -> None:
    """Hydra entry point (`configs/` beside this repo's `tools/`)."""
    import hydra

    register_configs()

    @hydra.main(config_path="../configs", config_name="train", version_base="1.3")
    def _main(cfg: Any) -> None:
        try:
            run(cfg)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    _main()


if __name__ == "__main__":
    main()
