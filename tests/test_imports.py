"""Import hygiene: what each path imports, checked in a fresh interpreter against `sys.modules`.

The development environment has every extra installed, and `import grain` imports JAX whenever
JAX is installed (Grain itself does not need it). So `sys.modules` alone cannot show that the
numpy path works on a core install. Each check therefore runs with a `sys.meta_path` finder that
makes the frameworks a core (or `[torch]`) install lacks look absent (`ModuleNotFoundError`, as
for a package that is not installed) and records who tried to import them: the path must work
so, and no attempt may come from a `wf_data` module. Attempts from Grain (which falls back
without JAX) are allowed. With the extras blocked, every optional feature must fail with one line
naming the extra to install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# Installed in the child before anything else: blocks BLOCKED and records import attempts.
BLOCKER = """
import json, sys

BLOCKED = set(json.loads(sys.argv[1]))
ATTEMPTS = []


def _importer():
    frame = sys._getframe(2)
    while frame is not None and "importlib" in frame.f_code.co_filename:
        frame = frame.f_back
    return frame.f_globals.get("__name__", "?") if frame is not None else "?"


class Blocker:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            ATTEMPTS.append([name, _importer()])
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, Blocker)


def report(**fields):
    watched = ("torch", "jax", "transformers", "matplotlib", "apache_beam", "torchtitan")
    fields["imported"] = sorted(name for name in watched if name in sys.modules)
    fields["attempts"] = ATTEMPTS
    print("REPORT " + json.dumps(fields))
"""

CORE_MISSING = ["torch", "torchdata", "jax", "jaxlib", "orbax", "transformers"]
ALL_EXTRAS = [*CORE_MISSING, "jinja2", "matplotlib", "apache_beam", "torchtitan"]


def run_child(code: str, blocked: list[str], tmp_path) -> dict:
    """Run `code` in a fresh interpreter with `blocked` made absent; its `report(...)` fields."""
    env = {key: value for key, value in os.environ.items() if key != "WF_DATA_NUM_WORKERS"}
    env["WF_DATA_CACHE"] = str(tmp_path / "cache")
    source = BLOCKER + textwrap.dedent(code)
    process = subprocess.run(
        [sys.executable, "-c", source, json.dumps(blocked)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
    )
    reports = [line for line in process.stdout.splitlines() if line.startswith("REPORT ")]
    assert process.returncode == 0 and reports, process.stdout + process.stderr
    return json.loads(reports[-1][len("REPORT ") :])


def _ours(attempts: list) -> list:
    return [(name, importer) for name, importer in attempts if importer.startswith("wf_data")]


# A token dataset prepared with the shipped tokenizer, then one batch through get_loader.
LOADER = """
import json, pathlib
from wf_data.data.prepare import prepare
from wf_data.data import get_loader

texts = [f"document {i}: " + "some words of text " * (i % 13 + 1) for i in range(200)]
jsonl = pathlib.Path("docs.jsonl")
jsonl.write_text("".join(json.dumps({"text": text}) + "\\n" for text in texts))
prepare([jsonl], "docs", tokenizer="wf-data-demo", progress=False)
config = {
    "tokenizer": "wf-data-demo",
    "seq_len": 64,
    "global_batch_size": 4,
    "sources": {"docs": {"path": str(pathlib.Path("docs").resolve()), "weight": 1.0}},
}
loader = get_loader(config, framework=FRAMEWORK, num_workers=0)
batch = next(iter(loader))
report(
    kind=type(batch["input_ids"]).__module__.partition(".")[0],
    shape=list(batch["input_ids"].shape),
)
"""


def test_numpy_path_needs_no_framework(tmp_path):
    """prepare + get_loader(framework="numpy") on a core install: no torch, JAX, transformers."""
    report = run_child("FRAMEWORK = 'numpy'\n" + LOADER, CORE_MISSING, tmp_path)
    assert report["kind"] == "numpy" and report["shape"] == [4, 64]
    assert report["imported"] == []
    assert _ours(report["attempts"]) == [], "wf_data imports an optional framework"


def test_jax_path_imports_no_torch(tmp_path):
    report = run_child("FRAMEWORK = 'jax'\n" + LOADER, [], tmp_path)
    assert report["kind"] in ("jax", "jaxlib") and report["shape"] == [4, 64]
    assert "torch" not in report["imported"] and "transformers" not in report["imported"]


def test_torch_path_imports_no_jax(tmp_path):
    """A `[torch]` install has no JAX: Grain's attempts fall back, ours must not exist."""
    report = run_child("FRAMEWORK = 'torch'\n" + LOADER, ["jax", "jaxlib", "orbax"], tmp_path)
    assert report["kind"] == "torch" and report["shape"] == [4, 64]
    assert "jax" not in report["imported"] and "transformers" not in report["imported"]
    assert _ours(report["attempts"]) == [], "wf_data imports JAX on the torch path"


def test_without_the_blocker_jax_would_come_in_through_grain(tmp_path):
    """Why the numpy check blocks: with JAX installed, `import grain` imports it (not us)."""
    report = run_child("import grain\nreport()\n", [], tmp_path)
    if "jax" not in report["imported"]:
        pytest.skip("this Grain does not import JAX when it is installed")
    blocked = run_child("import grain\nreport()\n", ["jax", "jaxlib"], tmp_path)
    assert blocked["imported"] == [] and blocked["attempts"]
    importers = {importer.partition(".")[0] for _, importer in blocked["attempts"]}
    assert "grain" in importers and "wf_data" not in importers


# Each optional feature, tried with every extra blocked: {feature: (exception type, message)}.
FEATURES = """
import numpy as np

def attempt(run):
    try:
        run()
    except BaseException as error:
        return [type(error).__name__, str(error)]
    return ["no error", ""]


class FakeLoader:
    def state_dict(self):
        return {}


def cli(*argv):
    import contextlib, io
    from wf_data import cli as wf_cli
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = wf_cli.main(list(argv))
    return ["exit status " + str(status), stderr.getvalue()]


def sft():
    from wf_data.data import InMemorySource, SFTDataset
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    SFTDataset(InMemorySource([{"messages": messages}], format="chat"), tokenizer=None, seq_len=64)


def hub_tokenizer():
    from wf_data.data import TokenizerWrapper
    TokenizerWrapper.from_pretrained("some-org/some-model")


def hf_tokenizer():
    from wf_data.data import TokenizerWrapper
    TokenizerWrapper.from_pretrained("wf-data-demo").hf_tokenizer


def import_(module):
    return lambda: __import__(module)


open("in.jsonl", "w").write('{"text": "a b c"}\\n')
results = {
    "to_torch": attempt(lambda: __import__("wf_data.data").data.to_torch({"x": np.zeros(2)})),
    "to_jax": attempt(lambda: __import__("wf_data.data").data.to_jax({"x": np.zeros(2)})),
    "LoaderDataset": attempt(lambda: __import__("wf_data.data").data.LoaderDataset),
    "save_with_dcp": attempt(
        lambda: __import__("wf_data.data").data.save_with_dcp("ckpt", FakeLoader())
    ),
    "save_with_orbax": attempt(
        lambda: __import__("wf_data.data").data.save_with_orbax(None, 0, FakeLoader())
    ),
    "viz": attempt(import_("wf_data.viz")),
    "hf_trainer": attempt(import_("wf_data.integrations.hf_trainer")),
    "torchtitan": attempt(import_("wf_data.integrations.torchtitan")),
    "hub tokenizer": attempt(hub_tokenizer),
    "hf_tokenizer": attempt(hf_tokenizer),
    "SFT": attempt(sft),
    "wf-data prepare --runner beam": cli(
        "prepare", "in.jsonl", "--out", "out", "--runner", "beam", "--quiet"
    ),
    "wf-data demo": cli("demo", "--steps", "1"),
}
report(results=results)
"""

EXPECTED = {
    "to_torch": "to_torch needs torch",
    "to_jax": "to_jax needs jax",
    "LoaderDataset": "LoaderDataset needs torch",
    "save_with_dcp": "save_dcp needs torch",
    "save_with_orbax": "save_with_orbax needs orbax",
    "viz": "wf_data.viz needs matplotlib",
    "hf_trainer": "the Hugging Face Trainer callback needs transformers",
    "torchtitan": "the torchtitan data loader needs torch",
    "hub tokenizer": "loading tokenizer 'some-org/some-model' (not a plain tokenizer.json) "
    "needs transformers",
    "hf_tokenizer": "loading tokenizer 'wf-data-demo' (not a plain tokenizer.json) needs "
    "transformers",
    "SFT": "SFTDataset (chat templates) needs",
    "wf-data prepare --runner beam": "wf-data prepare: error: wf-data prepare --runner beam "
    "needs apache_beam",
    "wf-data demo": "wf-data demo: error: wf-data demo needs torch",
}
EXTRA = {
    "to_torch": "torch",
    "to_jax": "jax",
    "LoaderDataset": "torch",
    "save_with_dcp": "torch",
    "save_with_orbax": "jax",
    "viz": "plot",
    "hf_trainer": "torch,hf",
    "torchtitan": "torch,titan",
    "hub tokenizer": "hf",
    "hf_tokenizer": "hf",
    "SFT": "hf",
    "wf-data prepare --runner beam": "beam",
    "wf-data demo": "torch,hf",
}


@pytest.fixture(scope="module")
def feature_errors(tmp_path_factory) -> dict:
    return run_child(FEATURES, ALL_EXTRAS, tmp_path_factory.mktemp("features"))["results"]


@pytest.mark.parametrize("feature", sorted(EXPECTED))
def test_a_missing_extra_fails_with_one_line_naming_it(feature_errors, feature):
    kind, message = feature_errors[feature]
    if feature.startswith("wf-data "):
        assert kind == "exit status 1"
        assert message.endswith("\n") and "\n" not in message[:-1], message
        message = message[:-1]
    else:
        assert kind == "MissingExtraError" and "\n" not in message, message
    assert EXPECTED[feature] in message
    assert message.endswith(f"which is not installed: pip install 'wf-data[{EXTRA[feature]}]'")


def test_every_public_name_resolves(tmp_path):
    code = """
    import wf_data.data as data
    missing = [name for name in data.__all__ if getattr(data, name, None) is None]
    report(missing=missing, names=len(data.__all__))
    """
    report = run_child(code, [], tmp_path)
    assert report["missing"] == [] and report["names"] >= 36


def test_the_extras_guard_passes_other_import_errors_through():
    from wf_data.extras import MissingExtraError, requires

    with pytest.raises(ModuleNotFoundError) as error:
        with requires("torch", feature="x"):
            import wf_data_no_such_module  # noqa: F401
    assert not isinstance(error.value, MissingExtraError)
    with pytest.raises(ValueError, match="extras must be some of"):
        with requires("tensorflow", feature="x"):
            pass
