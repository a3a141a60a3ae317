"""`wf-data prepare`: jsonl / parquet / txt inputs -> ArrayRecord shards + manifest.json.

The work is a map over input pieces and a reduce into shards, so it can later run on a
distributed engine:

1. `plan_tasks` splits the inputs into tasks: one per input file, large plain `.jsonl` files cut
   at line boundaries every `piece_bytes` and parquet files at row-group boundaries. The split
   depends only on the input files, never on the number of workers.
2. `prepare_file` turns one task into a *part* (an ArrayRecord file of encoded records plus,
   for tokens, its `(n,) int64` lengths) under `OUT/.wf-prepare/`.
3. `assemble_shard` copies the global record sequence (parts in task order) into shard k of N:
   records `[k * R // N, (k + 1) * R // N)`.
4. `finalize(out_dir)` writes `lengths.npy`, then `manifest.json`, from the per-shard results.

Every file is written through `wf_data.atomic` (unique temp file, fsync, rename); a part or
shard counts as finished only once its done-marker JSON (written atomically after the rename)
exists and carries the key of the current options, so a run killed at any moment and re-run
redoes only unfinished work, and the output is byte-identical whatever `workers` is.
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import pathlib
import queue as queue_lib
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from wf_data import atomic
from wf_data.data import input_streams, sources, worker_lifetime
from wf_data.data import out_dir as out_dir_lib
from wf_data.data.input_streams import InputFileError
from wf_data.data.out_dir import WORK_DIR_NAME, OutDirError

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".txt")
PIECE_BYTES = 64 << 20  # large plain jsonl / parquet inputs split into tasks of about this size
AUTO_SHARD_BYTES = 256 << 20  # num_shards=None: one shard per this many input bytes
MAX_AUTO_SHARDS = 1024
BATCH_DOCS = 512  # documents per encode_batch call
BATCH_CHARS = 4 << 20  # and at most this many characters (bounds the tokenizer's memory)
# Long documents are tokenized in pieces of about this many characters (see `_text_pieces`).
PIECE_CHARS = 1 << 16
MAX_DOC_BYTES = 64 << 20  # larger records are bad records: memory stays under 1 GB
PART_WRITER_OPTIONS = "group_size:1,uncompressed"  # parts are temporary: favour speed
SKIPPED_NAME = "skipped.jsonl"  # every skipped bad record, beside the manifest
SKIPPED_SHOWN = 20  # skipped records in the returned summary (and printed by the CLI)
_COMPRESSION = {".jsonl.gz": "gzip", ".jsonl.zst": "zstd"}

__all__ = [
    "BadInputError",
    "BadTypeError",
    "InputFileError",
    "OutDirError",
    "PreparePlan",
    "PrepareTask",
    "RecordFields",
    "assemble_shard",
    "expand_inputs",
    "finalize",
    "iter_documents",
    "plan_prepare",
    "plan_tasks",
    "prepare",
    "prepare_file",
]


class BadInputError(ValueError):
    """An input record that cannot be prepared; the message names file and line."""


class BadTypeError(BadInputError, TypeError):
    """An input field of the wrong type (e.g. `text` not a string)."""


# --------------------------------------------------------------------------- inputs and tasks


def _suffix(path: pathlib.Path) -> str | None:
    name = path.name.lower()
    return next((suffix for suffix in SUFFIXES if name.endswith(suffix)), None)


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[pathlib.Path]:
    """Input files in a deterministic order: as given, directories walked recursively, sorted.

    Hidden files and files with other suffixes inside directories are ignored; a file named
    explicitly must have one of `SUFFIXES`. A file reached twice (named twice, through a
    directory and by name, or through a link) is kept once, at its first place, with a warning.
    """
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    files: list[pathlib.Path] = []
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_dir():
            found = sorted(
                child
                for child in path.rglob("*")
                if child.is_file()
                and _suffix(child)
                and not any(part.startswith(".") for part in child.relative_to(path).parts)
            )
            if not found:
                raise ValueError(f"{path}: directory holds no input files with suffix {SUFFIXES}")
            files += found
        elif path.is_file():
            if not _suffix(path):
                raise ValueError(f"{path}: unsupported input type; valid suffixes: {SUFFIXES}")
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: input does not exist")
    if not files:
        raise ValueError("no inputs given")
    return _unique_files(files)


def _unique_files(files: list[pathlib.Path]) -> list[pathlib.Path]:
    first_seen: dict[tuple[int, int], pathlib.Path] = {}
    unique = []
    for path in files:
        stat = path.stat()
        identity = (stat.st_dev, stat.st_ino)  # the same file whatever the path or link
        if identity in first_seen:
            warnings.warn(
                f"{path}: the same file as input {first_seen[identity]}, given more than once; "
                "it is prepared once",
                UserWarning,
                stacklevel=3,
            )
            continue
        first_seen[identity] = path
        unique.append(path)
    return unique


@dataclasses.dataclass(frozen=True)
class PrepareTask:
    """One independent unit of work: a whole input file or a piece of one.

    `start`/`stop` are byte offsets at line starts for `.jsonl`, row-group indices for
    `.parquet`, and `0`/`None` (whole file) otherwise. `first_row` is the 0-based row of the
    first parquet row group (for error messages).
    """

    path: str
    kind: str
    start: int = 0
    stop: int | None = None
    first_row: int = 0

    def key(self) -> str:
        """Identity of the task's input: path, size, mtime and range (for resume checks)."""
        stat = os.stat(self.path)
        text = f"{os.path.abspath(self.path)}|{stat.st_size}|{stat.st_mtime_ns}|{self}"
        return hashlib.sha256(text.encode()).hexdigest()


def _line_boundaries(path: pathlib.Path, piece_bytes: int) -> list[int]:
    """Byte offsets of line starts about every `piece_bytes` (first 0, last the file size)."""
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        target = piece_bytes
        while target < size:
            f.seek(target - 1)
            f.readline()  # skip to the start of the next line
            position = f.tell()
            if position >= size:
                break
            if position > bounds[-1]:
                bounds.append(position)
            target = max(position, target) + piece_bytes
    bounds.append(size)
    return bounds


def plan_tasks(files: Sequence[pathlib.Path], piece_bytes: int = PIECE_BYTES) -> list[PrepareTask]:
    """Split input files into tasks; depends only on the files and `piece_bytes`."""
    tasks: list[PrepareTask] = []
    for path in files:
        kind = _suffix(path)
        if kind == ".jsonl" and path.stat().st_size > piece_bytes:
            bounds = _line_boundaries(path, piece_bytes)
            tasks += [
                PrepareTask(str(path), kind, a, b) for a, b in zip(bounds, bounds[1:], strict=False)
            ]
        elif kind == ".parquet":
            tasks += _parquet_tasks(path, piece_bytes)
        else:
            tasks.append(PrepareTask(str(path), kind))
    return tasks


def _open_parquet(path: str | os.PathLike):
    """`pyarrow.parquet.ParquetFile(path)`; InputFileError for a damaged or foreign file."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise InputFileError(
            f"{path}: not a readable parquet file ({error}); re-create or re-download it"
        ) from None


def _parquet_tasks(path: pathlib.Path, piece_bytes: int) -> list[PrepareTask]:
    metadata = _open_parquet(path).metadata
    tasks, start, first_row, rows, size = [], 0, 0, 0, 0
    for group in range(metadata.num_row_groups):
        rows += metadata.row_group(group).num_rows
        size += metadata.row_group(group).total_byte_size
        if size >= piece_bytes or group == metadata.num_row_groups - 1:
            tasks.append(PrepareTask(str(path), ".parquet", start, group + 1, first_row))
            start, first_row, size = group + 1, first_row + rows, 0
            rows = 0
    return tasks or [PrepareTask(str(path), ".parquet", 0, 0)]


# --------------------------------------------------------------------------- record fields


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
    `wf_data.data.chat.to_messages`. Stored chat records are `{"messages": [...]}` either way.
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
        from wf_data.data import chat

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


# --------------------------------------------------------------------------- reading documents


def _iter_jsonl(task: PrepareTask, max_doc_bytes: int):
    """(where, line) for each non-blank line of a jsonl task; `where()` names file:line.

    A line over `max_doc_bytes` comes as its size (an int), never held in memory.
    """
    line_base: list[int] = []

    def where(relative_line: int) -> str:
        if not line_base:  # count the lines before this piece only when a message needs it
            line_base.append(_count_lines(task.path, task.start) + 1)
        return f"{task.path}:{line_base[0] + relative_line}"

    chunks = input_streams.byte_chunks(
        task.path, _COMPRESSION.get(task.kind), task.start, task.stop
    )
    for relative_line, raw in enumerate(input_streams.lines(chunks, max_doc_bytes)):
        if isinstance(raw, int) or raw.strip():
            yield (lambda r=relative_line: where(r)), raw


def _count_lines(path: str, stop: int) -> int:
    count = 0
    with open(path, "rb") as f:
        while stop > 0 and (chunk := f.read(min(stop, 1 << 20))):
            count += chunk.count(b"\n")
            stop -= len(chunk)
    return count


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
    return fields.extract(obj, where)


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
        for values in batch.to_pylist():
            row += 1
            yield f"{task.path}: row {row}", values


def _parquet_value(values: dict, where: str, fields: RecordFields, max_doc_bytes: int) -> Any:
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


# --------------------------------------------------------------------------- one task -> one part


def prepare_file(
    task: PrepareTask | str | os.PathLike,
    part_path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    fields: RecordFields | None = None,
    append_eos: bool = False,
    skip_bad: bool = False,
    token_dtype: Any = None,
    progress: Callable[[int, int], None] | None = None,
    max_doc_bytes: int = MAX_DOC_BYTES,
) -> dict:
    """Encode one input file (or task piece) into the ArrayRecord file `part_path`, atomically.

    With a `tokenizer` (a `TokenizerWrapper`) records are token arrays of `token_dtype` and
    their `(n,) int64` lengths go to `PART_PATH.lengths.npy`; else text or chat JSON records.
    `fields` (default: the string field `text`) says which record fields make a document.
    Skipped bad records (`skip_bad`) are listed in `PART_PATH.skipped.jsonl`, one
    {"record": "file:line", "error": message} a line. `progress(documents, tokens)` is called
    after each batch. Returns {"records", "tokens", "dropped_empty", "skipped_bad", "sha256"}.
    """
    if not isinstance(task, PrepareTask):
        path = pathlib.Path(task)
        if not _suffix(path):
            raise ValueError(f"{path}: unsupported input type; valid suffixes: {SUFFIXES}")
        task = PrepareTask(str(path), _suffix(path), 0, None)
        if task.kind == ".parquet":
            import pyarrow.parquet as pq

            task = dataclasses.replace(task, stop=pq.ParquetFile(path).metadata.num_row_groups)
    fields = fields or RecordFields()
    if tokenizer is not None and fields.chat:
        raise ValueError(
            "chat records are stored untokenized: give chat_key or tokenizer, not both"
        )
    tokenizer = _load_tokenizer(tokenizer)
    part_path = pathlib.Path(part_path)
    stats = {"skipped_bad": 0, "dropped_empty": 0}
    skip_log = _SkipLog(_skipped_path(part_path))
    documents = iter_documents(
        task,
        fields=fields,
        skip_bad=skip_bad,
        stats=stats,
        max_doc_bytes=max_doc_bytes,
        on_skip=skip_log.add,
    )
    lengths: list[int] = []
    if tokenizer is None:
        format = "chat" if fields.chat else "text"
        records = _encode_untokenized(documents, format, lengths, progress)
    else:
        dtype = np.dtype(token_dtype or sources.token_dtype_for_vocab(tokenizer.vocab_size))
        records = _encode_tokens(
            documents, tokenizer, dtype, append_eos, lengths, stats, task, progress
        )
    try:
        written = sources.write_shard(part_path, records, options=PART_WRITER_OPTIONS)
    except BaseException:
        skip_log.discard()
        raise
    skip_log.close()
    if tokenizer is not None:
        _save_lengths(part_path.with_name(part_path.name + ".lengths.npy"), lengths)
    return {
        "records": written["records"],
        "tokens": int(sum(lengths)) if tokenizer is not None else 0,
        "dropped_empty": stats["dropped_empty"],
        "skipped_bad": stats["skipped_bad"],
        "sha256": written["sha256"],
    }


class _SkipLog:
    """Skipped records of one part as JSON lines, published atomically when complete."""

    def __init__(self, path: pathlib.Path):
        self.path, self.writer = path, None

    def add(self, where: str, message: str) -> None:
        if self.writer is None:
            self.writer = atomic.AtomicWriter(self.path, "w")
        entry = {"record": where, "error": message}
        self.writer.file.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.writer is None:
            self.path.unlink(missing_ok=True)  # from an earlier run of this part
            return
        self.writer.commit()

    def discard(self) -> None:
        """Drop what was logged: the part failed and will be redone."""
        if self.writer is not None:
            self.writer.discard()


def _skipped_path(part_path: pathlib.Path) -> pathlib.Path:
    return part_path.with_name(part_path.name + ".skipped.jsonl")


def _batches(documents: Iterator[Any], size: int, max_chars: int) -> Iterator[list[Any]]:
    """Lists of up to `size` documents holding up to `max_chars` characters (or one document)."""
    batch: list[Any] = []
    chars = 0
    for document in documents:
        length = len(document) if isinstance(document, str) else 0
        if batch and chars + length > max_chars:
            yield batch
            batch, chars = [], 0
        batch.append(document)
        chars += length
        if len(batch) == size:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# A single whitespace character between two non-space ones: where byte-level BPE and whitespace
# pre-tokenizers begin a new pre-token anyway.
_PIECE_CUT = re.compile(r"(?<=\S)\s(?=\S)")


def _text_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of about `size` characters (a text up to `2 * size` stays whole).

    Each cut falls before a single whitespace character between two non-space characters, so
    the tokens of the pieces, concatenated, equal those of the whole text for byte-level BPE
    and whitespace pre-tokenizers (tested with the shipped tokenizer). Only a stretch of
    `16 * size` characters without such a place is cut at its end, where the tokens may differ.
    """
    if len(text) <= 2 * size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > 2 * size:
        match = _PIECE_CUT.search(text, start + size, start + 16 * size)
        cut = match.start() if match else start + 16 * size
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
    """`tokenizer.encode_batch(texts)`, long texts encoded piece by piece (`_text_pieces`).

    Pieces go to the tokenizer at most `BATCH_CHARS` characters a call, which bounds its
    memory whatever the document length; bos/eos added per text by the tokenizer's flags are
    kept only at the start and end of each whole text.
    """
    pieces, counts = [], []  # counts: pieces per text
    for text in texts:
        split = _text_pieces(text)
        pieces += split
        counts.append(len(split))
    if len(pieces) == len(texts):
        return tokenizer.encode_batch(texts)
    encoded: list[np.ndarray] = []
    for group in _batches(iter(pieces), len(pieces), BATCH_CHARS):
        encoded += tokenizer.encode_batch(group)
    head = int(bool(getattr(tokenizer, "add_bos", False)))
    tail = int(bool(getattr(tokenizer, "add_eos", False)))
    result, start = [], 0
    for count in counts:
        parts = encoded[start : start + count]
        start += count
        result.append(
            np.concatenate(
                [
                    ids[(head if k else 0) : len(ids) - (tail if k < count - 1 else 0)]
                    for k, ids in enumerate(parts)
                ]
            )
        )
    return result


def _encode_untokenized(documents, format, lengths, progress) -> Iterator[bytes]:
    for batch in _batches(documents, BATCH_DOCS, BATCH_CHARS):
        for document in batch:
            yield sources.encode_record(document, format)
        if progress:
            progress(len(batch), 0)


def _encode_tokens(
    documents, tokenizer, dtype, append_eos, lengths, stats, task, progress
) -> Iterator[bytes]:
    eos_id = tokenizer.eos_id
    if append_eos and eos_id is None:
        raise ValueError(f"append_eos needs an eos token; tokenizer {tokenizer.name} has none")
    limit = np.iinfo(dtype).max
    for batch in _batches(documents, BATCH_DOCS, BATCH_CHARS):
        encoded = _encode_batch(tokenizer, batch)
        batch_tokens = 0
        for ids in encoded:
            ids = np.asarray(ids)
            if append_eos and (ids.size == 0 or ids[-1] != eos_id):
                ids = np.append(ids, eos_id)
            if ids.size == 0:
                stats["dropped_empty"] += 1
                continue
            if ids.max() > limit or ids.min() < 0:
                raise ValueError(
                    f"{task.path}: token id {int(ids.max())} does not fit {dtype.name} "
                    f"(tokenizer {tokenizer.name} vocab_size {tokenizer.vocab_size})"
                )
            lengths.append(int(ids.size))
            batch_tokens += int(ids.size)
            yield ids.astype(dtype).tobytes()
        if progress:
            progress(len(batch), batch_tokens)


def _save_lengths(path: pathlib.Path, lengths: Any) -> None:
    """Document lengths as an int64 ``.npy``, written atomically."""
    atomic.write_npy(path, np.asarray(lengths, dtype=np.int64))


# --------------------------------------------------------------------------- parts -> shards


def _out_path(out_dir: str | os.PathLike) -> pathlib.Path:
    # Resolved: the build goes beside the real directory ("." included, and the target of a
    # link, which stays a link), on its file system, so that the swap is a rename.
    return pathlib.Path(os.path.realpath(out_dir))


def _work_dir(out_dir: pathlib.Path) -> pathlib.Path:
    return out_dir_lib.build_dir(out_dir) / WORK_DIR_NAME


def _part_path(out_dir: pathlib.Path, index: int) -> pathlib.Path:
    return _work_dir(out_dir) / f"part-{index:06d}.array_record"


def _marker_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".done.json")


def _read_json(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _read_marker(path: pathlib.Path, key: str) -> dict | None:
    """The done-marker of `path` if it exists and was written for `key` (else unfinished)."""
    result = _read_json(_marker_path(path))
    return result if result is not None and result.get("key") == key else None


def _shard_lengths_path(out_dir: pathlib.Path, shard: int) -> pathlib.Path:
    return _work_dir(out_dir) / f"shard-{shard:05d}.lengths.npy"


def assemble_shard(out_dir: str | os.PathLike, shard: int) -> dict:
    """Copy shard `shard`'s slice of the global record order from the parts into its shard file.

    Reads the plan and part markers of the build of `out_dir` (`out_dir.build_dir`); writes the
    shard there atomically, its lengths, then its done marker. Returns the shard entry
    {file, records, tokens, sha256}. Records are copied one at a time: memory holds one.
    """
    from array_record.python.array_record_module import ArrayRecordReader

    out_dir = _out_path(out_dir)
    plan = json.loads((_work_dir(out_dir) / "plan.json").read_text())
    counts = [plan["part_records"][i] for i in range(len(plan["parts"]))]
    starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    total, num_shards = int(starts[-1]), plan["num_shards"]
    lo, hi = shard * total // num_shards, (shard + 1) * total // num_shards
    tokens = plan["format"] == "tokens"
    shard_lengths: list[np.ndarray] = []

    def records() -> Iterator[bytes]:
        for part in range(len(counts)):
            a, b = max(lo, int(starts[part])), min(hi, int(starts[part + 1]))
            if a >= b:
                continue
            part_path = _part_path(out_dir, part)
            if tokens:
                part_lengths = np.load(part_path.with_name(part_path.name + ".lengths.npy"))
                shard_lengths.append(part_lengths[a - starts[part] : b - starts[part]])
            reader = ArrayRecordReader(os.fspath(part_path), sources.READER_OPTIONS)
            try:
                for index in range(int(a - starts[part]), int(b - starts[part])):
                    reader.seek(index)
                    yield reader.read()
            finally:
                reader.close()

    file_name = plan["shards"][shard]
    build = out_dir_lib.build_dir(out_dir)
    _marker_path(_work_dir(out_dir) / file_name).unlink(missing_ok=True)
    written = sources.write_shard(build / file_name, records(), format=plan["format"])
    lengths = np.concatenate(shard_lengths) if shard_lengths else np.zeros(0, np.int64)
    _save_lengths(_shard_lengths_path(out_dir, shard), lengths)
    entry = {
        "file": file_name,
        "records": written["records"],
        "tokens": int(lengths.sum()),
        "sha256": written["sha256"],
    }
    sources.write_json_atomic(
        _marker_path(_work_dir(out_dir) / file_name),
        dict(entry, key=plan["shard_keys"][shard], size=(build / file_name).stat().st_size),
    )
    return entry


def _shard_done(out_dir: pathlib.Path, plan: dict, shard: int) -> dict | None:
    file_name = plan["shards"][shard]
    marker = _read_marker(_work_dir(out_dir) / file_name, plan["shard_keys"][shard])
    path = out_dir_lib.build_dir(out_dir) / file_name
    if marker is None or not path.exists() or path.stat().st_size != marker["size"]:
        return None
    if not _shard_lengths_path(out_dir, shard).exists():
        return None
    return marker


def finalize(out_dir: str | os.PathLike, overwrite: bool = False) -> dict:
    """Write `lengths.npy`, `skipped.jsonl`, then `manifest.json`, and swap the dataset in.

    Needs every shard's done marker in the build of `out_dir`. The finished build replaces
    `out_dir` in one atomic step (`out_dir.swap_in`), unless `out_dir` holds a dataset of
    another plan and not `overwrite` (`OutDirError`). Deletes the temporary part files
    afterwards. Returns the manifest.
    """
    out_dir = _out_path(out_dir)
    build = out_dir_lib.build_dir(out_dir)
    plan = json.loads((_work_dir(out_dir) / "plan.json").read_text())
    entries, missing = [], []
    for shard in range(plan["num_shards"]):
        marker = _shard_done(out_dir, plan, shard)
        if marker is None:
            missing.append(plan["shards"][shard])
        else:
            entries.append({key: marker[key] for key in ("file", "records", "tokens", "sha256")})
    if missing:
        raise ValueError(f"{out_dir}: cannot finalize, unfinished shards: {missing}")
    if plan["format"] == "tokens":
        lengths = [np.load(_shard_lengths_path(out_dir, k)) for k in range(plan["num_shards"])]
        _save_lengths(build / sources.LENGTHS_NAME, np.concatenate(lengths))
    _write_skipped(out_dir, plan)
    manifest = {
        "name": plan["name"],
        "format": plan["format"],
        "token_dtype": plan["token_dtype"],
        "tokenizer": plan["tokenizer"],
        "append_eos": plan["append_eos"],
        "input_fields": plan.get("input_fields"),
        "shards": entries,
        "totals": {
            "records": sum(entry["records"] for entry in entries),
            "tokens": sum(entry["tokens"] for entry in entries),
            "dropped_empty": plan["dropped_empty"],
            "skipped_bad": plan["skipped_bad"],
        },
    }
    manifest = sources.write_manifest(build, manifest)
    # Shards of an earlier build with another shard count, and temp files of killed writers
    # (every shard is done, so no writer of this build is still live).
    current = set(plan["shards"])
    for path in build.glob(f"{glob.escape(plan['name'])}-?????-of-?????.array_record*"):
        if path.name not in current:
            path.unlink(missing_ok=True)
    for path in atomic.temp_files(build):
        path.unlink(missing_ok=True)
    _refuse_replacing(out_dir, plan, overwrite)
    out_dir_lib.swap_in(build, out_dir)
    work = out_dir / WORK_DIR_NAME
    for path in [*work.glob("part-*"), *atomic.temp_files(work)]:
        if not path.name.endswith(".done.json"):  # markers stay: they record the parts' results
            path.unlink(missing_ok=True)
    return manifest


def _write_skipped(out_dir: pathlib.Path, plan: dict) -> None:
    """Concatenate the parts' skipped-record lists, in input order, into `skipped.jsonl`."""
    path = out_dir_lib.build_dir(out_dir) / SKIPPED_NAME
    if not plan["skipped_bad"]:
        path.unlink(missing_ok=True)
        return
    with atomic.AtomicWriter(path) as out:
        for part in range(len(plan["parts"])):
            part_log = _skipped_path(_part_path(out_dir, part))
            if part_log.exists():
                with open(part_log, "rb") as f:
                    shutil.copyfileobj(f, out)


_PLAN_SETTINGS = (
    "format",
    "tokenizer",
    "input_fields",
    "append_eos",
    "skip_bad",
    "max_doc_bytes",
    "num_shards",
    "name",
    "piece_bytes",
)


def _plan_differences(old: dict | None, new: dict) -> str:
    """What differs between the plan of the dataset in `--out` and the new one, in words."""
    if old is None or "inputs" not in old or "inputs" not in new:
        return "the inputs and settings of one of them are not recorded (.wf-prepare/plan.json)"
    differences = [
        f"{key} {old.get(key)!r} -> {new.get(key)!r}"
        for key in _PLAN_SETTINGS
        if old.get(key) != new.get(key)
    ]
    old_inputs = {item["path"]: item for item in old["inputs"]}
    new_inputs = {item["path"]: item for item in new["inputs"]}
    differences += [f"input added: {path}" for path in new_inputs if path not in old_inputs]
    differences += [f"input removed: {path}" for path in old_inputs if path not in new_inputs]
    differences += [
        f"input changed (size or modification time): {path}"
        for path, item in new_inputs.items()
        if path in old_inputs and old_inputs[path] != item
    ]
    if not differences and list(old_inputs) != list(new_inputs):
        differences.append("inputs in another order")
    shown = "; ".join(differences[:5])
    return shown + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")


def _refuse_replacing(out_dir: pathlib.Path, plan: dict, overwrite: bool) -> None:
    """OutDirError unless `out_dir` is free, holds no finished dataset, or the same plan's.

    A file prepare never writes is refused even with `overwrite` (the swap would delete it).
    """
    if not out_dir_lib.dataset_files_only(out_dir) or overwrite:
        return
    if not (out_dir / sources.MANIFEST_NAME).exists():
        return  # an unfinished build of an older wf-data: nothing readable to lose
    old = _read_json(out_dir / WORK_DIR_NAME / "plan.json")
    if old is not None and plan.get("key") is not None and old.get("key") == plan["key"]:
        return  # the same dataset, rebuilt (it was damaged)
    raise OutDirError(
        f"--out {out_dir}: holds a dataset prepared from other inputs or settings "
        f"({_plan_differences(old, plan)}); pass --overwrite to replace it once the new one "
        "is complete, or choose another --out"
    )


def _up_to_date(out_dir: pathlib.Path, plan: dict) -> dict | None:
    """The manifest of `out_dir` if it holds this plan's dataset with its files intact."""
    old = _read_json(out_dir / WORK_DIR_NAME / "plan.json")
    if old is None or old.get("key") != plan["key"]:
        return None
    try:
        sources.DocumentSource(out_dir)  # checks manifest, file sizes and lengths
    except (OSError, ValueError):
        return None  # damaged: build it again beside, then swap
    return sources.read_manifest(out_dir)


# --------------------------------------------------------------------------- orchestration

_WORKER: dict[str, Any] = {}


class _BackendEncoder:
    """`TokenizerWrapper.encode_batch` for worker processes, over the bare `tokenizers` backend.

    It pickles as the backend's JSON, so a spawned worker starts in a fraction of a second
    instead of importing transformers (and torch) to reload a `TokenizerWrapper`. It applies
    the wrapper's bos/eos flags the same way; the tests check it equals `encode_batch`.
    """

    def __init__(self, tokenizer: Any):
        self.backend = tokenizer.hf_tokenizer.backend_tokenizer
        self.name, self.vocab_size = tokenizer.name, tokenizer.vocab_size
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        self.add_bos = bool(getattr(tokenizer, "add_bos", False))
        self.add_eos = bool(getattr(tokenizer, "add_eos", False))
        self._fingerprint = tokenizer.fingerprint()
        self._vocab_fingerprint = tokenizer.vocab_fingerprint()

    @classmethod
    def of(cls, tokenizer: Any) -> _BackendEncoder:
        """`tokenizer` itself if it is one, else one built from the `TokenizerWrapper`."""
        return tokenizer if isinstance(tokenizer, cls) else cls(tokenizer)

    _FIELDS = ("name", "vocab_size", "bos_id", "eos_id", "pad_id", "add_bos", "add_eos")

    def describe(self) -> dict:
        """A JSON-safe description: the backend's JSON, the ids and flags, the fingerprint."""
        fields = {field: getattr(self, field) for field in self._FIELDS}
        return dict(
            fields,
            backend=self.backend.to_str(),
            fingerprint=self._fingerprint,
            vocab_fingerprint=self._vocab_fingerprint,
        )

    @classmethod
    def from_description(cls, description: dict) -> _BackendEncoder:
        """Inverse of `describe`."""
        from tokenizers import Tokenizer

        encoder = cls.__new__(cls)
        for field in cls._FIELDS:
            setattr(encoder, field, description[field])
        encoder.backend = Tokenizer.from_str(description["backend"])
        encoder._fingerprint = description["fingerprint"]
        encoder._vocab_fingerprint = description["vocab_fingerprint"]
        return encoder

    def fingerprint(self) -> str:
        """The wrapped tokenizer's `fingerprint()`, taken at construction."""
        return self._fingerprint

    def vocab_fingerprint(self) -> str:
        """The wrapped tokenizer's `vocab_fingerprint()`, taken at construction."""
        return self._vocab_fingerprint

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """One `(n_i,) int32` array per text, bos/eos added per the flags."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        head = [self.bos_id] if self.add_bos else []
        tail = [self.eos_id] if self.add_eos else []
        return [
            np.array(head + encoding.ids + tail, dtype=np.int32)
            for encoding in encode(texts, add_special_tokens=False)
        ]


def _init_worker(tokenizer: Any, progress_queue: Any, parent_pid: int) -> None:
    # A worker of a killed prepare must not live on, writing into the build directory.
    worker_lifetime.die_with_parent(parent_pid)
    # One tokenizer thread per worker process: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tokenizer"] = tokenizer
    _WORKER["queue"] = progress_queue


def _run_part(part_path: str, task: PrepareTask, key: str, options: dict) -> dict:
    """Worker entry: prepare one part, then write its done marker."""
    # A stale marker must not vouch for the file about to be rewritten.
    _marker_path(pathlib.Path(part_path)).unlink(missing_ok=True)
    tokenizer = _WORKER.get("tokenizer", options.pop("tokenizer", None))
    progress_queue = _WORKER.get("queue")
    progress = options.pop("progress", None)
    if progress is None and progress_queue is not None:
        progress = lambda docs, tokens: progress_queue.put((docs, tokens))  # noqa: E731
    result = prepare_file(task, part_path, tokenizer=tokenizer, progress=progress, **options)
    sources.write_json_atomic(_marker_path(pathlib.Path(part_path)), dict(result, key=key))
    return result


def _load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer name or path loaded as a `_BackendEncoder`; anything else unchanged.

    Loading goes through transformers, which imports torch (about 600 MB resident). Unless
    this process has imported it already, the loading runs in a short-lived process, so that
    prepare itself stays small and its memory is the documents'.
    """
    if tokenizer is None or not isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    if "transformers" in sys.modules:
        return _load_encoder(os.fspath(tokenizer))
    name = os.fspath(tokenizer)
    # Loading costs seconds: keep one description per name and state of its files.
    key = (name, _files_state(name))
    if key not in _LOADED_TOKENIZERS:
        # A plain subprocess, not multiprocessing: it must not re-import the caller's main.
        process = subprocess.run(
            [sys.executable, "-c", _LOAD_TOKENIZER, name, str(os.getpid())],
            capture_output=True,
            text=True,
        )
        if process.returncode != 0:
            lines = process.stderr.strip().splitlines() or [f"exit status {process.returncode}"]
            raise ValueError(f"cannot load tokenizer {name!r}: {lines[-1]}")
        _LOADED_TOKENIZERS[key] = json.loads(process.stdout)
    return _BackendEncoder.from_description(_LOADED_TOKENIZERS[key])


_LOADED_TOKENIZERS: dict[tuple, dict] = {}


def _files_state(name: str) -> tuple:
    """(name, size, mtime) of each file of a tokenizer directory: a changed file reloads."""
    if not os.path.isdir(name):
        return ()
    entries = [entry for entry in os.scandir(name) if entry.is_file()]
    return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries))


_LOAD_TOKENIZER = """
import json, os, sys
from wf_data.data import worker_lifetime
worker_lifetime.die_with_parent(int(sys.argv[2]))
from wf_data.data.prepare import _load_encoder
sys.stdout.write(json.dumps(_load_encoder(sys.argv[1]).describe()))
sys.stdout.flush()
os._exit(0)  # skip the slow teardown of torch and jax
"""


def _load_encoder(name_or_path: str) -> _BackendEncoder:
    from wf_data.data.tokenization import TokenizerWrapper

    return _BackendEncoder(
        TokenizerWrapper.from_pretrained(name_or_path, add_bos=False, add_eos=False)
    )


def _tokenizer_identity(tokenizer: Any) -> dict | None:
    if tokenizer is None:
        return None
    return {
        "name": str(tokenizer.name),
        "vocab_size": int(tokenizer.vocab_size),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "sha256": tokenizer.fingerprint(),
        "vocab_fingerprint": tokenizer.vocab_fingerprint(),
    }


class _Progress:
    """tqdm bar over documents with documents/s and tokens/s."""

    def __init__(self, enabled: bool):
        self.documents = self.tokens = self.parts_run = 0
        self.queue = None  # worker processes report (documents, tokens) here
        self.start = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc="prepare", unit="doc", unit_scale=True, file=sys.stderr)

    def update(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(documents)
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclasses.dataclass(frozen=True)
class PreparePlan:
    """What `prepare` decided before running anything; shared by the local and Beam runners.

    Part `i` is `prepare_file(tasks[i], part_paths[i], tokenizer=tokenizer, **options)`;
    `write(part_results)` then records the parts' results in `plan.json` of the build's
    `.wf-prepare/` (beside `out_dir`, `out_dir.build_dir`), which `assemble_shard` and
    `finalize` read. `plan` is that file's content; `part_keys[i]` is the
    identity of part `i` (inputs and options) for resume checks.
    """

    out_dir: pathlib.Path
    tasks: list[PrepareTask]
    part_keys: list[str]
    options: dict
    tokenizer: Any
    plan: dict

    @property
    def part_paths(self) -> list[pathlib.Path]:
        """Each task's part file in the build's `.wf-prepare/`: named by the task's index."""
        return [_part_path(self.out_dir, index) for index in range(len(self.tasks))]

    def part_marker_path(self, index: int) -> pathlib.Path:
        """Part `index`'s done marker: {result, key}, written once the part is complete."""
        return _marker_path(_part_path(self.out_dir, index))

    def check_out_dir(self, overwrite: bool = False) -> None:
        """Refuse, before any work, an `out_dir` that this plan may not replace (`OutDirError`:
        not writable, foreign files, or another plan's dataset without `overwrite`)."""
        out_dir_lib.prepare_out_dir(self.out_dir)
        _refuse_replacing(self.out_dir, self.plan, overwrite)

    def write(self, part_results: Sequence[dict]) -> None:
        """Write plan.json with the parts' record counts and dropped/skipped totals, in order."""
        plan = dict(
            self.plan,
            part_records=[result["records"] for result in part_results],
            dropped_empty=sum(result["dropped_empty"] for result in part_results),
            skipped_bad=sum(result["skipped_bad"] for result in part_results),
        )
        _work_dir(self.out_dir).mkdir(parents=True, exist_ok=True)
        sources.write_json_atomic(_work_dir(self.out_dir) / "plan.json", plan)


def plan_prepare(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    text_key: str | Sequence[str] = "text",
    text_separator: str = "\n\n",
    chat_key: str | None = None,
    input_key: str | None = None,
    output_key: str | None = None,
    system_prompt_key: str | None = None,
    num_shards: int | None = None,
    append_eos: bool = False,
    skip_bad: bool = False,
    name: str = "data",
    piece_bytes: int = PIECE_BYTES,
    max_doc_bytes: int = MAX_DOC_BYTES,
) -> PreparePlan:
    """Validate `prepare`'s options and plan its tasks, parts and shards; writes nothing."""
    fields = RecordFields.from_options(
        text_key, text_separator, chat_key, input_key, output_key, system_prompt_key
    )
    if tokenizer is not None and fields.chat:
        raise ValueError(
            "chat records are stored untokenized (tokenized by SFTDataset): give chat_key "
            "(--chat-key) or input_key/output_key (--input-key/--output-key), or tokenizer "
            "(--tokenizer), not both"
        )
    if max_doc_bytes < 1:
        raise ValueError(f"max_doc_bytes must be >= 1, got {max_doc_bytes}")
    out_dir = _out_path(out_dir)
    files = expand_inputs(inputs)
    tasks = plan_tasks(files, piece_bytes)
    if num_shards is None:
        total_bytes = sum(path.stat().st_size for path in files)
        num_shards = min(MAX_AUTO_SHARDS, max(1, -(-total_bytes // AUTO_SHARD_BYTES)))
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    shard_files = [sources.shard_name(name, k, num_shards) for k in range(num_shards)]
    tokenizer = _load_tokenizer(tokenizer)
    identity = _tokenizer_identity(tokenizer)
    format = "tokens" if tokenizer is not None else ("chat" if fields.chat else "text")
    token_dtype = sources.token_dtype_for_vocab(identity["vocab_size"]).name if identity else None
    options = {
        "fields": fields,
        "append_eos": append_eos,
        "skip_bad": skip_bad,
        "token_dtype": token_dtype,
        "max_doc_bytes": max_doc_bytes,
    }
    options_key = json.dumps(
        [format, identity, dict(options, fields=fields.describe())], sort_keys=True
    )
    part_keys = [
        hashlib.sha256(f"{options_key}|{task.key()}".encode()).hexdigest() for task in tasks
    ]
    plan_key = hashlib.sha256(f"{options_key}|{part_keys}|{shard_files}".encode()).hexdigest()
    plan_append_eos = bool(append_eos or getattr(tokenizer, "add_eos", False))
    plan = {
        "name": name,
        "format": format,
        "token_dtype": token_dtype,
        "tokenizer": identity,
        "append_eos": plan_append_eos,
        "input_fields": fields.describe(),
        "num_shards": num_shards,
        "shards": shard_files,
        "shard_keys": [
            hashlib.sha256(f"{plan_key}|{k}".encode()).hexdigest() for k in range(num_shards)
        ],
        "parts": part_keys,
        "key": plan_key,
        # With the fields above, what `_plan_differences` names when refusing to replace.
        "skip_bad": skip_bad,
        "max_doc_bytes": max_doc_bytes,
        "piece_bytes": piece_bytes,
        "inputs": [
            {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            for path, stat in ((path, path.stat()) for path in files)
        ],
    }
    return PreparePlan(out_dir, tasks, part_keys, options, tokenizer, plan)


def prepare(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    text_key: str | Sequence[str] = "text",
    text_separator: str = "\n\n",
    chat_key: str | None = None,
    input_key: str | None = None,
    output_key: str | None = None,
    system_prompt_key: str | None = None,
    num_shards: int | None = None,
    workers: int = 1,
    append_eos: bool = False,
    skip_bad: bool = False,
    name: str = "data",
    progress: bool = True,
    piece_bytes: int = PIECE_BYTES,
    overwrite: bool = False,
    max_doc_bytes: int = MAX_DOC_BYTES,
) -> dict:
    """Prepare `inputs` into the dataset directory `out_dir`; returns the manifest.

    `tokenizer` (name, path or `TokenizerWrapper`) gives format `tokens`; `chat_key`, or the
    Nemotron-style columns `input_key`/`output_key`/`system_prompt_key`, give `chat`
    (records `{"messages": [...]}`); else `text`. A text document is the fields `text_key`
    (one name or several) joined by `text_separator`, empty values left out (`RecordFields`).
    The manifest's `input_fields` records these options; changing them redoes the work.
    `num_shards=None` picks one shard per 256 MiB of input.
    `workers` processes share the tasks; the output does not depend on it.

    The dataset is built beside `out_dir` and replaces it atomically once complete
    (`wf_data.data.out_dir`): a failed or killed run leaves `out_dir` as it was, and a re-run
    with the same inputs and options redoes only unfinished parts and shards (or nothing,
    when `out_dir` already holds that dataset intact). A dataset of other inputs or options
    in `out_dir` is replaced only with `overwrite` (`OutDirError` names the differences).
    Records over `max_doc_bytes` are bad records; long documents are tokenized in pieces, so
    memory stays bounded. With `skip_bad`, every skipped record is listed in
    `out_dir/skipped.jsonl`.
    The returned manifest carries `summary` (elapsed seconds in all, documents/s and
    tokens/s from the first document on, tokenizer loading excluded, and the first 20
    skipped records), which is not on disk.
    """
    started = time.perf_counter()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_dir_lib.prepare_out_dir(_out_path(out_dir))
    prepared = plan_prepare(
        inputs,
        out_dir,
        tokenizer=tokenizer,
        text_key=text_key,
        text_separator=text_separator,
        chat_key=chat_key,
        input_key=input_key,
        output_key=output_key,
        system_prompt_key=system_prompt_key,
        num_shards=num_shards,
        append_eos=append_eos,
        skip_bad=skip_bad,
        name=name,
        piece_bytes=piece_bytes,
        max_doc_bytes=max_doc_bytes,
    )
    out_dir, tasks, part_keys = prepared.out_dir, prepared.tasks, prepared.part_keys
    tokenizer, options, plan = prepared.tokenizer, prepared.options, prepared.plan
    num_shards = plan["num_shards"]
    existing = _up_to_date(out_dir, plan)
    if existing is not None:
        return dict(existing, summary=_summary(started, _Progress(False), out_dir, 0))
    _refuse_replacing(out_dir, plan, overwrite)  # before any work, not only at the swap
    work_dir = _work_dir(out_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # In the build, a manifest means "finished" (`out_dir.recover`): it comes last.
    (out_dir_lib.build_dir(out_dir) / sources.MANIFEST_NAME).unlink(missing_ok=True)
    todo_shards = [k for k in range(num_shards) if _shard_done(out_dir, plan, k) is None]

    bar = _Progress(progress)
    pool = None
    try:
        pool = _make_pool(workers, tokenizer, bar)
        part_results = _run_parts(
            out_dir, tasks, part_keys, tokenizer, options, pool, bar, bool(todo_shards)
        )
        prepared.write(part_results)
        if pool is None or len(todo_shards) <= 1:
            for shard in todo_shards:
                assemble_shard(out_dir, shard)
        else:
            list(pool.map(assemble_shard, [out_dir] * len(todo_shards), todo_shards))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    manifest = finalize(out_dir, overwrite)
    manifest["summary"] = _summary(started, bar, out_dir, len(todo_shards))
    return manifest


def _summary(started: float, bar: _Progress, out_dir: pathlib.Path, shards_written: int) -> dict:
    now = time.perf_counter()
    processing = max(now - bar.start, 1e-9)  # rates exclude loading the tokenizer
    skipped = []
    if (out_dir / SKIPPED_NAME).exists():
        with open(out_dir / SKIPPED_NAME, encoding="utf-8") as f:
            skipped = [json.loads(line) for line, _ in zip(f, range(SKIPPED_SHOWN), strict=False)]
    return {
        "elapsed_s": now - started,
        "documents_per_s": bar.documents / processing,
        "tokens_per_s": bar.tokens / processing,
        "parts_run": bar.parts_run,
        "shards_written": shards_written,
        "skipped": skipped,
    }


def _run_parts(out_dir, tasks, part_keys, tokenizer, options, pool, bar, need_files):
    """Run the unfinished part tasks; returns every part's result, in task order.

    A part is finished when its marker carries the current key and, if a shard still has to be
    assembled from it (`need_files`), its files are still there (finalize deletes them).
    """
    results: list[dict | None] = [None] * len(tasks)
    todo = []
    for index, key in enumerate(part_keys):
        part_path = _part_path(out_dir, index)
        marker = _read_marker(part_path, key)
        has_files = part_path.exists() and (
            options["token_dtype"] is None
            or part_path.with_name(part_path.name + ".lengths.npy").exists()
        )
        if marker is not None and (has_files or not need_files):
            results[index] = marker
        else:
            todo.append(index)
    bar.parts_run = len(todo)
    if todo:
        jobs = [(os.fspath(_part_path(out_dir, i)), tasks[i], part_keys[i]) for i in todo]
        _execute(jobs, tokenizer, options, pool, bar, results, todo)
    return results


def _make_pool(workers: int, tokenizer: Any, bar: _Progress):
    """A spawn-context process pool of `workers` (None for 1: everything runs in-process).

    Workers die with this process (`worker_lifetime`), so a kill -9 leaves none behind.
    """
    if workers <= 1:
        return None
    context = multiprocessing.get_context("spawn")
    bar.queue = context.Queue()
    return futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(_BackendEncoder.of(tokenizer) if tokenizer else None, bar.queue, os.getpid()),
    )


def _execute(jobs, tokenizer, options, pool, bar, results, todo) -> None:
    if pool is None or len(jobs) == 1:
        for index, job in zip(todo, jobs, strict=True):
            results[index] = _run_part(
                *job, dict(options, tokenizer=tokenizer, progress=bar.update)
            )
        return
    pending = {
        pool.submit(_run_part, *job, dict(options)): index
        for index, job in zip(todo, jobs, strict=True)
    }
    waiting = set(pending)
    while waiting:
        done, waiting = futures.wait(waiting, timeout=0.2)
        _drain(bar)
        for future in done:
            results[pending[future]] = future.result()
    _drain(bar)


def _drain(bar: _Progress) -> None:
    while True:
        try:
            documents, tokens = bar.queue.get_nowait()
        except queue_lib.Empty:
            return
        bar.update(documents, tokens)
