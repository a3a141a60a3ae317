"""`PrepareOptions`: everything that shapes a prepared dataset, in one frozen dataclass.

`prepare`, `plan_prepare`, the Beam runner and the CLI take one of these (or its fields as
keywords); where the inputs and the output are, and how the run goes (workers, progress bar,
overwrite), are arguments of the runner, not options of the dataset.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from wf_data.data.prepare.inputs import PIECE_BYTES
from wf_data.data.prepare.records import MAX_DOC_BYTES, RecordFields

__all__ = ["PrepareOptions"]


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """What a dataset is prepared with; checked once, at construction.

    Args:
      tokenizer: a name (`"wf-data-demo"`, the shipped one), a directory, or a loaded
        `TokenizerWrapper`: records are token arrays (format `tokens`). None: text or chat.
      text_key, text_separator: the string field(s) of a record that make a text document,
        several joined by the separator (empty values left out; see `RecordFields`).
      chat_key, input_key, output_key, system_prompt_key: chat records, from a `[{role,
        content}]` field or from Nemotron-style columns (format `chat`, never tokenized here).
      num_shards: shards of the dataset; None picks one per 256 MiB of input.
      append_eos: end every tokenized document with the tokenizer's eos.
      skip_bad: skip (and list in `skipped.jsonl`) bad records instead of failing.
      name: the shard file name prefix.
      piece_bytes: large plain jsonl / parquet inputs are cut into tasks of about this size.
      max_doc_bytes: larger records are bad records (bounds memory).
    """

    tokenizer: Any = None
    text_key: str | Sequence[str] = "text"
    text_separator: str = "\n\n"
    chat_key: str | None = None
    input_key: str | None = None
    output_key: str | None = None
    system_prompt_key: str | None = None
    num_shards: int | None = None
    append_eos: bool = False
    skip_bad: bool = False
    name: str = "data"
    piece_bytes: int = PIECE_BYTES
    max_doc_bytes: int = MAX_DOC_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.text_key, str):
            object.__setattr__(self, "text_key", tuple(self.text_key))
        fields = self.fields  # validates the record options
        if self.tokenizer is not None and fields.chat:
            raise ValueError(
                "chat records are stored untokenized (tokenized by SFTDataset): give chat_key "
                "(--chat-key) or input_key/output_key (--input-key/--output-key), or tokenizer "
                "(--tokenizer), not both"
            )
        for option, low in (("num_shards", 1), ("piece_bytes", 1), ("max_doc_bytes", 1)):
            value = getattr(self, option)
            if value is None and option == "num_shards":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{option} must be an int >= {low}, got {value!r}")
        if not isinstance(self.name, str) or not self.name or os.sep in self.name:
            raise ValueError(f"name must be a non-empty file-name part, got {self.name!r}")

    @property
    def fields(self) -> RecordFields:
        """The record fields that make a document (`RecordFields.from_options`)."""
        return RecordFields.from_options(
            self.text_key,
            self.text_separator,
            self.chat_key,
            self.input_key,
            self.output_key,
            self.system_prompt_key,
        )

    @classmethod
    def of(cls, options: PrepareOptions | None = None, **values: Any) -> PrepareOptions:
        """`options` with `values` replaced (default options when None): the keyword form of
        `prepare(..., tokenizer=..., num_shards=...)`. An unknown keyword is a TypeError."""
        if options is None:
            return cls(**values)
        if not isinstance(options, cls):
            raise TypeError(f"options must be a PrepareOptions, got {type(options).__name__}")
        return dataclasses.replace(options, **values) if values else options
