"""Input files of `prepare`: which files, in what order, cut into tasks; their raw lines.

The split into tasks depends only on the input files, never on the number of workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import warnings
from collections.abc import Sequence

from wf_data.data.prepare import input_streams
from wf_data.data.prepare.input_streams import InputFileError

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".txt")


PIECE_BYTES = 64 << 20  # large plain jsonl / parquet inputs split into tasks of about this size


# Workers encode a task in chunks of about this size (`plan_chunks`): small enough that the
# last ones leave little idle time, large enough that handing one over costs ~0.1% of it.
CHUNK_BYTES = 1 << 20


_COMPRESSION = {".jsonl.gz": "gzip", ".jsonl.zst": "zstd"}


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
        """Identity of the task's input: the file (its real path, however spelled: relative,
        through a link), size, mtime and range (for resume checks)."""
        stat = os.stat(self.path)
        where = (self.kind, self.start, self.stop, self.first_row)
        text = f"{os.path.realpath(self.path)}|{stat.st_size}|{stat.st_mtime_ns}|{where}"
        return hashlib.sha256(text.encode()).hexdigest()


def _line_starts(path: str | os.PathLike, start: int, stop: int, step: int) -> list[int]:
    """Offsets of line starts in `[start, stop)` about every `step` bytes: `start`, the first
    line start at or after each previous one plus `step`, ..., `stop`. Reads in blocks, so a
    long line never has to fit in memory (`_next_line_start`)."""
    bounds = [start]
    with open(path, "rb") as f:
        while bounds[-1] + step < stop:
            position = _next_line_start(f, bounds[-1] + step - 1)
            if position >= stop:
                break
            bounds.append(position)
    bounds.append(stop)
    return bounds


def _next_line_start(f, offset: int) -> int:
    """The offset after the first newline at or after `offset` (the end of the file if none).

    The newline is searched in 1 MiB reads: a line of any length (a 1 GB record) costs no
    more memory than that.
    """
    f.seek(offset)
    while chunk := f.read(input_streams.READ_BYTES):
        newline = chunk.find(b"\n")
        if newline >= 0:
            return offset + newline + 1
        offset += len(chunk)
    return offset


def plan_tasks(files: Sequence[pathlib.Path], piece_bytes: int = PIECE_BYTES) -> list[PrepareTask]:
    """Split input files into tasks; depends only on the files and `piece_bytes`."""
    tasks: list[PrepareTask] = []
    for path in files:
        kind = _suffix(path)
        if kind == ".jsonl" and path.stat().st_size > piece_bytes:
            bounds = _line_starts(path, 0, path.stat().st_size, piece_bytes)
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


def plan_chunks(task: PrepareTask, chunk_bytes: int | None = None) -> list[PrepareTask]:
    """`task` cut into the chunks that worker processes encode in parallel, in input order.

    Plain jsonl is cut at line starts about every `chunk_bytes` (default `CHUNK_BYTES`),
    parquet at row groups; other inputs (compressed, txt) stay whole. The chunks' records,
    concatenated, are the task's, so the cut shows neither in the output nor in the resume
    keys (which are the tasks').
    """
    if task.kind == ".jsonl":
        stop = os.stat(task.path).st_size if task.stop is None else task.stop
        bounds = _line_starts(task.path, task.start, stop, chunk_bytes or CHUNK_BYTES)
        if len(bounds) > 2:
            return [
                PrepareTask(task.path, task.kind, a, b)
                for a, b in zip(bounds, bounds[1:], strict=False)
            ]
    elif task.kind == ".parquet" and (task.stop or 0) - task.start > 1:
        metadata = _open_parquet(task.path).metadata
        chunks, first_row = [], task.first_row
        for group in range(task.start, task.stop):
            chunks.append(PrepareTask(task.path, task.kind, group, group + 1, first_row))
            first_row += metadata.row_group(group).num_rows
        return chunks
    return [task]


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
    """Lines before byte `stop` of `path`, counted on from the nearest earlier offset already
    counted in this process: chunks of a file that each name a bad record read it about once."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    anchors = _LINE_ANCHORS.pop(key, None) or {0: 0}
    _LINE_ANCHORS[key] = anchors  # most recently used last
    while len(_LINE_ANCHORS) > _ANCHOR_FILES:
        del _LINE_ANCHORS[next(iter(_LINE_ANCHORS))]
    position = max(offset for offset in anchors if offset <= stop)
    count = anchors[position]
    with open(path, "rb") as f:
        f.seek(position)
        while position < stop and (chunk := f.read(min(stop - position, 1 << 20))):
            count += chunk.count(b"\n")
            position += len(chunk)
    if len(anchors) < _ANCHORS_PER_FILE:
        anchors[stop] = count
    return count


# (path, size, mtime) -> {byte offset: lines before it}, for `_count_lines`.
_LINE_ANCHORS: dict[tuple[str, int, int], dict[int, int]] = {}
_ANCHOR_FILES = 8
_ANCHORS_PER_FILE = 1 << 16
