"""A small deterministic three-domain corpus built from what every CPython install carries.

The demo and the tests run offline, so their data comes from the interpreter itself:

- ``prose``: the English help topics of ``pydoc_data.topics`` (one document per topic),
- ``code``: a capped, sorted subset of the standard library's ``.py`` sources,
- ``math``: arithmetic word problems with worked answers, generated from a seed.

The corpus is identical on every machine with the same Python minor version (and the
same seed for ``math``). ``write_demo_jsonl`` writes it as one jsonl file per domain,
optionally restricted to a fixed 95/5 train/validation split chosen by document hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import sysconfig
from collections.abc import Callable

import numpy as np

from wf_data import atomic

DOMAINS = ("prose", "code", "math")
SPLITS = ("all", "train", "validation")
VALIDATION_PERCENT = 5

# Directories of the standard library that are not representative code (tests, the IDLE
# GUI, vendored or third-party packages) or would make the corpus depend on the install.
# Linux distributions split some of them (tkinter, distutils, venv...) into separate packages.
_SKIPPED_CODE_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "venv",
        "tkinter",
        "distutils",
        "encodings",
        "pydoc_data",
        "lib-dynload",
        "__phello__",
    }
)
_SKIPPED_CODE_FILES = frozenset({"turtle.py", "this.py", "antigravity.py", "__hello__.py"})


def prose_documents() -> list[str]:
    """The English pydoc help topics, one document per topic, in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics) if topics[name].strip()]


def code_documents(
    max_files: int = 400, max_file_bytes: int = 60_000, max_total_bytes: int = 2_500_000
) -> list[str]:
    """Standard-library ``.py`` sources: sorted relative paths, capped by count and size.

    Files larger than ``max_file_bytes`` or that do not decode as UTF-8 are skipped; the walk
    stops at ``max_files`` documents or ``max_total_bytes`` bytes of text.
    """
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    relative_paths = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [
            d for d in dirnames if d not in _SKIPPED_CODE_DIRS and not d.startswith("config-")
        ]
        relative_paths.extend(
            (pathlib.Path(dirpath) / f).relative_to(stdlib).as_posix()
            for f in filenames
            if f.endswith(".py")
            and not f.startswith(("test_", "_sysconfigdata"))
            and f not in _SKIPPED_CODE_FILES
        )
    documents: list[str] = []
    total_bytes = 0
    for relative_path in sorted(relative_paths):
        raw = (stdlib / relative_path).read_bytes()
        if not raw.strip() or len(raw) > max_file_bytes:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if total_bytes + len(raw) > max_total_bytes or len(documents) >= max_files:
            break
        documents.append(f"# {relative_path}\n{text}")
        total_bytes += len(raw)
    return documents


_NAMES = (
    "Ava",
    "Ben",
    "Chen",
    "Dana",
    "Eli",
    "Farah",
    "Gus",
    "Hana",
    "Ivan",
    "Jo",
    "Kofi",
    "Lena",
    "Mo",
    "Nia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
)
_ITEMS = (
    ("apple", "apples"),
    ("notebook", "notebooks"),
    ("pencil", "pencils"),
    ("ticket", "tickets"),
    ("melon", "melons"),
    ("book", "books"),
    ("cup", "cups"),
)


def _shopping(rng: np.random.Generator, name: str) -> str:
    (item, items), (other, others) = (_ITEMS[i] for i in rng.choice(len(_ITEMS), 2, replace=False))
    count_a, count_b = rng.integers(2, 13, size=2)
    price_a, price_b = rng.integers(1, 20, size=2)
    paid = int(count_a * price_a + count_b * price_b + rng.integers(0, 50))
    total = count_a * price_a + count_b * price_b
    return (
        f"Question: {name} buys {count_a} {items} at ${price_a} each and {count_b} {others} "
        f"at ${price_b} each, and pays with ${paid}. How much change does {name} get?\n"
        f"Answer: The {items} cost {count_a} * {price_a} = ${count_a * price_a}. "
        f"The {others} cost {count_b} * {price_b} = ${count_b * price_b}. "
        f"Together that is ${total}, so the change is {paid} - {total} = ${paid - total}."
    )


def _rate(rng: np.random.Generator, name: str) -> str:
    speed = int(rng.integers(3, 90))
    hours = int(rng.integers(2, 9))
    extra = int(rng.integers(1, 60))
    distance = speed * hours
    return (
        f"Question: {name} travels at {speed} km per hour for {hours} hours, then walks "
        f"another {extra} km. How far does {name} go in total?\n"
        f"Answer: At {speed} km per hour for {hours} hours the distance is {speed} * {hours} "
        f"= {distance} km. Adding {extra} km gives {distance} + {extra} = "
        f"{distance + extra} km."
    )


def _area(rng: np.random.Generator, name: str) -> str:
    width, length = (int(v) for v in rng.integers(2, 40, size=2))
    cost = int(rng.integers(2, 15))
    area = width * length
    return (
        f"Question: {name} wants to tile a floor that is {width} m wide and {length} m long. "
        f"Tiles cost ${cost} per square metre. What is the total cost?\n"
        f"Answer: The area is {width} * {length} = {area} square metres. "
        f"The cost is {area} * {cost} = ${area * cost}."
    )


def _fraction(rng: np.random.Generator, name: str) -> str:
    denominator = int(rng.choice([2, 3, 4, 5, 6, 8, 10]))
    numerator = int(rng.integers(1, denominator))
    whole = denominator * int(rng.integers(2, 30))
    part = whole * numerator // denominator
    return (
        f"Question: {name} has {whole} marbles and gives away {numerator}/{denominator} of "
        f"them. How many marbles are left?\n"
        f"Answer: {numerator}/{denominator} of {whole} is {whole} / {denominator} * "
        f"{numerator} = {part}. So {whole} - {part} = {whole - part} marbles are left."
    )


def _percent(rng: np.random.Generator, name: str) -> str:
    price = int(rng.integers(2, 50)) * 10
    discount = int(rng.choice([10, 15, 20, 25, 30, 40, 50]))
    saved = price * discount // 100
    return (
        f"Question: A jacket costs ${price}. {name} has a coupon for {discount}% off. "
        f"What does {name} pay?\n"
        f"Answer: {discount}% of {price} is {price} * {discount} / 100 = {saved}. "
        f"{name} pays {price} - {saved} = ${price - saved}."
    )


def _sharing(rng: np.random.Generator, name: str) -> str:
    people = int(rng.integers(2, 12))
    each = int(rng.integers(2, 25))
    left = int(rng.integers(0, people))
    total = people * each + left
    return (
        f"Question: {name} shares {total} stickers equally among {people} friends and keeps "
        f"the rest. How many does each friend get, and how many does {name} keep?\n"
        f"Answer: {total} divided by {people} is {each} with remainder {left}, since "
        f"{people} * {each} = {people * each}. Each friend gets {each} and {name} keeps "
        f"{left}."
    )


def _work(rng: np.random.Generator, name: str) -> str:
    rate = int(rng.integers(8, 40))
    hours_per_day = int(rng.integers(2, 9))
    days = int(rng.integers(2, 7))
    hours = hours_per_day * days
    return (
        f"Question: {name} earns ${rate} per hour and works {hours_per_day} hours a day for "
        f"{days} days. How much does {name} earn?\n"
        f"Answer: {name} works {hours_per_day} * {days} = {hours} hours and earns "
        f"{hours} * {rate} = ${hours * rate}."
    )


_MATH_TEMPLATES: tuple[Callable[[np.random.Generator, str], str], ...] = (
    _shopping,
    _rate,
    _area,
    _fraction,
    _percent,
    _sharing,
    _work,
)


def math_documents(num_documents: int = 3000, seed: int = 0) -> list[str]:
    """Arithmetic word problems with worked answers, from ``np.random.default_rng([seed, 2])``."""
    rng = np.random.default_rng([seed, 2])
    template_ids = rng.integers(0, len(_MATH_TEMPLATES), size=num_documents)
    name_ids = rng.integers(0, len(_NAMES), size=num_documents)
    return [_MATH_TEMPLATES[t](rng, _NAMES[n]) for t, n in zip(template_ids, name_ids, strict=True)]


def build_demo_corpus(
    seed: int = 0,
    *,
    num_math: int = 3000,
    max_code_files: int = 400,
    max_code_bytes: int = 2_500_000,
) -> dict[str, list[str]]:
    """The three-domain demo corpus: ``{"prose": [...], "code": [...], "math": [...]}``.

    ``seed`` only affects ``math``; ``prose`` and ``code`` depend on the Python minor version.
    """
    return {
        "prose": prose_documents(),
        "code": code_documents(max_files=max_code_files, max_total_bytes=max_code_bytes),
        "math": math_documents(num_math, seed=seed),
    }


def corpus_fingerprint(corpus: dict[str, list[str]]) -> str:
    """sha256 hex over the domains and documents of ``corpus`` (in order)."""
    digest = hashlib.sha256()
    for domain, documents in corpus.items():
        digest.update(f"{domain}\0{len(documents)}\0".encode())
        for doc in documents:
            data = doc.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def in_validation(text: str) -> bool:
    """Whether a document is in the held-out split: a fixed 5% chosen by its sha256."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % 100 < VALIDATION_PERCENT


def split_documents(documents: list[str], split: str) -> list[str]:
    """Filter ``documents`` to ``split`` (``"all"``, ``"train"`` or ``"validation"``)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if split == "all":
        return list(documents)
    want_validation = split == "validation"
    return [doc for doc in documents if in_validation(doc) == want_validation]


def write_demo_jsonl(
    out_dir: str | os.PathLike,
    *,
    split: str = "all",
    seed: int = 0,
    corpus: dict[str, list[str]] | None = None,
) -> dict[str, pathlib.Path]:
    """Write ``{out_dir}/{domain}.jsonl`` (``{"text": ...}`` per line) for each domain.

    With ``split="train"`` or ``"validation"`` only that side of the 95/5 hash split is written
    (file names get a ``-{split}`` suffix). Files are written atomically (temp file + rename).
    Returns ``{domain: path}``.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    out_path = pathlib.Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    corpus = build_demo_corpus(seed) if corpus is None else corpus
    suffix = "" if split == "all" else f"-{split}"
    paths = {}
    for domain, documents in corpus.items():
        path = out_path / f"{domain}{suffix}.jsonl"
        with atomic.AtomicWriter(path, "w") as f:
            for doc in split_documents(documents, split):
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        paths[domain] = path
    return paths


def demo_cache_dir() -> pathlib.Path:
    """Where the prepared demo corpus lives: ``$WF_DATA_CACHE/demo``, default ~/.cache/wf-data."""
    root = os.environ.get("WF_DATA_CACHE") or os.path.join("~", ".cache", "wf-data")
    return pathlib.Path(root).expanduser() / "demo"


def ensure_demo_data(
    root: str | os.PathLike | None = None, *, progress: bool = True
) -> pathlib.Path:
    """Prepare the demo corpus as token shards once (cached) and return their root directory.

    Writes ``root/{prose,code,math}`` (training split) and ``root/validation/{...}``, the
    layout ``configs/data/demo.yaml`` reads. A stamp of the corpus and tokenizer fingerprints
    makes a changed corpus (another Python) or tokenizer prepare again.
    """
    from wf_data.data.prepare import prepare
    from wf_data.data.text.tokenization import TokenizerWrapper

    root = demo_cache_dir() if root is None else pathlib.Path(root)
    tokenizer = TokenizerWrapper.from_pretrained(None)
    corpus = build_demo_corpus()
    from wf_data.data.shards.sources import MANIFEST_VERSION

    # The manifest version too: a cache written by an older wf-data is prepared again.
    stamp = {
        "corpus": corpus_fingerprint(corpus),
        "tokenizer": tokenizer.fingerprint(),
        "manifest_version": MANIFEST_VERSION,
    }
    stamp_path = root / "demo-stamp.json"
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return root
    jsonl_dir = root / "jsonl"
    for split, out_root in (("train", root), ("validation", root / "validation")):
        paths = write_demo_jsonl(jsonl_dir, split=split, corpus=corpus)
        for domain, path in paths.items():
            if (out_root / domain).exists():
                shutil.rmtree(out_root / domain)
            prepare(
                [path],
                out_root / domain,
                tokenizer=tokenizer,
                name=domain,
                num_shards=2,
                progress=progress,
            )
    stamp_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(stamp_path, json.dumps(stamp))
    return root
