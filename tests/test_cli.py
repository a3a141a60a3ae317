"""Tests for the `wf-data` command: prepare, inspect, and a real kill -9 resume."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from wf_data import cli
from wf_data.config import config_dir
from wf_data.data.prepare import out_dir as out_dir_lib
from wf_data.data.shards import sources


def _corpus(directory, files=3, docs=40):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([11, 0])
    words = "the cat sat on a mat while dogs ran in the park".split()
    for i in range(files):
        with open(directory / f"f{i}.jsonl", "w") as f:
            for _ in range(docs):
                f.write(json.dumps({"body": " ".join(rng.choice(words, rng.integers(1, 30)))}))
                f.write("\n")
    return directory


def test_prepare_and_inspect_tokens(tmp_path, capsys):
    inputs = _corpus(tmp_path / "in")
    out = tmp_path / "out"
    status = cli.main(
        [
            "prepare",
            str(inputs),
            "--out",
            str(out),
            "--tokenizer",
            "wf-data-demo",
            "--text-key",
            "body",
            "--shards",
            "3",
            "--append-eos",
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0
    assert "records 120" in printed and "tokens/s" in printed and "fingerprint" in printed
    source = sources.open_dataset(out)
    assert len(source) == 120 and source.manifest["append_eos"]

    assert cli.main(["inspect", str(out), "--verify", "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "format tokens" in printed and "records 120" in printed
    assert "p50" in printed and "p99" in printed and "#" in printed  # percentiles, histogram
    assert "integrity: OK, 3 shards (sha256 of every file, record counts and lengths)" in printed
    assert "samples (2 evenly spaced):" in printed and "#119: [" in printed
    assert "the" in printed.split("samples")[1]  # decoded text, not ids

    plot = tmp_path / "plots" / "lengths.png"
    assert cli.main(["inspect", str(out), "--samples", "0", "--plot", str(plot)]) == 0
    assert f"plot: {plot}" in capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_verify_detects_corruption(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "prepare",
                str(_corpus(tmp_path / "in")),
                "--out",
                str(out),
                "--text-key",
                "body",
                "--shards",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    shard = out / "data-00001-of-00002.array_record"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cli.main(["inspect", str(out), "--verify", "--samples", "0"]) == 1
    printed = capsys.readouterr().out
    assert "integrity: FAILED" in printed
    assert "data-00001-of-00002.array_record: sha256 does not match the manifest" in printed
    assert "data-00000-of-00002.array_record" not in printed.split("FAILED")[1]


def test_prepare_bad_input_message(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    assert cli.main(["prepare", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert (
        "wf-data prepare: error:" in error and "bad.jsonl:2: field 'text' must be a string" in error
    )
    assert (
        cli.main(["prepare", str(bad), "--out", str(tmp_path / "o"), "--quiet", "--skip-bad"]) == 0
    )
    assert "skipped bad 1" in capsys.readouterr().out


def test_inspect_missing_dataset(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path)]) == 1
    assert "no manifest" in capsys.readouterr().err


def test_subcommands_listed():
    parser = cli.build_parser()
    assert {"prepare", "inspect"} <= set(parser._subparsers._group_actions[0].choices)


def _prepare_commands():
    """(id, argv after `wf-data`, source entry, config) for every `wf-data prepare` command in
    the `prepare_command` fields of configs/data/*.yaml, placeholders filled in."""
    found = []
    for path in sorted((config_dir() / "data").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        for group in ("sources", "eval_sources"):
            for name, entry in (config.get(group) or {}).items():
                command = entry.get("prepare_command")
                if not command:
                    continue
                command = command.replace("{path}", f"/data/{group}/{name}")
                command = command.replace("{tokenizer}", config.get("tokenizer", "wf-data-demo"))
                words, segment = shlex.split(command), []
                segments = []
                for word in [*words, "&&"]:
                    if word == "&&":
                        segments.append(segment)
                        segment = []
                    else:
                        segment.append(word)
                prepares = [s[1:] for s in segments if s[:2] == ["wf-data", "prepare"]]
                assert prepares, f"{path.name} {group}.{name}: no wf-data prepare in {command!r}"
                for argv in prepares:
                    found.append((f"{path.stem}/{group}.{name}", argv, entry, config))
    return found


PREPARE_COMMANDS = _prepare_commands()


def test_config_prepare_commands_found():
    configs = {command_id.split("/")[0] for command_id, *_ in PREPARE_COMMANDS}
    assert {"mixed_pretrain", "sft_nemotron", "downstream", "demo", "fineweb"} <= configs
    assert len(PREPARE_COMMANDS) >= 20


@pytest.mark.parametrize(
    ("argv", "entry", "config"),
    [command[1:] for command in PREPARE_COMMANDS],
    ids=[command[0] for command in PREPARE_COMMANDS],
)
def test_config_prepare_commands_parse_and_match_the_source(argv, entry, config):
    from wf_data.data.prepare import RecordFields

    args = cli.build_parser().parse_args(argv)
    assert args.func is cli.run_prepare and args.inputs and args.out.startswith("/data/")
    # the options prepare() would validate before reading any input
    fields = RecordFields.from_options(
        args.text_key or "text",
        args.text_separator,
        args.chat_key,
        args.input_key,
        args.output_key,
        args.system_prompt_key,
    )
    # the command makes what the source entry describes
    fmt = entry.get("format")
    assert fields.chat == (fmt == "chat")
    assert (args.tokenizer is not None) == (fmt == "tokens")
    if fmt == "tokens":
        assert args.tokenizer == config["tokenizer"]
    if not fields.chat:
        text_key = entry.get("text_key", "text")
        assert list(fields.text_keys) == ([text_key] if isinstance(text_key, str) else text_key)
        assert fields.text_separator == entry.get("text_separator", "\n\n")
    for key in ("chat_key", "input_key", "output_key", "system_prompt_key"):
        if entry.get(key) is not None:
            assert getattr(args, key) == entry[key], key


def test_prepare_several_text_keys(tmp_path, capsys):
    rows = [{"q": "Q0", "r": "R0", "a": "A0"}, {"q": "Q1", "r": "", "a": "A1"}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    argv = [
        "prepare",
        str(path),
        "--out",
        str(out),
        "--text-key",
        "q",
        "--text-key",
        "r,a",
        "--text-separator",
        "\\n---\\n",
        "--quiet",
    ]
    assert cli.main(argv) == 0
    source = sources.open_dataset(out)
    assert [source[0], source[1]] == ["Q0\n---\nR0\n---\nA0", "Q1\n---\nA1"]
    assert source.manifest["input_fields"] == {
        "text_key": ["q", "r", "a"],
        "text_separator": "\n---\n",
    }
    assert cli.build_parser().parse_args(argv).text_separator == "\n---\n"
    assert cli.main(["prepare", str(path), "--out", str(out) + "2", "--text-key", "q,r,x"]) == 1
    assert "in.jsonl:1: missing key 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["prepare", "x", "--out", "o", "--text-key", "q,,a"])
    assert "empty field name in 'q,,a'" in capsys.readouterr().err


def test_prepare_nemotron_records_feed_sft(tmp_path, capsys):
    from wf_data.data.read.sft import SFTDataset

    rows = [
        {
            "input": [{"role": "user", "content": "what is the answer"}],
            "output": "fine thanks",
            "system_prompt": "detailed thinking on",
        },
        {"input": "hello there", "output": "how are you", "system_prompt": "detailed thinking off"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ]
    path = tmp_path / "SFT" / "chat" / "part.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    command = (
        f"wf-data prepare {tmp_path / 'SFT' / 'chat'} --out {out} --chat-key messages "
        "--input-key input --output-key output --system-prompt-key system_prompt --quiet"
    )
    assert cli.main(shlex.split(command)[1:]) == 0
    assert "format chat" in capsys.readouterr().out
    source = sources.open_dataset(out)
    assert source[0]["messages"][0] == {"role": "system", "content": "detailed thinking on"}
    assert source[1]["messages"][-1] == {"role": "assistant", "content": "how are you"}
    dataset = SFTDataset(source, tokenizer="wf-data-demo", seq_len=64, num_epochs=1)
    rows_out = list(dataset)
    segments = sum(int(row["segment_ids"].max()) for row in rows_out)
    assert segments == 3 and all((row["labels"] != -100).any() for row in rows_out)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"input": "q", "output": 1}) + "\n")
    assert (
        cli.main(
            ["prepare", str(bad), "--out", str(tmp_path / "b"), "--input-key", "input", "--quiet"]
        )
        == 1
    )
    assert "bad.jsonl:2: field 'output' must be a string, got int" in capsys.readouterr().err


SLOW_RUN = """
import importlib, sys, time
from wf_data.data.shards import sources
prepare_module = importlib.import_module("wf_data.data.prepare.run")
real = sources.write_shard
def slow(*args, **kwargs):
    time.sleep(0.04)
    return real(*args, **kwargs)
sources.write_shard = slow
prepare_module.prepare(sys.argv[1], sys.argv[2], num_shards=4, piece_bytes=600, progress=False,
                       text_key="body", name="docs")
"""


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["parts", "shards"])
def test_resume_after_real_kill_9(tmp_path, phase):
    from wf_data.data.prepare import expand_inputs, plan_tasks, prepare

    inputs = _corpus(tmp_path / "in", files=4, docs=30)
    num_parts = len(plan_tasks(expand_inputs([inputs]), piece_bytes=600))
    assert num_parts > 8
    # done markers: one per part, then one per shard
    kill_after_markers = 3 if phase == "parts" else num_parts + 2
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(inputs), str(out)])
    deadline = time.monotonic() + 60
    work = out_dir_lib.build_dir(out) / ".wf-prepare"
    while time.monotonic() < deadline and process.poll() is None:
        if work.exists() and len(list(work.glob("*.done.json"))) >= kill_after_markers:
            break
        time.sleep(0.005)
    assert process.poll() is None, "prepare finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()  # the dataset appears only once complete
    options = dict(num_shards=4, piece_bytes=600, progress=False, text_key="body", name="docs")
    prepare(inputs, out, **options)
    prepare(inputs, tmp_path / "clean", **options)
    names = ["manifest.json"] + [sources.shard_name("docs", k, 4) for k in range(4)]
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
