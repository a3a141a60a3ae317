"""Tests for wf_data.data.prepare.run: inputs, determinism, resume, bad input, dtypes."""

import gzip
import importlib
import json
import os
import pathlib

import numpy as np
import pytest

from wf_data import atomic
from wf_data.data.prepare import BadInputError, OutDirError, prepare
from wf_data.data.prepare import out_dir as out_dir_lib
from wf_data.data.prepare.out_dir import WORK_DIR_NAME
from wf_data.data.shards import sources

# The module, not the `prepare` function that `wf_data.data` exports under the same name.
prepare_module = importlib.import_module("wf_data.data.prepare.run")
encoding = importlib.import_module("wf_data.data.prepare.encoding")


class SimulatedKill(BaseException):
    """Stands in for kill -9: nothing after the raise point runs (not even except Exception)."""


WORDS = "the a cat dog sat on mat ran far away big small red".split()


def _make_tokenizer(directory: pathlib.Path, extra_words: int = 0) -> pathlib.Path:
    """A WordLevel tokenizer over WORDS (+ `extra_words` filler entries), saved offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1}
    for word in WORDS + [f"w{i}" for i in range(extra_words)]:
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", unk_token="[UNK]"
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return _make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def loaded_tokenizer(tiny_tokenizer):
    from wf_data.data.text.tokenization import TokenizerWrapper

    return TokenizerWrapper.from_pretrained(tiny_tokenizer, add_bos=False, add_eos=False)


def _texts(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng([seed, 0])
    return [" ".join(rng.choice(WORDS, rng.integers(1, 25))) for _ in range(n)]


def _write_jsonl(path: pathlib.Path, rows, opener=open) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture
def corpus(tmp_path):
    """Three jsonl files (60 docs each) in a directory; returns (dir, texts in order)."""
    texts = []
    for i in range(3):
        docs = _texts(i, 60)
        _write_jsonl(
            tmp_path / "in" / f"part{i}.jsonl", [{"text": t, "id": j} for j, t in enumerate(docs)]
        )
        texts += docs
    return tmp_path / "in", texts


def _files(out_dir: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir()) if p.is_file()}


def _run(inputs, out_dir, **kwargs):
    kwargs.setdefault("progress", False)
    return prepare(inputs, out_dir, **kwargs)


def test_tokens_round_trip(corpus, tmp_path, tiny_tokenizer, loaded_tokenizer):
    in_dir, texts = corpus
    manifest = _run(
        [in_dir], tmp_path / "out", tokenizer=tiny_tokenizer, num_shards=4, piece_bytes=1500
    )
    source = sources.open_dataset(tmp_path / "out")
    assert manifest["format"] == "tokens" and manifest["token_dtype"] == "uint16"
    assert manifest["tokenizer"]["sha256"] == loaded_tokenizer.fingerprint()
    assert len(source) == len(texts) == manifest["totals"]["records"]
    assert [s["records"] for s in manifest["shards"]] == [45, 45, 45, 45]
    expected = loaded_tokenizer.encode_batch(texts)
    for i in (0, 44, 45, 100, 179):
        np.testing.assert_array_equal(source[i], expected[i])
    np.testing.assert_array_equal(source.lengths, [len(e) for e in expected])
    assert manifest["totals"]["tokens"] == sum(len(e) for e in expected)
    assert not (tmp_path / "out" / ".wf-prepare" / "part-000000.array_record").exists()


def test_deterministic_and_independent_of_workers(corpus, tmp_path, tiny_tokenizer):
    in_dir, _ = corpus
    options = dict(tokenizer=tiny_tokenizer, num_shards=3, piece_bytes=1500, append_eos=True)
    _run([in_dir], tmp_path / "a", workers=1, **options)
    _run([in_dir], tmp_path / "b", workers=1, **options)
    _run([in_dir], tmp_path / "c", workers=2, **options)
    assert _files(tmp_path / "a") == _files(tmp_path / "b") == _files(tmp_path / "c")
    # 3 shards, lengths.npy, record_offsets.npy, block_crc32.npy, manifest.json
    assert len(_files(tmp_path / "a")) == 7


def test_backend_encoder_matches_encode_batch(tiny_tokenizer):
    from wf_data.data.text.tokenization import TokenizerWrapper

    texts = _texts(5, 20) + ["zebra unknown the"]
    for add_bos, add_eos in [(False, False), (False, True)]:
        wrapper = TokenizerWrapper.from_pretrained(tiny_tokenizer, add_bos=add_bos, add_eos=add_eos)
        encoder = encoding._BackendEncoder(wrapper)
        for ours, theirs in zip(
            encoder.encode_batch(texts), wrapper.encode_batch(texts), strict=True
        ):
            np.testing.assert_array_equal(ours, theirs)


def test_input_types_and_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root = tmp_path / "in"
    _write_jsonl(root / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    _write_jsonl(root / "b" / "c.jsonl.gz", [{"text": "three"}], opener=gzip.open)
    (root / "b" / "d.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b'{"text": "four"}\n{"text": "five"}\n')
    )
    table = pa.table({"text": ["six", "seven", "eight"]})
    pq.write_table(table, root / "e.parquet", row_group_size=2)
    (root / "f.txt").write_text("nine\nstill nine\n")
    (root / "ignored.csv").write_text("x")
    (root / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    (root / "link.jsonl").symlink_to(root / "a.jsonl")  # hidden from the walk by the dedupe
    # a.jsonl three times: in the directory walk, by name, and through a link
    with pytest.warns(UserWarning, match=r"a\.jsonl, given more than once; it is prepared once"):
        _run([root, root / "a.jsonl"], tmp_path / "out", num_shards=2)
    source = sources.open_dataset(tmp_path / "out")
    assert source.format == "text" and source.lengths is None
    assert list(source.__getitems__(range(len(source)))) == [
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine\nstill nine\n",
    ]


def test_chat_records(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages, "x": 1}, {"messages": []}])
    manifest = _run([path], tmp_path / "out", chat_key="messages", num_shards=1)
    assert manifest["format"] == "chat" and manifest["totals"]["dropped_empty"] == 1
    assert sources.open_dataset(tmp_path / "out")[0] == {"messages": messages}
    with pytest.raises(ValueError, match="not both"):
        _run([path], tmp_path / "x", chat_key="messages", tokenizer="wf-data-demo")


BAD_CASES = [
    ('{"text": "ok"}\n{"text": broken}\n', r"bad\.jsonl:2: malformed JSON"),
    (
        '{"text": "ok"}\n\n{"body": "x"}\n',
        r"bad\.jsonl:3: missing key 'text' \(record keys: \['body'\]\)",
    ),
    ('{"text": 5}\n', r"bad\.jsonl:1: field 'text' must be a string, got int"),
    ('{"text": null}\n', r"bad\.jsonl:1: field 'text' must be a string, got NoneType"),
    ('["text"]\n', r"bad\.jsonl:1: expected a JSON object, got list"),
    (
        b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
        r"bad\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 14\)",
    ),
]


@pytest.mark.parametrize(("content", "message"), BAD_CASES)
def test_bad_input_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(BadInputError, match=message):
        _run([path], tmp_path / "out", num_shards=1)
    assert not (tmp_path / "out" / "manifest.json").exists()
    manifest = _run([path], tmp_path / "skip", num_shards=1, skip_bad=True)
    assert manifest["totals"]["skipped_bad"] == 1
    assert manifest["totals"]["records"] == content.count(
        b'"ok"' if isinstance(content, bytes) else '"ok"'
    )


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hi", r"chat\.jsonl:1: field 'messages': chat messages must be a list of .* got str"),
        (
            [{"role": "user"}],
            r"chat\.jsonl:1: field 'messages' message 0 .*'content' must be a str",
        ),
        (
            [{"role": "user", "content": 3}],
            r"message 0 \(role 'user'\): field 'content' must be a string, got int",
        ),
        ([{"role": "robot", "content": "hi"}], r"message 0: unknown role 'robot'; valid roles"),
    ],
)
def test_bad_chat(tmp_path, messages, message):
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    with pytest.raises(BadInputError, match=message):
        _run([path], tmp_path / "out", chat_key="messages", num_shards=1)


def test_bad_parquet_and_txt(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "t.parquet")
    with pytest.raises(BadInputError, match=r"t\.parquet: row 2: field 'text' must be a string"):
        _run([tmp_path / "t.parquet"], tmp_path / "o1", num_shards=1)
    with pytest.raises(BadInputError, match=r"t\.parquet: no column 'body' \(columns: \['text'\]"):
        _run([tmp_path / "t.parquet"], tmp_path / "o2", num_shards=1, text_key="body")
    (tmp_path / "t.txt").write_bytes(b"fine\nalso fine\nbad \xff here\n")
    with pytest.raises(BadInputError, match=r"t\.txt:3: not valid UTF-8 \(byte 0xff at column 5\)"):
        _run([tmp_path / "t.txt"], tmp_path / "o3", num_shards=1)
    with pytest.raises(ValueError, match="unsupported input type"):
        _run(
            [tmp_path / "x.csv"] if (tmp_path / "x.csv").write_text("") == 0 else [],
            tmp_path / "o4",
        )


def test_error_line_numbers_in_later_pieces(tmp_path):
    rows = [{"text": f"doc {i} " + "pad " * 20} for i in range(100)]
    rows[77] = "{oops"
    path = _write_jsonl(tmp_path / "big.jsonl", rows)
    tasks = prepare_module.plan_tasks([path], piece_bytes=1000)
    assert len(tasks) > 5 and tasks[0].start == 0 and tasks[-1].stop == path.stat().st_size
    assert all(a.stop == b.start for a, b in zip(tasks, tasks[1:], strict=False))
    with pytest.raises(BadInputError, match=r"big\.jsonl:78: malformed JSON"):
        _run([path], tmp_path / "out", num_shards=2, piece_bytes=1000)


def test_empty_documents_dropped_and_counted(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "cat"}, {"text": "  \n"}])
    manifest = _run([path], tmp_path / "out", tokenizer=tiny_tokenizer, num_shards=1)
    assert manifest["totals"]["dropped_empty"] == 2 and manifest["totals"]["records"] == 1


def test_append_eos(corpus, tmp_path, tiny_tokenizer, loaded_tokenizer):
    in_dir, texts = corpus
    _run([in_dir], tmp_path / "out", tokenizer=tiny_tokenizer, num_shards=2, append_eos=True)
    source = sources.open_dataset(tmp_path / "out")
    assert source.manifest["append_eos"] is True
    eos = loaded_tokenizer.eos_id
    assert all(doc[-1] == eos for doc in source.__getitems__(range(len(source))))
    np.testing.assert_array_equal(source[3][:-1], loaded_tokenizer.encode(texts[3]))


def test_uint32_for_large_vocab(tmp_path):
    big = _make_tokenizer(tmp_path / "big", extra_words=70_000)
    path = _write_jsonl(tmp_path / "in.jsonl", [{"text": "cat w69999 dog"}])
    manifest = _run([path], tmp_path / "out", tokenizer=big, num_shards=1)
    assert manifest["token_dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] > 65536
    doc = sources.open_dataset(tmp_path / "out")[0]
    assert doc.dtype == np.uint32 and doc[1] == 70_000 + len(WORDS) + 1


def _shard_stats(out_dir):
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(out_dir.glob("*.array_record"))
    }


def test_resume_after_kill_between_shards(corpus, tmp_path, tiny_tokenizer, monkeypatch):
    in_dir, _ = corpus
    options = dict(tokenizer=tiny_tokenizer, num_shards=4, piece_bytes=1500)
    _run([in_dir], tmp_path / "clean", **options)

    real_assemble = prepare_module.assemble_shard

    def killed_at_shard_2(out_dir, shard):
        if shard == 2:
            raise SimulatedKill()
        return real_assemble(out_dir, shard)

    monkeypatch.setattr(prepare_module, "assemble_shard", killed_at_shard_2)
    out = tmp_path / "out"
    build = out_dir_lib.build_dir(out)
    with pytest.raises(SimulatedKill):
        _run([in_dir], out, **options)
    assert not out.exists()  # the dataset appears only once complete
    assert not (build / "manifest.json").exists()
    finished = _shard_stats(build)
    assert sorted(finished) == [
        "data-00000-of-00004.array_record",
        "data-00001-of-00004.array_record",
    ]
    # a half-written shard from the killed process must not count as finished, and temp files
    # of killed writers (unique names, never reused) must not end up in the dataset
    stale = [
        atomic.temp_path(build / "data-00002-of-00004.array_record"),
        atomic.temp_path(build / sources.LENGTHS_NAME),
        atomic.temp_path(build / WORK_DIR_NAME / "shard-00002.lengths.npy"),
        atomic.temp_path(build / WORK_DIR_NAME / "plan.json"),
    ]
    for path in stale:
        path.write_bytes(b"half")
    (build / "data-00003-of-00004.array_record").write_bytes(b"garbage, no marker")

    monkeypatch.setattr(prepare_module, "assemble_shard", real_assemble)
    calls = []
    real_prepare_file = prepare_module.prepare_file
    monkeypatch.setattr(
        prepare_module,
        "prepare_file",
        lambda *a, **k: calls.append(a) or real_prepare_file(*a, **k),
    )
    manifest = _run([in_dir], out, **options)
    assert calls == []  # every part was finished: no input is read again
    assert manifest["summary"]["shards_written"] == 2
    after = _shard_stats(out)
    for name, stat in finished.items():
        assert after[name] == stat  # not rewritten (moved by the swap): same inode and mtime
    assert _files(out) == _files(tmp_path / "clean") and not build.exists()
    assert not atomic.temp_files(out / WORK_DIR_NAME)
    assert sources.open_dataset(out).fingerprint == manifest["fingerprint"]


def test_resume_after_kill_between_parts(corpus, tmp_path, tiny_tokenizer, monkeypatch):
    in_dir, _ = corpus
    options = dict(tokenizer=tiny_tokenizer, num_shards=2, piece_bytes=1500)
    real_prepare_file = prepare_module.prepare_file
    calls, killed = [], []

    def killed_at_third_part(task, part_path, **kwargs):
        calls.append(pathlib.Path(part_path).name)
        if len(calls) == 3 and not killed:
            killed.append(True)
            raise SimulatedKill()
        return real_prepare_file(task, part_path, **kwargs)

    monkeypatch.setattr(prepare_module, "prepare_file", killed_at_third_part)
    with pytest.raises(SimulatedKill):
        _run([in_dir], tmp_path / "out", **options)
    total_parts = len(prepare_module.plan_tasks(prepare_module.expand_inputs([in_dir]), 1500))
    calls.clear()
    _run([in_dir], tmp_path / "out", **options)
    assert calls[0] == "part-000002.array_record" and len(calls) == total_parts - 2
    _run([in_dir], tmp_path / "clean", **options)
    assert _files(tmp_path / "out") == _files(tmp_path / "clean")


def test_rerun_finished_and_after_losing_a_shard(corpus, tmp_path, tiny_tokenizer):
    in_dir, _ = corpus
    options = dict(tokenizer=tiny_tokenizer, num_shards=3)
    out = tmp_path / "out"
    _run([in_dir], out, **options)
    reference, stats = _files(out), _shard_stats(out)
    manifest = _run([in_dir], out, **options)
    assert manifest["summary"]["shards_written"] == 0 and _shard_stats(out) == stats
    assert manifest["fingerprint"] == sources.read_manifest(out)["fingerprint"]
    # a damaged dataset of the same plan is built again beside it and swapped in
    (out / "data-00001-of-00003.array_record").unlink()
    manifest = _run([in_dir], out, **options)
    assert manifest["summary"]["shards_written"] == 3
    assert _files(out) == reference


def test_changed_options_refused_unless_overwrite(corpus, tmp_path, tiny_tokenizer):
    in_dir, _ = corpus
    out = tmp_path / "out"
    first = _run([in_dir], out, tokenizer=tiny_tokenizer, num_shards=2)
    reference = _files(out)
    with pytest.raises(OutDirError, match=r"append_eos False -> True.*--overwrite"):
        _run([in_dir], out, tokenizer=tiny_tokenizer, num_shards=2, append_eos=True)
    extra = in_dir / "more.jsonl"
    _write_jsonl(extra, [{"text": "the cat"}])
    with pytest.raises(OutDirError, match=r"input added: .*more\.jsonl"):
        _run([in_dir], out, tokenizer=tiny_tokenizer, num_shards=2)
    extra.unlink()
    assert _files(out) == reference and not out_dir_lib.build_dir(out).exists()
    second = _run(
        [in_dir], out, tokenizer=tiny_tokenizer, num_shards=2, append_eos=True, overwrite=True
    )
    assert second["summary"]["shards_written"] == 2
    assert second["fingerprint"] != first["fingerprint"]
    assert second["totals"]["tokens"] == first["totals"]["tokens"] + first["totals"]["records"]
    assert sources.open_dataset(out).fingerprint == second["fingerprint"]


def test_out_dir_with_other_files_refused(corpus, tmp_path):
    in_dir, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutDirError, match=r"holds files prepare did not write \(notes\.txt\)"):
        _run([in_dir], out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()  # an empty directory is fine
    assert _run([in_dir], out)["totals"]["records"] == 180


def test_manifest_written_last(corpus, tmp_path, monkeypatch):
    in_dir, _ = corpus
    order = []
    real_write = atomic.write_json
    monkeypatch.setattr(
        atomic,
        "write_json",
        lambda path, obj, **kw: order.append(os.path.basename(path)) or real_write(path, obj, **kw),
    )
    _run([in_dir], tmp_path / "out", num_shards=2)
    assert order[-1] == "manifest.json" and order.count("manifest.json") == 1


# --------------------------------------------------------------------------- several text fields

SYNTH_ROWS = [
    {"query": "q0", "reasoning": "r0", "answer": "a0"},
    {"query": "q1", "reasoning": "", "answer": "a1"},  # empty field: left out of the join
    {"query": "q2", "reasoning": " \n", "answer": "a2"},  # whitespace-only counts as empty
    {"query": "", "reasoning": "", "answer": ""},  # every field empty: dropped as empty
]
SYNTH_JOINED = ["q0\n\nr0\n\na0", "q1\n\na1", "q2\n\na2"]


def test_several_text_keys_joined_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_jsonl(tmp_path / "in" / "a.jsonl", SYNTH_ROWS)
    table = pa.table({key: [row[key] for row in SYNTH_ROWS] for key in SYNTH_ROWS[0]})
    pq.write_table(table, tmp_path / "in" / "b.parquet", row_group_size=3)
    keys = ["query", "reasoning", "answer"]
    manifest = _run([tmp_path / "in"], tmp_path / "out", text_key=keys, num_shards=2)
    source = sources.open_dataset(tmp_path / "out")
    assert list(source.__getitems__(range(len(source)))) == SYNTH_JOINED * 2
    assert manifest["totals"]["dropped_empty"] == 2
    assert manifest["input_fields"] == {"text_key": keys, "text_separator": "\n\n"}
    assert sources.read_manifest(tmp_path / "out")["input_fields"] == manifest["input_fields"]

    _run([tmp_path / "in" / "a.jsonl"], tmp_path / "sep", text_key=keys[::-1], text_separator=" | ")
    assert sources.open_dataset(tmp_path / "sep")[0] == "a0 | r0 | q0"
    # one key: the value is kept as it is (no stripping), as before
    _write_jsonl(tmp_path / "one.jsonl", [{"text": "  spaced \n"}])
    _run([tmp_path / "one.jsonl"], tmp_path / "one", text_key=["text"])
    assert sources.open_dataset(tmp_path / "one")[0] == "  spaced \n"


@pytest.mark.parametrize(
    ("row", "message", "error"),
    [
        (
            {"query": "q", "answer": "a"},
            r"m\.jsonl:2: missing key 'reasoning' \(record keys: "
            r"\['answer', 'query'\]\); choose with --text-key",
            BadInputError,
        ),
        (
            {"query": "q", "reasoning": ["r"], "answer": "a"},
            r"m\.jsonl:2: field 'reasoning' must be a string, got list",
            TypeError,
        ),
        (
            {"query": "q", "reasoning": "r", "answer": None},
            r"m\.jsonl:2: field 'answer' must be a string, got NoneType",
            TypeError,
        ),
    ],
)
def test_several_text_keys_bad_records(tmp_path, row, message, error):
    path = _write_jsonl(tmp_path / "m.jsonl", [SYNTH_ROWS[0], row])
    keys = ["query", "reasoning", "answer"]
    with pytest.raises(error, match=message):
        _run([path], tmp_path / "out", text_key=keys)
    manifest = _run([path], tmp_path / "skip", text_key=keys, skip_bad=True)
    assert manifest["totals"]["skipped_bad"] == 1 and manifest["totals"]["records"] == 1


def test_several_text_keys_parquet_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"query": ["q"], "answer": ["a"]}), tmp_path / "t.parquet")
    with pytest.raises(
        BadInputError,
        match=r"t\.parquet: no column 'reasoning' \(columns: "
        r"\['query', 'answer'\]\); choose with --text-key",
    ):
        _run([tmp_path / "t.parquet"], tmp_path / "o", text_key=["query", "reasoning", "answer"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(text_key=[]), "at least one field name"),
        (dict(text_key=["a", "b", "a"]), r"text_key names \['a'\] more than once"),
        (dict(text_key=["a", ""]), "text_key must be a non-empty field name, got ''"),
        (dict(text_separator=None), "text_separator must be a str, got NoneType"),
        (dict(system_prompt_key="system"), "give input_key/output_key"),
        (dict(chat_key="messages", text_key="body"), "apply to text records"),
        (dict(input_key="input", tokenizer="wf-data-demo"), "not both"),
    ],
)
def test_field_options_validated(tmp_path, options, message):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises((ValueError, TypeError), match=message):
        _run([path], tmp_path / "out", **options)


# --------------------------------------------------------------------------- Nemotron-style chat

NEMOTRON_ROWS = [
    {
        "input": [{"role": "user", "content": "hi"}],
        "output": "hello",
        "system_prompt": "detailed thinking on",
    },
    {"input": "2+2?", "output": "4", "system_prompt": ""},  # empty system prompt: no system turn
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    {
        "input": [{"role": "system", "content": "own"}, {"role": "user", "content": "q"}],
        "output": "ans",
        "system_prompt": "ignored: the input has a system turn",
    },
    {"messages": None, "input": "x", "output": "y"},  # null messages (e.g. parquet): the columns
]
NEMOTRON_MESSAGES = [
    [
        {"role": "system", "content": "detailed thinking on"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [
        {"role": "system", "content": "own"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "ans"},
    ],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
]
NEMOTRON_OPTIONS = dict(
    chat_key="messages", input_key="input", output_key="output", system_prompt_key="system_prompt"
)


def test_nemotron_records_become_messages(tmp_path):
    from wf_data.data.text.chat import to_messages

    path = _write_jsonl(tmp_path / "n.jsonl", NEMOTRON_ROWS)
    manifest = _run([path], tmp_path / "out", num_shards=2, **NEMOTRON_OPTIONS)
    assert manifest["format"] == "chat" and manifest["input_fields"] == NEMOTRON_OPTIONS
    source = sources.open_dataset(tmp_path / "out")
    records = list(source.__getitems__(range(len(source))))
    assert records == [{"messages": messages} for messages in NEMOTRON_MESSAGES]
    # what SFTDataset calls on each record, with its default keys
    assert [to_messages(record) for record in records] == NEMOTRON_MESSAGES
    assert [to_messages(row) for row in NEMOTRON_ROWS[:4]] == NEMOTRON_MESSAGES[:4]
    # --input-key alone: the other keys take to_messages' defaults, the same dataset
    _run([path], tmp_path / "defaults", num_shards=2, input_key="input")
    assert _files(tmp_path / "defaults") == _files(tmp_path / "out")


def test_nemotron_renamed_columns_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p0", "answer": "a0", "sys": "s0"}, {"prompt": "p1", "answer": "a1"}]
    expected = [
        {
            "messages": [
                {"role": "system", "content": "s0"},
                {"role": "user", "content": "p0"},
                {"role": "assistant", "content": "a0"},
            ]
        },
        {"messages": [{"role": "user", "content": "p1"}, {"role": "assistant", "content": "a1"}]},
    ]
    options = dict(input_key="prompt", output_key="answer", system_prompt_key="sys")
    _run([_write_jsonl(tmp_path / "r.jsonl", rows)], tmp_path / "json", **options)
    assert list(sources.open_dataset(tmp_path / "json").__getitems__([0, 1])) == expected
    table = pa.table(
        {
            "prompt": [[{"role": "user", "content": "p0"}], [{"role": "user", "content": "p1"}]],
            "answer": ["a0", "a1"],
            "sys": ["s0", None],
            "unused": [1, 2],
        }
    )
    pq.write_table(table, tmp_path / "r.parquet")
    _run([tmp_path / "r.parquet"], tmp_path / "pq", **options)
    assert list(sources.open_dataset(tmp_path / "pq").__getitems__([0, 1])) == expected
    with pytest.raises(
        BadInputError,
        match=r"r\.parquet: no column 'messages' or columns "
        r"'input' \+ 'output' \(columns: \['prompt'",
    ):
        _run([tmp_path / "r.parquet"], tmp_path / "bad", input_key="input")


@pytest.mark.parametrize(
    ("row", "message", "error"),
    [
        (
            {"input": "q"},
            r"n\.jsonl:2: missing key 'output' \(record keys: \['input'\]\); a "
            r"chat record needs 'messages' or 'input' \+ 'output'",
            BadInputError,
        ),
        ({"prompt": "q", "answer": "a"}, r"n\.jsonl:2: missing key 'input'", BadInputError),
        (
            {"input": "q", "output": 5},
            r"n\.jsonl:2: field 'output' must be a string, got int",
            TypeError,
        ),
        (
            {"input": [], "output": "a"},
            r"n\.jsonl:2: field 'input' is an empty list",
            BadInputError,
        ),
        (
            {"input": 3, "output": "a"},
            r"n\.jsonl:2: field 'input': chat messages must be a list",
            TypeError,
        ),
        (
            {"input": [{"role": "bot", "content": "x"}], "output": "a"},
            r"n\.jsonl:2: field 'input' message 0: unknown role 'bot'",
            BadInputError,
        ),
        (
            {"input": "q", "output": "a", "system_prompt": ["s"]},
            r"n\.jsonl:2: field 'system_prompt' must be a string, got list",
            TypeError,
        ),
        (
            {"messages": "hi", "input": "q", "output": "a"},
            r"n\.jsonl:2: field 'messages': chat messages must be a list",
            TypeError,
        ),
    ],
)
def test_nemotron_bad_records(tmp_path, row, message, error):
    path = _write_jsonl(tmp_path / "n.jsonl", [NEMOTRON_ROWS[1], row])
    with pytest.raises(error, match=message):
        _run([path], tmp_path / "out", **NEMOTRON_OPTIONS)
    manifest = _run([path], tmp_path / "skip", skip_bad=True, **NEMOTRON_OPTIONS)
    assert manifest["totals"]["skipped_bad"] == 1 and manifest["totals"]["records"] == 1


def test_nemotron_empty_messages_dropped(tmp_path):
    path = _write_jsonl(tmp_path / "n.jsonl", [{"messages": []}, NEMOTRON_ROWS[1]])
    manifest = _run([path], tmp_path / "out", input_key="input")
    assert manifest["totals"]["dropped_empty"] == 1 and manifest["totals"]["records"] == 1


# --------------------------------------------------------------------------- options and resume


def test_field_options_redo_the_work_and_change_the_manifest(tmp_path):
    path = _write_jsonl(tmp_path / "in.jsonl", SYNTH_ROWS)
    out = tmp_path / "out"
    keys = ["query", "reasoning", "answer"]
    first = _run([path], out, text_key=keys)
    again = _run([path], out, text_key=keys)
    assert again["summary"]["parts_run"] == again["summary"]["shards_written"] == 0
    for changed in (dict(text_separator="\n"), dict(text_key=keys[:2])):
        second = _run([path], out, overwrite=True, **dict(dict(text_key=keys), **changed))
        assert second["summary"]["parts_run"] == 1 and second["summary"]["shards_written"] == 1
        assert second["fingerprint"] != first["fingerprint"]
        assert second["input_fields"] != first["input_fields"]
    # chat: the Nemotron keys are part of the key too
    chat = _write_jsonl(tmp_path / "chat.jsonl", NEMOTRON_ROWS)
    with_system = _run([chat], tmp_path / "chat", **NEMOTRON_OPTIONS)
    without = _run(
        [chat], tmp_path / "chat", input_key="input", system_prompt_key="none", overwrite=True
    )
    assert without["summary"]["parts_run"] == 1
    assert without["input_fields"]["system_prompt_key"] == "none"
    assert without["fingerprint"] != with_system["fingerprint"]
    assert sources.open_dataset(tmp_path / "chat")[0]["messages"][0]["role"] == "user"


def test_fields_independent_of_workers(tmp_path):
    rows = SYNTH_ROWS[:3] * 40
    _write_jsonl(tmp_path / "in" / "a.jsonl", rows)
    _write_jsonl(tmp_path / "in" / "b.jsonl", rows[::-1])
    options = dict(text_key=["query", "reasoning"], num_shards=3, piece_bytes=1200)
    _run([tmp_path / "in"], tmp_path / "one", workers=1, **options)
    _run([tmp_path / "in"], tmp_path / "two", workers=2, **options)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert sources.open_dataset(tmp_path / "one")[1] == "q1"


# --------------------------------------------------------------------------- long documents


@pytest.fixture(scope="module")
def demo_text():
    """About 600 KB of the demo corpus (prose, code, math) as one document."""
    from wf_data.data.prepare.demo_corpus import build_demo_corpus

    corpus = build_demo_corpus()
    return "\n\n".join(doc for docs in corpus.values() for doc in docs[:200])[:600_000]


@pytest.mark.parametrize(("add_bos", "add_eos"), [(False, False), (False, True)])
def test_long_documents_tokenized_in_pieces_equal_whole(demo_text, add_bos, add_eos):
    from wf_data.data.text.tokenization import TokenizerWrapper

    tokenizer = TokenizerWrapper.from_pretrained(None, add_bos=add_bos, add_eos=add_eos)
    pieces = encoding._text_pieces(demo_text, size=4096)
    assert len(pieces) > 50 and "".join(pieces) == demo_text
    texts = ["short one", demo_text, "another short"]
    chunked = encoding._encode_batch(tokenizer, texts)
    for got, text in zip(chunked, texts, strict=True):
        np.testing.assert_array_equal(got, tokenizer.encode(text))


def test_documents_over_max_doc_bytes(tmp_path):
    big = {"text": "a" * 5000}
    path = _write_jsonl(tmp_path / "in.jsonl", [big, "x" * 50, {"text": "ok"}])
    (tmp_path / "big.txt").write_text("b" * 3000)
    size = len(json.dumps(big))
    with pytest.raises(BadInputError, match=rf"in\.jsonl:1: record of {size:,} bytes is over"):
        _run([path], tmp_path / "out", max_doc_bytes=1000)
    manifest = _run(
        [path, tmp_path / "big.txt"], tmp_path / "out", max_doc_bytes=1000, skip_bad=True
    )
    assert manifest["totals"]["skipped_bad"] == 3 and manifest["totals"]["records"] == 1
    assert [entry["record"] for entry in manifest["summary"]["skipped"]] == [
        f"{path}:1",
        f"{path}:2",
        str(tmp_path / "big.txt"),
    ]
    assert "malformed JSON" in manifest["summary"]["skipped"][1]["error"]
