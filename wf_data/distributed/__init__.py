"""Torch side: device mesh, FSDP2, tensor and pipeline parallelism, DCP checkpoints.

Imports nothing from `wf_data.data`: the trainer connects the two.
"""

from wf_data.distributed.fsdp2 import (
    apply_fsdp,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from wf_data.distributed.parallelism import (
    MESH_DIM_NAMES,
    ParallelDims,
    Pipeline,
    PipelineStageModule,
    apply_tp,
    build_pipeline,
    clip_grad_norm_,
    decoder_layers,
    split_layers,
    validate_pp,
    validate_tp,
)

__all__ = [
    "MESH_DIM_NAMES",
    "ParallelDims",
    "Pipeline",
    "PipelineStageModule",
    "apply_fsdp",
    "apply_tp",
    "build_pipeline",
    "clip_grad_norm_",
    "decoder_layers",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "split_layers",
    "validate_pp",
    "validate_tp",
]
