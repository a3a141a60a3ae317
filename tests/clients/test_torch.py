"""torch DataLoader and torchdata StatefulDataLoader over LoaderDataset, 0 and 2 workers."""

import multiprocessing
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader as TorchDataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from tests.clients.streams import OVERRIDES, as_numpy, assert_streams_equal
from wf_data.data.deliver.factory import get_loader
from wf_data.integrations.torch_dataset import LoaderDataset

STEPS = 6
ROOT = pathlib.Path(__file__).resolve().parents[2]


def take(batches, count):
    iterator = iter(batches)
    return [as_numpy(next(iterator)) for _ in range(count)]


def test_step_shards_partition_the_stream(demo_config):
    full = take(get_loader(demo_config, framework="numpy"), STEPS)
    for index in range(2):
        loader = get_loader(demo_config, framework="numpy", step_shard=(index, 2))
        assert_streams_equal(take(loader, STEPS // 2), full[index::2])
        assert loader.step == STEPS - 1 + index  # global count, planned steps included


def test_zero_workers_equals_the_loader_with_int64_labels(demo_config):
    batches = take(TorchDataLoader(LoaderDataset(demo_config), batch_size=None), STEPS)
    assert_streams_equal(batches, take(get_loader(demo_config, framework="numpy"), STEPS))
    first = next(iter(TorchDataLoader(LoaderDataset(demo_config), batch_size=None)))
    assert first["labels"].dtype == torch.int64 and first["input_ids"].dtype == torch.int32


def two_worker_stream(config, context):
    loader = TorchDataLoader(
        LoaderDataset(config),
        batch_size=None,
        num_workers=2,
        multiprocessing_context=multiprocessing.get_context(context),
    )
    return take(loader, STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_two_workers_equal_zero_workers(demo_config, context):
    want = take(get_loader(demo_config, framework="numpy"), STEPS)  # the parent reads shards
    assert_streams_equal(two_worker_stream(demo_config, context), want)  # once each, in order


def stateful_resume_checks(make, steps=7, cut=3):
    """Save a StatefulDataLoader after ``cut`` batches, restore a fresh one: the same stream."""
    straight = take(make(), steps)
    first = make()
    iterator = iter(first)
    seen = [as_numpy(next(iterator)) for _ in range(cut)]
    state = first.state_dict()
    del iterator, first
    resumed = make()
    resumed.load_state_dict(state)
    assert_streams_equal(seen + take(resumed, steps - cut), straight)
    return straight


def fork_checks(cache):
    """Forked workers (the parent reads no shard until the end): the 0-worker stream, exactly
    once each, and exact resume through StatefulDataLoader's per-worker states."""
    from wf_data.config import load_data_config
    from wf_data.data.shards.sources import read_before_fork

    config = load_data_config("demo", OVERRIDES)
    straight = stateful_resume_checks(
        lambda: StatefulDataLoader(
            LoaderDataset(config), batch_size=None, num_workers=2, multiprocessing_context="fork"
        )
    )
    assert not read_before_fork()
    assert_streams_equal(straight, take(get_loader(config, framework="numpy"), 7))


def worker_count_checks(cache):
    """A StatefulDataLoader state of 2 forked workers restored with 1 or 3: a LoaderStateError
    that names both counts and what to do, instead of torchdata's bare AssertionError."""
    import re

    from wf_data.config import load_data_config
    from wf_data.data.deliver.loader_state import LoaderStateError

    config = load_data_config("demo", OVERRIDES)

    def make(workers):
        return StatefulDataLoader(
            LoaderDataset(config),
            batch_size=None,
            num_workers=workers,
            multiprocessing_context="fork",
        )

    first = make(2)
    iterator = iter(first)
    for _ in range(3):
        next(iterator)
    state = first.state_dict()
    del iterator, first
    for workers in (1, 3):
        other = make(workers)
        other.load_state_dict(state)
        try:
            next(iter(other))
        except LoaderStateError as error:
            message = str(error)  # from the first worker to report
            saved = rf"saved by torch DataLoader worker (\d) of 2; this is worker \1 of {workers}\."
            assert re.search(saved, message), message
            assert "StatefulDataLoader(..., num_workers=2)" in message
            assert "LoaderDataset(config, num_workers=N)" in message
        else:
            raise AssertionError(f"a 2-worker state restored with {workers} workers")


def run_in_a_fresh_process(function, cache):
    """Runs ``function(cache)`` of this file in a new interpreter (forked torch workers need a
    parent that has not read shards); fails with its output if it fails."""
    code = f"import runpy; runpy.run_path({__file__!r})[{function!r}]({str(cache)!r})"
    env = dict(os.environ, WF_DATA_CACHE=str(cache))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_two_forked_workers_equal_zero_workers(demo_cache):
    run_in_a_fresh_process("fork_checks", demo_cache)


@pytest.mark.slow
def test_state_restored_with_another_worker_count_names_the_fix(demo_cache):
    run_in_a_fresh_process("worker_count_checks", demo_cache)


def fork_after_read_checks(cache):
    """Forked torch workers after the parent read shards: fine after memory-mapped reads (they
    leave nothing a forked child could trip on), refused after a record-reader read."""
    from wf_data.config import load_data_config
    from wf_data.data.shards.sources import open_dataset, read_before_fork

    config = load_data_config("demo", OVERRIDES)
    want = take(get_loader(config, framework="numpy"), STEPS)
    assert not read_before_fork()
    assert_streams_equal(two_worker_stream(config, "fork"), want)
    source = next(iter(config.enabled_sources().values()))
    open_dataset(source.path, memory_map=False)[0]  # riegeli's pools are now live here
    with pytest.raises(RuntimeError, match="multiprocessing_context='forkserver'"):
        two_worker_stream(config, "fork")


@pytest.mark.slow
def test_fork_after_the_parent_read_shards_is_refused(demo_cache):
    # In a fresh process: any earlier test of this session may have read with the record reader.
    run_in_a_fresh_process("fork_after_read_checks", demo_cache)


def test_rows_mode_batches_back_to_the_same_stream(demo_config):
    rows = LoaderDataset(demo_config, rows=True)
    batches = take(TorchDataLoader(rows, batch_size=demo_config.global_batch_size), 3)
    assert_streams_equal(batches, take(get_loader(demo_config, framework="numpy"), 3))


def test_stateful_dataloader_resumes_exactly(demo_config):
    # 2 workers: in fork_checks (forked, in a fresh process).
    straight = stateful_resume_checks(
        lambda: StatefulDataLoader(LoaderDataset(demo_config), batch_size=None)
    )
    assert_streams_equal(straight, take(get_loader(demo_config, framework="numpy"), 7))


def test_dataset_state_round_trip_in_rows_mode(demo_config):
    dataset = LoaderDataset(demo_config, rows=True)
    iterator = iter(dataset)
    rows = [next(iterator) for _ in range(6)]  # one batch of 4 and half of the next
    state = dataset.state_dict()
    assert state["row"] == 2
    later = [as_numpy(next(iterator)) for _ in range(5)]
    restored = LoaderDataset(demo_config, rows=True)
    restored.load_state_dict(state)
    again = iter(restored)
    assert_streams_equal([as_numpy(next(again)) for _ in range(5)], later)
    assert rows[0]["input_ids"].shape == (demo_config.seq_len,)


def test_exp3_refuses_torch_workers_and_takes_feedback_without(demo_cache):
    from wf_data.config import load_data_config

    # reward = the loss itself: the source with the highest loss earns the most rows.
    config = load_data_config("demo", ["seq_len=64", "global_batch_size=4", "mixing.reward=loss"])
    dataset = LoaderDataset(config)
    with pytest.raises(RuntimeError, match="loader's own worker processes"):
        next(iter(TorchDataLoader(dataset, batch_size=None, num_workers=1)))
    iterator = iter(TorchDataLoader(dataset, batch_size=None))
    next(iterator)
    before = dict(dataset.loader.mixture)
    for _ in range(3):
        dataset.update_mixture({"prose": 9.0, "code": 0.1, "math": 0.1})
        next(iterator)
    after = dataset.loader.mixture
    assert after != before and after["prose"] > max(after["code"], after["math"])


def test_pickles_as_its_recipe_after_iterating(demo_config):
    dataset = LoaderDataset(demo_config)
    first = next(iter(dataset))
    copy = pickle.loads(pickle.dumps(dataset))  # what spawn and forkserver workers receive
    assert copy.loader is None and copy.config == demo_config
    assert_streams_equal([as_numpy(next(iter(copy)))], [as_numpy(first)])


def test_state_from_another_worker_count_is_refused(demo_config):
    dataset = LoaderDataset(demo_config)
    next(iter(dataset))
    state = dataset.state_dict()
    state["step_shard"] = [1, 2]
    dataset.load_state_dict(state)
    with pytest.raises(ValueError, match="worker 1 of 2.*same num_workers"):
        next(iter(dataset))


def test_dataset_from_a_loader_starts_where_the_loader_stands(demo_config):
    loader = get_loader(demo_config, framework="numpy")
    next(loader)
    want = take(get_loader(demo_config, framework="numpy"), 3)[1:]
    dataset = LoaderDataset.from_loader(loader)
    assert isinstance(dataset, LoaderDataset)
    assert_streams_equal(take(TorchDataLoader(dataset, batch_size=None), 2), want)
    np.testing.assert_array_equal(want[0]["domain_ids"], want[0]["domain_ids"])


@pytest.mark.slow
@pytest.mark.parametrize("started", [0, 3])
def test_dataset_from_a_loader_splits_it_over_spawned_workers(demo_config, started):
    # LoaderDataset.from_loader(loader) with torch workers used to be refused at any step
    # ("state was saved by torch worker 0 of 1"), and a started loader's planned-ahead batches
    # then came out twice: now worker w continues at step s + w, in torch's round-robin order.
    reference = take(get_loader(demo_config, framework="torch"), started + STEPS)
    loader = get_loader(demo_config, framework="torch")
    take(loader, started)
    workers = TorchDataLoader(
        LoaderDataset.from_loader(loader),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="spawn",
    )
    assert_streams_equal(take(workers, STEPS), reference[started:])


def test_step_shard_loader_restored_from_a_global_state_yields_only_its_steps(demo_config):
    """The batches a global state planned ahead for other shards' steps are not delivered:
    the shard goes on with exactly the global stream's batches of its own steps."""
    reference = take(get_loader(demo_config, framework="numpy"), 9)
    loader = get_loader(demo_config, framework="numpy")
    take(loader, 3)
    shard = get_loader(demo_config, framework="numpy", step_shard=(0, 2))
    shard.load_state_dict(loader.state_dict())
    batches, steps = [], []
    for _ in range(3):
        batches.append(next(shard))
        steps.append(shard.step - 1)
    assert steps == [4, 6, 8]
    assert_streams_equal(batches, [reference[step] for step in steps])
