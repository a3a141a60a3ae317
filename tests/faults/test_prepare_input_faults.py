"""Hostile inputs to `wf-data prepare`, for real (issue 19 cases 2 and 10).

A lone UTF-16 surrogate in a record (jsonl escape, invalid UTF-8 in a parquet string column),
and a flipped byte in a `.jsonl.zst`: each is a bad record named by file and line, or a
damaged file, never a library traceback or silently altered text. (Case 12, memory, is in
test_prepare_faults.py beside the 45 MB document.)
"""

import json
import pathlib
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tests.faults._prepare_helpers import WordTokenizer, run_cli, write_jsonl
from wf_data import cli
from wf_data.data.prepare import BadInputError, prepare
from wf_data.data.shards import sources

SURROGATE_RECORDS = {
    "text": [{"text": "fine"}, '{"text": "x \\ud800 y"}', {"text": "ok"}],
    "chat": [
        {"messages": [{"role": "user", "content": "fine"}]},
        '{"messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "x \\udc00"}]}',
        {"messages": [{"role": "user", "content": "ok"}]},
    ],
    "nemotron": [
        {"input": "fine", "output": "yes"},
        '{"input": "q", "output": "a \\uDBFF b"}',
        {"input": "ok", "output": "yes"},
    ],
}
CHAT_OPTIONS = {"text": {}, "chat": {"chat_key": "messages"}, "nemotron": {"input_key": "input"}}


def _stored(out):
    source = sources.open_dataset(out)
    return source.__getitems__(range(len(source)))


@pytest.mark.parametrize(
    ("kind", "tokenizer"),
    [("text", None), ("text", "words"), ("chat", None), ("nemotron", None)],  # chat: as text
)
def test_lone_surrogate_is_a_bad_record(tmp_path, kind, tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", SURROGATE_RECORDS[kind])
    options = dict(CHAT_OPTIONS[kind], tokenizer=WordTokenizer() if tokenizer else None)
    with pytest.raises(
        BadInputError, match=rf"{re.escape(str(path))}:2: .*lone UTF-16 surrogate \\ud[8bc]"
    ):
        prepare(path, tmp_path / "out", progress=False, **options)
    manifest = prepare(path, tmp_path / "out", progress=False, skip_bad=True, **options)
    assert manifest["totals"]["records"] == 2 and manifest["totals"]["skipped_bad"] == 1
    skipped = (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()
    assert [json.loads(line)["record"] for line in skipped] == [f"{path}:2"]
    assert len(_stored(tmp_path / "out")) == 2


def test_surrogate_pair_is_text_not_a_bad_record(tmp_path):
    """A valid escaped pair is one character outside the BMP: kept, byte for byte."""
    path = write_jsonl(tmp_path / "in.jsonl", ['{"text": "smile \\ud83d\\ude00"}'])
    prepare(path, tmp_path / "out", progress=False)
    assert _stored(tmp_path / "out") == ["smile \U0001f600"]


def _invalid_utf8_strings(values: list[bytes]) -> pa.Array:
    """A parquet `string` column holding the bytes as they are (another writer's bad UTF-8)."""
    binary = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(binary), binary.buffers())


def test_invalid_utf8_in_parquet_is_a_bad_record(tmp_path, capsys):
    values = [b"fine", b"x \xed\xa0\x80 y", b"ok"]  # the UTF-8 form of the surrogate U+D800
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"text": _invalid_utf8_strings(values)}), text)
    contents = _invalid_utf8_strings([b"fine", b"bad \xff", b"ok"])
    messages = pa.ListArray.from_arrays(
        pa.array([0, 1, 2, 3], pa.int32()),
        pa.StructArray.from_arrays([pa.array(["user"] * 3), contents], ["role", "content"]),
    )
    chat = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": messages}), chat)
    for path, flags in ((text, []), (chat, ["--chat-key", "messages"])):
        out = tmp_path / f"out-{path.stem}"
        argv = ["prepare", str(path), "--out", str(out), "--quiet", *flags]
        assert cli.main(argv) == 1
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"wf-data prepare: error: {path}: row 2: ") and "UTF-8" in error
        assert "\n" not in error
        assert cli.main([*argv, "--skip-bad"]) == 0
        assert "skipped bad 1" in capsys.readouterr().out
        assert len(_stored(out)) == 2


@pytest.mark.slow
def test_lone_surrogate_with_the_shipped_tokenizer_cli(tmp_path):
    """The reported command: `--tokenizer wf-data-demo --skip-bad` (a TypeError traceback)."""
    path = write_jsonl(tmp_path / "in.jsonl", SURROGATE_RECORDS["text"])
    out = tmp_path / "out"
    argv = ["prepare", str(path), "--out", str(out), "--tokenizer", "wf-data-demo"]
    result = run_cli(*argv, "--quiet", "--skip-bad")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert f"{path}:2: field 'text' holds a lone UTF-16 surrogate" in result.stdout
    assert len(_stored(out)) == 2


ZST_ROWS = [
    json.dumps({"text": f"document number {i} " + "word " * (i % 7)}) + "\n" for i in range(2000)
]


def _flipped_zst(path: pathlib.Path, checksum: bool) -> None:
    """Write ZST_ROWS zstd-compressed with one bit flipped where the frame still decodes, to
    JSON lines with altered text: only a content checksum can tell."""
    text = "".join(ZST_ROWS).encode()
    plain = zstandard.ZstdCompressor(write_checksum=False).compress(text)
    for position in range(len(plain) // 2, len(plain)):
        damaged = bytearray(plain)
        damaged[position] ^= 0x01
        try:
            altered = zstandard.ZstdDecompressor().decompressobj().decompress(bytes(damaged))
            [json.loads(line) for line in altered.splitlines()]
        except (zstandard.ZstdError, ValueError):
            continue
        if altered != text:
            break
    else:
        raise AssertionError("no bit found whose flip still decodes")
    # The checksum flag changes only the frame header's flags and adds a trailer: the same
    # position holds the same compressed byte.
    data = bytearray(zstandard.ZstdCompressor(write_checksum=checksum).compress(text))
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("checksum", [True, False], ids=["with-checksum", "no-checksum"])
def test_flipped_byte_in_zst(tmp_path, checksum):
    path = tmp_path / "docs.jsonl.zst"
    _flipped_zst(path, checksum)
    out = tmp_path / "out"
    result = run_cli("prepare", str(path), "--out", str(out), "--skip-bad", "--quiet")
    lines = result.stderr.strip().splitlines()
    if checksum:  # the damage is found: a damaged file, exit 2, no dataset
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert f"{path}: corrupt zstd stream" in lines[0] and "checksum" in lines[0]
        assert not out.exists()
    else:  # it cannot be found: said once, before the text is used
        assert result.returncode == 0, result.stderr
        warnings = [line for line in lines if "warning" in line]
        assert len(warnings) == 1, result.stderr
        assert f"{path}: its zstd frames carry no content checksum" in warnings[0]


def test_zst_with_checksums_gives_no_warning(tmp_path, recwarn):
    path = tmp_path / "docs.jsonl.zst"
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    # two frames, as `cat a.zst b.zst` makes them
    path.write_bytes(b"".join(compressor.compress("".join(rows).encode()) for rows in
                              (ZST_ROWS[:1000], ZST_ROWS[1000:])))  # fmt: skip
    manifest = prepare(path, tmp_path / "out", progress=False)
    assert manifest["totals"]["records"] == 2000
    assert [str(w.message) for w in recwarn if "checksum" in str(w.message)] == []


def test_zst_frame_without_checksum_among_checked_ones_warns(tmp_path):
    path = tmp_path / "docs.jsonl.zst"
    frames = [
        zstandard.ZstdCompressor(write_checksum=True).compress("".join(ZST_ROWS[:1000]).encode()),
        zstandard.ZstdCompressor(write_checksum=False).compress("".join(ZST_ROWS[1000:]).encode()),
    ]
    path.write_bytes(b"".join(frames))
    with pytest.warns(UserWarning, match="carry no content checksum") as caught:
        prepare(path, tmp_path / "out", progress=False)
    assert len([w for w in caught if "checksum" in str(w.message)]) == 1
