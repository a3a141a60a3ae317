"""Prepared dataset directories: manifest, ArrayRecord shards and random access over them.

A dataset directory holds `manifest.json`, shards `NAME-00000-of-00008.array_record` and, for the
`tokens` format, `lengths.npy` ((N,) int64 token count per record, in global record order) and the
index of memory-mapped reads (`wf_data.data.shards.mapped`): `record_offsets.npy` ((N,) int64
file offset of each record's tokens in its shard) and `block_crc32.npy` ((B,) uint32, a CRC-32
of every 64 KiB block of every shard). Records:

- tokens: raw little-endian bytes of a uint16 or uint32 array (manifest `token_dtype`);
- text:   UTF-8 bytes of the document text;
- chat:   UTF-8 JSON object with at least `"messages": [{"role": str, "content": str}, ...]`.

`open_dataset(path)` returns a `DocumentSource`, a Grain `RandomAccessDataSource` (by protocol)
over all shards. Token records are read from memory maps of the shards when the dataset has the
index (version 3), else (version 2, or `memory_map=False`) with ArrayRecord's record reader.

Integrity: the manifest lists every other file of the dataset with its size and sha256 (shards,
`lengths.npy`), and its `fingerprint` is the sha256 of the rest of the manifest, so an edit of
any field or file is detected. Opening checks what needs no scan (fingerprint, file sizes,
lengths count; `lengths.npy` is memory-mapped); the first read of a shard checks its lengths'
sum, and every read checks each token record's length against `lengths.npy` (memory-mapped
reads: its chunk's framing on its first read, and each 64 KiB block's CRC-32 on its first use);
`verify_dataset` (`wf-data inspect --verify`) hashes every file and recomputes the lengths.
The small writer helpers here (`write_shard`, `file_sha256`) are what
`wf_data.data.prepare.run` uses, so that reading and writing agree on one encoding.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import os
import pathlib
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from wf_data import atomic
from wf_data.data.shards.mapped import ShardReadError

MANIFEST_NAME = "manifest.json"
LENGTHS_NAME = "lengths.npy"
# 2: fingerprint over the whole manifest, lengths.npy and sizes listed; 3: token datasets may
# list the index of memory-mapped reads ("mapped"). Both are read.
MANIFEST_VERSION = 3
READ_VERSIONS = (2, 3)
OFFSETS_NAME = "record_offsets.npy"
CRC_NAME = "block_crc32.npy"
FORMATS = ("tokens", "text", "chat")
TOKEN_DTYPES = ("uint16", "uint32")
# group_size:1 makes every record its own chunk: fast random access (what Grain recommends).
# Token records are stored uncompressed: zstd saves about a third of the disk on real token
# ids but doubles the cost of a random read (~4.7 against ~2.5 us a record), which is what
# bounds packing speed on short documents. Text and chat records compress well and are
# tokenized after reading anyway: they keep zstd (ArrayRecord's default).
WRITER_OPTIONS = {
    "tokens": "group_size:1,uncompressed",
    "text": "group_size:1",
    "chat": "group_size:1",
}
# Random access: no readahead (the Grain ArrayRecordDataSource choice) and no reader thread
# pool (its dispatch alone is ~100-150 us per call and shard).
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
# Pid of the last process that opened a shard reader. riegeli (under array_record) keeps
# process-wide pools (zstd contexts, a background cleaner thread) that a forked child inherits
# half-alive: reading shards in a child forked after its parent read them can crash.
_READ_IN_PID: int | None = None


def read_before_fork() -> bool:
    """True in a forked process whose parent read shards first (reading here is unsafe)."""
    return _READ_IN_PID is not None and _READ_IN_PID != os.getpid()


__all__ = [
    "DocumentSource",
    "CRC_NAME",
    "InMemorySource",
    "LENGTHS_NAME",
    "MANIFEST_NAME",
    "OFFSETS_NAME",
    "ShardReadError",
    "compute_fingerprint",
    "decode_record",
    "encode_record",
    "file_sha256",
    "open_dataset",
    "read_manifest",
    "shard_name",
    "take_pieces",
    "token_dtype_for_vocab",
    "validate_chat_messages",
    "validate_manifest",
    "verify_dataset",
    "write_manifest",
    "write_mapped_index",
    "write_shard",
]


# --------------------------------------------------------------------------- naming and hashing


def shard_name(name: str, index: int, num_shards: int) -> str:
    """File name of shard `index` of `num_shards`: `NAME-00003-of-00008.array_record`."""
    if not name or "/" in name or os.sep in name:
        raise ValueError(f"dataset name must be a non-empty file-name part, got {name!r}")
    if num_shards < 1 or not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} out of range for {num_shards} shards")
    return f"{name}-{index:05d}-of-{num_shards:05d}.array_record"


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits (vocab_size <= 65536), else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def compute_fingerprint(manifest: dict) -> str:
    """sha256 hex of the canonical JSON of every manifest field but `fingerprint` itself.

    The fields include each file's sha256, so equal fingerprints mean equal records, tokenizer,
    format and settings; editing any field (a tokenizer name, a vocab size) changes it.
    """
    body = {key: value for key, value in manifest.items() if key != "fingerprint"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- record encoding


def validate_chat_messages(messages: Any, where: str) -> list[dict]:
    """Check `messages` is a non-empty list of {"role": known role, "content": str}.

    `where` names the file and line. The rules live in `wf_data.data.text.chat.check_messages`;
    an empty list passes here, as `prepare` drops and counts empty documents.
    """
    from wf_data.data.text.chat import check_messages

    return (
        messages if isinstance(messages, list) and not messages else check_messages(messages, where)
    )


def encode_record(document: Any, format: str, token_dtype: np.dtype | None = None) -> bytes:
    """Bytes stored in a shard for one document (tokens array, text str or chat dict)."""
    if format == "tokens":
        dtype = np.dtype(token_dtype).newbyteorder("<")
        return np.ascontiguousarray(document, dtype=dtype).tobytes()
    if format == "text":
        return document.encode("utf-8")
    if format == "chat":
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raise ValueError(f"unknown format {format!r}; valid: {FORMATS}")


def decode_record(
    record: bytes, format: str, token_dtype: np.dtype | None = None, where: str = "record"
) -> Any:
    """Inverse of `encode_record`: (n,) read-only token array, str or chat dict."""
    if format == "tokens":
        dtype = np.dtype(token_dtype).newbyteorder("<")
        if len(record) % dtype.itemsize:
            raise ValueError(
                f"{where}: expected {dtype.name} tokens, got {len(record)} bytes "
                f"(not a multiple of {dtype.itemsize})"
            )
        return np.frombuffer(record, dtype=dtype)
    if format == "text":
        return record.decode("utf-8")
    if format == "chat":
        return json.loads(record)
    raise ValueError(f"unknown format {format!r}; valid: {FORMATS}")


# --------------------------------------------------------------------------- atomic writers


def write_shard(
    path: str | os.PathLike,
    records: Iterable[bytes],
    options: str | None = None,
    *,
    format: str = "tokens",
) -> dict:
    """Write records to an ArrayRecord shard atomically; returns {"records", "sha256"}.

    `options` are ArrayRecord writer options, by default `WRITER_OPTIONS[format]`.

    The shard is written under a temp name unique to this writer and published by
    `wf_data.atomic.publish_file` once closed, so a killed run never leaves a file at `path`
    that looks finished, and two live copies of one task never write into the same file.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = atomic.temp_path(path)
    try:
        if options is None:
            if format not in WRITER_OPTIONS:
                raise ValueError(f"unknown format {format!r}; valid: {FORMATS}")
            options = WRITER_OPTIONS[format]
        writer = ArrayRecordWriter(os.fspath(tmp), options)
        count = 0
        try:
            for record in records:
                writer.write(record)
                count += 1
        finally:
            writer.close()
        sha256 = file_sha256(tmp)
        atomic.publish_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"records": count, "sha256": sha256}


# --------------------------------------------------------------------------- manifest


def validate_manifest(manifest: Any, where: str = MANIFEST_NAME) -> dict:
    """Check keys, types, totals and fingerprint of a manifest dict; ValueError naming `where`."""

    def fail(message: str) -> None:
        raise ValueError(f"{where}: {message}")

    if not isinstance(manifest, dict):
        fail(f"expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("version") not in READ_VERSIONS:
        fail(
            f"unsupported version {manifest.get('version')!r}; this wf-data reads versions "
            f"{list(READ_VERSIONS)}: prepare the dataset again with `wf-data prepare`"
        )
    required = (
        "name",
        "format",
        "token_dtype",
        "tokenizer",
        "shards",
        "lengths",
        "totals",
        "fingerprint",
    )
    missing = [key for key in required if key not in manifest]
    if missing:
        fail(f"missing keys {missing}")
    if manifest["format"] not in FORMATS:
        fail(f"format {manifest['format']!r} is not one of {FORMATS}")
    if manifest["format"] == "tokens":
        if manifest["token_dtype"] not in TOKEN_DTYPES:
            fail(f"token_dtype {manifest['token_dtype']!r} is not one of {TOKEN_DTYPES}")
        _check_file_entry(manifest["lengths"], "lengths", fail)
        if manifest["lengths"]["file"] != LENGTHS_NAME:
            fail(f"lengths.file must be {LENGTHS_NAME!r}, got {manifest['lengths']['file']!r}")
        mapped = manifest.get("mapped")
        if mapped is not None:
            if manifest["version"] < 3 or not isinstance(mapped, dict):
                fail(f"mapped must be absent (version 2) or an object, got {mapped!r}")
            for key, name in (("offsets", OFFSETS_NAME), ("block_crc32", CRC_NAME)):
                _check_file_entry(mapped.get(key), f"mapped.{key}", fail)
                if mapped[key]["file"] != name:
                    fail(f"mapped.{key}.file must be {name!r}, got {mapped[key]['file']!r}")
    else:
        if manifest.get("mapped") is not None:
            fail(f"mapped must be null for format {manifest['format']!r}")
        if manifest["token_dtype"] is not None:
            fail(f"token_dtype must be null for format {manifest['format']!r}")
        if manifest["lengths"] is not None:
            fail(f"lengths must be null for format {manifest['format']!r}")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        fail("shards must be a non-empty list")
    for i, shard in enumerate(shards):
        _check_file_entry(shard, f"shards[{i}]", fail)
        for key in ("records", "tokens"):
            if not isinstance(shard.get(key), int) or shard[key] < 0:
                fail(f"shards[{i}].{key} must be an int >= 0, got {shard.get(key)!r}")
    totals = manifest["totals"]
    if not isinstance(totals, dict):
        fail("totals must be an object")
    for key in ("records", "tokens"):
        expected = sum(shard[key] for shard in shards)
        if totals.get(key) != expected:
            fail(f"totals.{key} = {totals.get(key)!r} but the shards sum to {expected}")
    if manifest["fingerprint"] != compute_fingerprint(manifest):
        fail(
            "fingerprint does not match the manifest contents (edited or corrupt manifest); "
            "prepare the dataset again"
        )
    return manifest


def _check_file_entry(entry: Any, name: str, fail: Callable[[str], None]) -> None:
    """A manifest file entry: {"file": bare name, "bytes": int, "sha256": str, ...}."""
    if not isinstance(entry, dict):
        fail(f"{name} must be an object")
    for key, kind in (("file", str), ("bytes", int), ("sha256", str)):
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            fail(f"{name}.{key} must be {kind.__name__}, got {entry.get(key)!r}")
    if os.path.basename(entry["file"]) != entry["file"] or entry["file"] in ("", ".", ".."):
        fail(f"{name}.file must be a bare file name, got {entry['file']!r}")


def read_manifest(path: str | os.PathLike) -> dict:
    """Load and validate `DIR/manifest.json` (or a manifest file path)."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no manifest; is {path.parent} a dataset prepared by `wf-data prepare`?"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error
    return validate_manifest(manifest, where=str(path))


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> dict:
    """Complete, validate and write `out_dir/manifest.json` atomically; returns the manifest.

    Fills in what the files on disk say: the current `version`, each shard's `bytes`, the
    `lengths` entry (size and sha256 of `lengths.npy`, format `tokens`; else null), the
    `mapped` index of a `tokens` dataset (`write_mapped_index`), and the `fingerprint`.
    Callers give the rest, shard sha256s included (computed while writing).
    """
    out_dir = pathlib.Path(out_dir)
    shards = [
        dict(shard, bytes=(out_dir / shard["file"]).stat().st_size) for shard in manifest["shards"]
    ]
    lengths = mapped = None
    if manifest.get("format") == "tokens":
        lengths = _file_entry(out_dir / LENGTHS_NAME)
        mapped = write_mapped_index(out_dir, shards, np.dtype(manifest["token_dtype"]))
    manifest = dict(
        manifest, version=MANIFEST_VERSION, shards=shards, lengths=lengths, mapped=mapped
    )
    manifest.pop("fingerprint", None)
    manifest["fingerprint"] = compute_fingerprint(manifest)
    path = out_dir / MANIFEST_NAME
    validate_manifest(manifest, where=str(path))
    atomic.write_json(path, manifest, indent=2)
    return manifest


def _file_entry(path: pathlib.Path) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_mapped_index(
    out_dir: str | os.PathLike, shards: list[dict], token_dtype: np.dtype
) -> dict | None:
    """Writes `record_offsets.npy` and `block_crc32.npy` of a `tokens` dataset (atomically) and
    returns their manifest entry, or None (and writes nothing) when a shard is not laid out as
    uncompressed one-record chunks (it is then read with the record reader).

    Reads every shard once (in threads: hashing releases the GIL), checking its sha256 against
    its manifest entry, so the checksums describe the bytes the manifest lists.
    """
    from concurrent.futures import ThreadPoolExecutor

    from wf_data.data.shards import mapped

    out_dir = pathlib.Path(out_dir)
    lengths = np.load(out_dir / LENGTHS_NAME, mmap_mode="r", allow_pickle=False)
    starts = list(itertools.accumulate((int(shard["records"]) for shard in shards), initial=0))
    if lengths.shape != (starts[-1],):
        raise ValueError(f"{out_dir / LENGTHS_NAME}: {lengths.shape} for {starts[-1]} records")

    def index(k: int):
        shard = shards[k]
        return mapped.index_shard(
            out_dir / shard["file"],
            lengths[starts[k] : starts[k + 1]],
            token_dtype.itemsize,
            shard["sha256"],
        )

    workers = max(1, min(len(shards), os.cpu_count() or 1))
    try:
        with ThreadPoolExecutor(workers) as pool:
            indexed = list(pool.map(index, range(len(shards))))
    except mapped.UnrecognizedLayout:
        for name in (OFFSETS_NAME, CRC_NAME):
            (out_dir / name).unlink(missing_ok=True)  # of an earlier write: not listed
        return None
    atomic.write_npy(out_dir / OFFSETS_NAME, np.concatenate([o for o, _ in indexed]))
    atomic.write_npy(out_dir / CRC_NAME, np.concatenate([c for _, c in indexed]))
    return {
        "offsets": _file_entry(out_dir / OFFSETS_NAME),
        "block_crc32": _file_entry(out_dir / CRC_NAME),
    }


# --------------------------------------------------------------------------- sources


class DocumentSource:
    """Random access over the records of a prepared dataset directory (all shards, in order).

    Items are (n,) uint16/uint32 read-only token arrays (`tokens`), `str` (`text`) or `dict`
    (`chat`). Readers open lazily, per process, so the source pickles as just its path.
    It implements Grain's `RandomAccessDataSource` protocol (`isinstance` holds); it does not
    inherit from it so that this module, and `prepare`'s worker processes, never import grain
    (and with it jax): a worker then starts in about a second instead of several.
    """

    def __init__(self, path: str | os.PathLike, *, memory_map: bool = True):
        self.path = pathlib.Path(path)
        self.manifest = read_manifest(self.path)
        self.format: str = self.manifest["format"]
        self.fingerprint: str = self.manifest["fingerprint"]
        dtype = self.manifest["token_dtype"]
        self.token_dtype = np.dtype(dtype) if dtype else None
        self._token_dtype_le = (
            self.token_dtype.newbyteorder("<") if self.format == "tokens" else None
        )
        self.shard_paths = [self.path / shard["file"] for shard in self.manifest["shards"]]
        for shard, shard_path in zip(self.manifest["shards"], self.shard_paths, strict=True):
            _check_size(shard_path, shard["bytes"], self.path)
        counts = [int(shard["records"]) for shard in self.manifest["shards"]]
        # starts[k] = global index of shard k's first record; starts[-1] = total records.
        # Python ints: a read locates its few records with `bisect`, cheaper than numpy calls.
        self._starts = list(itertools.accumulate(counts, initial=0))
        self.lengths = self._load_lengths() if self.format == "tokens" else None
        self._readers: list[Any] = [None] * len(self.shard_paths)
        self._lock = threading.Lock()
        # Memory-mapped reads: when the dataset lists their index (and `memory_map`).
        self.memory_map = bool(memory_map and self.manifest.get("mapped"))
        if self.memory_map:
            for entry in self.manifest["mapped"].values():
                _check_size(self.path / entry["file"], entry["bytes"], self.path)
        self._mapped = None

    def _load_lengths(self) -> np.ndarray:
        """`lengths.npy` memory-mapped (ranks on one host share the page cache), checked
        against the manifest at open for what costs no scan: size, dtype and shape.

        Each shard's sum is checked against the manifest when the shard is first read
        (`_check_shard_lengths`), so opening 100M documents reads no lengths.
        """
        lengths_path = self.path / LENGTHS_NAME
        _check_size(lengths_path, self.manifest["lengths"]["bytes"], self.path)
        lengths = np.load(lengths_path, mmap_mode="r", allow_pickle=False)
        if lengths.dtype != np.int64 or lengths.shape != (len(self),):
            raise ValueError(
                f"{lengths_path}: expected ({len(self)},) int64 (one per record), "
                f"got {lengths.shape} {lengths.dtype}; prepare the dataset again"
            )
        # A plain array over the same mapping: np.memmap indexing costs a Python call.
        return lengths.view(np.ndarray)

    @property
    def num_tokens(self) -> int | None:
        """Total tokens (format `tokens`: the manifest's per-shard sums), else None."""
        if self.format != "tokens":
            return None
        return sum(int(shard["tokens"]) for shard in self.manifest["shards"])

    def _check_shard_lengths(self, shard: int) -> None:
        """Fails if shard `shard`'s lengths do not sum to the manifest's count: catches entries
        moved across shards; the per-record check in `__getitems__` catches the rest."""
        if self.lengths is None:
            return
        start, stop = self._starts[shard], self._starts[shard + 1]
        total = int(np.sum(self.lengths[start:stop]))
        expected = self.manifest["shards"][shard]
        if total != expected["tokens"]:
            raise ValueError(
                f"{self.path / LENGTHS_NAME}: the lengths of shard {expected['file']} sum to "
                f"{total} tokens, the manifest says {expected['tokens']} (corrupt "
                f"lengths.npy); check with `wf-data inspect {self.path} --verify`"
            )

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return f"DocumentSource(path={str(self.path)!r}, fingerprint={self.fingerprint[:16]!r})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = [None] * len(self.shard_paths)
        state["_mapped"] = None
        del state["_lock"]
        # lengths can be large (8 bytes a record): the new process memory-maps the file again.
        state["lengths"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        if self.format == "tokens":
            self.lengths = self._load_lengths()

    def _mapped_shards(self):
        """The memory maps of the shards (`wf_data.data.shards.mapped.MappedShards`)."""
        with self._lock:
            if self._mapped is None:
                from wf_data.data.shards.mapped import MappedShards

                def load(entry):
                    return np.load(self.path / entry["file"], mmap_mode="r").view(np.ndarray)

                offsets = load(self.manifest["mapped"]["offsets"])
                if offsets.shape != (len(self),) or offsets.dtype != np.int64:
                    raise ValueError(
                        f"{self.path / OFFSETS_NAME}: expected ({len(self)},) int64, got "
                        f"{offsets.shape} {offsets.dtype}; prepare the dataset again"
                    )
                self._mapped = MappedShards(
                    self.shard_paths,
                    self._starts,
                    offsets,
                    self.lengths,
                    load(self.manifest["mapped"]["block_crc32"]),
                    self.token_dtype,
                    describe_record=self._describe_record,
                    on_open=self._check_shard_lengths,
                )
        return self._mapped

    def _describe_record(self, index: int) -> str:
        shard, local = self._shard_of(index)
        return f"{self.path}: shard {self.shard_paths[shard].name} record {local}"

    def _reader(self, shard: int):
        reader = self._readers[shard]
        if reader is None:
            from array_record.python.array_record_module import ArrayRecordReader

            with self._lock:
                reader = self._readers[shard]
                if reader is None:
                    self._check_shard_lengths(shard)
                    global _READ_IN_PID
                    _READ_IN_PID = os.getpid()
                    try:
                        reader = ArrayRecordReader(
                            os.fspath(self.shard_paths[shard]), READER_OPTIONS
                        )
                    except RuntimeError as error:  # a damaged footer or index
                        raise self._damaged(shard, None, error) from None
                    self._readers[shard] = reader
        return reader

    def _locate(self, indices: Sequence[int]) -> tuple[np.ndarray, list[int]]:
        """Global record indices (negative from the end) -> the same made non-negative, as a
        (n,) int64 array and as Python ints; IndexError naming the first out of range."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        index_list, n = indices.tolist(), len(self)
        if index_list and (min(index_list) < 0 or max(index_list) >= n):
            bad = next((index for index in index_list if not -n <= index < n), None)
            if bad is not None:
                raise IndexError(f"record {bad} out of range for {self.path} with {n} records")
            indices = np.where(indices < 0, indices + n, indices)
            index_list = indices.tolist()
        return indices, index_list

    def _shard_of(self, index: int) -> tuple[int, int]:
        """Record `index` (>= 0) -> (its shard, its index within the shard)."""
        shard = bisect.bisect_right(self._starts, index) - 1  # past empty shards
        return shard, index - self._starts[shard]

    def _decode(self, record: bytes, index: int, expected: int) -> Any:
        """Record `index`'s document; a token record must hold `expected` tokens
        (lengths.npy)."""
        if self._token_dtype_le is not None:
            if len(record) == expected * self._token_dtype_le.itemsize:
                return np.frombuffer(record, dtype=self._token_dtype_le)
            shard, local = self._shard_of(index)
            raise ValueError(
                f"{self.path}: shard {self.shard_paths[shard].name} record {local}: "
                f"{len(record)} bytes, but lengths.npy plans {expected} {self.token_dtype.name} "
                f"tokens (corrupt shard or lengths.npy); check with "
                f"`wf-data inspect {self.path} --verify`"
            )
        shard, local = self._shard_of(index)
        where = f"shard {self.shard_paths[shard].name} record {local}"
        return decode_record(record, self.format, self.token_dtype, where)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Records in the order of `indices` (a token record must hold its planned length)."""
        if self.memory_map:
            tokens, lengths = self.read_tokens(indices)
            return np.split(tokens, np.cumsum(lengths)[:-1]) if lengths.size else []
        indices, index_list = self._locate(indices)
        records = self._read_records(index_list)
        planned = self.lengths[indices].tolist() if self.lengths is not None else [0] * len(records)
        return [self._decode(*entry) for entry in zip(records, index_list, planned, strict=True)]

    def read_tokens(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Documents `indices` of a `tokens` dataset in one buffer: `(tokens, lengths)`.

        `tokens` is a (T,) read-only array of the token dtype holding the documents back to
        back in the order asked, `lengths` (n,) int64 their token counts (lengths.npy), so
        document `indices[i]` starts at `lengths[:i].sum()`. One join of the records instead
        of an array per record; every record's size is checked against lengths.npy.
        """
        if self._token_dtype_le is None:
            raise TypeError(f"{self.path} holds {self.format} records, not tokens")
        indices, index_list = self._locate(indices)
        lengths = self.lengths[indices]
        if self.memory_map:
            pieces = self._mapped_shards().read_pieces(indices, np.zeros_like(indices), lengths)
            return pieces, lengths
        records = self._read_records(index_list)
        expected = (lengths * self._token_dtype_le.itemsize).tolist()
        sizes = list(map(len, records))
        if sizes != expected:  # the record's own check names shard, record and the fix
            at = next(i for i, size in enumerate(sizes) if size != expected[i])
            self._decode(records[at], index_list[at], int(lengths[at]))
        return np.frombuffer(b"".join(records), dtype=self._token_dtype_le), lengths

    def read_pieces(
        self, indices: Sequence[int], offsets: np.ndarray, sizes: np.ndarray
    ) -> np.ndarray:
        """(T,) read-only tokens of pieces `[offsets[i], offsets[i] + sizes[i])` of documents
        `indices` (of a `tokens` dataset), back to back in this order: only those tokens are
        read from memory-mapped shards; the record reader reads each document once, whole.
        The caller checks that pieces lie within their documents (lengths.npy)."""
        if self._token_dtype_le is None:
            raise TypeError(f"{self.path} holds {self.format} records, not tokens")
        indices, _ = self._locate(indices)
        offsets = np.asarray(offsets, dtype=np.int64)
        sizes = np.asarray(sizes, dtype=np.int64)
        if self.memory_map:
            return self._mapped_shards().read_pieces(indices, offsets, sizes)
        wanted, which = np.unique(indices, return_inverse=True)
        tokens, lengths = self.read_tokens(wanted)
        starts = np.cumsum(lengths) - lengths
        return take_pieces(tokens, starts[which] + offsets, sizes)

    def _read_records(self, indices: list[int]) -> list[bytes]:
        """Records `indices` (>= 0), in request order.

        A reader's cursor is shared state, so reads hold the source's lock (readers open
        before, as opening takes it). Records go by `seek` + `read`: a batched
        `read(indices)` costs ~100 us per call and was no faster per record even at 512
        records of one shard. A read is a few records, so they are located in plain Python:
        numpy calls on a few values cost more than they save.
        """
        starts, readers = self._starts, self._readers
        shards = [bisect.bisect_right(starts, index) - 1 for index in indices]
        for shard in set(shards):
            if readers[shard] is None:
                self._reader(shard)
        records: list[bytes] = []
        with self._lock:
            try:
                for index, shard in zip(indices, shards, strict=True):
                    reader = readers[shard]
                    reader.seek(index - starts[shard])
                    records.append(reader.read())
            except RuntimeError as error:  # Riegeli's report of a damaged chunk
                raise self._damaged(shard, index - starts[shard], error) from None
        return records

    def _damaged(self, shard: int, record: int | None, error: RuntimeError) -> ShardReadError:
        """The error for a shard Riegeli cannot read; its reader is dropped, so that the
        records of undamaged chunks stay readable."""
        reader, self._readers[shard] = self._readers[shard], None
        if reader is not None:
            with contextlib.suppress(RuntimeError):  # close reports the same failure again
                reader.close()
        at = "" if record is None else f" record {record}"
        return ShardReadError(
            f"{self.path}: shard {self.shard_paths[shard].name}{at}: unreadable ({error}); "
            f"a damaged file reads this way: check every file with `wf-data inspect "
            f"{self.path} --verify`, then prepare the dataset again or restore it from a copy"
        )

    def close(self) -> None:
        """Close the open shard readers and maps (they reopen lazily on the next read)."""
        if self._mapped is not None:
            self._mapped.close()
        for i, reader in enumerate(self._readers):
            if reader is not None:
                reader.close()
                self._readers[i] = None


# Mean piece size from which copying a slice per piece (~0.4 us each) beats one gather of
# every token (~2.2 ns a token, its index included).
_SLICE_COPY_MIN_TOKENS = 200


def take_pieces(buffer: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """`buffer[starts[i] : starts[i] + sizes[i]]` for every i, back to back: (sizes.sum(),)."""
    total = int(sizes.sum())
    if total >= _SLICE_COPY_MIN_TOKENS * sizes.size:  # long pieces: a slice each
        spans = zip(starts.tolist(), (starts + sizes).tolist(), strict=True)
        return np.concatenate([buffer[start:stop] for start, stop in spans] or [buffer[:0]])
    # Short pieces: one gather, its index a running sum of ones that jumps at piece starts.
    gather = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes)
    gather += np.arange(total)
    return buffer[gather]


class InMemorySource:
    """The `DocumentSource` interface over a Python list of documents (tests, demo).

    `format="tokens"` stores each document as a read-only (n,) `token_dtype` array and computes
    `lengths` ((N,) int64); `fingerprint` is the sha256 of the encoded content.
    """

    def __init__(self, docs: Sequence[Any], format: str = "tokens", token_dtype=np.uint32):
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; valid: {FORMATS}")
        self.format = format
        self.path = None
        self.token_dtype = np.dtype(token_dtype) if format == "tokens" else None
        digest = hashlib.sha256(f"format={format},dtype={self.token_dtype}".encode())
        self._docs: list[Any] = []
        for i, doc in enumerate(docs):
            if format == "tokens":
                doc = np.array(doc, dtype=self.token_dtype).reshape(-1)
                doc.setflags(write=False)
            elif format == "text" and not isinstance(doc, str):
                raise TypeError(f"document {i}: text format needs str, got {type(doc).__name__}")
            elif format == "chat":
                if not isinstance(doc, dict) or "messages" not in doc:
                    raise TypeError(f"document {i}: chat format needs a dict with 'messages'")
                validate_chat_messages(doc["messages"], f"document {i}")
            record = encode_record(doc, format, self.token_dtype)
            digest.update(len(record).to_bytes(8, "little"))
            digest.update(record)
            self._docs.append(doc)
        self.fingerprint = digest.hexdigest()
        self.lengths = None
        if format == "tokens":
            self.lengths = np.array([len(doc) for doc in self._docs], dtype=np.int64)
            self.lengths.setflags(write=False)
        self.manifest = {
            "version": MANIFEST_VERSION,
            "name": "in-memory",
            "format": format,
            "token_dtype": self.token_dtype.name if self.token_dtype else None,
            "fingerprint": self.fingerprint,
        }

    def __len__(self) -> int:
        return len(self._docs)

    def __repr__(self) -> str:
        return (
            f"InMemorySource(n={len(self)}, format={self.format!r}, "
            f"fingerprint={self.fingerprint[:16]!r})"
        )

    def __getitem__(self, index: int) -> Any:
        return self._docs[int(index)]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Documents at `indices`, in that order."""
        return [self._docs[int(i)] for i in indices]


def _check_size(path: pathlib.Path, expected: int, dataset: pathlib.Path) -> None:
    """A dataset file must exist with the size the manifest lists (a cheap truncation check)."""
    if not path.exists():
        raise FileNotFoundError(
            f"{dataset / MANIFEST_NAME}: {path.name} missing; prepare the dataset again"
        )
    size = path.stat().st_size
    if size != expected:
        raise ValueError(
            f"{path}: {size} bytes, the manifest says {expected} (truncated or replaced file); "
            f"check with `wf-data inspect {dataset} --verify` and prepare the dataset again"
        )


def verify_dataset(
    path: str | os.PathLike, *, contents: bool = True, read_chunk: int = 1024
) -> list[str]:
    """Check every file of a dataset against its manifest; returns the problems found.

    Each shard: present, readable, record count; with `contents` also every file's sha256
    (shards, `lengths.npy`) and, format `tokens`, each record's token count recomputed from
    the shard against `lengths.npy`. One line per problem names the file (and record).
    Raises on a missing or invalid manifest.
    """
    from array_record.python.array_record_module import ArrayRecordReader

    path = pathlib.Path(path)
    manifest = read_manifest(path)
    problems = []
    lengths = None
    if contents and manifest["format"] == "tokens":
        lengths_path = path / LENGTHS_NAME
        if not lengths_path.exists():
            problems.append(f"{LENGTHS_NAME}: missing")
        else:
            if file_sha256(lengths_path) != manifest["lengths"]["sha256"]:
                problems.append(f"{LENGTHS_NAME}: sha256 does not match the manifest")
            lengths = np.load(lengths_path, allow_pickle=False)
            itemsize = np.dtype(manifest["token_dtype"]).itemsize
        for entry in (manifest.get("mapped") or {}).values():
            index_path = path / entry["file"]
            if not index_path.exists():
                problems.append(f"{entry['file']}: missing")
            elif file_sha256(index_path) != entry["sha256"]:
                problems.append(f"{entry['file']}: sha256 does not match the manifest")
    start = 0
    for shard in manifest["shards"]:
        shard_path, name = path / shard["file"], shard["file"]
        first, start = start, start + shard["records"]
        if not shard_path.exists():
            problems.append(f"{name}: missing")
            continue
        if contents and file_sha256(shard_path) != shard["sha256"]:
            problems.append(f"{name}: sha256 does not match the manifest")
        try:
            reader = ArrayRecordReader(os.fspath(shard_path))
            try:
                records = reader.num_records()
                if records != shard["records"]:
                    problems.append(f"{name}: {records} records, manifest says {shard['records']}")
                elif lengths is not None:
                    problems += _compare_lengths(
                        reader, lengths[first:start], itemsize, name, read_chunk
                    )
            finally:
                reader.close()
        except RuntimeError as error:  # riegeli reports corrupt files this way
            problems.append(f"{name}: unreadable: {error}")
    return problems


def _compare_lengths(
    reader, planned: np.ndarray, itemsize: int, name: str, chunk: int
) -> list[str]:
    """Problems where a shard's record sizes disagree with its slice of lengths.npy."""
    if planned.shape != (reader.num_records(),):
        return [f"{LENGTHS_NAME}: {planned.size} entries for {name}, which has more records"]
    for begin in range(0, planned.size, chunk):
        records = reader.read(begin, min(begin + chunk, planned.size))
        sizes = np.fromiter(map(len, records), dtype=np.int64, count=len(records))
        bad = np.flatnonzero(sizes != planned[begin : begin + len(records)] * itemsize)
        if bad.size:
            record = begin + int(bad[0])
            return [
                f"{name} record {record}: {sizes[bad[0]] / itemsize:g} tokens, "
                f"{LENGTHS_NAME} says {int(planned[record])} ({bad.size} records differ in this "
                "read chunk)"
            ]
    return []


def open_dataset(path: str | os.PathLike, *, memory_map: bool = True) -> DocumentSource:
    """Open a dataset directory written by `wf-data prepare` as a `DocumentSource`
    (`memory_map=False`: read token records with the record reader even where the dataset
    has the index of memory-mapped reads)."""
    return DocumentSource(path, memory_map=memory_map)
