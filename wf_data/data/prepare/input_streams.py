"""Bytes and lines of `prepare`'s input files, read in bounded memory, refusing damaged files.

A compressed input (`.gz`, `.zst`) is decompressed frame by frame (gzip members, zstd frames,
concatenated ones included), verifying the checksums the frames carry (a `.zst` whose frames
carry none is warned about once); a stream that is empty, ends inside a frame or is not of its
format raises `InputFileError` naming the file: such a file has lost an unknown number of
records, so no flag skips it. Lines come whole up to a size limit; a longer line is reported
by its size and its bytes are dropped as they stream by, so one huge record never has to fit
in memory before it is refused.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterator
from typing import BinaryIO

READ_BYTES = 1 << 20  # plain input read per call
COMPRESSED_READ_BYTES = 64 << 10  # compressed input per call: bounds the decompressed chunk

__all__ = ["InputFileError", "byte_chunks", "lines"]


class InputFileError(ValueError):
    """An input file that cannot be read as a whole (empty, truncated or corrupt compressed
    stream); the message names the file and the fix. Never skipped, even with `skip_bad`."""


def byte_chunks(
    path: str, compression: str | None, start: int = 0, stop: int | None = None
) -> Iterator[bytes]:
    """The bytes of `path`: `[start, stop)` of a plain file, or all of a decompressed one.

    `compression` is None, "gzip" or "zstd". Raises `InputFileError` for a zero-byte, truncated
    or corrupt compressed file (after yielding what came before the damage).
    """
    with open(path, "rb") as f:
        if compression is None:
            yield from _plain(f, start, stop)
        else:
            yield from _decompressed(f, path, compression)


def _plain(f: BinaryIO, start: int, stop: int | None) -> Iterator[bytes]:
    f.seek(start)
    remaining = None if stop is None else stop - start
    while remaining is None or remaining > 0:
        chunk = f.read(READ_BYTES if remaining is None else min(READ_BYTES, remaining))
        if not chunk:
            return
        if remaining is not None:
            remaining -= len(chunk)
        yield chunk


def _decoder(compression: str):
    if compression == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip header and trailer
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


def _decompressed(f: BinaryIO, path: str, compression: str) -> Iterator[bytes]:
    import zstandard

    data = f.read(COMPRESSED_READ_BYTES)
    if not data:
        raise InputFileError(
            f"{path}: empty file (0 bytes) is not a {compression} stream; re-create it or "
            "leave it out of the inputs"
        )
    decoder, offset, unchecked = None, 0, False
    while data:
        if decoder is None and compression == "zstd" and not unchecked:
            while len(data) < len(_ZSTD_MAGIC) + 1 and (more := f.read(COMPRESSED_READ_BYTES)):
                data += more
            unchecked = _warn_if_unchecked(data, path)
        decoder = decoder or _decoder(compression)
        try:
            out = decoder.decompress(data)
        except (zlib.error, zstandard.ZstdError) as error:
            raise InputFileError(
                f"{path}: corrupt {compression} stream near compressed byte {offset:,} "
                f"({error}); re-create or re-download the file"
            ) from None
        if out:
            yield out
        if decoder.eof:  # end of a member / frame: what follows starts the next one
            data, decoder = decoder.unused_data, None
            if data:
                continue
        offset += len(data)
        data = f.read(COMPRESSED_READ_BYTES)
    if decoder is not None:
        raise InputFileError(
            f"{path}: truncated {compression} stream (it ends inside a compressed frame, after "
            f"{offset:,} bytes): the file is incomplete; re-create or re-download it"
        )


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_CHECKSUM_FLAG = 0x04  # in the frame header descriptor, the byte after the magic


def _warn_if_unchecked(frame: bytes, path: str) -> bool:
    """Warn (and return True) if the zstd frame at the start of `frame` carries no content
    checksum: damage inside it can decode to other text, which nothing could detect. libzstd
    verifies the checksum of frames that carry one (gzip members always carry a CRC-32)."""
    if frame[: len(_ZSTD_MAGIC)] != _ZSTD_MAGIC or len(frame) <= len(_ZSTD_MAGIC):
        return False  # a skippable frame (no content), or not zstd: the decoder says so
    if frame[len(_ZSTD_MAGIC)] & _ZSTD_CHECKSUM_FLAG:
        return False
    warnings.warn(
        f"{path}: its zstd frames carry no content checksum, so a damaged byte may decode to "
        "other text unnoticed; compress with checksums (zstd -C, the zstd tool's default; "
        "write_checksum=True in python-zstandard) to have them verified",
        UserWarning,
        stacklevel=2,
    )
    return True


def lines(chunks: Iterator[bytes], max_line_bytes: int) -> Iterator[bytes | int]:
    """The lines of a byte stream, without their `\\n`; the last one may lack it.

    A line longer than `max_line_bytes` is yielded as its length (an `int`) instead; its
    bytes are dropped as they arrive, so memory stays within about one chunk plus one line.
    """
    pending: list[bytes] = []  # pieces of the current line
    size = 0  # its length so far
    for chunk in chunks:
        pieces = chunk.split(b"\n")
        for piece in pieces[:-1]:
            size += len(piece)
            if size > max_line_bytes:
                yield size
            elif pending:
                pending.append(piece)
                joined = b"".join(pending)
                pending.clear()  # drop the pieces before handing out the line
                yield joined
            else:
                yield piece
            pending.clear()
            size = 0
        size += len(pieces[-1])
        if size > max_line_bytes:
            pending.clear()
        elif pieces[-1]:
            pending.append(pieces[-1])
    if size > max_line_bytes:
        yield size
    elif size:
        yield b"".join(pending)
