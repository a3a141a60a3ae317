"""`prepare` on Apache Beam: byte-identical to the local run, under parallelism and retries."""

import gzip
import hashlib
import json
import pathlib

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam", reason="the optional extra wf-data[beam]")

from wf_data import cli  # noqa: E402
from wf_data.data.prepare import assemble, parts  # noqa: E402
from wf_data.data.prepare import beam as prepare_beam  # noqa: E402
from wf_data.data.prepare import out_dir as out_dir_lib  # noqa: E402
from wf_data.data.prepare import run as prepare_lib  # noqa: E402

WORDS = "the a cat dog sat on mat ran far away big small red".split()
# Small pieces: the plain jsonl and the parquet file become several tasks each.
OPTIONS = {"num_shards": 3, "piece_bytes": 2000}
MULTI_PROCESS = (
    "--runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers=2"
)


def _texts(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng([seed, 1])
    return [" ".join(rng.choice(WORDS, rng.integers(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> pathlib.Path:
    """jsonl (several pieces), jsonl.gz, parquet (several row groups), txt, and a blank line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("beam-inputs")
    lines = [json.dumps({"text": text}) for text in _texts(0, 120)] + [""]
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": text}) for text in _texts(1, 40)) + "\n")
    pq.write_table(pa.table({"text": _texts(2, 90)}), folder / "c.parquet", row_group_size=20)
    (folder / "d.txt").write_text(" ".join(_texts(3, 30)))
    assert len(prepare_lib.plan_tasks(prepare_lib.expand_inputs([folder]), 2000)) > 6
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    """A WordLevel tokenizer over WORDS, saved offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1} | {word: i + 2 for i, word in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory = tmp_path_factory.mktemp("beam-tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", unk_token="[UNK]"
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def local_tokens(inputs, tokenizer_dir, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("local") / "tokens"
    prepare_lib.prepare(
        inputs, out, tokenizer=tokenizer_dir, append_eos=True, progress=False, **OPTIONS
    )
    return out


@pytest.fixture(scope="module")
def local_text(inputs, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("local") / "text"
    prepare_lib.prepare(inputs, out, progress=False, **OPTIONS)
    return out


def _output_files(out_dir: pathlib.Path) -> dict[str, str]:
    """sha256 of every output file (the work folder .wf-prepare is not output)."""
    return {
        str(path.relative_to(out_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out_dir.rglob("*"))
        if path.is_file() and out_dir_lib.WORK_DIR_NAME not in path.parts
    }


def _assert_same_output(beam_out: pathlib.Path, local_out: pathlib.Path) -> None:
    expected = _output_files(local_out)
    shards = [name for name in expected if name.endswith(".array_record")]
    assert len(shards) == OPTIONS["num_shards"] and "manifest.json" in expected
    assert _output_files(beam_out) == expected
    work = beam_out / out_dir_lib.WORK_DIR_NAME
    leftovers = [path for path in work.glob("part-*") if not path.name.endswith(".done.json")]
    assert leftovers == []  # parts and attempts are removed once the manifest is written


@pytest.mark.slow
def test_in_process_runner_matches_local(inputs, tokenizer_dir, local_tokens, tmp_path):
    manifest = prepare_beam.run(
        inputs, tmp_path / "beam", tokenizer=tokenizer_dir, append_eos=True, **OPTIONS
    )
    _assert_same_output(tmp_path / "beam", local_tokens)
    assert manifest["summary"]["parts_run"] == len(
        prepare_lib.plan_tasks(prepare_lib.expand_inputs([inputs]), OPTIONS["piece_bytes"])
    )
    assert manifest["totals"]["dropped_empty"] == 0 and manifest["totals"]["tokens"] > 0


@pytest.mark.slow
def test_multi_process_runner_matches_local(inputs, local_text, tmp_path):
    # Text: worker processes start without importing the tokenizer stack (seconds each); the
    # tokenizer's load-by-name in `setup` runs in the other tests, through the same pickling.
    manifest = prepare_beam.run(
        inputs, tmp_path / "beam", pipeline_options=MULTI_PROCESS, **OPTIONS
    )
    _assert_same_output(tmp_path / "beam", local_text)
    assert manifest["summary"]["parts_run"] > 6


@pytest.mark.slow
def test_cli_runner_beam_text_matches_local_and_replaces_a_previous_dataset(
    inputs, local_text, tmp_path
):
    # A previous dataset with another shard count in the same folder: none of it may survive.
    prepare_lib.prepare(inputs, tmp_path / "beam", num_shards=2, progress=False)
    argv = ["prepare", str(inputs), "--out", str(tmp_path / "beam"), "--shards", "3", "--overwrite"]
    beam_options = "--beam-options=--runner=DirectRunner --direct_num_workers=1"
    assert cli.main([*argv, "--runner", "beam", beam_options]) == 0
    _assert_same_output(tmp_path / "beam", local_text)  # part boundaries do not show in output
    assert json.loads((tmp_path / "beam" / "manifest.json").read_text())["format"] == "text"


class _FailOnce:
    """prepare_file that, on its first call for `task`, writes the part and then fails."""

    def __init__(self, real, task, flag: pathlib.Path):
        self.real, self.task, self.flag = real, task, flag

    def __call__(self, task, part_path, **options):
        result = self.real(task, part_path, **options)
        if task == self.task and not self.flag.exists():
            self.flag.write_text(str(part_path))
            raise OSError("simulated worker failure after writing the part")
        return result


@pytest.mark.slow
def test_failed_task_is_retried_and_output_is_identical(
    inputs, tokenizer_dir, local_tokens, tmp_path, monkeypatch
):
    tasks = prepare_lib.plan_tasks(prepare_lib.expand_inputs([inputs]), OPTIONS["piece_bytes"])
    flag = tmp_path / "failed-once"
    monkeypatch.setattr(parts, "prepare_file", _FailOnce(parts.prepare_file, tasks[1], flag))
    # The bundle-based DirectRunner retries a failed bundle (up to 4 attempts) in this process.
    prepare_beam.run(
        inputs,
        tmp_path / "beam",
        tokenizer=tokenizer_dir,
        append_eos=True,
        pipeline_options="--runner=BundleBasedDirectRunner",
        **OPTIONS,
    )
    assert ".attempt-" in flag.read_text()  # the failure happened, on an attempt's own file
    _assert_same_output(tmp_path / "beam", local_tokens)


@pytest.mark.slow
def test_rerun_after_a_failed_job_encodes_no_finished_part(
    inputs, tokenizer_dir, local_tokens, tmp_path, monkeypatch
):
    def failing_assemble_shard(out_dir, shard):
        raise OSError(f"simulated failure assembling shard {shard}")

    options = dict(tokenizer=tokenizer_dir, append_eos=True, **OPTIONS)
    with monkeypatch.context() as patch:
        patch.setattr(assemble, "assemble_shard", failing_assemble_shard)
        with pytest.raises(OSError, match="simulated failure"):
            prepare_beam.run(inputs, tmp_path / "beam", **options)
    manifest = prepare_beam.run(inputs, tmp_path / "beam", **options)
    assert manifest["summary"]["parts_run"] == 0
    _assert_same_output(tmp_path / "beam", local_tokens)


@pytest.mark.slow
def test_worker_with_other_tokenizer_files_is_refused(inputs, tokenizer_dir, tmp_path):
    import shutil

    moved = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, moved)
    pipeline = prepare_beam.build_pipeline(inputs, tmp_path / "beam", tokenizer=moved, **OPTIONS)
    # Between planning and running, the files under that path change (another worker's disk).
    config = json.loads((moved / "tokenizer.json").read_text())
    config["model"]["vocab"]["zebra"] = len(config["model"]["vocab"])
    (moved / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="has fingerprint .* the launcher planned with"):
        pipeline.run().wait_until_finish()
    assert not (tmp_path / "beam" / "manifest.json").exists()


def test_bad_arguments(inputs, tmp_path, capsys):
    with pytest.raises(TypeError, match="pass its name or path, not a dict"):
        prepare_beam.build_pipeline(inputs, tmp_path / "out", tokenizer={"vocab": {}})
    base = ["prepare", str(inputs), "--out", str(tmp_path / "out")]
    assert cli.main([*base, "--runner", "beam", "--workers", "2"]) == 1
    assert "--workers applies to --runner local" in capsys.readouterr().err
    assert cli.main([*base, "--beam-options=--direct_num_workers=2"]) == 1
    assert "--beam-options applies to --runner beam" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_chunks_of_one_file_spread_and_match_local(tokenizer_dir, tmp_path, monkeypatch):
    from wf_data.data.prepare import inputs as inputs_lib

    monkeypatch.setattr(inputs_lib, "CHUNK_BYTES", 1000)  # the in-process runner plans here
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in _texts(9, 300)))
    options = dict(tokenizer=tokenizer_dir, append_eos=True, num_shards=2)
    (task,) = prepare_lib.plan_tasks([path])
    assert len(inputs_lib.plan_chunks(task)) > 10
    encoded = []
    real_encode_chunk = parts.encode_chunk
    monkeypatch.setattr(
        parts,
        "encode_chunk",
        lambda chunk, **kw: encoded.append(chunk) or real_encode_chunk(chunk, **kw),
    )
    manifest = prepare_beam.run(path, tmp_path / "beam", **options)
    assert sorted(encoded, key=lambda chunk: chunk.start) == inputs_lib.plan_chunks(task)
    prepare_lib.prepare(path, tmp_path / "local", progress=False, **options)
    assert _output_files(tmp_path / "beam") == _output_files(tmp_path / "local")
    assert manifest["summary"]["parts_run"] == 1
