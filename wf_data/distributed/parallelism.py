"""Parallelism as data: `ParallelDims`, the device mesh, tensor and pipeline parallelism.

Modelled on torchtitan (`distributed/parallel_dims.py`, `models/llama3/parallelize.py`), for
transformers' Llama-family decoders (Llama, Qwen2, Mistral: `model.model.layers[i].self_attn.q_proj`
...). Every check that can fail runs before the first collective, so a bad configuration raises the
same `ValueError` on every rank instead of hanging one of them.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "MESH_DIM_NAMES",
    "ParallelDims",
    "Pipeline",
    "PipelineStageModule",
    "apply_tp",
    "build_pipeline",
    "clip_grad_norm_",
    "decoder_layers",
    "split_layers",
    "validate_pp",
    "validate_tp",
]

# Mesh dimension order, outermost first: pipeline stages talk least, tensor-parallel ranks most,
# so tp is innermost (neighbouring ranks, same host).
MESH_DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "tp")
_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_PIPELINE_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


@dataclass
class ParallelDims:
    """Degrees of data (replicate, shard), tensor and pipeline parallelism over `world_size` ranks.

    One degree may be -1 (by default `dp_shard`): it takes what the others leave. `world_size` and
    `rank` default to the initialised process group, else `WORLD_SIZE`/`RANK` (torchrun), else 1/0,
    so the dims validate before `init_process_group`. Ranks are laid out row-major over
    `MESH_DIM_NAMES` = (pp, dp_replicate, dp_shard, tp).
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    world_size: int | None = None
    rank: int | None = None
    mesh: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.world_size is None:
            initialised = dist.is_available() and dist.is_initialized()
            self.world_size = dist.get_world_size() if initialised else _env_int("WORLD_SIZE", 1)
        if self.rank is None:
            initialised = dist.is_available() and dist.is_initialized()
            self.rank = dist.get_rank() if initialised else _env_int("RANK", 0)
        self._validate()

    def _validate(self) -> None:
        degrees = self.degrees()
        for name, degree in degrees.items():
            if (
                not isinstance(degree, int)
                or isinstance(degree, bool)
                or (degree < 1 and degree != -1)
            ):
                raise ValueError(f"ParallelDims.{name} must be an int >= 1 or -1, got {degree!r}")
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(
                f"ParallelDims.world_size must be an int >= 1, got {self.world_size!r}"
            )
        rest = [name for name, degree in degrees.items() if degree == -1]
        if len(rest) > 1:
            raise ValueError(f"ParallelDims: at most one degree may be -1, got -1 for {rest}")
        known = {name: degree for name, degree in degrees.items() if degree != -1}
        product = math.prod(known.values())
        formula = " * ".join(f"{name}({degree})" for name, degree in known.items())
        if rest:
            if self.world_size % product:
                raise ValueError(
                    f"ParallelDims: world_size {self.world_size} is not divisible by "
                    f"{formula} = {product}, so {rest[0]}=-1 has no integer value"
                )
            setattr(self, rest[0], self.world_size // product)
        elif product != self.world_size:
            raise ValueError(f"ParallelDims: {formula} = {product} != world_size {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"ParallelDims: rank {self.rank} not in [0, {self.world_size})")

    def degrees(self) -> dict[str, int]:
        """The degree of every mesh dimension, in `MESH_DIM_NAMES` order."""
        return {name: getattr(self, name) for name in MESH_DIM_NAMES}

    def coordinate(self) -> dict[str, int]:
        """This rank's index along every mesh dimension (row-major rank layout)."""
        coordinate, remainder = {}, self.rank
        for name in reversed(MESH_DIM_NAMES):
            degree = getattr(self, name)
            coordinate[name] = remainder % degree
            remainder //= degree
        return {name: coordinate[name] for name in MESH_DIM_NAMES}

    def build_mesh(self, device_type: str = "cpu"):
        """The 4-D `DeviceMesh` (pp, dp_replicate, dp_shard, tp), plus a flattened `dp` dimension.

        All four names always exist (size-1 ones included), so `mesh["tp"]` works in any
        configuration; `mesh["dp"]` spans dp_replicate x dp_shard (loss and data all-reduce).
        Requires an initialised process group whose size is `world_size`.
        """
        from torch.distributed.device_mesh import init_device_mesh

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ParallelDims.build_mesh needs torch.distributed initialised first")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(
                f"ParallelDims(world_size={self.world_size}, rank={self.rank}) does not match the "
                f"process group (world_size={dist.get_world_size()}, rank={dist.get_rank()})"
            )
        shape = tuple(self.degrees().values())
        self.mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIM_NAMES)
        self.mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return self.mesh

    def dp_mesh(self):
        """The mesh `apply_fsdp` shards over: 2-D (dp_replicate, dp_shard) = HSDP, else dp_shard."""
        if self.mesh is None:
            raise RuntimeError("call ParallelDims.build_mesh() first")
        if self.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.mesh["dp_shard"]

    @property
    def dp_world_size(self) -> int:
        """Number of distinct data streams: ranks of one tp group or pp pipeline share one."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        """This rank's data stream in [0, dp_world_size): same for all ranks of a tp/pp group."""
        coordinate = self.coordinate()
        return coordinate["dp_replicate"] * self.dp_shard + coordinate["dp_shard"]

    @property
    def tp_rank(self) -> int:
        """This rank's index within its tensor-parallel group."""
        return self.coordinate()["tp"]

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline position (0 = holds the first stage)."""
        return self.coordinate()["pp"]

    @property
    def dp_enabled(self) -> bool:
        """Any data parallelism (replicated or sharded)."""
        return self.dp_world_size > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        """Replicated data parallelism (DDP, or the outer dimension of HSDP)."""
        return self.dp_replicate > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Sharded data parallelism (FSDP2; HSDP when `dp_replicate_enabled` too)."""
        return self.dp_shard > 1

    @property
    def tp_enabled(self) -> bool:
        """Tensor parallelism."""
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        """Pipeline parallelism."""
        return self.pp > 1


def validate_tp(model_config: Any, tp: int) -> None:
    """Raise ValueError unless `tp` divides the head counts and MLP width of `model_config`.

    `model_config` is a transformers config (or anything with the same attribute names). Call it
    before building the mesh so a bad degree fails on every rank before any collective.
    """
    if tp == 1:
        return
    sizes = {
        "num_attention_heads": model_config.num_attention_heads,
        "num_key_value_heads": getattr(model_config, "num_key_value_heads", None)
        or model_config.num_attention_heads,
        "intermediate_size": model_config.intermediate_size,
    }
    bad = {name: size for name, size in sizes.items() if size % tp}
    if bad:
        detail = ", ".join(f"{name}={size}" for name, size in bad.items())
        raise ValueError(f"tensor parallel degree tp={tp} does not divide {detail}")


def validate_pp(
    model_config: Any,
    pp: int,
    *,
    stages_per_rank: int = 1,
    split_points: Sequence[int] | None = None,
) -> None:
    """Raise ValueError unless the decoder layers split into `pp * stages_per_rank` stages."""
    if pp == 1:
        return
    split_layers(model_config.num_hidden_layers, pp * stages_per_rank, split_points)
    if getattr(model_config, "tie_word_embeddings", False):
        raise ValueError(
            "pipeline parallelism with tie_word_embeddings=True is not supported: embed_tokens "
            "(first stage) and lm_head (last stage) would share one weight across ranks; set "
            "tie_word_embeddings: false in the model config"
        )


# ----------------------------------------------------------------------------- model structure


def _backbone(model: nn.Module) -> nn.Module:
    """The module holding embed_tokens/layers/norm: `model.model` for a causal LM, else model."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "layers") else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM or of a `PipelineStageModule`, in order."""
    layers = getattr(_backbone(model), "layers", None)
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    if isinstance(layers, nn.ModuleDict):
        return list(layers.values())
    children = [name for name, _ in model.named_children()]
    raise ValueError(
        f"{type(model).__name__}: no decoder layers found (expected `model.layers` as a "
        f"ModuleList, as in transformers' Llama-family models); top-level modules: {children}"
    )


def _check_llama_layout(model: nn.Module) -> list[nn.Module]:
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        missing = [
            f"self_attn.{n}"
            for n in _ATTENTION_PROJECTIONS
            if not isinstance(getattr(attention, n, None), nn.Linear)
        ]
        missing += [
            f"mlp.{n}" for n in _MLP_PROJECTIONS if not isinstance(getattr(mlp, n, None), nn.Linear)
        ]
        if missing:
            found = sorted(name for name, _ in layer.named_modules() if name and "." not in name)
            found += sorted(name for name, _ in layer.named_modules() if name.count(".") == 1)
            raise ValueError(
                f"apply_tp: {type(model).__name__} layer {index} ({type(layer).__name__}) is not a "
                f"Llama-family decoder layer: missing {missing}; modules found: {found}"
            )
    return layers


# ----------------------------------------------------------------------------- tensor parallel


def _set_local_head_counts(attention: nn.Module, tp: int) -> None:
    # transformers 5.x attention reshapes with (-1, head_dim) and keeps only the q/kv ratio
    # (num_key_value_groups, unchanged by tp); older or custom layouts store the counts.
    for name in ("num_heads", "num_attention_heads", "num_key_value_heads", "hidden_size"):
        value = getattr(attention, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(attention, name, value // tp)


def apply_tp(
    model: nn.Module, tp_mesh, *, sequence_parallel: bool = False, loss_parallel: bool = False
) -> nn.Module:
    """Shard a Llama-family causal LM (or pipeline stage) over the 1-D `tp_mesh`; returns it.

    Plan (Megatron layout): q/k/v and gate/up column-wise, o and down row-wise, so each layer needs
    one all-reduce per block; embed_tokens row-wise (vocab-sharded), lm_head column-wise with the
    logits gathered, or left vocab-sharded (a DTensor, `Shard(-1)`) when `loss_parallel` (compute
    cross-entropy under `torch.distributed.tensor.parallel.loss_parallel()`). With
    `sequence_parallel` the norms and residual stream are sharded along the sequence (dim 1).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    layers = _check_llama_layout(model)
    tp = tp_mesh.size()
    if hasattr(model, "config"):
        validate_tp(model.config, tp)
    backbone = _backbone(model)
    prefix = "model." if backbone is not model else ""
    residual = Shard(1) if sequence_parallel else Replicate()

    embed, lm_head = getattr(backbone, "embed_tokens", None), getattr(model, "lm_head", None)
    tied = embed is not None and lm_head is not None and lm_head.weight is embed.weight
    plan: dict[str, Any] = {}
    if embed is not None:
        plan[f"{prefix}embed_tokens"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=residual
        )
    if sequence_parallel and getattr(backbone, "norm", None) is not None:
        plan[f"{prefix}norm"] = SequenceParallel()
    if lm_head is not None:
        plan["lm_head"] = ColwiseParallel(
            input_layouts=residual,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    if plan:
        parallelize_module(model, tp_mesh, plan)
    if tied:  # both styles shard the (vocab, hidden) weight on dim 0: share the one DTensor
        lm_head.weight = embed.weight

    for layer in layers:
        layer_plan: dict[str, Any] = {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=residual),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=residual),
        }
        if sequence_parallel:
            layer_plan.update(
                {
                    "input_layernorm": SequenceParallel(),
                    "post_attention_layernorm": SequenceParallel(),
                    "self_attn": PrepareModuleInput(
                        input_kwarg_layouts={"hidden_states": Shard(1)},
                        desired_input_kwarg_layouts={"hidden_states": Replicate()},
                    ),
                    "mlp": PrepareModuleInput(
                        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                    ),
                }
            )
        parallelize_module(layer, tp_mesh, layer_plan)
        _set_local_head_counts(layer.self_attn, tp)

    if sequence_parallel and backbone is not model:
        # The decoder builds its attention mask from the embeddings, which are now sequence-
        # sharded: build the full-length mask up front from input_ids/position_ids instead.
        backbone.register_forward_pre_hook(_full_mask_pre_hook, with_kwargs=True)
    return model


def _full_mask_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if kwargs.get("attention_mask") is None and input_ids is not None:
        position_ids = kwargs.get("position_ids")
        kwargs["attention_mask"] = _causal_mask(
            module.config,
            input_ids.shape,
            position_ids,
            module.embed_tokens.weight.dtype,
            input_ids.device,
        )
    return args, kwargs


def _causal_mask(
    config: Any,
    shape: Sequence[int],
    position_ids: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
):
    """The decoder's attention mask for `(B, L)` inputs: causal, block-diagonal over packed
    documents when `position_ids` restart; None means plain causal (sdpa's `is_causal`)."""
    from transformers.masking_utils import create_causal_mask

    shape_only = torch.empty((*shape[:2], 0), dtype=dtype, device=device)
    return create_causal_mask(
        config=config,
        inputs_embeds=shape_only,
        attention_mask=None,
        cache=None,
        position_ids=position_ids,
    )


# ----------------------------------------------------------------------------- pipeline parallel


def split_layers(
    num_layers: int, num_stages: int, split_points: Sequence[int] | None = None
) -> list[range]:
    """Contiguous layer ranges, one per stage: even (earlier stages take the remainder) or cut
    before each index in `split_points` (strictly increasing, in (0, num_layers))."""
    if num_stages < 1 or num_layers < num_stages:
        raise ValueError(
            f"cannot split {num_layers} decoder layers into {num_stages} pipeline stages "
            f"(need num_hidden_layers >= pp * stages_per_rank)"
        )
    if split_points is None:
        base, extra = divmod(num_layers, num_stages)
        sizes = [base + (stage < extra) for stage in range(num_stages)]
        bounds = [0, *itertools.accumulate(sizes)]
    else:
        points = list(split_points)
        if (
            len(points) != num_stages - 1
            or points != sorted(set(points))
            or (points and (points[0] <= 0 or points[-1] >= num_layers))
        ):
            raise ValueError(
                f"split_points {points} must be {num_stages - 1} strictly increasing layer "
                f"indices in (0, {num_layers}) for {num_stages} stages"
            )
        bounds = [0, *points, num_layers]
    return [range(bounds[i], bounds[i + 1]) for i in range(num_stages)]


class PipelineStageModule(nn.Module):
    """One pipeline stage of a Llama-family causal LM: a slice of its decoder layers, plus the
    embeddings on the first stage and norm + lm_head on the last.

    Parameter names are those of the full model (`model.layers.5.mlp.up_proj.weight`, with the
    layers in a ModuleDict keyed by their global index), so checkpoints move freely between
    pipelined and unpipelined runs. `forward(x, position_ids=None)` takes `(B, L)` token ids on the
    first stage, `(B, L, H)` hidden states elsewhere; it recomputes the rotary embeddings and the
    packed-document mask from `position_ids` itself. Returns hidden states, or `(B, L, V)` logits.
    """

    def __init__(self, causal_lm: nn.Module, layer_ids: range, *, is_first: bool, is_last: bool):
        super().__init__()
        source = _backbone(causal_lm)
        self.config = causal_lm.config
        self.model = nn.Module()
        self.model.embed_tokens = source.embed_tokens if is_first else None
        self.model.layers = nn.ModuleDict({str(i): source.layers[i] for i in layer_ids})
        self.model.norm = source.norm if is_last else None
        self.model.rotary_emb = source.rotary_emb
        self.lm_head = causal_lm.lm_head if is_last else None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids `(B, L)` (first stage) or hidden `(B, L, H)` -> hidden or logits."""
        hidden = self.model.embed_tokens(x) if self.model.embed_tokens is not None else x
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        # (B, L) from position_ids: with sequence parallelism x may hold only L / tp positions.
        shape = (x.shape[0], position_ids.shape[-1])
        mask = _causal_mask(self.config, shape, position_ids, hidden.dtype, x.device)
        rotary = self.model.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.model.layers.values():
            hidden = layer(
                hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary
            )
        if self.model.norm is not None:
            hidden = self.model.norm(hidden)
        if self.lm_head is not None:
            hidden = self.lm_head(hidden)
        return hidden


@dataclass
class Pipeline:
    """A built pipeline: the schedule and this rank's stage modules (`modules`, to give to the
    optimizer and checkpoint). `step` runs one training step and returns the per-microbatch losses
    on the rank holding the last stage (an empty list elsewhere)."""

    schedule: Any
    stages: list[Any]
    modules: list[PipelineStageModule]
    has_first_stage: bool
    has_last_stage: bool

    def step(
        self, input_ids: torch.Tensor, labels: torch.Tensor, **stage_kwargs: torch.Tensor
    ) -> list[torch.Tensor]:
        """One forward/backward over `(B, L)` inputs split into microbatches along B.

        `stage_kwargs` (e.g. `position_ids=(B, L)`) are split the same way and reach every stage.
        Every rank of the pipeline calls this with the same batch.
        """
        losses: list[torch.Tensor] = []
        args = (input_ids,) if self.has_first_stage else ()
        target = labels if self.has_last_stage else None
        self.schedule.step(
            *args, target=target, losses=losses, return_outputs=False, **stage_kwargs
        )
        return losses


def build_pipeline(
    model: nn.Module,
    pp_mesh,
    *,
    schedule: str = "1F1B",
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    split_points: Sequence[int] | None = None,
    stages_per_rank: int | None = None,
    parallelize_fn: Callable[[nn.Module], nn.Module] | None = None,
    scale_grads: bool = True,
) -> Pipeline:
    """Split a Llama-family causal LM into pipeline stages over the 1-D `pp_mesh`.

    Decoder layers are split evenly (or before each of `split_points`) into
    `pp * stages_per_rank` stages; rank r holds stages r, r + pp, ... (looped placement, 2 per
    rank by default for "Interleaved1F1B", else 1). `parallelize_fn` (TP, FSDP) is applied to each
    stage module before it is wrapped in a `PipelineStage`. `loss_fn(logits, labels)` runs per
    microbatch; with `scale_grads` the gradients are divided by `n_microbatches` (use a mean loss),
    without it they are summed. Layers this rank does not hold are dropped from `model`'s stages
    (the caller should drop `model` itself).
    """
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    if schedule not in _PIPELINE_SCHEDULES:
        raise ValueError(
            f"unknown pipeline schedule {schedule!r}; choose from {_PIPELINE_SCHEDULES}"
        )
    if stages_per_rank is None:
        stages_per_rank = 2 if schedule == "Interleaved1F1B" else 1
    if schedule != "Interleaved1F1B" and stages_per_rank != 1:
        raise ValueError(f"schedule {schedule!r} runs 1 stage per rank, got {stages_per_rank}")
    pp, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    if n_microbatches < 1 or (schedule == "Interleaved1F1B" and n_microbatches % pp):
        raise ValueError(
            f"n_microbatches={n_microbatches} must be >= 1 (and a multiple of pp={pp} for "
            f"Interleaved1F1B)"
        )
    _check_llama_layout(model)
    validate_pp(model.config, pp, stages_per_rank=stages_per_rank, split_points=split_points)
    num_stages = pp * stages_per_rank
    ranges = split_layers(model.config.num_hidden_layers, num_stages, split_points)
    device = next(model.parameters()).device
    modules, stages = [], []
    for stage_index in range(pp_rank, num_stages, pp):
        module = PipelineStageModule(
            model,
            ranges[stage_index],
            is_first=stage_index == 0,
            is_last=stage_index == num_stages - 1,
        )
        if parallelize_fn is not None:
            module = parallelize_fn(module)
        modules.append(module)
        stages.append(
            PipelineStage(module, stage_index, num_stages, device, group=pp_mesh.get_group())
        )
    if schedule == "Interleaved1F1B":
        runner = ScheduleInterleaved1F1B(
            stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads
        )
    else:
        schedule_class = ScheduleGPipe if schedule == "GPipe" else Schedule1F1B
        runner = schedule_class(
            stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads
        )
    return Pipeline(
        schedule=runner,
        stages=stages,
        modules=modules,
        has_first_stage=any(stage.is_first for stage in stages),
        has_last_stage=any(stage.is_last for stage in stages),
    )


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, *, pp_mesh=None
) -> torch.Tensor:
    """Clip gradients (plain tensors or DTensors) to a global L2 norm; returns that norm.

    Gradients are grouped by device mesh (plain tensors, e.g. tensor-parallel norm weights, are
    the same on every rank and count once). With pipeline parallelism each rank holds different
    parameters: pass `pp_mesh` so the squared norms are summed over the stages before clipping.
    """
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list[torch.Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            mesh = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
            groups.setdefault(mesh, []).append(param)
    squares = torch.zeros(())
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squares = squares.to(norm.device) + norm.float() ** 2
    if pp_mesh is not None and pp_mesh.size() > 1:
        dist.all_reduce(squares, group=pp_mesh.get_group())
    total = squares.sqrt()
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
