"""Tests of `PrepareOptions`: one frozen dataclass carries prepare's options everywhere."""

import dataclasses
import json

import pytest

from wf_data.data.prepare import PrepareOptions, plan_prepare, prepare


def test_options_are_frozen_and_checked_at_construction():
    options = PrepareOptions(text_key=["title", "body"], num_shards=3)
    assert options.text_key == ("title", "body")
    assert options.fields.text_keys == ("title", "body")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.num_shards = 4
    with pytest.raises(ValueError, match="num_shards must be an int >= 1, got 0"):
        PrepareOptions(num_shards=0)
    with pytest.raises(ValueError, match="max_doc_bytes must be an int >= 1"):
        PrepareOptions(max_doc_bytes=0)
    with pytest.raises(ValueError, match="not both"):
        PrepareOptions(tokenizer="wf-data-demo", chat_key="messages")
    with pytest.raises(ValueError, match="more than once"):
        PrepareOptions(text_key=["a", "a"])


def test_keywords_are_the_options_fields():
    base = PrepareOptions(num_shards=2)
    assert PrepareOptions.of(base, name="web") == PrepareOptions(num_shards=2, name="web")
    assert PrepareOptions.of(None, name="web") == PrepareOptions(name="web")
    with pytest.raises(TypeError, match="text_kye"):
        PrepareOptions.of(None, text_kye="body")
    with pytest.raises(TypeError, match="must be a PrepareOptions"):
        PrepareOptions.of({"name": "web"})


def test_options_object_and_keywords_plan_the_same_dataset(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(20)))
    by_object = plan_prepare(inputs, tmp_path / "a", PrepareOptions(text_key="body", num_shards=2))
    by_keywords = plan_prepare(inputs, tmp_path / "a", text_key="body", num_shards=2)
    assert by_object.plan == by_keywords.plan
    manifest = prepare(inputs, tmp_path / "b", PrepareOptions(text_key="body"), progress=False)
    assert manifest["totals"]["records"] == 20
