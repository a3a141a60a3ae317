"""One task to one *part*: an ArrayRecord file of encoded records (plus its lengths) under
the build's `.wf-prepare/`, with a done marker that makes a re-run skip it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from wf_data import atomic
from wf_data.data.prepare import out_dir as out_dir_lib
from wf_data.data.prepare.encoding import (
    BATCH_CHARS,
    BATCH_DOCS,
    _batches,
    _load_tokenizer,
    one_tokenizer_thread,
    token_records,
)
from wf_data.data.prepare.inputs import SUFFIXES, PrepareTask, _suffix, plan_chunks
from wf_data.data.prepare.out_dir import WORK_DIR_NAME
from wf_data.data.prepare.records import MAX_DOC_BYTES, RecordFields, iter_documents
from wf_data.data.shards import sources

PART_WRITER_OPTIONS = "group_size:1,uncompressed"  # parts are temporary: favour speed


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
    encoded: Iterable[EncodedChunk] | None = None,
) -> dict:
    """Encode one input file (or task piece) into the ArrayRecord file `part_path`, atomically.

    With a `tokenizer` (a `TokenizerWrapper`) records are token arrays of `token_dtype` and
    their `(n,) int64` lengths go to `PART_PATH.lengths.npy`; else text or chat JSON records.
    `fields` (default: the string field `text`) says which record fields make a document.
    Skipped bad records (`skip_bad`) are listed in `PART_PATH.skipped.jsonl`, one
    {"record": "file:line", "error": message} a line. `progress(documents, tokens)` is called
    after each chunk. `encoded`: the task's chunks (`plan_chunks`) already encoded with these
    options, in order, e.g. by worker processes; by default they are encoded here, one after
    the other. Returns {"records", "tokens", "dropped_empty", "skipped_bad", "sha256"}.
    """
    task = _as_task(task)
    options = dict(
        tokenizer=_load_tokenizer(tokenizer),
        fields=fields,
        append_eos=append_eos,
        skip_bad=skip_bad,
        token_dtype=token_dtype,
        max_doc_bytes=max_doc_bytes,
    )
    if encoded is None:
        encoded = (encode_chunk(chunk, **options) for chunk in plan_chunks(task))
    part_path = pathlib.Path(part_path)
    stats = {"skipped_bad": 0, "dropped_empty": 0}
    skip_log = _SkipLog(_skipped_path(part_path))
    lengths: list[np.ndarray] = []  # of token records; stays empty for text and chat

    def records() -> Iterator[bytes]:
        for chunk in encoded:
            for where, message in chunk.skipped:
                skip_log.add(where, message)
            stats["skipped_bad"] += len(chunk.skipped)
            stats["dropped_empty"] += chunk.dropped_empty
            if chunk.lengths is not None:
                lengths.append(chunk.lengths)
            ends = np.cumsum(chunk.sizes).tolist()
            for start, end in zip([0, *ends], ends, strict=False):
                yield chunk.records[start:end]
            if progress:
                tokens = 0 if chunk.lengths is None else int(chunk.lengths.sum())
                progress(chunk.documents, tokens)

    try:
        written = sources.write_shard(part_path, records(), options=PART_WRITER_OPTIONS)
    except BaseException:
        skip_log.discard()
        raise
    skip_log.close()
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if lengths or options["tokenizer"] is not None:
        _save_lengths(part_path.with_name(part_path.name + ".lengths.npy"), all_lengths)
    return {
        "records": written["records"],
        "tokens": int(all_lengths.sum()),
        "dropped_empty": stats["dropped_empty"],
        "skipped_bad": stats["skipped_bad"],
        "sha256": written["sha256"],
    }


@dataclasses.dataclass(frozen=True)
class EncodedChunk:
    """One chunk's records, ready to append to its part (what a worker hands back).

    `records` holds them back to back, `sizes` their byte sizes `(n,) int64`, `lengths`
    their token counts `(n,) int64` (None for text and chat records). Of the `documents` read,
    `dropped_empty` were empty; `skipped` lists the bad records skipped, (where, error).
    """

    records: bytes
    sizes: np.ndarray
    lengths: np.ndarray | None
    documents: int
    dropped_empty: int
    skipped: list[tuple[str, str]]


def encode_chunk(
    chunk: PrepareTask,
    *,
    tokenizer: Any = None,
    fields: RecordFields | None = None,
    append_eos: bool = False,
    skip_bad: bool = False,
    token_dtype: Any = None,
    max_doc_bytes: int = MAX_DOC_BYTES,
) -> EncodedChunk:
    """Read and encode one chunk of a task (`plan_chunks`), `prepare_file`'s options; a pure
    function of the chunk and the options, so any process may run it."""
    fields = fields or RecordFields()
    if tokenizer is not None and fields.chat:
        raise ValueError(
            "chat records are stored untokenized: give chat_key or tokenizer, not both"
        )
    stats = {"skipped_bad": 0, "dropped_empty": 0}
    skipped: list[tuple[str, str]] = []
    documents = iter_documents(
        chunk,
        fields=fields,
        skip_bad=skip_bad,
        stats=stats,
        max_doc_bytes=max_doc_bytes,
        on_skip=lambda where, message: skipped.append((where, message)),
    )
    pieces: list[bytes] = []
    sizes: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    count = 0
    if tokenizer is None:
        format = "chat" if fields.chat else "text"
        for document in documents:
            pieces.append(sources.encode_record(document, format))
        count = len(pieces)
        sizes.append(np.fromiter(map(len, pieces), np.int64, count))
    else:
        dtype = np.dtype(token_dtype or sources.token_dtype_for_vocab(tokenizer.vocab_size))
        with one_tokenizer_thread():
            for batch in _batches(documents, BATCH_DOCS, BATCH_CHARS):
                data, batch_lengths = token_records(tokenizer, batch, dtype, append_eos, chunk.path)
                pieces.append(data)
                lengths.append(batch_lengths)
                count += len(batch)
                stats["dropped_empty"] += len(batch) - len(batch_lengths)
        sizes = [batch_lengths * dtype.itemsize for batch_lengths in lengths]
    return EncodedChunk(
        records=b"".join(pieces),
        sizes=_concatenate(sizes),
        lengths=None if tokenizer is None else _concatenate(lengths),
        documents=count,
        dropped_empty=stats["dropped_empty"],
        skipped=skipped,
    )


def _concatenate(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)


def _as_task(task: PrepareTask | str | os.PathLike) -> PrepareTask:
    """A whole input file as a task (a task unchanged)."""
    if isinstance(task, PrepareTask):
        return task
    path = pathlib.Path(task)
    if not _suffix(path):
        raise ValueError(f"{path}: unsupported input type; valid suffixes: {SUFFIXES}")
    task = PrepareTask(str(path), _suffix(path), 0, None)
    if task.kind == ".parquet":
        import pyarrow.parquet as pq

        task = dataclasses.replace(task, stop=pq.ParquetFile(path).metadata.num_row_groups)
    return task


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


def _save_lengths(path: pathlib.Path, lengths: Any) -> None:
    """Document lengths as an int64 ``.npy``, written atomically."""
    atomic.write_npy(path, np.asarray(lengths, dtype=np.int64))


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
