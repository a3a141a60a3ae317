"""Input records to documents: the fields that make a text or chat document, bad records.

`iter_documents(task)` yields one task's documents in input order; a bad record raises
`BadInputError` naming file and line, or is skipped and logged with `skip_bad`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from wf_data.data.prepare.input_streams import InputFileError
from wf_data.data.prepare.inputs import PrepareTask, _iter_jsonl, _open_parquet
from wf_data.data.shards import sources

MAX_DOC_BYTES = 64 << 20  # larger records are bad records: memory stays under 1 GB


class BadInputError(ValueError):
    """An input record that cannot be prepared; the message names file and line."""


class BadTypeError(BadInputError, TypeError):
    """An input field of the wrong type (e.g. `text` not a string)."""


def _check_name(value: Any, option: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{option} must be a non-empty field name, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class RecordFields:
    """Which fields of a jsonl/parquet record make its document (build with `from_options`).

    Text (`chat_key` None): the string fields `text_keys`, joined by `text_separator`. Empty or
    whitespace-only values are left out of the join (no doubled separators); a record whose
    every value is empty is dropped and counted as empty. One key keeps its value unchanged.
    Chat: the `[{role, content}]` list in `chat_key`; with `input_key` set (Nemotron style),
    a record without `chat_key` is converted from `input_key` (user string or messages so far),
    `output_key` (assistant answer) and optional `system_prompt_key` by
    `wf_data.data.text.chat.to_messages`. Stored chat records are `{"messages": [...]}` either way.
    """

    text_keys: tuple[str, ...] = ("text",)
    text_separator: str = "\n\n"
    chat_key: str | None = None
    input_key: str | None = None
    output_key: str | None = None
    system_prompt_key: str | None = None

    @classmethod
    def from_options(
        cls,
        text_key: str | Sequence[str] = "text",
        text_separator: str = "\n\n",
        chat_key: str | None = None,
        input_key: str | None = None,
        output_key: str | None = None,
        system_prompt_key: str | None = None,
    ) -> RecordFields:
        """Validated, normalised fields: any of `input_key`/`output_key` gives Nemotron-style
        chat, the missing ones taking `to_messages`' defaults (`messages`, `input`, `output`,
        `system_prompt`)."""
        keys = (text_key,) if isinstance(text_key, str) else tuple(text_key)
        if not keys:
            raise ValueError("text_key: give at least one field name")
        for key in keys:
            _check_name(key, "text_key")
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(f"text_key names {repeated} more than once: {list(keys)}")
        if not isinstance(text_separator, str):
            raise TypeError(f"text_separator must be a str, got {type(text_separator).__name__}")
        for value, option in (
            (chat_key, "chat_key"),
            (input_key, "input_key"),
            (output_key, "output_key"),
            (system_prompt_key, "system_prompt_key"),
        ):
            if value is not None:
                _check_name(value, option)
        if input_key is None and output_key is None:
            if system_prompt_key is not None:
                raise ValueError(
                    "system_prompt_key (--system-prompt-key) applies to Nemotron-style records: "
                    "give input_key/output_key (--input-key/--output-key) too"
                )
            fields = cls(keys, text_separator, chat_key)
        else:
            fields = cls(
                keys,
                text_separator,
                chat_key or "messages",
                input_key or "input",
                output_key or "output",
                system_prompt_key or "system_prompt",
            )
        if fields.chat and (keys != ("text",) or text_separator != "\n\n"):
            raise ValueError(
                "text_key/text_separator (--text-key/--text-separator) apply to text records; "
                "chat records are read from chat_key/input_key/output_key"
            )
        return fields

    @property
    def chat(self) -> bool:
        """Whether records are chat conversations (else text)."""
        return self.chat_key is not None

    def describe(self) -> dict:
        """The options that shape the records, as JSON (manifest `input_fields`, resume keys)."""
        if self.chat:
            return {
                "chat_key": self.chat_key,
                "input_key": self.input_key,
                "output_key": self.output_key,
                "system_prompt_key": self.system_prompt_key,
            }
        return {"text_key": list(self.text_keys), "text_separator": self.text_separator}

    def parquet_columns(self, names: Sequence[str], path: str) -> list[str]:
        """The columns of a parquet file (schema `names`) to read; BadInputError if any lack."""
        if not self.chat:
            missing = [key for key in self.text_keys if key not in names]
            if missing:
                raise BadInputError(
                    f"{path}: no column {missing[0]!r} (columns: {list(names)}); "
                    "choose with --text-key"
                )
            return list(self.text_keys)
        if self.chat_key in names:
            wanted = [self.chat_key, self.input_key, self.output_key, self.system_prompt_key]
        elif self.input_key is not None and self.input_key in names and self.output_key in names:
            wanted = [self.input_key, self.output_key, self.system_prompt_key]
        else:
            needs = f"{self.chat_key!r}" + (
                f" or columns {self.input_key!r} + {self.output_key!r}" if self.input_key else ""
            )
            raise BadInputError(
                f"{path}: no column {needs} (columns: {list(names)}); choose with --chat-key"
                + (", --input-key, --output-key" if self.input_key else "")
            )
        return [name for name in wanted if name is not None and name in names]

    def extract(self, obj: Any, where: str) -> Any:
        """The document of one parsed record: the text str, or {"messages": [...]} for chat."""
        if not isinstance(obj, dict):
            raise BadTypeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if not self.chat:
            return self._text(obj, where)
        if self.input_key is None or obj.get(self.chat_key) is not None:
            return self._messages(obj, where)
        return self._nemotron(obj, where)

    def _text(self, obj: dict, where: str) -> str:
        values = [_string_field(obj, key, where, "--text-key") for key in self.text_keys]
        if len(values) == 1:
            return values[0]
        return self.text_separator.join(value for value in values if value.strip())

    def _messages(self, obj: dict, where: str) -> dict:
        if self.chat_key not in obj:
            raise BadInputError(
                f"{where}: missing key {self.chat_key!r} (record keys: {sorted(obj)[:10]}); "
                "choose with --chat-key"
            )
        try:
            messages = sources.validate_chat_messages(
                obj[self.chat_key], f"{where}: field {self.chat_key!r}"
            )
        except TypeError as error:
            raise BadTypeError(str(error)) from None
        except ValueError as error:
            raise BadInputError(str(error)) from None
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}

    def _nemotron(self, obj: dict, where: str) -> dict:
        from wf_data.data.text import chat

        for key in (self.input_key, self.output_key):
            if key not in obj:
                raise BadInputError(
                    f"{where}: missing key {key!r} (record keys: {sorted(obj)[:10]}); a chat "
                    f"record needs {self.chat_key!r} or {self.input_key!r} + "
                    f"{self.output_key!r} (--chat-key, --input-key, --output-key)"
                )
        prompt = obj[self.input_key]
        if not isinstance(prompt, str):
            if isinstance(prompt, list) and not prompt:
                raise BadInputError(f"{where}: field {self.input_key!r} is an empty list")
            try:
                sources.validate_chat_messages(prompt, f"{where}: field {self.input_key!r}")
            except TypeError as error:
                raise BadTypeError(str(error)) from None
            except ValueError as error:
                raise BadInputError(str(error)) from None
        _string_field(obj, self.output_key, where, "--output-key")
        system = obj.get(self.system_prompt_key)
        if system is not None and not isinstance(system, str):
            raise BadTypeError(
                f"{where}: field {self.system_prompt_key!r} must be a string, got "
                f"{type(system).__name__}"
            )
        record = {key: value for key, value in obj.items() if key != self.chat_key}  # it is null
        try:
            messages = chat.to_messages(
                record,
                messages_key=self.chat_key,
                input_key=self.input_key,
                output_key=self.output_key,
                system_key=self.system_prompt_key,
            )
        except (TypeError, ValueError) as error:  # to_messages names no file: prefix it
            kind = BadTypeError if isinstance(error, TypeError) else BadInputError
            raise kind(f"{where}: {str(error).removeprefix('conversation: ')}") from None
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def _string_field(obj: dict, key: str, where: str, flag: str) -> str:
    if key not in obj:
        raise BadInputError(
            f"{where}: missing key {key!r} (record keys: {sorted(obj)[:10]}); choose with {flag}"
        )
    value = obj[key]
    if not isinstance(value, str):
        raise BadTypeError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


SURROGATE_CHECK_CHARS = 1 << 20  # text checked for lone surrogates this much at a time


def _lone_surrogate(text: str) -> int | None:
    """The index of the first lone UTF-16 surrogate in `text` (None: there is none).

    JSON's `\\ud800` escapes parse into such characters, which no encoding can store. ASCII
    text has none and is known so at no cost; other text is encoded in slices, which fails
    exactly at one (a valid pair was parsed into one character), in bounded memory.
    """
    if text.isascii():
        return None
    for start in range(0, len(text), SURROGATE_CHECK_CHARS):
        try:
            text[start : start + SURROGATE_CHECK_CHARS].encode("utf-8")
        except UnicodeEncodeError as error:
            return start + error.start
    return None


def _check_no_surrogate(obj: dict, document: Any, where: str, fields: RecordFields) -> None:
    """BadInputError for a lone surrogate in `document` (the text fields of `obj`, or its
    messages): not Unicode text, so it can be neither stored as UTF-8 nor tokenized."""
    if isinstance(document, str):
        if document.isascii():  # most text: no scan
            return
        named: Iterator[tuple[Any, str]] = ((key, obj[key]) for key in fields.text_keys)
        label = "field {!r}"
    else:
        named = enumerate((message["content"] for message in document["messages"]), 1)
        label = "message {}"
    for key, text in named:
        at = _lone_surrogate(text)
        if at is not None:
            raise BadInputError(
                f"{where}: {label.format(key)} holds a lone UTF-16 surrogate "
                f"\\u{ord(text[at]):04x} at character {at + 1} (a \\u escape without its pair): "
                "not Unicode text; fix the record or skip it with --skip-bad"
            )


def _too_large(where: str, size: int, max_doc_bytes: int) -> BadInputError:
    return BadInputError(
        f"{where}: record of {size:,} bytes is over max_doc_bytes {max_doc_bytes:,}; raise "
        "--max-doc-bytes (prepare's memory grows about 4 bytes per byte of it) or skip such "
        "records with --skip-bad"
    )


def _parse_jsonl_line(raw: bytes | int, where: str, fields: RecordFields, max_doc_bytes) -> Any:
    if isinstance(raw, int):
        raise _too_large(where, raw, max_doc_bytes)
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadInputError(
            f"{where}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
        ) from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadInputError(
            f"{where}: malformed JSON: {error.msg} at column {error.colno}"
        ) from None
    document = fields.extract(obj, where)
    _check_no_surrogate(obj, document, where, fields)
    return document


def _iter_parquet(task: PrepareTask, fields: RecordFields):
    """(where, {column: value}) for each row of a parquet task, the columns `fields` reads."""
    import pyarrow

    parquet = _open_parquet(task.path)
    columns = fields.parquet_columns(parquet.schema_arrow.names, task.path)
    row = task.first_row
    groups = list(range(task.start, task.stop or 0))
    batches = parquet.iter_batches(batch_size=1024, row_groups=groups, columns=columns)
    while True:
        try:
            batch = next(batches, None)
        except (pyarrow.ArrowException, OSError) as error:  # a damaged page
            raise InputFileError(
                f"{task.path}: damaged parquet data after row {row} ({error}); re-create or "
                "re-download it"
            ) from None
        if batch is None:
            return
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8
            rows = _rows_or_errors(batch, f"{task.path}: row ", row)
        for values in rows:
            row += 1
            yield f"{task.path}: row {row}", values


def _rows_or_errors(batch, where: str, first_row: int) -> Iterator[dict | BadInputError]:
    """The rows of a record batch one by one: each row's values, or a BadInputError naming
    the row and column whose string is not UTF-8 (arrow stores what the writer gave it)."""
    for index in range(batch.num_rows):
        row = batch.slice(index, 1)
        try:
            yield row.to_pylist()[0]
        except UnicodeDecodeError as error:
            column = next(
                name
                for name, values in zip(row.schema.names, row.columns, strict=True)
                if _undecodable(values)
            )
            yield BadInputError(
                f"{where}{first_row + index + 1}: field {column!r} is not valid UTF-8 "
                f"({error.reason} at byte {error.start}); fix the file or skip the row with "
                "--skip-bad"
            )


def _undecodable(values) -> bool:
    try:
        values.to_pylist()
    except UnicodeDecodeError:
        return True
    return False


def _parquet_value(
    values: dict | BadInputError, where: str, fields: RecordFields, max_doc_bytes: int
) -> Any:
    if isinstance(values, BadInputError):
        raise values
    for column, value in values.items():
        if isinstance(value, bytes):  # binary columns hold UTF-8 text
            try:
                values[column] = value.decode("utf-8")
            except UnicodeDecodeError as error:
                raise BadInputError(
                    f"{where}: field {column!r} not valid UTF-8 (byte "
                    f"0x{value[error.start]:02x} at offset {error.start})"
                ) from None
    document = fields.extract(values, where)
    # A str has at most 4 UTF-8 bytes a character: encode only the candidates.
    if isinstance(document, str) and len(document) * 4 > max_doc_bytes:
        size = len(document.encode("utf-8"))
        if size > max_doc_bytes:
            raise _too_large(where, size, max_doc_bytes)
    return document


def _read_txt(task: PrepareTask, fields: RecordFields, max_doc_bytes: int) -> str:
    if fields.chat:
        raise BadInputError(f"{task.path}: a .txt file holds plain text, not chat (--chat-key)")
    size = os.stat(task.path).st_size
    if size > max_doc_bytes:
        raise _too_large(task.path, size, max_doc_bytes)
    data = pathlib.Path(task.path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise BadInputError(
            f"{task.path}:{line}: not valid UTF-8 (byte 0x{data[error.start]:02x} at column "
            f"{column})"
        ) from None


def iter_documents(
    task: PrepareTask,
    *,
    fields: RecordFields | None = None,
    skip_bad: bool = False,
    stats: dict | None = None,
    max_doc_bytes: int = MAX_DOC_BYTES,
    on_skip: Callable[[str, str], None] | None = None,
) -> Iterator[Any]:
    """Documents of one task in input order: text `str`, or `{"messages": [...]}` for chat.

    `fields` says which record fields make a document (default: the string field `text`).

    Bad records (a record over `max_doc_bytes` included) raise `BadInputError` naming file and
    line, or with `skip_bad` are counted in `stats["skipped_bad"]` and reported to
    `on_skip(where, message)`; empty (whitespace-only) documents are counted in
    `stats["dropped_empty"]` and not yielded. A damaged input file raises `InputFileError`
    whatever `skip_bad` says.
    """
    stats = stats if stats is not None else {}
    stats.setdefault("skipped_bad", 0)
    stats.setdefault("dropped_empty", 0)
    fields = fields or RecordFields()
    if task.kind == ".txt":
        items: Iterator = iter([(task.path, None)])
    elif task.kind == ".parquet":
        items = _iter_parquet(task, fields)
    else:
        items = _iter_jsonl(task, max_doc_bytes)
    for where, raw in items:
        if task.kind not in (".txt", ".parquet"):
            where = where()
        try:
            if task.kind == ".txt":
                document = _read_txt(task, fields, max_doc_bytes)
            elif task.kind == ".parquet":
                document = _parquet_value(raw, where, fields, max_doc_bytes)
            else:
                document = _parse_jsonl_line(raw, where, fields, max_doc_bytes)
        except BadInputError as error:
            if not skip_bad:
                raise
            stats["skipped_bad"] += 1
            if on_skip is not None:
                on_skip(where, str(error))
            continue
        finally:
            del raw  # a long line must not stay alive beside its parsed document
        empty = not document["messages"] if fields.chat else not document.strip()
        if empty:
            stats["dropped_empty"] += 1
            continue
        yield document
