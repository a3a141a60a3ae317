"""Shared-memory hand-off of result arrays from a worker process to its consumer.

Each worker owns one anonymous shared file (``memfd``) divided into ``slots``; the consumer
maps the same file. The worker copies the arrays of one result into a slot (or builds them
there, in memory the slot lends) and sends only ``(key, dtype, shape, offset)`` metadata over
a pipe; the consumer copies them out. A memfd
has no name, so nothing can be left in ``/dev/shm`` whatever kills either side, and no
resource tracker is involved. A slot grows (moves to the end of the file) when a result does
not fit, and the pages of its old region are freed at once (``MADV_REMOVE``); the consumer
remaps when an offset lies past its mapping, unmapping the old mapping (results are copies,
so no array refers to it). Each side holds one mapping of the file at any time, but for a
worker's mapping that arrays of a result being built still refer to (freed once they are).

Safety rests on one rule the caller keeps: a slot is reused only after the consumer has read
the result last written to it.

Also here: length-prefixed message framing for the task and result pipes. This module must
not import grain (a worker imports it; grain's import costs seconds).
"""

from __future__ import annotations

import math
import mmap
import os
import pickle
import struct
from collections.abc import Mapping

import numpy as np

_HEADER = struct.Struct("<Q")
_ALIGN = 64
_PAGE = mmap.PAGESIZE

# (key, dtype string, shape, byte offset in the shared file)
ArrayMeta = tuple[str, str, tuple[int, ...], int]


def check_result(result) -> dict[str, np.ndarray]:
    """``result`` as a ``dict[str, np.ndarray]``, or a TypeError naming the bad key and type.

    Object and structured dtypes are refused: they cannot be copied through shared memory as
    bytes. The caller adds which element it was to the error.
    """
    if not isinstance(result, Mapping):
        raise TypeError(
            f"ProcessMap fn must return dict[str, np.ndarray]; got {type(result).__name__}"
        )
    for key, value in result.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise TypeError(
                f"ProcessMap fn must return dict[str, np.ndarray]; key {key!r} holds "
                f"{type(value).__name__}: wrap it with np.asarray"
            )
        if value.dtype.hasobject or value.dtype.fields is not None:
            raise TypeError(
                f"ProcessMap fn result key {key!r} has dtype {value.dtype}; only plain "
                f"numeric, bool or fixed-width string dtypes go through shared memory"
            )
    return dict(result)


def _free(mapping: mmap.mmap, offset: int, length: int) -> None:
    """Gives the pages of a region nobody reads again back to the system (a hole in the file).

    Called for a slot's old region once it moved: the consumer has read the slot's last
    result (the reuse rule), so without this its memory stays taken until the pool closes.
    """
    try:
        mapping.madvise(mmap.MADV_REMOVE, offset, length)
    except (AttributeError, OSError):
        pass  # a kernel or sandbox without MADV_REMOVE: freed at close, as before


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class SlotWriter:
    """Worker side: writes result arrays into slots of the shared file ``fd``.

    ``fn`` may also build a result in place, in memory of its slot lent by :meth:`allocate`;
    :meth:`write` then describes the arrays that lie there instead of copying them.
    """

    def __init__(self, fd: int):
        self._fd = fd
        self._size = os.fstat(fd).st_size
        self._map: mmap.mmap | None = None
        self._address = 0  # of the file's first byte in ``_map``
        self._regions: dict[int, tuple[int, int]] = {}  # slot -> (offset, capacity)
        self._lent: dict[int, int] = {}  # slot -> bytes lent by `allocate` since its last write

    def allocate(self, slot: int, nbytes: int) -> np.ndarray:
        """``(nbytes,)`` uint8 memory in ``slot`` for the result :meth:`write` sends next from
        it; plain memory (copied by ``write``) if the slot would have to move to hold it after
        part of it was lent already."""
        lent = self._lent.get(slot, 0)
        offset, capacity = self._regions.get(slot, (0, -1))
        if lent + _aligned(nbytes) > capacity:
            if lent:
                return np.empty(nbytes, np.uint8)
            offset, _ = self._move(slot, nbytes)
        self._lent[slot] = lent + _aligned(nbytes)
        # frombuffer holds the mapping open (an export) for as long as the array lives.
        return np.frombuffer(self._map, np.uint8, count=nbytes, offset=offset + lent)

    def forget_lent(self, slot: int) -> None:
        """Forgets what :meth:`allocate` lent in ``slot`` for a result that will not be sent."""
        self._lent.pop(slot, None)

    def write(self, slot: int, arrays: dict[str, np.ndarray]) -> list[ArrayMeta]:
        """Copies ``arrays`` into ``slot`` (but for those already there, built in memory lent
        by :meth:`allocate`); returns the metadata the consumer needs to read them."""
        offset, capacity = self._regions.get(slot, (0, -1))
        lent = self._lent.pop(slot, 0)
        placed = {key: self._lent_offset(array, offset, lent) for key, array in arrays.items()}
        to_copy = [key for key, at in placed.items() if at is None]
        needed = lent + sum(_aligned(arrays[key].nbytes) for key in to_copy)
        old = None
        if needed > capacity:  # the slot moves: everything is copied to its new region
            placed, to_copy = dict.fromkeys(arrays), list(arrays)
            needed = sum(_aligned(array.nbytes) for array in arrays.values())
            old = (offset, capacity) if capacity > 0 else None
            (offset, capacity), lent = self._new_region(slot, needed), 0
        cursor = offset + lent
        for key in to_copy:
            array = arrays[key]
            if array.nbytes:
                target = np.ndarray(array.shape, array.dtype, buffer=self._map, offset=cursor)
                np.copyto(target, array, casting="no")
                del target
            placed[key] = cursor
            cursor += _aligned(array.nbytes)
        if old is not None:  # after the copies: arrays built in place may have lain there
            _free(self._map, *old)
        return [
            (key, array.dtype.str, tuple(array.shape), placed[key]) for key, array in arrays.items()
        ]

    def _lent_offset(self, array: np.ndarray, offset: int, lent: int) -> int | None:
        """The file offset of ``array`` if it lies in the ``lent`` bytes of the region at
        ``offset`` of the current mapping, as one C-contiguous block; else None."""
        if not lent or not array.nbytes or not array.flags.c_contiguous:
            return None
        at = array.ctypes.data - self._address
        return at if offset <= at and at + array.nbytes <= offset + lent else None

    def _move(self, slot: int, needed: int) -> tuple[int, int]:
        """Gives ``slot`` a new region for ``needed`` bytes and frees its old one, whose last
        result the consumer has read (the reuse rule)."""
        old = self._regions.get(slot)
        region = self._new_region(slot, needed)
        if old is not None:
            _free(self._map, *old)
        return region

    def _new_region(self, slot: int, needed: int) -> tuple[int, int]:
        # Room for 25% growth, so results that vary a little do not move every time.
        capacity = max(_PAGE, -(-(needed + needed // 4) // _PAGE) * _PAGE)
        offset = self._size
        self._grow(offset + capacity)
        self._regions[slot] = (offset, capacity)
        return offset, capacity

    def _grow(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # arrays of a result still refer to it: unmapped once they are gone
        self._map = mmap.mmap(self._fd, size)
        self._address = np.frombuffer(self._map, np.uint8, count=1).ctypes.data
        self._size = size


class SlotReader:
    """Consumer side: copies result arrays out of the shared file ``fd`` the worker writes."""

    def __init__(self, fd: int):
        self._fd = fd
        self._map: mmap.mmap | None = None
        self._size = 0

    def read(self, metas: list[ArrayMeta]) -> dict[str, np.ndarray]:
        """The arrays described by ``metas``, copied: they stay valid after the slot is reused."""
        result = {}
        for key, dtype, shape, offset in metas:
            array_dtype = np.dtype(dtype)
            nbytes = math.prod(shape) * array_dtype.itemsize
            if nbytes == 0:
                result[key] = np.empty(shape, array_dtype)
                continue
            if offset + nbytes > self._size:
                self._remap(offset + nbytes)
            view = np.ndarray(shape, array_dtype, buffer=self._map, offset=offset)
            result[key] = view.copy()
            del view
        return result

    def _remap(self, needed: int) -> None:
        size = os.fstat(self._fd).st_size
        if size < needed:
            raise RuntimeError(
                f"shared result buffer holds {size} bytes but a result ends at byte {needed}: "
                f"the worker and the consumer disagree on its layout"
            )
        if self._map is not None:
            self._map.close()
        self._map = mmap.mmap(self._fd, size, access=mmap.ACCESS_READ)
        self._size = size

    def close(self) -> None:
        """Unmaps the file (the caller closes ``fd``)."""
        if self._map is not None:
            self._map.close()
            self._map = None


HEADER_SIZE = _HEADER.size


def frame_message(message) -> bytes:
    """``message`` pickled behind its length: the bytes :func:`send_message` writes."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def payload_length(header: bytes) -> int:
    """The payload length a ``HEADER_SIZE``-byte message header announces."""
    return _HEADER.unpack(header)[0]


def send_message(fd: int, message) -> None:
    """Writes one pickled, length-prefixed message to pipe ``fd`` (blocking)."""
    view = memoryview(frame_message(message))
    while view:
        view = view[os.write(fd, view) :]


def receive_message(fd: int):
    """Reads one message from pipe ``fd`` (blocking); ``EOFError`` once the writer is gone.

    Only for pipes between this process and its own workers: the payload is a pickle.
    """
    length = payload_length(_read_exactly(fd, HEADER_SIZE))
    return pickle.loads(_read_exactly(fd, length))  # ipc-pickle


def _read_exactly(fd: int, count: int) -> bytes:
    chunks = []
    while count:
        chunk = os.read(fd, min(count, 1 << 20))
        if not chunk:
            raise EOFError("pipe closed by the other side")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)
