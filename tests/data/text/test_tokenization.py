"""Tests for wf_data.data.text.tokenization: the TokenizerWrapper, its fingerprints and the check
of a token source's tokenizer."""

import multiprocessing
import pickle
import shutil

import jinja2
import numpy as np
import pytest

from wf_data.data.text.tokenization import (
    DEMO_TOKENIZER_NAME,
    DEMO_TOKENIZER_PATH,
    TokenizerWrapper,
)

TEXTS = [
    "Hello world, this is wf-data.",
    "def f(x):\n    return x * 2\n",
    "Question: 3 apples at $2 each?\nAnswer: 3 * 2 = $6.",
    "",
    "unicode: naïve café ∑ 😀",
]


@pytest.fixture(scope="module")
def tokenizer():
    return TokenizerWrapper.from_pretrained(DEMO_TOKENIZER_NAME)


def test_demo_tokenizer_identity(tokenizer):
    assert (DEMO_TOKENIZER_PATH / "tokenizer.json").is_file()
    assert tokenizer.name == DEMO_TOKENIZER_NAME
    assert TokenizerWrapper.from_pretrained(None).name == DEMO_TOKENIZER_NAME
    assert tokenizer.vocab_size == len(tokenizer.hf_tokenizer) == 8192
    assert tokenizer.eos_id == tokenizer.bos_id == tokenizer.pad_id == 0
    assert tokenizer.hf_tokenizer.is_fast
    jinja2.Environment().parse(tokenizer.chat_template)  # plain Jinja: no extensions needed


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tokenizer, text):
    plain = TokenizerWrapper.from_pretrained(add_eos=False)
    ids = plain.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert plain.decode(ids) == text
    assert np.all((ids >= 0) & (ids < tokenizer.vocab_size))


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("add_eos", [False, True])
def test_bos_eos_flags(add_bos, add_eos):
    tok = TokenizerWrapper.from_pretrained(add_bos=add_bos, add_eos=add_eos)
    body = TokenizerWrapper.from_pretrained(add_eos=False).encode("some text")
    ids = tok.encode("some text")
    assert len(ids) == len(body) + add_bos + add_eos
    assert (ids[0] == tok.bos_id) == add_bos
    assert (ids[-1] == tok.eos_id) == add_eos
    np.testing.assert_array_equal(ids[int(add_bos) : len(ids) - int(add_eos)], body)


def test_no_special_tokens_besides_flags(tokenizer):
    ids = TokenizerWrapper.from_pretrained(add_eos=False).encode("plain words")
    assert not np.isin(ids, [0, 1, 2]).any()


@pytest.mark.parametrize("add_bos", [False, True])
def test_batch_equals_single(add_bos):
    tok = TokenizerWrapper.from_pretrained(add_bos=add_bos)
    batch = tok.encode_batch(TEXTS)
    assert len(batch) == len(TEXTS)
    for text, ids in zip(TEXTS, batch, strict=True):
        assert ids.dtype == np.int32
        np.testing.assert_array_equal(ids, tok.encode(text))
    assert tok.encode_batch([]) == []


def test_encode_rejects_non_str(tokenizer):
    with pytest.raises(TypeError, match="bytes"):
        tokenizer.encode(b"bytes")
    with pytest.raises(TypeError, match="text 1"):
        tokenizer.encode_batch(["ok", 3])


def test_pickle_round_trip(tokenizer):
    data = pickle.dumps(tokenizer)
    assert len(data) < 1000  # the name and flags travel, not the vocabulary
    restored = pickle.loads(data)
    assert restored.fingerprint() == tokenizer.fingerprint()
    np.testing.assert_array_equal(restored.encode(TEXTS[1]), tokenizer.encode(TEXTS[1]))


def test_pickle_round_trip_from_path(tmp_path):
    shutil.copytree(DEMO_TOKENIZER_PATH, tmp_path / "tok")
    tok = TokenizerWrapper.from_pretrained(tmp_path / "tok", add_bos=True, add_eos=False)
    restored = pickle.loads(pickle.dumps(tok))
    assert restored.name == str(tmp_path / "tok")
    assert (restored.add_bos, restored.add_eos) == (True, False)
    np.testing.assert_array_equal(restored.encode("abc"), tok.encode("abc"))


def _encode_in_worker(tok, text):
    return tok.encode(text).tolist(), tok.fingerprint()


@pytest.mark.slow
def test_pickle_into_spawn_worker(tokenizer):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        ids, fingerprint = pool.apply(_encode_in_worker, (tokenizer, TEXTS[0]))
    assert ids == tokenizer.encode(TEXTS[0]).tolist()
    assert fingerprint == tokenizer.fingerprint()


def test_fingerprint_stable_and_flag_sensitive(tmp_path):
    base = TokenizerWrapper.from_pretrained().fingerprint()
    assert base == TokenizerWrapper.from_pretrained().fingerprint()
    assert len(base) == 64
    assert TokenizerWrapper.from_pretrained(add_bos=True).fingerprint() != base
    assert TokenizerWrapper.from_pretrained(add_eos=False).fingerprint() != base
    # Same files elsewhere: same fingerprint. Changed files: different fingerprint.
    shutil.copytree(DEMO_TOKENIZER_PATH, tmp_path / "tok")
    assert TokenizerWrapper.from_pretrained(tmp_path / "tok").fingerprint() == base
    config = tmp_path / "tok" / "tokenizer_config.json"
    config.write_text(
        config.read_text().replace('"model_max_length": 1048576', '"model_max_length": 2048')
    )
    assert TokenizerWrapper.from_pretrained(tmp_path / "tok").fingerprint() != base


def test_non_fast_tokenizer_rejected(monkeypatch, tmp_path):
    # A directory without tokenizer.json goes to transformers, which may give a slow tokenizer.
    transformers = pytest.importorskip("transformers")

    class SlowTokenizer:
        is_fast = False

    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: SlowTokenizer()
    )
    with pytest.raises(ValueError, match="not a fast tokenizer"):
        TokenizerWrapper.from_pretrained(tmp_path)


def test_missing_tokenizer_is_clear_error(tmp_path):
    with pytest.raises(ValueError, match="offline"):
        TokenizerWrapper.from_pretrained(tmp_path / "does-not-exist")


# ----------------------------------------------------------------- tokenizer of a token source


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer of a few dozen ids, built with `tokenizers` (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>"
    ).save_pretrained(path)
    return path


def test_vocab_fingerprint_depends_on_ids_only(tmp_path, tokenizer, tiny_tokenizer_dir):
    base = tokenizer.vocab_fingerprint()
    assert len(base) == 64
    # Another path, other flags, another chat template: the ids mean the same tokens.
    shutil.copytree(DEMO_TOKENIZER_PATH, tmp_path / "tok")
    config = tmp_path / "tok" / "tokenizer_config.json"
    config.write_text(config.read_text().replace("{% generation %}", "{% generation  %}"))
    copy = TokenizerWrapper.from_pretrained(tmp_path / "tok", add_bos=True, add_eos=False)
    assert copy.name != tokenizer.name and copy.fingerprint() != tokenizer.fingerprint()
    assert copy.vocab_fingerprint() == base
    # Another vocabulary, or another eos id, is another fingerprint.
    assert TokenizerWrapper.from_pretrained(tiny_tokenizer_dir).vocab_fingerprint() != base
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = tmp_path / "tok" / name
        file.write_text(
            file.read_text().replace('"eos_token": "<|endoftext|>"', '"eos_token": "<|im_end|>"')
        )
    changed = TokenizerWrapper.from_pretrained(tmp_path / "tok")
    assert changed.eos_id != tokenizer.eos_id
    assert changed.vocab_fingerprint() != base


def _loader_config(source_path, tokenizer_name, **extra):
    return {
        "tokenizer": tokenizer_name,
        "seq_len": 16,
        "global_batch_size": 2,
        "prefetch": 0,
        "sources": {"docs": {"path": str(source_path), "weight": 1.0}},
        **extra,
    }


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory, tiny_tokenizer_dir):
    """A token dataset prepared with the tiny tokenizer."""
    import json

    from wf_data.data.prepare import prepare

    root = tmp_path_factory.mktemp("tiny-prepared")
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS * 4 if text))
    prepare([jsonl], root / "docs", tokenizer=str(tiny_tokenizer_dir), progress=False)
    return root / "docs"


def test_loader_refuses_a_source_of_another_tokenizer(tiny_prepared, tiny_tokenizer_dir):
    from wf_data.data.deliver.factory import get_loader
    from wf_data.data.text.tokenization import TokenizerMismatchError

    tiny = TokenizerWrapper.from_pretrained(tiny_tokenizer_dir)
    with pytest.raises(TokenizerMismatchError) as error:
        get_loader(_loader_config(tiny_prepared, "wf-data-demo"), framework="numpy")
    message = str(error.value)
    assert (
        f"{tiny_prepared} was prepared with tokenizer {str(tiny_tokenizer_dir)!r} "
        f"(vocab_size {tiny.vocab_size})" in message
    )
    assert "configured tokenizer is 'wf-data-demo' (vocab_size 8192)" in message
    assert "allow_tokenizer_mismatch: true" in message

    # The tokenizer it was prepared with streams, and the demo one when explicitly allowed.
    loader = get_loader(_loader_config(tiny_prepared, str(tiny_tokenizer_dir)), framework="numpy")
    assert next(loader)["input_ids"].max() < tiny.vocab_size
    with pytest.warns(UserWarning, match="allowed by allow_tokenizer_mismatch"):
        loader = get_loader(
            _loader_config(tiny_prepared, "wf-data-demo", allow_tokenizer_mismatch=True),
            framework="numpy",
        )
    assert next(loader)["input_ids"].shape == (2, 16)


def test_manifest_without_vocab_fingerprint_compares_sizes_and_special_ids(tokenizer):
    from types import SimpleNamespace

    from wf_data.data.text.tokenization import TokenizerMismatchError, check_source_tokenizer

    recorded = {"name": "old", "vocab_size": 8192, "bos_id": 0, "eos_id": 0, "pad_id": 0}
    with pytest.warns(UserWarning, match="predates tokenizer vocab fingerprints"):
        check_source_tokenizer(
            SimpleNamespace(manifest={"tokenizer": recorded}, path="ds"), tokenizer
        )
    source = SimpleNamespace(manifest={"tokenizer": dict(recorded, eos_id=2)}, path="ds")
    with pytest.raises(TokenizerMismatchError, match="ds was prepared with tokenizer 'old'"):
        check_source_tokenizer(source, tokenizer)
    # A source without a recorded tokenizer (text, or tokens made elsewhere): nothing to check.
    check_source_tokenizer(SimpleNamespace(manifest={"tokenizer": None}), tokenizer)


def test_loading_a_tokenizer_does_not_import_grain_jax_or_transformers():
    # Prepare workers and the CLI load tokenizers; importing Grain (and JAX) costs seconds, and
    # transformers (and torch with it) is not needed for a plain tokenizer.json.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from wf_data.data.text.tokenization import TokenizerWrapper\n"
        "TokenizerWrapper.from_pretrained('wf-data-demo').encode('hi')\n"
        "print(sorted(m for m in ('grain', 'jax', 'transformers', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
