"""tools/train_tokenizer.py regenerates the shipped demo tokenizer byte for byte."""

import importlib.util
import json
import pathlib

from transformers import AutoTokenizer

from wf_data.data.prepare.demo_corpus import build_demo_corpus, corpus_fingerprint
from wf_data.data.text.tokenization import DEMO_TOKENIZER_PATH

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "tools" / "train_tokenizer.py"
FILES = [
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "training_corpus.json",
]


def _load_script():
    spec = importlib.util.spec_from_file_location("train_tokenizer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerates_shipped_tokenizer(tmp_path):
    script = _load_script()
    assert script.main(["--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == FILES
    shipped = json.loads((DEMO_TOKENIZER_PATH / "training_corpus.json").read_text())
    if shipped["corpus_sha256"] == corpus_fingerprint(build_demo_corpus(seed=shipped["seed"])):
        reference = DEMO_TOKENIZER_PATH
    else:
        # Another Python version carries other stdlib sources and pydoc topics, hence another
        # corpus: check that training is deterministic on this one instead.
        assert script.main(["--out", str(tmp_path / "b")]) == 0
        reference = tmp_path / "b"
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (reference / name).read_bytes(), name


def test_chat_template_assistant_mask():
    from wf_data.data.text.chat import render_with_mask

    tokenizer = AutoTokenizer.from_pretrained(DEMO_TOKENIZER_PATH, local_files_only=True)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
    ]
    ids, mask = render_with_mask(messages, tokenizer)
    assert len(ids) == len(mask) and 0 < sum(mask) < len(ids)
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]) == (
        "4.<|im_end|>6.<|im_end|>"
    )
