"""Tests for wf_data.data.text.tokenize_dataset: the `tokenize` transform over text documents."""

import pickle

import grain
import numpy as np
import pytest

from tests.data.text.test_tokenization import TEXTS
from wf_data.data.text.tokenization import DEMO_TOKENIZER_NAME, TokenizerWrapper
from wf_data.data.text.tokenize_dataset import TokenizeDataset, tokenize


@pytest.fixture(scope="module")
def tokenizer():
    return TokenizerWrapper.from_pretrained(DEMO_TOKENIZER_NAME)


def test_tokenize_dataset(tokenizer):
    ds = tokenize(TEXTS, tokenizer)
    assert isinstance(ds, TokenizeDataset) and isinstance(ds, grain.MapDataset)
    assert len(ds) == len(TEXTS)
    for index, text in enumerate(TEXTS):
        np.testing.assert_array_equal(ds[index], tokenizer.encode(text))
    batch = ds.__getitems__([4, 0, 2])
    for got, index in zip(batch, [4, 0, 2], strict=True):
        np.testing.assert_array_equal(got, tokenizer.encode(TEXTS[index]))
    np.testing.assert_array_equal(list(ds[1:3])[1], tokenizer.encode(TEXTS[2]))
    assert [len(x) for x in ds.to_iter_dataset()] == [len(tokenizer.encode(t)) for t in TEXTS]


def test_tokenize_accepts_name_and_map_dataset():
    ds = tokenize(grain.MapDataset.source(TEXTS), DEMO_TOKENIZER_NAME)
    assert ds.tokenizer.name == DEMO_TOKENIZER_NAME
    assert ds[0][-1] == ds.tokenizer.eos_id


def test_tokenize_dataset_type_error_names_index(tokenizer):
    ds = TokenizeDataset(grain.MapDataset.source(["fine", {"text": "dict"}]), tokenizer)
    with pytest.raises(TypeError, match="element 1 is dict"):
        ds[1]
    with pytest.raises(TypeError, match="element 1 is dict"):
        ds.__getitems__([0, 1])
    with pytest.raises(TypeError, match="TokenizerWrapper"):
        TokenizeDataset(grain.MapDataset.source(["x"]), "wf-data-demo")


def test_tokenize_dataset_passes_none_through(tokenizer):
    ds = TokenizeDataset(
        grain.MapDataset.source(["a", "b", "c"]).filter(lambda t: t != "b"), tokenizer
    )
    assert ds[1] is None
    got = ds.__getitems__([0, 1, 2])
    assert got[1] is None
    np.testing.assert_array_equal(got[2], tokenizer.encode("c"))


def test_tokenize_dataset_uses_only_public_grain_api(tokenizer):
    # The batch read goes through Grain's own batching too (its default per-element path).
    ds = tokenize(grain.MapDataset.source(TEXTS), tokenizer).batch(2, batch_fn=list)
    assert [len(batch) for batch in ds] == [2, 2, 1]
    np.testing.assert_array_equal(ds[2][0], tokenizer.encode(TEXTS[4]))
    restored = pickle.loads(pickle.dumps(tokenize(TEXTS, tokenizer)))
    np.testing.assert_array_equal(restored[3], tokenizer.encode(TEXTS[3]))
