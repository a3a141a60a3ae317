"""Documents of any random-access source as token arrays: the source protocol packers read.

A source has `__len__` and `__getitem__`, optionally `__getitems__` (one batched read); a
document is a 1-D integer token array or a dict `{"input_ids": (n,) int, "loss_mask": (n,)}`.
`read_documents` checks and normalises one batch of them; planners measure documents with it
and readers read them with it.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

__all__ = ["describe_source", "read_documents"]


def describe_source(source: Any) -> str:
    """The source, for error messages: its path when it has one."""
    path = getattr(source, "path", None)
    if path is not None:
        return f"{type(source).__name__}({path})"
    if isinstance(source, list | tuple):
        return f"{type(source).__name__} of {len(source)} documents"
    text = repr(source)
    return text if len(text) <= 160 else text[:157] + "..."


def read_documents(
    source: Any, indices: list[int]
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """One batched read: (index -> (n,) int tokens, index -> (n,) loss mask for dict docs)."""
    if not indices:
        return {}, {}
    getitems = getattr(source, "__getitems__", None)
    raw = getitems(indices) if getitems is not None else [source[i] for i in indices]
    if len(raw) != len(indices):
        raise ValueError(
            f"{type(source).__name__}.__getitems__ returned {len(raw)} documents for "
            f"{len(indices)} indices"
        )
    if _plain_token_arrays(raw):
        return dict(zip(indices, raw, strict=True)), {}
    tokens, masks = {}, {}
    for index, doc in zip(indices, raw, strict=True):
        tokens[index], mask = _as_document(doc, index, source)
        if mask is not None:
            masks[index] = mask
    return tokens, masks


def _plain_token_arrays(docs: list) -> bool:
    """Whether every document is a 1-D integer numpy array (checked with C-level maps)."""
    if set(map(type, docs)) != {np.ndarray} or set(map(_NDIM, docs)) != {1}:
        return False
    return set(map(_DTYPE_KIND, docs)) <= {"i", "u"}  # kinds: hashing dtypes is slow


_NDIM, _DTYPE_KIND = operator.attrgetter("ndim"), operator.attrgetter("dtype.kind")


def _as_document(doc: Any, index: int, source: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens (n,) int, loss_mask (n,) or None) from a token array or an SFT dict."""
    if type(doc) is np.ndarray and doc.ndim == 1 and doc.dtype.kind in "iu":
        return doc, None
    where = f"{describe_source(source)} document {index}"
    if isinstance(doc, dict):
        if "input_ids" not in doc:
            raise ValueError(
                f"{where}: dict without 'input_ids' (keys: {sorted(doc)}); expected "
                "{'input_ids': ..., 'loss_mask': ...}"
            )
        tokens = np.asarray(doc["input_ids"])
        if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
            raise TypeError(
                f"{where}: field 'input_ids' must be a 1-D integer array, got shape "
                f"{tokens.shape} and dtype {tokens.dtype}"
            )
        mask = doc.get("loss_mask")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != tokens.shape:
                raise ValueError(
                    f"{where}: field 'loss_mask' has shape {mask.shape}, 'input_ids' {tokens.shape}"
                )
        return tokens, mask
    if isinstance(doc, str | bytes):
        raise TypeError(
            f"{where} is text ({type(doc).__name__}), packing needs token ids: "
            "tokenize it (PretrainDataset(..., tokenizer=...)) or pre-tokenize with "
            "`wf-data prepare --tokenizer ...`"
        )
    array = np.asarray(doc)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise TypeError(
            f"{where}: expected a 1-D integer token array or a dict with 'input_ids', "
            f"got {type(doc).__name__} with shape {array.shape} and dtype {array.dtype}"
        )
    return array, None
