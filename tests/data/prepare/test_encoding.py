"""Tests for wf_data.data.prepare.encoding: token records built per batch, as per document."""

import numpy as np
import pytest

from tests.data.prepare.test_prepare import WORDS, _make_tokenizer, _texts
from wf_data.data.prepare import encoding


@pytest.fixture(scope="module")
def wrapper_dir(tmp_path_factory):
    return _make_tokenizer(tmp_path_factory.mktemp("tok"))


def _encoder(directory):
    from wf_data.data.text.tokenization import TokenizerWrapper

    wrapper = TokenizerWrapper.from_pretrained(directory, add_bos=False, add_eos=False)
    return encoding._BackendEncoder(wrapper)


@pytest.mark.parametrize(("add_bos", "add_eos"), [(False, False), (False, True), (True, True)])
def test_flat_batch_is_encode_batch_back_to_back(wrapper_dir, add_bos, add_eos):
    encoder = _encoder(wrapper_dir)
    encoder.add_bos, encoder.add_eos = add_bos, add_eos
    encoder.bos_id = 0  # the tiny tokenizer has no bos: any id shows where it goes
    texts = [*_texts(3, 30), "", "zebra"]
    ids, lengths = encoder.encode_batch_flat(texts)
    expected = encoder.encode_batch(texts)
    assert lengths.tolist() == [len(one) for one in expected]
    np.testing.assert_array_equal(ids, np.concatenate(expected))


def test_token_records_drop_empty_and_end_with_one_eos(wrapper_dir):
    encoder = _encoder(wrapper_dir)
    vocab = {word: index for index, word in enumerate(["[UNK]", "</s>", *WORDS])}
    texts = ["", "cat", "cat </s>", "  ", "dog dog", "zebra"]
    data, lengths = encoding.token_records(encoder, texts, np.dtype(np.uint16), True, "in.jsonl")
    eos, cat, dog = vocab["</s>"], vocab["cat"], vocab["dog"]
    expected = [[eos], [cat, eos], [cat, eos], [eos], [dog, dog, eos], [0, eos]]
    assert lengths.tolist() == [len(one) for one in expected]
    assert np.frombuffer(data, np.uint16).tolist() == sum(expected, [])
    data, lengths = encoding.token_records(encoder, texts, np.dtype(np.uint16), False, "in.jsonl")
    assert lengths.tolist() == [1, 2, 2, 1]  # the empty ones left out
    assert np.frombuffer(data, np.uint16).tolist() == [cat, cat, eos, dog, dog, 0]


def test_token_records_refuse_ids_over_the_dtype(tmp_path):
    big = _make_tokenizer(tmp_path / "big", extra_words=300)
    encoder = _encoder(big)
    w299 = 2 + len(WORDS) + 299  # after [UNK], </s> and WORDS
    with pytest.raises(ValueError, match=rf"in\.jsonl: token id {w299} does not fit uint8"):
        encoding.token_records(encoder, ["cat w299"], np.dtype(np.uint8), False, "in.jsonl")
