"""A Hugging Face tokenizer directory read with the `tokenizers` library alone, and the test of
when that gives exactly what transformers' `AutoTokenizer` gives.

The direct read takes `tokenizer.json` as the tokenizer, the special tokens from
`tokenizer_config.json` (then `special_tokens_map.json`, as transformers merges them) and the chat
template from `chat_template.jinja` or the config. Transformers changes the backend on load in a
few cases: a model-specific `tokenizer_class` rebuilds it from the vocabulary, a special token
missing from `tokenizer.json` is added, `added_tokens.json` adds tokens, padding in
`tokenizer.json` sets the pad token, a large vocabulary beside a `config.json` may get Mistral's
regex patch. `read_directory` returns None for each of them (and for a directory without
`tokenizer.json`): the caller then loads with transformers, so token ids never differ.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

# Tokenizer classes that load `tokenizer.json` as it is (transformers 4: the first; 5: both).
GENERIC_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
# transformers' named special-token attributes (`SPECIAL_TOKENS_ATTRIBUTES`).
NAMED_SPECIALS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Above this vocabulary size, transformers 5 may patch the pre-tokenizer of a Mistral model
# (found through a `config.json` next to the tokenizer).
_MISTRAL_PATCH_VOCAB = 100_000


def read_directory(directory: str | pathlib.Path) -> dict[str, Any] | None:
    """``{"backend", "special_ids", "chat_template"}`` of a tokenizer directory, read without
    transformers, or None when only transformers loads it faithfully (see the module docstring).

    ``special_ids`` maps bos/eos/pad/unk to their ids (None when the tokenizer has none).
    """
    from tokenizers import Tokenizer

    directory = pathlib.Path(directory)
    config = _json(directory / "tokenizer_config.json")
    if (
        not (directory / "tokenizer.json").is_file()
        or not isinstance(config, dict)
        or config.get("tokenizer_class") not in GENERIC_CLASSES
        or (directory / "added_tokens.json").exists()
        or (directory / "additional_chat_templates").exists()
        or config.get("clean_up_tokenization_spaces")
        or "fast_tokenizer_files" in config
    ):
        return None
    specials = _special_tokens(config, _json(directory / "special_tokens_map.json"))
    if specials is None:
        return None
    backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    if backend.padding is not None or not _registered(backend, specials, config):
        return None
    if (directory / "config.json").exists() and backend.get_vocab_size() > _MISTRAL_PATCH_VOCAB:
        return None
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    named = specials["named"]
    return {
        "backend": backend,
        "special_ids": {
            key: None
            if named.get(f"{key}_token") is None
            else backend.token_to_id(named[key + "_token"])
            for key in ("bos", "eos", "pad", "unk")
        },
        "chat_template": _chat_template(directory, config),
    }


def _json(path: pathlib.Path) -> Any:
    """The JSON document at `path`, or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON document ({error})") from error


def _content(token: Any) -> str | None | bool:
    """The text of a special-token entry (a str, or a dict with "content"); False if neither."""
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, Mapping) and isinstance(token.get("content"), str):
        return token["content"]
    return False


def _special_tokens(config: dict, special_map: Any) -> dict | None:
    """``{"named": {attr: text or None}, "extra": [text, ...]}`` as transformers merges the
    config and the legacy `special_tokens_map.json`; None for an entry it reads otherwise."""
    entries = dict(config)
    if "added_tokens_decoder" not in config and isinstance(special_map, dict):
        entries.update(special_map)  # transformers lets the legacy map override the config
    named = {
        key: _content(value)
        for key, value in entries.items()
        if key in NAMED_SPECIALS or (key.endswith("_token") and isinstance(value, str))
    }
    extra = [
        _content(token)
        for key in ("additional_special_tokens", "extra_special_tokens")
        for token in (entries.get(key) or [])
    ]
    if isinstance(entries.get("extra_special_tokens"), dict) or False in [*named.values(), *extra]:
        return None
    if any(isinstance(config.get(key), dict) for key in NAMED_SPECIALS):
        return None  # transformers refuses a plain dict here; let it say so
    return {"named": named, "extra": extra}


def _registered(backend: Any, specials: dict, config: dict) -> bool:
    """True when every special token is already a special added token of `backend`, and the
    config's `added_tokens_decoder` agrees with it (else transformers would add or change it)."""
    added = {
        token.content: (index, token) for index, token in backend.get_added_tokens_decoder().items()
    }
    for text in [*specials["named"].values(), *specials["extra"]]:
        if text is not None and (text not in added or not added[text][1].special):
            return False
    for index, entry in (config.get("added_tokens_decoder") or {}).items():
        content = _content(entry)
        if content not in added or added[content][0] != int(index):
            return False
        if isinstance(entry, Mapping) and bool(entry.get("special")) != added[content][1].special:
            return False
    return True


def _chat_template(directory: pathlib.Path, config: dict) -> str | None:
    """`chat_template.jinja`, else the config's template when it is one string (transformers
    reads a list of named templates as a dict, which the wrapper reports as None)."""
    path = directory / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    return template if isinstance(template, str) else None
