"""Ready-made datasets: pre-training (tokenize + pack) and SFT (chat + loss mask + pack)."""

import importlib

_EXPORTS = {
    "PretrainDataset": "wf_data.data.datasets.pretrain",
    "SFTDataset": "wf_data.data.datasets.sft",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wf_data.data.datasets' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
