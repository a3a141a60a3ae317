"""DataLoader: rank sharding, elastic and exact resume, workers, finite epochs, checkpoints."""

import json

import numpy as np
import pytest

from wf_data.data.deliver.factory import reader_of
from wf_data.data.deliver.loader import DataLoader, LoaderStateError, check_fingerprint
from wf_data.data.deliver.loader_state import PendingLosses
from wf_data.data.mix.exp3 import Exp3
from wf_data.data.mix.mixing import Exp3Policy, mix_plans
from wf_data.data.read.packing import pack
from wf_data.data.shards.sources import InMemorySource

SEQ_LEN = 32
GLOBAL_BATCH = 4
WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}


def domain_source(domain: int, num_docs: int = 80) -> InMemorySource:
    rng = np.random.default_rng([11, domain])
    lengths = rng.integers(4, 70, size=num_docs)
    return InMemorySource(
        [
            (domain * 100_000 + doc * 100 + np.arange(n) % 100).astype(np.uint32)
            for doc, n in enumerate(lengths)
        ],
        format="tokens",
    )


def mixing(kind="static", num_epochs=None, names=("a", "b", "c"), weights=WEIGHTS):
    """(mixer, reader) over best_fit packed domains."""
    datasets = {
        name: pack(
            domain_source(i), SEQ_LEN, "best_fit", window_size=16, seed=i, num_epochs=num_epochs
        )
        for i, name in ((("a", "b", "c").index(name), name) for name in names)
    }
    weights = {name: weights[name] for name in names}
    policy = weights
    if kind == "exp3":
        policy = Exp3Policy(Exp3(len(names), prior=list(weights.values())))
    stop = "stop" if num_epochs is not None else "restart"
    mixer = mix_plans(
        {n: ds.plans for n, ds in datasets.items()}, policy, seed=1, on_exhausted=stop
    )
    return mixer, reader_of(datasets)


def make_loader(kind="static", rank=0, world=1, **kwargs):
    options = {k: kwargs.pop(k) for k in ("num_epochs",) if k in kwargs}
    return DataLoader(
        *mixing(kind, **options),
        global_batch_size=GLOBAL_BATCH,
        dp_rank=rank,
        dp_world_size=world,
        framework="numpy",
        **kwargs,
    )


def losses_for(step):
    return np.array([3.0, 1.0, 0.2]) + 0.05 * (step % 5)


def run(loaders, steps, feed=True, start_step=0):
    """Steps every rank's loader in lockstep; returns per step the concatenated global batch."""
    out = []
    for step in range(start_step, start_step + steps):
        parts = [next(loader) for loader in loaders]
        out.append({key: np.concatenate([p[key] for p in parts]) for key in parts[0]})
        if feed and loaders[0].mixer.policy.learns:
            for loader in loaders:
                loader.update_mixture(losses_for(step))
    return out


def assert_batches_equal(got, expected):
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        for key in b:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"step {step} {key}")


@pytest.mark.parametrize("kind", ["static", "exp3"])
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_partition_the_global_batch(kind, world):
    single = run([make_loader(kind)], 12)
    ranks = run([make_loader(kind, rank=r, world=world) for r in range(world)], 12)
    assert_batches_equal(ranks, single)
    first = [make_loader(kind, rank=r, world=world) for r in range(world)]
    shapes = {next(loader)["input_ids"].shape for loader in first}
    assert shapes == {(GLOBAL_BATCH // world, SEQ_LEN)}


@pytest.mark.parametrize("kind", ["static", "exp3"])
@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("cut", [1, 5, 13])
def test_exact_resume_through_state_dict(kind, prefetch, cut):
    loader = make_loader(kind, prefetch=prefetch)
    run([loader], cut)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = run([loader], 10, start_step=cut)
    restored = make_loader(kind, prefetch=prefetch)
    restored.load_state_dict(state)
    assert restored.step == cut
    assert_batches_equal(run([restored], 10, start_step=cut), expected)


@pytest.mark.parametrize("kind", ["static", "exp3"])
@pytest.mark.parametrize("world_before, world_after", [(2, 1), (1, 2), (2, 4)])
def test_elastic_resume_repeats_and_skips_no_row(kind, world_before, world_after):
    single = run([make_loader(kind)], 14)
    # prefetch 2: the state holds two planned global batches, read by the new ranks
    before = [
        make_loader(kind, rank=r, world=world_before, prefetch=2) for r in range(world_before)
    ]
    run(before, 6)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in before]
    assert all(state == states[0] for state in states), "the state is global, alike on ranks"
    after = [make_loader(kind, rank=r, world=world_after) for r in range(world_after)]
    for loader in after:
        loader.load_state_dict(states[0])
    assert_batches_equal(run(after, 8, start_step=6), single[6:])


def test_restore_into_added_domain_reads_planned_batches_by_name():
    old = DataLoader(
        *mixing(names=("a", "c")), global_batch_size=GLOBAL_BATCH, framework="numpy", prefetch=2
    )
    run([old], 3, feed=False)
    state = json.loads(json.dumps(old.state_dict()))
    expected = run([old], 2, feed=False)  # the two batches planned before the state was taken
    new = make_loader("static", prefetch=2)  # domains a, b, c
    new.load_state_dict(state)
    got = run([new], 2, feed=False)
    for batch in expected:
        batch["domain_ids"] = np.array([0, 2])[batch["domain_ids"]]  # c is now index 2
    assert_batches_equal(got, expected)
    assert new.stats()["data/rows_served"] == 5 * GLOBAL_BATCH


def test_finite_epochs_every_rank_stops_at_the_same_step():
    ranks = [make_loader("static", rank=r, world=2, num_epochs=1) for r in range(2)]
    counts = [sum(1 for _ in loader) for loader in ranks]
    assert counts[0] == counts[1] > 0
    single = sum(1 for _ in make_loader("static", num_epochs=1))
    assert single == counts[0]


def test_mixture_and_update():
    loader = make_loader("exp3")
    assert loader.mixture == pytest.approx(WEIGHTS)
    for _step in range(30):
        next(loader)
        loader.update_mixture({"a": 5.0, "b": 1.0, "c": 0.1})
    assert loader.mixture["a"] > WEIGHTS["a"]
    with pytest.raises(TypeError, match="exp3"):
        make_loader("static").update_mixture({"a": 1.0})


def test_stats_are_flat_data_floats():
    loader = make_loader("static")
    run([loader], 20)
    stats = loader.stats()
    assert all(key.startswith("data/") and isinstance(v, float) for key, v in stats.items())
    assert 0.5 < stats["data/fill"] <= 1.0
    shares = [stats[f"data/row_share/{n}"] for n in WEIGHTS]
    assert sum(shares) == pytest.approx(1.0)
    assert stats["data/weight/a"] == pytest.approx(0.5)


def test_state_size_is_bounded():
    loader = make_loader("exp3", prefetch=2)
    run([loader], 5)
    small = len(json.dumps(loader.state_dict()))
    run([loader], 300, start_step=5)
    assert len(json.dumps(loader.state_dict())) < small + 256


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["static", "exp3"])
def test_batches_identical_for_0_1_2_workers(kind):
    results = []
    for workers in (0, 1, 2):
        with make_loader(kind, num_workers=workers, prefetch=2) as loader:
            results.append(run([loader], 8))
    assert_batches_equal(results[1], results[0])
    assert_batches_equal(results[2], results[0])


def test_torch_framework_and_torch_dataloader():
    torch = pytest.importorskip("torch")
    loader = DataLoader(*mixing(), global_batch_size=GLOBAL_BATCH, framework="torch")
    batch = next(loader)
    assert batch["input_ids"].dtype == torch.int32
    assert batch["domain_ids"].shape == (GLOBAL_BATCH,)
    from wf_data.integrations.torch_dataset import LoaderDataset

    dataset = LoaderDataset.from_loader(make_loader("static"))
    assert isinstance(dataset, torch.utils.data.IterableDataset)
    wrapped = torch.utils.data.DataLoader(dataset, batch_size=None)
    first = next(iter(wrapped))
    expected = next(make_loader("static"))
    np.testing.assert_array_equal(first["input_ids"].numpy(), expected["input_ids"])


def test_torchtitan_base_dataloader_interface():
    loader = make_loader("static")
    for name in ("__iter__", "state_dict", "load_state_dict", "close"):
        assert callable(getattr(loader, name))
    loader.close()
    assert loader.state_dict()["step"] == 0


def test_fingerprint_difference_is_named():
    saved = {"seq_len": 256, "seed": 0, "sources": {"a": {"data": "x"}, "b": {"data": "y"}}}
    check_fingerprint(saved, {**saved, "sources": {"a": {"data": "x"}, "c": {"data": "z"}}})
    with pytest.raises(LoaderStateError, match="seq_len: state has 256, loader has 512"):
        check_fingerprint(saved, {**saved, "seq_len": 512})
    with pytest.raises(LoaderStateError, match="source 'b'"):
        check_fingerprint(saved, {**saved, "sources": {"a": {"data": "x"}, "b": {"data": "q"}}})


def test_not_a_state_is_refused():
    with pytest.raises(LoaderStateError, match="not a wf-data loader state"):
        make_loader().load_state_dict({"foo": 1})


@pytest.mark.parametrize("kind", ["static", "exp3"])
def test_step_shards_interleave_to_the_full_stream(kind):
    single = run([make_loader(kind, prefetch=1)], 12, feed=False)
    shards = [make_loader(kind, prefetch=1, step_shard=(i, 3)) for i in range(3)]
    got = [next(shards[step % 3]) for step in range(12)]
    assert_batches_equal(got, single)
    assert [shard.step for shard in shards] == [10, 11, 12]
    state = json.loads(json.dumps(shards[1].state_dict()))
    expected = [next(shards[1]) for _ in range(2)]
    restored = make_loader(kind, prefetch=1, step_shard=(1, 3))
    restored.load_state_dict(state)
    assert_batches_equal([next(restored) for _ in range(2)], expected)
    assert restored.step == 17


def test_observed_losses_are_part_of_the_state():
    loader = make_loader("exp3")
    run([loader], 2, feed=False)
    loader.observe_losses(np.array([6.0, 2.0, 0.0]), np.array([2, 1, 0]))
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["feedback"] == {"a": [6.0, 2.0], "b": [2.0, 1.0], "c": [0.0, 0.0]}
    restored = make_loader("exp3")
    restored.load_state_dict(state)
    for each in (loader, restored):
        each.apply_observed()  # mean losses a=3, b=2, c unobserved
        assert each.policy.bandit.step == 1
    assert restored.mixture == pytest.approx(loader.mixture)
    assert restored.state_dict()["feedback"]["a"] == [0.0, 0.0]


def test_pending_losses_take_means_once_and_round_trip_through_the_state():
    pending = PendingLosses(("a", "b", "c"))
    assert pending.take() is None, "nothing observed: no update"
    pending.add(np.array([6.0, 2.0, 0.0]), np.array([2, 1, 0]))
    pending.add(np.array([3.0, 0.0, 0.0]), np.array([2, 0, 0]))
    restored = PendingLosses.from_state(json.loads(json.dumps(pending.to_state())), ("c", "a"))
    np.testing.assert_array_equal(pending.take(), [9.0 / 4, 2.0, np.nan])
    assert pending.take() is None, "taking clears"
    np.testing.assert_array_equal(restored.take(), [np.nan, 9.0 / 4])  # matched by name
    with pytest.raises(LoaderStateError, match="'feedback': domain 'a' must map to two numbers"):
        PendingLosses.from_state({"a": [1.0]}, ("a",))


def test_reset_restarts_the_stream_and_keeps_the_mixture():
    loader = make_loader("exp3", prefetch=1)
    run([loader], 7)  # feedback moves the weights
    loader.observe_losses(np.ones(3), np.ones(3))
    mixture = loader.mixture
    assert mixture != pytest.approx(WEIGHTS)
    loader.reset()
    assert loader.step == 0
    assert loader.mixture == pytest.approx(mixture), "the bandit belongs to the run"
    assert loader.state_dict()["feedback"]["a"] == [0.0, 0.0]
    assert loader.stats()["data/rows_served"] == 0
    static = make_loader("static", prefetch=1)
    first = run([static], 3)
    static.reset()
    assert_batches_equal(run([static], 3), first)


@pytest.mark.slow
def test_reset_and_restore_restart_worker_processes():
    reference = make_loader("exp3", prefetch=2)
    run([reference], 3)
    state = json.loads(json.dumps(reference.state_dict()))
    with make_loader("exp3", num_workers=2, prefetch=2) as loader:
        expected = run([loader], 6)
        loader.reset()  # a second iterator of the same pipeline, then a third
        loader.load_state_dict(state)
        assert_batches_equal(run([loader], 3, start_step=3), expected[3:])


def test_bad_arguments():
    with pytest.raises(ValueError, match="not divisible"):
        make_loader(world=3)
    with pytest.raises(ValueError, match="framework"):
        DataLoader(*mixing(), global_batch_size=4, framework="tf")
    with pytest.raises(ValueError, match="dp_rank 2"):
        make_loader(rank=2, world=2)
