"""Everything from shards to batches: sources, tokenization, packing, mixing, loader.

Public names are imported lazily, so that ``import wf_data.data`` stays cheap and a
numpy-only user never imports torch or JAX.
"""

import importlib

_EXPORTS = {
    "open_dataset": "wf_data.data.sources",
    "DocumentSource": "wf_data.data.sources",
    "InMemorySource": "wf_data.data.sources",
    "TokenizerWrapper": "wf_data.data.tokenization",
    "tokenize": "wf_data.data.tokenization",
    "pack": "wf_data.data.packing",
    "PretrainDataset": "wf_data.data.datasets.pretrain",
    "SFTDataset": "wf_data.data.datasets.sft",
    "render_with_mask": "wf_data.data.chat",
    "to_messages": "wf_data.data.chat",
    "plan_concat": "wf_data.data.plans",
    "plan_best_fit": "wf_data.data.plans",
    "read_rows": "wf_data.data.rows",
    "batch_plans": "wf_data.data.batching",
    "mix_plans": "wf_data.data.mixing",
    "StaticWeights": "wf_data.data.mixing",
    "Exp3Policy": "wf_data.data.mixing",
    "Exp3": "wf_data.data.odm",
    "DataLoader": "wf_data.data.loader",
    "loader_pipeline": "wf_data.data.loader",
    "get_loader": "wf_data.data.factory",
    "get_eval_loaders": "wf_data.data.factory",
    "LoaderStateError": "wf_data.data.loader",
    "to_torch": "wf_data.data.interop",
    "LoaderDataset": "wf_data.data.torch_dataset",
    "check_model": "wf_data.data.torch_dataset",
    "to_jax": "wf_data.data.interop",
    "save_with_orbax": "wf_data.data.checkpoint",
    "restore_with_orbax": "wf_data.data.checkpoint",
    "save_with_dcp": "wf_data.data.checkpoint",
    "load_with_dcp": "wf_data.data.checkpoint",
    "build_demo_corpus": "wf_data.data.demo_corpus",
    "ensure_demo_data": "wf_data.data.demo_corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wf_data.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
