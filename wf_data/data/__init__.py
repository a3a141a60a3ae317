"""Everything from shards to batches: sources, tokenization, packing, mixing, loader.

Public names are imported lazily, so that ``import wf_data.data`` stays cheap and a
numpy-only user never imports torch or JAX. This package imports none of its stages, so every
stage may take the batch-schema constants below from it.
"""

import importlib

# The `labels` value of a token without loss: padding, each packed document's first token and
# non-assistant SFT tokens. -100 is what torch's cross_entropy and HF models ignore by default.
IGNORE_INDEX = -100

_EXPORTS = {
    "open_dataset": "wf_data.data.shards.sources",
    "DocumentSource": "wf_data.data.shards.sources",
    "InMemorySource": "wf_data.data.shards.sources",
    "TokenizerWrapper": "wf_data.data.text.tokenization",
    "tokenize": "wf_data.data.text.tokenize_dataset",
    "pack": "wf_data.data.read.packing",
    "PretrainDataset": "wf_data.data.read.pretrain",
    "SFTDataset": "wf_data.data.read.sft",
    "render_with_mask": "wf_data.data.text.chat",
    "to_messages": "wf_data.data.text.chat",
    "plan_concat": "wf_data.data.plan.plans",
    "plan_best_fit": "wf_data.data.plan.plans",
    "read_rows": "wf_data.data.read.rows",
    "batch_plans": "wf_data.data.plan.batching",
    "mix_plans": "wf_data.data.mix.mixing",
    "StaticWeights": "wf_data.data.mix.mixing",
    "Exp3Policy": "wf_data.data.mix.mixing",
    "Exp3": "wf_data.data.mix.exp3",
    "DataLoader": "wf_data.data.deliver.loader",
    "loader_pipeline": "wf_data.data.deliver.loader",
    "get_loader": "wf_data.data.deliver.factory",
    "get_eval_loaders": "wf_data.data.deliver.factory",
    "LoaderStateError": "wf_data.data.deliver.loader",
    "to_torch": "wf_data.data.deliver.interop",
    "LoaderDataset": "wf_data.integrations.torch_dataset",
    "check_model": "wf_data.integrations.torch_dataset",
    "to_jax": "wf_data.data.deliver.interop",
    "save_with_orbax": "wf_data.integrations.checkpoint",
    "restore_with_orbax": "wf_data.integrations.checkpoint",
    "save_with_dcp": "wf_data.integrations.checkpoint",
    "load_with_dcp": "wf_data.integrations.checkpoint",
    "MixtureFeedback": "wf_data.data.mix.feedback",
    "ProcessMap": "wf_data.data.workers.process_map",
    "build_demo_corpus": "wf_data.data.prepare.demo_corpus",
    "ensure_demo_data": "wf_data.data.prepare.demo_corpus",
}

__all__ = sorted([*_EXPORTS, "IGNORE_INDEX"])


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wf_data.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
