"""The tokenizer wrapper: ``(n,) int32`` token ids, bos/eos by flag, fingerprints for manifests.

The wrapper pins down what the rest of the package relies on: token ids as ``(n,) int32``
numpy arrays, optional bos/eos added by flag (no other special tokens), batched encoding on
the Rust side, a fingerprint of the tokenizer files for manifests and caches, and cheap
pickling (the path and flags travel; the tokenizer is reloaded in the worker process).
A directory with a plain ``tokenizer.json`` loads with the ``tokenizers`` library alone
(``tokenizer_files``); a Hub model name or another layout loads with transformers (the ``hf``
extra). The name ``"wf-data-demo"`` (or ``None``) is the byte-level BPE tokenizer shipped in
``wf_data/assets/tokenizer/`` (trained by ``tools/train_tokenizer.py``), so everything runs
offline. The ``tokenize`` transform is in ``tokenize_dataset``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wf_data.data.text import tokenizer_files
from wf_data.extras import requires

DEMO_TOKENIZER_NAME = "wf-data-demo"
DEMO_TOKENIZER_PATH = pathlib.Path(__file__).resolve().parents[2] / "assets" / "tokenizer"

# Files that define a transformers tokenizer; the fingerprint hashes those present.
_TOKENIZER_FILES = (
    "added_tokens.json",
    "chat_template.jinja",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
)
_SPECIALS = ("bos", "eos", "pad", "unk")


def _resolve(name_or_path: str | os.PathLike | None) -> tuple[str, str]:
    """Map a user-facing name to ``(name, directory or Hub name)``."""
    if name_or_path is None or str(name_or_path) == DEMO_TOKENIZER_NAME:
        return DEMO_TOKENIZER_NAME, str(DEMO_TOKENIZER_PATH)
    return str(name_or_path), str(name_or_path)


def _load_with_transformers(name: str, path: str) -> dict[str, Any]:
    """``TokenizerWrapper`` arguments from transformers' ``AutoTokenizer`` (offline)."""
    with requires("hf", feature=f"loading tokenizer {name!r} (not a plain tokenizer.json)"):
        from transformers import AutoTokenizer

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot load tokenizer {name!r} from {path!r} offline (a local directory, a "
            f"model already in the Hugging Face cache, or {DEMO_TOKENIZER_NAME!r}): {error}"
        ) from error
    if not getattr(hf_tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer {name!r} is not a fast tokenizer ({type(hf_tokenizer).__name__}); "
            "wf-data needs a tokenizers-backed (fast) tokenizer with a tokenizer.json"
        )
    template = getattr(hf_tokenizer, "chat_template", None)
    return {
        "backend": hf_tokenizer.backend_tokenizer,
        "special_ids": {key: getattr(hf_tokenizer, f"{key}_token_id") for key in _SPECIALS},
        "chat_template": template if isinstance(template, str) else None,
        "hf_tokenizer": hf_tokenizer,
    }


class TokenizerWrapper:
    """A ``tokenizers`` tokenizer returning ``(n,) int32`` numpy token arrays.

    ``add_bos``/``add_eos`` put the bos/eos id at the start/end of every encoded text; no
    other special tokens are added (special-token strings inside the text are still parsed
    as special tokens, as transformers does). Pickles as ``(name, flags)`` and reloads the
    tokenizer in the receiving process, so Grain worker processes can use it.
    """

    def __init__(
        self,
        backend: Any,
        *,
        name: str,
        name_or_path: str,
        special_ids: Mapping[str, int | None],
        chat_template: str | None = None,
        hf_tokenizer: Any = None,
        add_bos: bool = False,
        add_eos: bool = True,
    ):
        self._backend = backend
        self._special_ids = {key: special_ids.get(key) for key in _SPECIALS}
        self._chat_template = chat_template
        self._hf_tokenizer = hf_tokenizer
        # Loaded by transformers: decode as it does (it may clean up spaces); the files read
        # without it decode the same with the backend alone.
        self._decode = hf_tokenizer.decode if hf_tokenizer is not None else backend.decode
        self._name = name
        self._name_or_path = name_or_path
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        if self.add_bos and self.bos_id is None:
            raise ValueError(f"tokenizer {name!r} has no bos token, but add_bos=True")
        if self.add_eos and self.eos_id is None:
            raise ValueError(f"tokenizer {name!r} has no eos token, but add_eos=True")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | None = None,
        *,
        add_bos: bool = False,
        add_eos: bool = True,
    ) -> TokenizerWrapper:
        """Load from a local directory or the local HF cache (never downloads). ``None`` or
        ``"wf-data-demo"`` loads the shipped demo tokenizer.

        A directory with a plain ``tokenizer.json`` loads with ``tokenizers`` alone; anything
        else (a Hub name, a model-specific tokenizer class) needs transformers (``hf`` extra).
        """
        name, path = _resolve(name_or_path)
        loaded = tokenizer_files.read_directory(path) if os.path.isdir(path) else None
        if loaded is None:
            loaded = _load_with_transformers(name, path)
        return cls(**loaded, name=name, name_or_path=path, add_bos=add_bos, add_eos=add_eos)

    # Pickling: only the name and flags travel; the receiving process reloads the files.
    def __getstate__(self) -> dict:
        return {
            "name": self._name,
            "name_or_path": self._name_or_path,
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
        }

    def __setstate__(self, state: dict) -> None:
        source = None if state["name"] == DEMO_TOKENIZER_NAME else state["name_or_path"]
        loaded = TokenizerWrapper.from_pretrained(
            source, add_bos=state["add_bos"], add_eos=state["add_eos"]
        )
        self.__dict__.update(loaded.__dict__)

    def __repr__(self) -> str:
        return (
            f"TokenizerWrapper(name={self._name!r}, vocab_size={self.vocab_size}, "
            f"add_bos={self.add_bos}, add_eos={self.add_eos})"
        )

    @property
    def name(self) -> str:
        """The name given at load time (``"wf-data-demo"`` for the shipped tokenizer)."""
        return self._name

    @property
    def name_or_path(self) -> str:
        """The directory or hub name the tokenizer was loaded from."""
        return self._name_or_path

    @property
    def backend(self) -> Any:
        """The ``tokenizers.Tokenizer`` that encodes (what prepare's workers pickle)."""
        return self._backend

    @property
    def hf_tokenizer(self) -> Any:
        """The transformers tokenizer of the same files (chat templates, HF APIs), loaded on
        first use: it needs the ``hf`` extra."""
        if self._hf_tokenizer is None:
            self._hf_tokenizer = _load_with_transformers(self._name, self._name_or_path)[
                "hf_tokenizer"
            ]
        return self._hf_tokenizer

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's Jinja chat template, or ``None``."""
        return self._chat_template

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (``len(tokenizer)`` in transformers)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or ``None``."""
        return self._special_ids["bos"]

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token, or ``None``."""
        return self._special_ids["eos"]

    @property
    def pad_id(self) -> int:
        """Id used for padding: the pad token, else the eos token, else 0."""
        for token_id in (self._special_ids["pad"], self.eos_id):
            if token_id is not None:
                return int(token_id)
        return 0

    def _with_specials(self, ids: Sequence[int]) -> np.ndarray:
        start = int(self.add_bos)
        tokens = np.empty(len(ids) + start + int(self.add_eos), dtype=np.int32)
        if self.add_bos:
            tokens[0] = self.bos_id
        if self.add_eos:
            tokens[-1] = self.eos_id
        tokens[start : start + len(ids)] = ids
        return tokens

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a ``(n,) int32`` array, with bos/eos per the flags."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._with_specials(self._backend.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many texts in one call of the Rust batch encoder (parallel, no padding).

        Returns one ``(n_i,) int32`` array per text, equal to ``encode(text)``.
        """
        texts = list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch: text {index} is {type(text).__name__}, not str")
        batch_encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        encodings = batch_encode(texts, add_special_tokens=False)
        return [self._with_specials(encoding.ids) for encoding in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of the token ids ``ids`` (a 1-D int array or sequence)."""
        return self._decode(np.asarray(ids).tolist(), skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> str:
        """sha256 hex over the tokenizer files (sorted by name) and the bos/eos flags.

        Equal fingerprints mean equal token ids for equal text, wherever the files live.
        """
        digest = hashlib.sha256()
        directory = pathlib.Path(self._name_or_path)
        files = (
            sorted(directory / name for name in _TOKENIZER_FILES if (directory / name).is_file())
            if directory.is_dir()
            else []
        )
        for path in files:
            data = path.read_bytes()
            digest.update(f"{path.name}\0{len(data)}\0".encode())
            digest.update(data)
        if not files:  # loaded from the hub cache: hash the serialized tokenizer instead
            digest.update(self._backend.to_str().encode("utf-8"))
            digest.update((self.chat_template or "").encode("utf-8"))
        digest.update(f"add_bos={self.add_bos}\0add_eos={self.add_eos}".encode())
        return digest.hexdigest()

    def vocab_fingerprint(self) -> str:
        """sha256 hex of what token ids mean: the vocabulary (token -> id, added tokens
        included) and the bos/eos/pad/unk ids.

        Token ids prepared with one tokenizer read correctly under another with the same vocab
        fingerprint, whatever its name, path, chat template or bos/eos flags; ``prepare`` records
        it in the manifest and the loader compares it (``check_source_tokenizer``).
        """
        if "_vocab_fingerprint" not in self.__dict__:
            vocab = self._backend.get_vocab(with_added_tokens=True)
            vocab = sorted(vocab.items(), key=lambda item: (item[1], item[0]))
            specials = dict(self._special_ids)
            text = json.dumps([vocab, specials], ensure_ascii=False, sort_keys=True)
            self._vocab_fingerprint = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return self._vocab_fingerprint


class TokenizerMismatchError(ValueError):
    """A token source was prepared with another tokenizer than the one configured."""


def check_source_tokenizer(source: Any, tokenizer: Any, *, allow_mismatch: bool = False) -> None:
    """Refuse to read a prepared token ``source`` under a ``tokenizer`` whose ids mean other
    tokens than the tokenizer recorded in its manifest (vocab fingerprints differ).

    ``allow_mismatch`` turns the error into a warning. Nothing is checked when the source has
    no recorded tokenizer (text, or tokens from elsewhere) or no tokenizer is configured. A
    manifest from before vocab fingerprints is compared by vocab size and special ids.
    """
    recorded = (getattr(source, "manifest", None) or {}).get("tokenizer")
    if not recorded or not isinstance(tokenizer, TokenizerWrapper):
        return
    where = getattr(source, "path", None) or repr(source)
    if "vocab_fingerprint" in recorded:
        differs = recorded["vocab_fingerprint"] != tokenizer.vocab_fingerprint()
    else:
        current = {
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
        }
        differs = any(recorded.get(key) != value for key, value in current.items())
        if not differs:
            warnings.warn(
                f"{where}: the manifest predates tokenizer vocab fingerprints, so only "
                "its vocab size and special ids were compared with the configured "
                "tokenizer; re-run `wf-data prepare` for the full check",
                stacklevel=2,
            )
    if not differs:
        return
    message = (
        f"{where} was prepared with tokenizer {recorded.get('name')!r} (vocab_size "
        f"{recorded.get('vocab_size')}), but the configured tokenizer is {tokenizer.name!r} "
        f"(vocab_size {tokenizer.vocab_size}), whose token ids mean other tokens. Configure "
        f"tokenizer: {recorded.get('name')}, re-prepare the source with `wf-data prepare "
        f"--tokenizer {tokenizer.name}`, or set allow_tokenizer_mismatch: true to read the ids "
        "anyway"
    )
    if not allow_mismatch:
        raise TokenizerMismatchError(message)
    warnings.warn(f"{message} (allowed by allow_tokenizer_mismatch)", stacklevel=2)
