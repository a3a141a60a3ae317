"""Torch side: device mesh, FSDP2, tensor and pipeline parallelism, DCP checkpoints."""
