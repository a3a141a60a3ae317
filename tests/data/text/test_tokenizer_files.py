"""Tests for wf_data.data.text.tokenizer_files: a tokenizer directory read with `tokenizers` alone
gives exactly what transformers gives (ids, special ids, template, both fingerprints), and the
layouts transformers would change on load are left to it."""

import hashlib
import json
import shutil

import pytest

from wf_data.data.text import tokenization, tokenizer_files
from wf_data.data.text.tokenization import DEMO_TOKENIZER_PATH, TokenizerWrapper

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world, this is wf-data.",
    "the a <sp> xyz cat<|im_end|>dog",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "unicode: naïve café ∑ 😀",
    "",
]
# What manifests prepared before the tokenizers-only loader recorded for the shipped tokenizer
# (default flags: eos appended): a change here makes every such dataset refuse to load.
SHIPPED_FINGERPRINT = "9a52fef535f3ce3df36599349d8abf9ddd97720330c7d657c9a05587c4e7ff0b"
SHIPPED_VOCAB_FINGERPRINT = "24861397ca9fc8942fbaed5e1078083dd2dca437475588616b6471766d94bf20"


def _transformers_vocab_fingerprint(hf_tokenizer) -> str:
    """`vocab_fingerprint` as computed from a transformers tokenizer before this module."""
    vocab = sorted(hf_tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    specials = {
        key: getattr(hf_tokenizer, f"{key}_token_id") for key in ("bos", "eos", "pad", "unk")
    }
    text = json.dumps([vocab, specials], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _both_ways(path, **flags) -> tuple[TokenizerWrapper, TokenizerWrapper]:
    """The wrapper read with `tokenizers` alone, and the one built by transformers."""
    direct = tokenizer_files.read_directory(path)
    assert direct is not None, f"{path} should load without transformers"
    through_hf = tokenization._load_with_transformers(str(path), str(path))
    return tuple(
        TokenizerWrapper(**loaded, name=str(path), name_or_path=str(path), **flags)
        for loaded in (direct, through_hf)
    )


def _assert_same(direct: TokenizerWrapper, through_hf: TokenizerWrapper) -> None:
    hf = through_hf.hf_tokenizer
    assert direct.vocab_size == through_hf.vocab_size == len(hf)
    assert (direct.bos_id, direct.eos_id, direct.pad_id) == (
        through_hf.bos_id,
        through_hf.eos_id,
        through_hf.pad_id,
    )
    assert direct.chat_template == through_hf.chat_template
    assert direct.backend.get_vocab(True) == hf.get_vocab()
    assert direct.fingerprint() == through_hf.fingerprint()
    assert direct.vocab_fingerprint() == through_hf.vocab_fingerprint()
    assert direct.vocab_fingerprint() == _transformers_vocab_fingerprint(hf)
    encoded = direct.encode_batch(TEXTS)
    for text, ids, expected in zip(TEXTS, encoded, through_hf.encode_batch(TEXTS), strict=True):
        assert ids.tolist() == expected.tolist(), text
        assert direct.decode(ids) == hf.decode(ids.tolist())
        skipped = hf.decode(ids.tolist(), skip_special_tokens=True)
        assert direct.decode(ids, skip_special_tokens=True) == skipped


def _save_word_tokenizer(path, **specials):
    """A WordLevel tokenizer with special and plain added tokens, saved by transformers."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate("the a cat dog".split())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken("<sp>", special=True, normalized=False)])
    backend.add_tokens([AddedToken("xyz", special=False)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(path)
    return path


def _edit_json(path, **changes) -> None:
    document = json.loads(path.read_text()) if path.exists() else {}
    document.update(changes)
    for key in [key for key, value in changes.items() if value is ...]:
        del document[key]
    path.write_text(json.dumps(document))


@pytest.fixture
def shipped_copy(tmp_path):
    shutil.copytree(DEMO_TOKENIZER_PATH, tmp_path / "tok")
    return tmp_path / "tok"


def test_shipped_tokenizer_keeps_its_recorded_fingerprints():
    tokenizer = TokenizerWrapper.from_pretrained("wf-data-demo")
    assert tokenizer._hf_tokenizer is None  # read with tokenizers alone
    assert tokenizer.fingerprint() == SHIPPED_FINGERPRINT
    assert tokenizer.vocab_fingerprint() == SHIPPED_VOCAB_FINGERPRINT


@pytest.mark.parametrize("flags", [{}, {"add_bos": True, "add_eos": False}])
def test_shipped_tokenizer_equals_transformers(flags):
    _assert_same(*_both_ways(DEMO_TOKENIZER_PATH, **flags))


@pytest.mark.parametrize(
    "specials",
    [
        {"eos_token": "</s>", "unk_token": "[UNK]"},
        # Special tokens that transformers adds to tokenizer.json when it saves.
        {"eos_token": "</s>", "pad_token": "<pad>", "additional_special_tokens": ["<extra>"]},
        {"bos_token": "<sp>", "eos_token": "</s>", "unk_token": "[UNK]", "pad_token": "</s>"},
    ],
)
def test_tiny_tokenizers_with_added_tokens_equal_transformers(tmp_path, specials):
    path = _save_word_tokenizer(tmp_path / "tok", **specials)
    direct, through_hf = _both_ways(path)
    _assert_same(direct, through_hf)
    assert "xyz" in direct.backend.get_vocab(True) and direct.eos_id == 1


def test_special_tokens_map_overrides_the_config_as_in_transformers(shipped_copy):
    # Without added_tokens_decoder in the config, transformers lets the legacy map win ...
    _edit_json(shipped_copy / "special_tokens_map.json", eos_token="<|im_end|>")
    direct, through_hf = _both_ways(shipped_copy)
    assert direct.eos_id == 2
    _assert_same(direct, through_hf)
    # ... and with it, the map is not read.
    added = {"0": {"content": "<|endoftext|>", "special": True}}
    _edit_json(shipped_copy / "tokenizer_config.json", added_tokens_decoder=added)
    direct, through_hf = _both_ways(shipped_copy)
    assert direct.eos_id == 0
    _assert_same(direct, through_hf)


def test_chat_template_file_overrides_the_config(shipped_copy):
    (shipped_copy / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    direct, through_hf = _both_ways(shipped_copy)
    assert direct.chat_template == "{{ messages[0]['content'] }}"
    _assert_same(direct, through_hf)
    (shipped_copy / "chat_template.jinja").unlink()
    _edit_json(shipped_copy / "tokenizer_config.json", chat_template=...)
    direct, through_hf = _both_ways(shipped_copy)
    assert direct.chat_template is None
    _assert_same(direct, through_hf)


def test_split_special_tokens_follows_the_config(shipped_copy):
    _edit_json(shipped_copy / "tokenizer_config.json", split_special_tokens=True)
    direct, through_hf = _both_ways(shipped_copy)
    assert 2 not in direct.encode("a<|im_end|>b").tolist()
    _assert_same(direct, through_hf)


def _pad_in_tokenizer_json(path) -> None:
    document = json.loads((path / "tokenizer.json").read_text())
    document["padding"] = {
        "strategy": "BatchLongest",
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 1,
        "pad_type_id": 0,
        "pad_token": "<|im_start|>",
    }
    (path / "tokenizer.json").write_text(json.dumps(document))


@pytest.mark.parametrize(
    "change",
    [
        "model-specific class",
        "special token not in tokenizer.json",
        "special token not marked special",
        "added_tokens.json",
        "padding in tokenizer.json",
        "no tokenizer.json",
        "no tokenizer_config.json",
        "clean_up_tokenization_spaces",
    ],
)
def test_layouts_that_transformers_changes_are_left_to_it(shipped_copy, change):
    config = shipped_copy / "tokenizer_config.json"
    if change == "model-specific class":
        _edit_json(config, tokenizer_class="LlamaTokenizerFast")
    elif change == "special token not in tokenizer.json":
        _edit_json(shipped_copy / "special_tokens_map.json", pad_token="<|pad|>")
    elif change == "special token not marked special":
        _edit_json(shipped_copy / "special_tokens_map.json", pad_token="the")
    elif change == "added_tokens.json":
        (shipped_copy / "added_tokens.json").write_text('{"<|new|>": 8192}')
    elif change == "padding in tokenizer.json":
        _pad_in_tokenizer_json(shipped_copy)
    elif change == "no tokenizer.json":
        (shipped_copy / "tokenizer.json").unlink()
    elif change == "no tokenizer_config.json":
        config.unlink()
    else:
        _edit_json(config, clean_up_tokenization_spaces=True)
    assert tokenizer_files.read_directory(shipped_copy) is None


@pytest.mark.parametrize(
    "change", ["special token not in tokenizer.json", "padding in tokenizer.json"]
)
def test_left_to_transformers_gives_what_transformers_gives(shipped_copy, change):
    if change == "padding in tokenizer.json":
        _pad_in_tokenizer_json(shipped_copy)
    else:
        _edit_json(shipped_copy / "special_tokens_map.json", pad_token="<|pad|>")
    tokenizer = TokenizerWrapper.from_pretrained(shipped_copy)
    hf = transformers.AutoTokenizer.from_pretrained(shipped_copy, local_files_only=True)
    assert tokenizer._hf_tokenizer is not None
    assert (tokenizer.vocab_size, tokenizer.pad_id) == (len(hf), hf.pad_token_id)
    assert tokenizer.vocab_fingerprint() == _transformers_vocab_fingerprint(hf)


def test_a_config_that_is_not_json_names_the_file(shipped_copy):
    (shipped_copy / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not a JSON document"):
        tokenizer_files.read_directory(shipped_copy)
