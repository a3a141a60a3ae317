"""Train the shipped demo tokenizer: byte-level BPE on the demo corpus, saved for transformers.

    uv run python tools/train_tokenizer.py [--out wf_data/assets/tokenizer] [--vocab-size 8192]

The result is deterministic: the same corpus (same Python minor version) and options give
byte-identical files, so the shipped tokenizer can be regenerated and checked at any time.
Special tokens: ``<|endoftext|>`` (id 0; bos, eos and pad), ``<|im_start|>``, ``<|im_end|>``.
The ChatML chat template is plain Jinja; ``wf_data.data.text.chat`` finds the assistant tokens (the
SFT loss mask) by rendering conversation prefixes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from wf_data import atomic
from wf_data.data.prepare.demo_corpus import build_demo_corpus, corpus_fingerprint

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

DEFAULT_OUT = REPO_ROOT / "wf_data" / "assets" / "tokenizer"
DEFAULT_VOCAB_SIZE = 8192
# Beside the tokenizer files: which corpus it was trained on. The stdlib sources and pydoc
# topics differ between Python versions, so byte-identical regeneration needs the same corpus.
TRAINING_RECORD = "training_corpus.json"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")

# ChatML in plain Jinja (no {% generation %}: torchtitan's and any plain Jinja must load it).
# The "\n" between turns opens the next turn, so the prefix method of wf_data.data.text.chat finds
# each assistant reply plus its closing <|im_end|> as the loss tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{%- if messages %}{{- '\\n' }}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(documents: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE ``Tokenizer`` on ``documents`` (special tokens get ids 0, 1, 2)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tokenizer


def tokenizer_config() -> dict:
    """The transformers ``tokenizer_config.json`` content (written by hand, so the files do not
    depend on the installed transformers version)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict:
    """The transformers ``special_tokens_map.json`` content."""
    return {
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
    }


def training_record(corpus: dict[str, list[str]], vocab_size: int, seed: int) -> dict:
    """What the tokenizer was trained on: Python version, corpus sha256, per-domain sizes."""
    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "seed": seed,
        "vocab_size": vocab_size,
        "corpus_sha256": corpus_fingerprint(corpus),
        "domains": {
            domain: {
                "documents": len(documents),
                "bytes": sum(len(doc.encode("utf-8")) for doc in documents),
            }
            for domain, documents in corpus.items()
        },
    }


def save_tokenizer(
    tokenizer: Tokenizer, out_dir: str | os.PathLike, record: dict | None = None
) -> list[pathlib.Path]:
    """Save ``tokenizer`` in transformers format into ``out_dir``; return the written files.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template),
    ``special_tokens_map.json`` and, given ``record``, ``training_corpus.json``; each goes to a
    temporary file first and is renamed into place, so a killed run leaves no half-written file.
    """
    out_path = pathlib.Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    contents = {
        "tokenizer.json": tokenizer.to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config(), indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special_tokens_map(), indent=2) + "\n",
    }
    if record is not None:
        contents[TRAINING_RECORD] = json.dumps(record, indent=2) + "\n"
    written = []
    for name, text in contents.items():
        target = out_path / name
        atomic.write_text(target, text)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: build the demo corpus, train, save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output directory")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo math domain")
    args = parser.parse_args(argv)
    corpus = build_demo_corpus(seed=args.seed)
    documents = [doc for domain in sorted(corpus) for doc in corpus[domain]]
    tokenizer = train_tokenizer(documents, vocab_size=args.vocab_size)
    record = training_record(corpus, args.vocab_size, args.seed)
    for path in save_tokenizer(tokenizer, args.out, record):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    print(f"vocab size {tokenizer.get_vocab_size()} trained on {len(documents)} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
