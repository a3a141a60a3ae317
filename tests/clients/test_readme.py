"""The README's client snippets run as written (torch, Hugging Face, torchtitan, JAX)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Use it from torch, torchtitan, Hugging Face and JAX"


def snippets():
    text = README.read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_one_snippet_per_client():
    names = ["StatefulDataLoader", "Trainer(", "WfDataTitanLoader", "jax_sharding"]
    blocks = snippets()
    assert len(blocks) == len(names)
    for name, block in zip(names, blocks, strict=True):
        assert name in block


@pytest.mark.slow
@pytest.mark.parametrize("index", range(4), ids=["torch", "hf", "torchtitan", "jax"])
def test_snippet_runs(index, demo_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Trainer writes its checkpoints here
    namespace = {}
    exec(compile(snippets()[index], f"README.md snippet {index}", "exec"), namespace)
    if index == 0:
        assert str(namespace["batch"]["labels"].dtype) == "torch.int64"
        assert namespace["state"]  # StatefulDataLoader collected the workers' states
        assert namespace["batch"]["input_ids"].shape == (8, 256)
    if index == 1:
        assert (tmp_path / "hf-run" / "checkpoint-4" / "wf_data_loader_state.json").is_file()
    if index == 2:
        assert namespace["labels"].shape == (8, 256)
    if index == 3:
        assert namespace["batch"]["input_ids"].shape == (8, 256)
