"""The ``tokenize`` transform: a Grain ``MapDataset`` of ``(n,) int32`` token arrays over a
dataset of text documents.

Written against Grain's public API only: the parent is our own reference, and batched reads
are the public ``__getitems__`` (the batch protocol wf-data's sources and readers use), which
tokenizes a whole batch with one ``encode_batch`` call on the Rust side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from wf_data.data.text.tokenization import TokenizerWrapper


class TokenizeDataset(grain.MapDataset):
    """Maps text documents of ``parent`` to ``(n,) int32`` token arrays with ``tokenizer``.

    ``__getitems__(indices)`` tokenizes a batch with one ``encode_batch`` call. ``None``
    elements (filtered out upstream) stay ``None``; any other non-``str`` element is a
    TypeError naming its index.
    """

    def __init__(self, parent: grain.MapDataset, tokenizer: TokenizerWrapper):
        super().__init__(parent)
        if not isinstance(tokenizer, TokenizerWrapper):
            raise TypeError(f"tokenizer is not a TokenizerWrapper: {type(tokenizer)}")
        # Our own handle on the parent: Grain's `_parent` is private.
        self._texts = parent
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> TokenizerWrapper:
        """The tokenizer applied to every element."""
        return self._tokenizer

    def __len__(self) -> int:
        return len(self._texts)

    def __str__(self) -> str:
        return f"TokenizeDataset(tokenizer={self._tokenizer.name!r})"

    def _check_text(self, index: int, element: Any) -> None:
        if element is not None and not isinstance(element, str):
            raise TypeError(
                f"{self}: element {index} is {type(element).__name__}, not str; tokenize needs "
                "text documents (a 'text' format source or a dataset mapped to str)"
            )

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        element = self._texts[index]
        self._check_text(index, element)
        return None if element is None else self._tokenizer.encode(element)

    def __getitems__(self, indices: Sequence[int]) -> list[np.ndarray | None]:
        """The token arrays of ``indices`` (``None`` where the parent has none), encoded in
        one batch."""
        elements = [self._texts[index] for index in indices]
        for index, element in zip(indices, elements, strict=True):
            self._check_text(index, element)
        encoded = iter(self._tokenizer.encode_batch([e for e in elements if e is not None]))
        return [None if element is None else next(encoded) for element in elements]


def tokenize(dataset: Any, tokenizer: TokenizerWrapper | str | None) -> TokenizeDataset:
    """Tokenize a dataset of text documents: ``(n,) int32`` token arrays per element.

    ``dataset`` is a ``grain.MapDataset`` or a random-access source (a ``DocumentSource`` of
    ``text`` format, a list of str...); ``tokenizer`` a ``TokenizerWrapper`` or a name/path
    for ``TokenizerWrapper.from_pretrained`` (default flags: eos appended).
    """
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper.from_pretrained(tokenizer)
    if not isinstance(dataset, grain.MapDataset):
        dataset = grain.MapDataset.source(dataset)
    return TokenizeDataset(dataset, tokenizer)
