"""Memory-mapped reads of token shards: the pieces of documents as one buffer, no record reader.

Token shards are ArrayRecord (Riegeli) files of uncompressed one-record chunks, so a record's
bytes sit at a fixed place in the file. The Riegeli layout: a 24-byte block header at every
multiple of 64 KiB; between them, chunks back to back, each a 40-byte chunk header then its
data, here `[0x00 (no compression)][varint size of the sizes][varint record size][record]`.
In *content* coordinates (file bytes with block headers left out) chunks are contiguous, so
every record's position follows from the record sizes (`lengths.npy`).

`index_shard` (the write side, called by `sources.write_manifest`) computes each record's
payload position, checks the whole framing of every chunk against it, and a CRC-32 of every
64 KiB block of the file; the dataset keeps them in `record_offsets.npy` ((N,) int64) and
`block_crc32.npy` ((blocks,) uint32). `MappedShards` (the read side) then copies any pieces of
any records with one `bytes.join` of memory-map slices, and trusts only bytes it has checked:

- a block's CRC-32 when a read first touches it (per process), as Riegeli checks a chunk's
  hash on every read (~22 us per 64 KiB, once);
- a record's framing when it is first read: the 10 bytes before its payload must be its chunk
  header's decoded size (= lengths.npy) and the data prefix, so a damaged `lengths.npy` or
  `record_offsets.npy` fails naming the shard and record, as a record reader's size check did.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import pathlib
import threading
import zlib
from collections.abc import Sequence

import numpy as np


class ShardReadError(ValueError):
    """A shard that cannot be read as written (a block failing its CRC-32, a record's framing
    off, a chunk hash mismatch reported by Riegeli); the message names the dataset, shard and
    record and suggests `inspect --verify`."""


BLOCK = 1 << 16  # Riegeli block size, also the unit of block_crc32.npy
BLOCK_HEADER = 24
USABLE = BLOCK - BLOCK_HEADER
CHUNK_HEADER = 40
SIMPLE_CHUNK = 0x72  # 'r': a simple chunk with records
# Bytes checked before each payload on its first read: decoded size (8), compression, sizes size.
CHECKED_PREFIX = 10

__all__ = ["BLOCK", "MappedShards", "UnrecognizedLayout", "index_shard", "varint_size"]


class UnrecognizedLayout(ValueError):
    """A shard whose bytes are not laid out as uncompressed one-record chunks: read it with the
    record reader instead."""


def to_content(physical: np.ndarray) -> np.ndarray:
    """File positions of bytes (never inside a block header) -> content positions."""
    return physical - BLOCK_HEADER * (physical // BLOCK + 1)


def to_physical(content: np.ndarray) -> np.ndarray:
    """Content positions -> file positions of those bytes."""
    return content + BLOCK_HEADER * (content // USABLE + 1)


def varint_size(values: np.ndarray) -> np.ndarray:
    """Bytes of the LEB128 varint of each value (>= 0): 1 below 128, 2 below 2**14, ..."""
    bits = np.maximum(np.asarray(values, dtype=np.int64), 1)
    size = np.ones(bits.shape, dtype=np.int64)
    for shift in (7, 14, 21, 28, 35, 42, 49, 56):
        size += bits >= (1 << shift)
    return size


def _gather(data: np.ndarray, content: np.ndarray) -> np.ndarray:
    """Bytes of `data` (a shard's uint8 map) at content positions `content` (any shape)."""
    return data[to_physical(content)]


def index_shard(
    path: str | os.PathLike, lengths: np.ndarray, itemsize: int, sha256: str
) -> tuple[np.ndarray, np.ndarray]:
    """(payload file offset of each record (n,) int64, CRC-32 of each 64 KiB block (b,) uint32)
    of a token shard whose records have `lengths` tokens of `itemsize` bytes.

    Reads the file once, checking its sha256 against `sha256` (what its writer computed), so
    the CRCs describe the bytes the manifest lists; then checks the framing of every chunk
    against `lengths`. Raises `UnrecognizedLayout` if the chunks are not laid out as expected,
    ValueError if the file changed since it was written.
    """
    path = pathlib.Path(path)
    size = path.stat().st_size
    crcs = np.empty(-(-size // BLOCK), dtype=np.uint32)
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        block = 0
        while chunk := file.read(BLOCK * 16):
            digest.update(chunk)
            view = memoryview(chunk)
            for start in range(0, len(chunk), BLOCK):
                crcs[block] = zlib.crc32(view[start : start + BLOCK])
                block += 1
    if digest.hexdigest() != sha256:
        raise ValueError(
            f"{path}: sha256 {digest.hexdigest()} differs from {sha256}, computed when the "
            "shard was written: the file changed since; prepare the dataset again"
        )
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return np.zeros(0, dtype=np.int64), crcs
    data = np.memmap(path, dtype=np.uint8, mode="r")
    record_bytes = lengths * itemsize
    prefix = 2 + varint_size(record_bytes)  # compression byte, varint of sizes' size, varint
    data_size = prefix + record_bytes
    chunk = np.empty(lengths.size, dtype=np.int64)
    chunk[0] = _first_data_chunk(data)
    np.cumsum(CHUNK_HEADER + data_size[:-1], out=chunk[1:])
    chunk[1:] += chunk[0]
    if to_physical(chunk[-1] + CHUNK_HEADER + data_size[-1] - 1) >= size:
        raise UnrecognizedLayout(f"{path}: records run past the end of the file")
    for begin in range(0, lengths.size, 1 << 16):  # bounded temporaries on big shards
        part = slice(begin, begin + (1 << 16))
        _check_framing(data, chunk[part], data_size[part], record_bytes[part], path)
    del data
    return to_physical(chunk + CHUNK_HEADER + prefix), crcs


def _first_data_chunk(data: np.ndarray) -> int:
    """Content position of the first chunk with records, after the file signature (and any
    metadata or padding chunk a writer put first)."""
    position = CHUNK_HEADER  # the signature chunk: a block header, a header, no data
    for _ in range(8):
        header = _gather(data, position + np.arange(CHUNK_HEADER))
        chunk_type = int(header[24])
        if chunk_type == SIMPLE_CHUNK:
            return position
        if chunk_type not in b"mp":  # metadata, padding
            break
        position += CHUNK_HEADER + int(header[8:16].view("<u8")[0])
    raise UnrecognizedLayout("no simple chunk of records after the file signature")


def _check_framing(data, chunk, data_size, record_bytes, path) -> None:
    """Every chunk header and data prefix is what one uncompressed record of its size has."""
    sizes_size = varint_size(record_bytes)
    width = CHUNK_HEADER + 2 + int(sizes_size.max())
    got = _gather(data, chunk[:, None] + np.arange(width))
    expected = np.zeros_like(got)
    expected[:, 8:16] = data_size.astype("<u8").view(np.uint8).reshape(-1, 8)
    expected[:, 24] = SIMPLE_CHUNK
    expected[:, 25] = 1  # num_records (7 bytes)
    expected[:, 32:40] = record_bytes.astype("<u8").view(np.uint8).reshape(-1, 8)
    expected[:, 41] = sizes_size
    for k in range(int(sizes_size.max())):  # the record size as a varint
        more = sizes_size > k + 1
        expected[:, 42 + k] = ((record_bytes >> (7 * k)) & 0x7F) | (more << 7)
    checked = np.ones(got.shape, dtype=bool)
    checked[:, :8] = checked[:, 16:24] = False  # header and data hashes
    checked[:, 42:] = np.arange(width - 42) < sizes_size[:, None]
    bad = np.flatnonzero(((got != expected) & checked).any(axis=1))
    if bad.size:
        raise UnrecognizedLayout(
            f"{path}: chunk {int(bad[0])} is not one uncompressed record of "
            f"{int(record_bytes[bad[0]])} bytes"
        )


class MappedShards:
    """Pieces of token records of a dataset's shards, from memory maps.

    `shard_paths` in order, `starts` the global index of each shard's first record (plus the
    total), `offsets` (N,) payload file offsets, `lengths` (N,) tokens, `crcs` the CRC-32 of
    each block of each shard in order. Maps open lazily per process; not picklable (its owner,
    `DocumentSource`, rebuilds it).
    """

    def __init__(
        self,
        shard_paths: Sequence[pathlib.Path],
        starts: Sequence[int],
        offsets: np.ndarray,
        lengths: np.ndarray,
        crcs: np.ndarray,
        token_dtype: np.dtype,
        describe_record,
        on_open,
    ):
        self.shard_paths = list(shard_paths)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.offsets, self.lengths, self.crcs = offsets, lengths, crcs
        self.token_dtype = np.dtype(token_dtype).newbyteorder("<")
        self.describe_record = describe_record  # (global index) -> "PATH: shard X record k"
        self.on_open = on_open  # (shard) -> None, raises if the shard must not be read
        blocks = [-(-path.stat().st_size // BLOCK) for path in self.shard_paths]
        # Global block index of each shard's first block.
        self.block_base = np.concatenate([[0], np.cumsum(blocks)]).astype(np.int64)
        if self.block_base[-1] != crcs.size:
            raise ValueError(
                f"block_crc32.npy holds {crcs.size} checksums for {self.block_base[-1]} blocks "
                "of shards: prepare the dataset again"
            )
        self._views: list[memoryview | None] = [None] * len(self.shard_paths)
        self._arrays: list[np.ndarray | None] = [None] * len(self.shard_paths)
        self._maps: list[mmap.mmap | None] = [None] * len(self.shard_paths)
        self._unopened = len(self.shard_paths)
        self._verified = np.zeros(crcs.size, dtype=bool)  # blocks whose CRC matched
        # Records whose framing and blocks are checked, a bit each (1/64 of lengths.npy).
        self._ready = np.zeros(-(-offsets.size // 8), dtype=np.uint8)
        self._unready = offsets.size
        self._lock = threading.RLock()

    def _open(self, shard: int) -> None:
        with self._lock:
            if self._views[shard] is None:
                self.on_open(shard)
                with open(self.shard_paths[shard], "rb") as file:
                    mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps[shard] = mapped
                self._arrays[shard] = np.frombuffer(mapped, dtype=np.uint8)
                self._views[shard] = memoryview(mapped)
                self._unopened -= 1

    def _open_all(self, shards: np.ndarray) -> None:
        for index in set(shards.tolist()):
            if self._views[index] is None:
                self._open(index)

    def close(self) -> None:
        """Drops the maps (each closes once no read holds a slice of it)."""
        with self._lock:
            self._views = [None] * len(self.shard_paths)
            self._arrays = [None] * len(self.shard_paths)
            self._maps = [None] * len(self.shard_paths)
            self._unopened = len(self.shard_paths)

    def read_pieces(
        self, records: np.ndarray, offsets: np.ndarray, sizes: np.ndarray
    ) -> np.ndarray:
        """(T,) tokens of pieces `[offsets[i], offsets[i] + sizes[i])` of records `records`
        (global indices >= 0, pieces within their records), back to back in this order."""
        if self._unready:
            ready = (self._ready[records >> 3] >> (records & 7).astype(np.uint8)) & 1
            if not ready.all():
                self._make_ready(records[ready == 0])
        shard = self.starts.searchsorted(records, side="right") - 1
        itemsize = self.token_dtype.itemsize
        payload = self.offsets[records]
        # Content position of each piece's first byte, its block, then its file position.
        first = payload - BLOCK_HEADER * (payload // BLOCK) + (offsets * itemsize - BLOCK_HEADER)
        block = first // USABLE
        start = first + BLOCK_HEADER * (block + 1)
        length = sizes * itemsize
        stop = start + length
        crossing = np.flatnonzero(stop > (block + 1) * BLOCK)  # runs into a block header
        views = self._views
        parts = [
            views[index][begin:end]
            for index, begin, end in zip(shard.tolist(), start.tolist(), stop.tolist(), strict=True)
        ]
        for i in crossing.tolist():  # rare (a 2 KB piece: 1 in 32)
            parts[i] = _across_blocks(views[shard[i]], int(start[i]), int(length[i]))
        return np.frombuffer(b"".join(parts), dtype=self.token_dtype)

    def _make_ready(self, records: np.ndarray) -> None:
        """Opens the shards of `records` (not ready yet), CRC-checks every block of them not
        checked yet (in this process) and checks their framing; records starting in a block
        checked now are made ready with them (their first read is then free), but only a
        requested record's bad framing is an error."""
        with self._lock:  # reader threads: each record made ready (and counted) once
            todo = self._not_ready(np.unique(records))
            if not todo.size:
                return
            shard = self.starts.searchsorted(todo, side="right") - 1
            if self._unopened:
                for index in set(shard.tolist()):
                    if self._views[index] is None:
                        self._open(index)
            first, last = self._blocks_of(todo)
            fresh = self._verify(todo, shard, first, last)
            others = self._not_ready(np.setdiff1d(self._records_starting_in(fresh), todo))
            if others.size:  # ready too where every block of them is checked
                first, last = self._blocks_of(others)
                base = self.block_base[self.starts.searchsorted(others, side="right") - 1]
                checked = self._verified[base + first] & self._verified[base + last]
                others = others[checked & (last - first <= 1)]
            candidates = np.concatenate([todo, others])
            good = self._check_framing(candidates)
            if not good[: todo.size].all():
                self._framing_error(todo[np.flatnonzero(~good[: todo.size])[0]])
            ready = candidates[good]
            np.bitwise_or.at(self._ready, ready >> 3, (1 << (ready & 7)).astype(np.uint8))
            self._unready -= ready.size

    def _not_ready(self, records: np.ndarray) -> np.ndarray:
        """The distinct `records` whose ready bit is not set."""
        bits = (1 << (records & 7)).astype(np.uint8)
        return records[(self._ready[records >> 3] & bits) == 0]

    def _blocks_of(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first, last) block within its shard of each record's framing and tokens."""
        record_bytes = self.lengths[records] * self.token_dtype.itemsize
        payload = to_content(self.offsets[records])
        prefix = payload - varint_size(record_bytes) - CHECKED_PREFIX
        return prefix // USABLE, (payload + np.maximum(record_bytes, 1) - 1) // USABLE

    def _records_starting_in(self, blocks: list[int]) -> np.ndarray:
        """Global indices of the records whose tokens start in global blocks `blocks`."""
        found = []
        for block in blocks:
            index = int(self.block_base.searchsorted(block, side="right")) - 1
            local = block - int(self.block_base[index])
            first, stop = int(self.starts[index]), int(self.starts[index + 1])
            bounds = self.offsets[first:stop].searchsorted([local * BLOCK, (local + 1) * BLOCK])
            found.append(np.arange(first + bounds[0], first + bounds[1]))
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def _verify(self, records, shard, first_block, last_block) -> list[int]:
        """CRC-checks the blocks `[first_block, last_block]` (content blocks = file blocks) of
        each of `records` in `shard` not checked yet in this process; returns those (global
        block indices). A block that fails names the first of `records` that needs it."""
        base = self.block_base[shard]
        count = last_block - first_block + 1
        blocks = np.repeat(base + first_block - np.cumsum(count) + count, count)
        blocks += np.arange(blocks.size)
        fresh = np.unique(blocks[~self._verified[blocks]]).tolist()
        for block in fresh:
            index = int(self.block_base.searchsorted(block, side="right")) - 1
            local = block - int(self.block_base[index])
            data = self._views[index][local * BLOCK : (local + 1) * BLOCK]
            if zlib.crc32(data) != int(self.crcs[block]):
                needs = (base + first_block <= block) & (block <= base + last_block)
                record = int(records[np.flatnonzero(needs)[0]])
                raise ShardReadError(
                    f"{self.describe_record(record)}: unreadable (bytes {local * BLOCK}-"
                    f"{local * BLOCK + len(data)} of the shard do not match their CRC-32 in "
                    "block_crc32.npy); a damaged file reads this way: check every file with "
                    f"`wf-data inspect {self.shard_paths[index].parent} --verify`, then prepare "
                    "the dataset again or restore it from a copy"
                )
            self._verified[block] = True
        return fresh

    def _check_framing(self, records: np.ndarray) -> np.ndarray:
        """(n,) bool: the `CHECKED_PREFIX` bytes before each record's varint size are its
        chunk's decoded size, 0 (no compression) and the varint's size."""
        record_bytes = self.lengths[records] * self.token_dtype.itemsize
        prefix = to_content(self.offsets[records]) - varint_size(record_bytes) - CHECKED_PREFIX
        positions = to_physical(prefix[:, None] + np.arange(CHECKED_PREFIX))
        shard = self.starts.searchsorted(records, side="right") - 1
        got = np.zeros(positions.shape, dtype=np.uint8)
        for index in np.unique(shard).tolist():
            rows = shard == index
            data = self._arrays[index]
            if positions[rows].max(initial=0) < data.size:  # else 0s: bad
                got[rows] = data[positions[rows]]
        decoded = got[:, :8].copy().view("<u8")[:, 0]
        return (
            (decoded == record_bytes) & (got[:, 8] == 0) & (got[:, 9] == varint_size(record_bytes))
        )

    def _framing_error(self, record: int):
        record_bytes = self.lengths[[record]] * self.token_dtype.itemsize
        prefix = to_content(self.offsets[[record]]) - varint_size(record_bytes) - CHECKED_PREFIX
        shard = int(self.starts.searchsorted(record, side="right")) - 1
        positions = to_physical(prefix[0] + np.arange(8))
        data = self._arrays[shard]
        decoded = int(data[positions].copy().view("<u8")[0]) if positions[-1] < data.size else 0
        raise ShardReadError(
            f"{self.describe_record(int(record))}: {decoded} bytes, but lengths.npy plans "
            f"{int(self.lengths[record])} {self.token_dtype.name} tokens at this offset "
            "(corrupt shard, lengths.npy or record_offsets.npy); check with "
            f"`wf-data inspect {self.shard_paths[0].parent} --verify`"
        )


def _across_blocks(view: memoryview, start: int, length: int) -> bytes:
    """`length` content bytes from file position `start`, skipping block headers."""
    parts = []
    while length:
        end = min(start + length, (start // BLOCK + 1) * BLOCK)
        parts.append(view[start:end])
        length -= end - start
        start = end + BLOCK_HEADER
    return b"".join(parts)
