"""get_loader from configs over prepared shards: fingerprints, re-weighting, eval loaders."""

import json
import warnings

import numpy as np
import pytest

from wf_data.data.deliver.factory import get_eval_loaders, get_loader
from wf_data.data.deliver.loader import LoaderStateError
from wf_data.data.prepare import prepare
from wf_data.data.prepare.demo_corpus import build_demo_corpus

DOMAINS = ("prose", "code", "math")


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Small token datasets per domain (and a held-out split), prepared with the demo tokenizer."""
    root = tmp_path_factory.mktemp("shards")
    corpus = build_demo_corpus(num_math=300, max_code_files=20)
    sizes = {"prose": 30, "code": 20, "math": 300}
    for domain in DOMAINS:
        docs = corpus[domain][: sizes[domain]]
        cut = max(2, len(docs) // 10)
        for split, texts in (("train", docs[cut:]), ("validation", docs[:cut])):
            jsonl = write_jsonl(root / f"{domain}-{split}.jsonl", texts)
            prepare(
                [jsonl],
                root / split / domain,
                tokenizer="wf-data-demo",
                name=domain,
                progress=False,
            )
    # The same domain name with other documents: a state from one must not restore the other.
    jsonl = write_jsonl(root / "math-other.jsonl", corpus["math"][-100:])
    prepare([jsonl], root / "other" / "math", tokenizer="wf-data-demo", name="math", progress=False)
    return root


def config(shards, names=DOMAINS, weights=None, mixing="static", **extra):
    weights = weights or {name: 1.0 for name in names}
    return {
        "tokenizer": "wf-data-demo",
        "seq_len": 64,
        "global_batch_size": 4,
        "window_size": 64,
        "prefetch": 1,
        "mixing": {"kind": mixing},
        "sources": {
            name: {"path": str(shards / "train" / name), "weight": weights[name]} for name in names
        },
        "eval_sources": {name: {"path": str(shards / "validation" / name)} for name in names},
        **extra,
    }


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_have_the_schema(shards):
    loader = get_loader(config(shards), framework="numpy")
    batch = next(loader)
    assert set(batch) == {"input_ids", "labels", "position_ids", "segment_ids", "domain_ids"}
    assert batch["input_ids"].shape == (4, 64) and batch["input_ids"].dtype == np.int32
    assert batch["domain_ids"].shape == (4,)
    assert loader.domain_names == DOMAINS
    # labels: -100 on padding and on each segment's first token, input_ids elsewhere
    starts = np.zeros_like(batch["segment_ids"], dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = batch["segment_ids"][:, 1:] != batch["segment_ids"][:, :-1]
    no_loss = (batch["segment_ids"] == 0) | starts
    assert np.all(batch["labels"][no_loss] == -100)
    np.testing.assert_array_equal(batch["labels"][~no_loss], batch["input_ids"][~no_loss])


def test_state_refused_after_seq_len_change(shards):
    loader = get_loader(config(shards), framework="numpy")
    take(loader, 3)
    state = loader.state_dict()
    other = get_loader(config(shards, seq_len=128), framework="numpy")
    with pytest.raises(LoaderStateError, match="seq_len: state has 64, loader has 128"):
        other.load_state_dict(state)


def test_state_refused_after_global_batch_size_change(shards):
    # It used to load, then fail at the next batch: "rows [0, 8) of a 4-row batch".
    loader = get_loader(config(shards), framework="numpy")
    take(loader, 3)
    state = loader.state_dict()
    other = get_loader(config(shards, global_batch_size=8), framework="numpy")
    with pytest.raises(LoaderStateError, match="global_batch_size: state has 4, loader has 8"):
        other.load_state_dict(state)
    assert next(other)["input_ids"].shape == (8, 64)  # still serving from where it was


def test_state_without_global_batch_size_still_restores(shards):
    # States saved before the fingerprint recorded global_batch_size (and before the seal).
    loader = get_loader(config(shards), framework="numpy")
    take(loader, 3)
    state = loader.state_dict()
    del state["fingerprint"]["global_batch_size"], state["seal"]
    expected = take(loader, 2)
    restored = get_loader(config(shards), framework="numpy")
    restored.load_state_dict(json.loads(json.dumps(state)))
    for got, want in zip(take(restored, 2), expected, strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_state_refused_after_source_data_change(shards):
    loader = get_loader(config(shards), framework="numpy")
    take(loader, 3)
    state = loader.state_dict()
    changed = config(shards)
    changed["sources"]["math"]["path"] = str(shards / "other" / "math")
    with pytest.raises(LoaderStateError, match="source 'math'"):
        get_loader(changed, framework="numpy").load_state_dict(state)


def test_reweighted_and_added_source_continue_unchanged_sources(shards):
    names = ("prose", "math")
    old = get_loader(config(shards, names=names, prefetch=0), framework="numpy")
    take(old, 5)
    state = json.loads(json.dumps(old.state_dict()))
    # What each unchanged source would serve next: its plans from the saved position.
    domains = state["pipeline"]["parent"]["parent"]["domains"]
    expected = {}
    for i, name in enumerate(names):
        plans = iter(old.mixer.datasets[name])
        plans.set_state(domains[name]["state"])
        expected[name] = np.stack(
            [old.reader({**next(plans), "domain": i})["input_ids"] for _ in range(6)]
        )
    weights = {"prose": 1.0, "code": 1.0, "math": 4.0}
    new = get_loader(config(shards, weights=weights, prefetch=0), framework="numpy")
    new.load_state_dict(state)
    assert new.mixture == pytest.approx({"prose": 1 / 6, "code": 1 / 6, "math": 4 / 6})
    rows = {name: [] for name in DOMAINS}
    for batch in take(new, 12):
        for row, domain in zip(batch["input_ids"], batch["domain_ids"], strict=True):
            rows[DOMAINS[domain]].append(row)
    assert rows["code"], "the added source is drawn"
    for name in names:
        got = np.array(rows[name][: len(expected[name])])
        np.testing.assert_array_equal(got, expected[name][: len(got)])


def test_exp3_update_and_resume(shards):
    loader = get_loader(config(shards, mixing="exp3"), framework="numpy")
    for _ in range(20):
        next(loader)
        loader.update_mixture({"code": 6.0, "prose": 2.0, "math": 0.5})
    state = json.loads(json.dumps(loader.state_dict()))
    expected = take(loader, 4)
    restored = get_loader(config(shards, mixing="exp3"), framework="numpy")
    restored.load_state_dict(state)
    assert restored.mixture == pytest.approx(loader.mixture)
    for a, b in zip(take(restored, 4), expected, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_eval_loaders_are_finite_and_deterministic(shards):
    loaders = get_eval_loaders(config(shards, global_batch_size=2), framework="numpy")
    assert set(loaders) == set(DOMAINS)
    for name, loader in loaders.items():
        batches = list(loader)
        first = [b["input_ids"] for b in batches]
        assert first, name
        assert all(np.all(b["domain_ids"] == 0) for b in batches)
        loader.reset()
        second = [b["input_ids"] for b in loader]
        assert len(first) == len(second)
        for a, b in zip(first, second, strict=True):
            np.testing.assert_array_equal(a, b)


def test_eval_source_smaller_than_a_batch_warns(shards):
    # Its loader yields no batch at all; that used to go unnoticed (a NaN eval loss later).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaders = get_eval_loaders(config(shards, global_batch_size=512), framework="numpy")
    warned = " ".join(str(w.message) for w in caught)
    for name in DOMAINS:
        assert f"eval source {name!r} packs into at most" in warned
        assert list(loaders[name]) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(get_eval_loaders(config(shards), framework="numpy")["prose"])


def test_missing_source_names_the_prepare_command(shards, tmp_path):
    cfg = config(shards)
    cfg["sources"]["math"]["path"] = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="wf-data prepare"):
        get_loader(cfg)


def test_factory_names_are_exported_from_the_package():
    import wf_data.data
    from wf_data.data.deliver import factory

    for name in ("get_loader", "get_eval_loaders"):
        assert getattr(factory, name) is getattr(wf_data.data, name)
    with pytest.raises(AttributeError, match="has no attribute 'get_loaders'"):
        wf_data.data.get_loaders  # noqa: B018


def test_jax_framework_gives_jax_arrays(shards):
    jax = pytest.importorskip("jax")
    batch = next(get_loader(config(shards), framework="jax"))
    assert isinstance(batch["input_ids"], jax.Array)
    assert batch["input_ids"].shape == (4, 64)


@pytest.mark.parametrize("timeout", [7.5, None])
def test_worker_timeout_reaches_the_loaders_process_map(shards, timeout):
    loader = get_loader(config(shards, worker_timeout_s=timeout), framework="numpy")
    assert f"timeout_s={timeout})" in str(loader.pipeline)


def test_torch_batches_carry_int64_labels_equal_to_the_numpy_ones(shards):
    as_numpy = take(get_loader(config(shards), framework="numpy"), 3)
    as_torch = take(get_loader(config(shards), framework="torch"), 3)
    for a, b in zip(as_numpy, as_torch, strict=True):
        assert (
            str(b["labels"].dtype) == "torch.int64" and str(b["input_ids"].dtype) == "torch.int32"
        )
        for key in a:
            np.testing.assert_array_equal(a[key], b[key].numpy())


def test_loader_pipeline_is_the_grain_dataset_the_loader_serves(shards):
    """`loader.pipeline` (`loader_pipeline`) is a plain Grain dataset: iterated by itself, with
    workers, it yields the loader's batches, and its iterator state resumes it exactly."""
    loader = get_loader(config(shards, mixing="exp3"), framework="numpy")
    expected = [next(loader) for _ in range(8)]
    pipeline = get_loader(config(shards, mixing="exp3"), framework="numpy", num_workers=2).pipeline
    iterator = iter(pipeline)
    first = [next(iterator) for _ in range(5)]
    state = iterator.get_state()
    iterator.close()
    resumed = iter(pipeline)
    resumed.set_state(json.loads(json.dumps(state)))
    rest = [next(resumed) for _ in range(3)]
    resumed.close()
    for step, (got, want) in enumerate(zip(first + rest, expected, strict=True)):
        assert int(got.pop("step")) == step
        assert {key for key in got if not key.startswith("served_")} == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"step {step} {key}")


def test_a_source_of_no_documents_is_refused_naming_it(shards, tmp_path):
    # prepare drops empty records: a source of only those used to fail at its domain's first
    # draw, far from the config. Text format: no tokenizer to load, the same check.
    empty = tmp_path / "empty"
    prepare([write_jsonl(tmp_path / "empty.jsonl", ["", ""])], empty, progress=False)
    cfg = config(shards, names=("prose",))
    cfg["sources"]["nothing"] = {"path": str(empty), "weight": 1.0, "format": "text"}
    with pytest.raises(ValueError, match=r"source 'nothing' \(.*empty\) holds 0 documents"):
        get_loader(cfg, framework="numpy")
    cfg["sources"]["nothing"]["weight"] = 0.0  # disabled: never opened
    assert next(get_loader(cfg, framework="numpy"))["input_ids"].shape == (4, 64)
