"""Tests for wf_data.data.prepare.input_streams: frames, damaged streams, bounded lines."""

import gzip
import os

import pytest
import zstandard

from wf_data.data.prepare.input_streams import InputFileError, byte_chunks, lines

PAYLOAD = b"".join(b'{"text": "doc %d"}\n' % i for i in range(20_000))


def _compress(compression: str, data: bytes) -> bytes:
    if compression == "gzip":
        return gzip.compress(data)
    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_concatenated_frames_read_whole(tmp_path, compression):
    path = tmp_path / "in"
    path.write_bytes(_compress(compression, PAYLOAD[:999]) + _compress(compression, PAYLOAD[999:]))
    assert b"".join(byte_chunks(str(path), compression)) == PAYLOAD


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: len(data) // 2], "truncated"),
        (lambda data: data[:-3], "truncated"),  # only the end of the last frame lost
        (lambda data: os.urandom(3000), "corrupt"),
        (lambda data: b"", "empty file"),
        (lambda data: data + b"\x00garbage after the frame", "corrupt"),
    ],
    ids=["half", "last-bytes", "random", "empty", "trailing-garbage"],
)
def test_damaged_stream_is_a_file_error(tmp_path, compression, damage, message):
    path = tmp_path / "in.compressed"
    path.write_bytes(damage(_compress(compression, PAYLOAD)))
    with pytest.raises(InputFileError, match=rf"{path}: {message}"):
        list(lines(byte_chunks(str(path), compression), 1000))


def test_lines_of_a_range_and_over_long_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"ab\ncd\n\n" + b"x" * 50 + b"\nz")
    assert list(lines(byte_chunks(str(path), None), 10)) == [b"ab", b"cd", b"", 50, b"z"]
    assert list(lines(byte_chunks(str(path), None, 3, 7), 10)) == [b"cd", b""]
    # a line split across chunks; one over the limit never held whole
    chunks = iter([b"ab\nc", b"d", b"ef\n", b"y" * 30, b"y" * 30, b"\nlast"])
    assert list(lines(chunks, 20)) == [b"ab", b"cdef", 60, b"last"]
