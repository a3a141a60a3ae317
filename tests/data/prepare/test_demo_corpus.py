"""Tests for wf_data.data.prepare.demo_corpus: the offline three-domain demo corpus."""

import json

import pytest

from wf_data.data.prepare.demo_corpus import (
    DOMAINS,
    build_demo_corpus,
    corpus_fingerprint,
    in_validation,
    math_documents,
    split_documents,
    write_demo_jsonl,
)


@pytest.fixture(scope="module")
def corpus():
    return build_demo_corpus(seed=0)


def test_three_domains_non_empty(corpus):
    assert tuple(corpus) == DOMAINS
    for domain, documents in corpus.items():
        assert len(documents) > 50, domain
        assert all(isinstance(doc, str) and doc.strip() for doc in documents), domain
    total_bytes = sum(len(doc.encode()) for docs in corpus.values() for doc in docs)
    assert 1_000_000 < total_bytes < 6_000_000
    assert any("def " in doc for doc in corpus["code"])
    assert all(doc.startswith("Question: ") and "\nAnswer: " in doc for doc in corpus["math"])


def test_deterministic(corpus):
    assert build_demo_corpus(seed=0) == corpus
    other = build_demo_corpus(seed=1)
    assert other["prose"] == corpus["prose"] and other["code"] == corpus["code"]
    assert other["math"] != corpus["math"]


def test_math_templates_varied():
    documents = math_documents(200, seed=3)
    assert len({doc.split(" ", 3)[2] for doc in documents}) > 4  # verbs differ per template
    assert len(set(documents)) > 190


def test_split_disjoint_and_complete(corpus):
    for documents in corpus.values():
        train = split_documents(documents, "train")
        validation = split_documents(documents, "validation")
        assert not set(train) & set(validation)
        assert sorted(train + validation) == sorted(documents)
    math_validation = split_documents(corpus["math"], "validation")
    assert 0.02 < len(math_validation) / len(corpus["math"]) < 0.09
    assert all(in_validation(doc) for doc in math_validation)
    with pytest.raises(ValueError, match="split 'test'"):
        split_documents(corpus["math"], "test")


def test_write_demo_jsonl(tmp_path, corpus):
    small = {domain: documents[:40] for domain, documents in corpus.items()}
    paths = write_demo_jsonl(tmp_path, corpus=small)
    assert set(paths) == set(DOMAINS)
    for domain, path in paths.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)["text"] for line in lines] == small[domain]
    train = write_demo_jsonl(tmp_path, corpus=small, split="train")
    validation = write_demo_jsonl(tmp_path, corpus=small, split="validation")
    for domain in DOMAINS:
        assert train[domain].name == f"{domain}-train.jsonl"
        train_texts = {json.loads(x)["text"] for x in train[domain].read_text().splitlines()}
        val_texts = {json.loads(x)["text"] for x in validation[domain].read_text().splitlines()}
        assert not train_texts & val_texts
        assert train_texts | val_texts == set(small[domain])
    assert not list(tmp_path.glob("*.tmp"))


def test_corpus_fingerprint(corpus):
    assert corpus_fingerprint(corpus) == corpus_fingerprint(build_demo_corpus(seed=0))
    changed = dict(corpus, math=corpus["math"][:-1])
    assert corpus_fingerprint(changed) != corpus_fingerprint(corpus)
