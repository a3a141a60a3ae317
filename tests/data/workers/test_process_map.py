"""ProcessMap: same stream for 0 and N workers, exact lookahead, exact state, clear errors."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import pickle

import grain
import numpy as np
import pytest

from tests.data.workers.process_map_fns import (
    FailWhileFileExists,
    InPlaceRows,
    LoadsOnlyInItsProcess,
    RowsAndPid,
    SleepyRows,
    environment,
    growing,
    not_a_dict,
    rows,
)
from wf_data.config import DataConfig, load_data_config
from wf_data.data.workers.lifetime import process_exited
from wf_data.data.workers.pool import pack_plan, unpack_plan
from wf_data.data.workers.process_map import (
    DEFAULT_TIMEOUT_S,
    ProcessMap,
    RemoteTraceback,
    decode_plan,
    encode_plan,
)
from wf_data.data.workers.shm_ring import SlotReader, SlotWriter

NUM_PLANS = 30


def make_plan(index: int) -> dict:
    return {
        "index": np.int64(index),
        "docs": np.arange(index % 5, dtype=np.int32),
        "weight": index / 3,
        "name": f"plan-{index}",
    }


def plans(num_plans: int = NUM_PLANS) -> grain.IterDataset:
    """A parent with real state: shuffled, filtered, then turned into plans."""
    return (
        grain.MapDataset.range(num_plans + 10)
        .shuffle(seed=7)
        .to_iter_dataset()
        .filter(lambda index: index % 4 != 1)
        .map(make_plan)
    )


def reference(parent=None) -> list[dict]:
    return [rows(plan) for plan in (plans() if parent is None else parent)]


def assert_same_stream(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for position, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert got.keys() == want.keys(), position
        for key in want:
            assert got[key].dtype == want[key].dtype, (position, key)
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{position} {key}")


@pytest.mark.parametrize("num_workers,lookahead", [(0, 0), (0, 3), (1, 0), (2, 1), (2, 5)])
def test_stream_equals_inline_fn(num_workers, lookahead):
    with iter(ProcessMap(plans(), rows, num_workers=num_workers, lookahead=lookahead)) as it:
        assert_same_stream(list(it), reference())


def test_map_dataset_parent():
    parent = grain.MapDataset.range(7).map(make_plan)
    with iter(ProcessMap(parent, rows, num_workers=1, lookahead=2)) as it:
        assert_same_stream(list(it), reference(parent))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("lookahead", [0, 3])
def test_pulls_exactly_lookahead_ahead(num_workers, lookahead):
    """After k elements the parent has given k + lookahead, whatever the worker count."""
    parent = grain.MapDataset.range(12).map(make_plan).to_iter_dataset()
    with iter(ProcessMap(parent, rows, num_workers=num_workers, lookahead=lookahead)) as it:
        for taken in range(1, 13):
            next(it)
            state = it.get_state()
            pulled = min(taken + lookahead, 12)
            assert state["parent"]["next_index"] == pulled
            in_flight = [int(decode_plan(plan)["index"]) for plan in state["in_flight"]]
            assert in_flight == list(range(taken, pulled))


@pytest.mark.parametrize("before,after,taken", [(0, 2, 0), (2, 0, 5), (2, 1, 22), (1, 2, 5)])
def test_state_restores_exactly_across_worker_counts(before, after, taken):
    expected = reference()
    with iter(ProcessMap(plans(), rows, num_workers=before, lookahead=3)) as it:
        head = [next(it) for _ in range(taken)]
        state = json.loads(json.dumps(it.get_state()))  # JSON-safe, and exact through JSON
        next(it)  # moving on must not change what the state describes
    assert_same_stream(head, expected[:taken])
    with iter(ProcessMap(plans(), rows, num_workers=after, lookahead=3)) as it:
        it.set_state(state)
        assert_same_stream(list(it), expected[taken:])


def test_set_state_on_a_running_iterator_rewinds():
    expected = reference()
    with iter(ProcessMap(plans(), rows, num_workers=2, lookahead=4)) as it:
        for _ in range(3):
            next(it)
        state = it.get_state()
        for _ in range(6):
            next(it)  # leaves results of submitted elements unread in the workers
        it.set_state(state)
        assert_same_stream(list(it), expected[3:])


def state_round_trip(plan: dict) -> dict:
    return decode_plan(json.loads(json.dumps(encode_plan(plan))))


def task_round_trip(plan: dict) -> dict:
    return unpack_plan(pickle.loads(pickle.dumps(pack_plan(plan))))


@pytest.mark.parametrize("round_trip", [state_round_trip, task_round_trip])
def test_plan_encoding_round_trips_dtypes_and_scalars(round_trip):
    """Both plan codecs: the JSON-safe one of states and the one of worker task messages."""
    plan = {
        "ids": np.array([[1, -2], [3, 2**40]], dtype=np.int64),
        "flags": np.array([True, False]),
        "scores": np.array([0.5, np.nan, -np.inf], dtype=np.float32),
        "names": np.array(["ab", "c"]),
        "empty": np.zeros((0, 3), dtype=np.uint16),
        "big_endian": np.arange(4, dtype=">i4"),
        "zero_d": np.array(2.5),
        "step": np.int32(7),
        "count": 3,
        "ratio": 0.25,
        "tag": "x",
    }
    decoded = round_trip(plan)
    assert decoded.keys() == plan.keys()
    for key, value in plan.items():
        assert type(decoded[key]) is type(value), key
        if isinstance(value, (np.ndarray, np.generic)):
            assert decoded[key].dtype == value.dtype and decoded[key].shape == value.shape
            np.testing.assert_array_equal(decoded[key], value)
            if isinstance(value, np.ndarray):
                assert decoded[key].flags.writeable, key
        else:
            assert decoded[key] == value


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fn_error_names_element_and_retries_it(tmp_path, num_workers):
    flag = tmp_path / "fail"
    flag.touch()
    expected = reference()
    fail_at = int(list(plans())[4]["index"])
    fn = FailWhileFileExists(str(flag), fail_at)
    with iter(ProcessMap(plans(), fn, num_workers=num_workers, lookahead=3)) as it:
        head = [next(it) for _ in range(4)]
        with pytest.raises(ValueError, match="refusing element") as raised:
            next(it)
        notes = "\n".join(raised.value.__notes__)
        assert "element 4" in notes and f"index={fail_at}" in notes
        if num_workers:
            assert isinstance(raised.value.__cause__, RemoteTraceback)
            assert "process_map_fns.py" in str(raised.value.__cause__)
            assert "worker pid" in notes
        state = it.get_state()  # still at element 4: nothing was delivered
        flag.unlink()
        assert_same_stream(head + list(it), expected)  # the same iterator retries element 4
    with iter(ProcessMap(plans(), fn, num_workers=num_workers, lookahead=3)) as it:
        it.set_state(state)
        assert_same_stream(list(it), expected[4:])


def test_result_contract_is_checked_in_workers_and_inline():
    for num_workers in (0, 1):
        with iter(ProcessMap(plans(), not_a_dict, num_workers=num_workers, lookahead=1)) as it:
            with pytest.raises(TypeError, match=r"must return dict\[str, np.ndarray\]; got list"):
                next(it)


def test_fn_that_workers_cannot_load_is_reported():
    with iter(ProcessMap(plans(), LoadsOnlyInItsProcess(), num_workers=1, lookahead=1)) as it:
        with pytest.raises(RuntimeError, match="only loads in the process that made it") as raised:
            next(it)
        assert "element 0" in "\n".join(raised.value.__notes__)


def test_bad_arguments_and_plans_are_refused():
    with pytest.raises(TypeError, match="cannot be pickled"):
        ProcessMap(plans(), lambda plan: plan, num_workers=1, lookahead=1)
    with pytest.raises(ValueError, match="num_workers must be an int >= 0, got -1"):
        ProcessMap(plans(), rows, num_workers=-1, lookahead=1)
    with pytest.raises(ValueError, match="lookahead must be an int >= 0, got 1.5"):
        ProcessMap(plans(), rows, num_workers=0, lookahead=1.5)
    for timeout_s in (0, -1.0, float("nan"), float("inf"), True, "60"):
        with pytest.raises(ValueError, match=rf"timeout_s must be .* got {timeout_s!r}"):
            ProcessMap(plans(), rows, num_workers=1, lookahead=1, timeout_s=timeout_s)
    bad = grain.MapDataset.range(3).map(lambda i: {"index": i, "docs": [1, 2]})
    with pytest.raises(TypeError, match="element 0 key 'docs' holds list"):
        next(iter(ProcessMap(bad, rows, num_workers=0, lookahead=0)))
    with pytest.raises(ValueError, match="keys 'parent' and 'in_flight'"):
        iter(ProcessMap(plans(), rows, num_workers=0, lookahead=0)).set_state({"parent": {}})
    it = iter(ProcessMap(plans(), rows, num_workers=0, lookahead=0))
    with pytest.raises(ValueError, match="'in_flight' must be a list of encoded plans"):
        it.set_state({"parent": it.get_state()["parent"], "in_flight": {"index": 1}})
    with pytest.raises(ValueError, match="plan key 'docs' is not an encoded array"):
        it.set_state({"parent": {}, "in_flight": [{"docs": {"ndarray": "<i4", "shape": [2]}}]})


def test_close_stops_workers_promptly():
    it = iter(ProcessMap(plans(), rows, num_workers=2, lookahead=2))
    next(it)
    pids = it.worker_pids
    assert len(pids) == 2 and not any(process_exited(pid) for pid in pids)
    it.close()
    assert all(process_exited(pid) for pid in pids)
    with pytest.raises(ValueError, match="closed"):
        next(it)
    it = iter(ProcessMap(plans(), rows, num_workers=1, lookahead=1))
    next(it)
    pids = it.worker_pids
    del it  # dropped without close(): garbage collection stops the workers
    gc.collect()
    assert all(process_exited(pid) for pid in pids)


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the child only calls next()
def test_iterator_refuses_other_processes():
    it = iter(ProcessMap(plans(), rows, num_workers=0, lookahead=0))
    with pytest.raises(TypeError, match="cannot be pickled"):
        __import__("pickle").dumps(it)
    pid = os.fork()
    if pid == 0:
        try:
            next(it)
        except RuntimeError:
            os._exit(0)
        os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0


def test_workers_outlive_the_thread_that_started_them():
    """The parent-death signal fires when the *thread* that forked a worker exits: workers
    started from a short-lived thread must survive it (they are forked by a launcher thread)."""
    import threading

    it = iter(ProcessMap(plans(), rows, num_workers=2, lookahead=2))
    first = []
    thread = threading.Thread(target=lambda: first.append(next(it)))
    thread.start()
    thread.join()
    pids = it.worker_pids
    assert len(first) == 1 and len(pids) == 2
    with it:
        rest = list(it)
        assert it.worker_pids == pids
    assert_same_stream(first + rest, reference())


def test_workers_see_the_environment_of_their_pool_start(tmp_path, monkeypatch):
    """Workers fork from a long-lived zygote, yet run with this process's environment and
    working directory as of their pool's start, not the zygote's."""
    next(iter(ProcessMap(plans(), rows, num_workers=1, lookahead=0)))  # zygote runs by now
    monkeypatch.setenv("WF_DATA_TEST_VALUE", "set-later")
    monkeypatch.chdir(tmp_path)
    with iter(ProcessMap(plans(), environment, num_workers=1, lookahead=0)) as it:
        result = next(it)
    assert result["value"][0] == "set-later"
    assert result["cwd"][0] == str(tmp_path)


@pytest.mark.parametrize("timeout_s", [None, 1.0])
def test_timeout_bounds_one_wait_not_the_run(timeout_s):
    """Elements of 0.1 s, 1.5 s in all on 2 workers: a 1 s timeout never fires, and the
    stream is the one without a timeout."""
    fn = SleepyRows(0.1)
    with iter(ProcessMap(plans(), fn, num_workers=2, lookahead=3, timeout_s=timeout_s)) as it:
        assert_same_stream(list(it), reference())


def test_config_worker_timeout_default_and_checks():
    """The config's default is ProcessMap's (config.py cannot import it: it stays light), and
    a timeout that could never wait is refused with the field named."""
    default = next(f for f in dataclasses.fields(DataConfig) if f.name == "worker_timeout_s")
    assert default.default == DEFAULT_TIMEOUT_S
    assert load_data_config("demo", ["worker_timeout_s=null"], check_paths=False)
    for bad in ("0", "-5", "inf"):
        with pytest.raises(ValueError, match="data.worker_timeout_s: must be finite and > 0"):
            load_data_config("demo", [f"worker_timeout_s={bad}"], check_paths=False)


MEMFD = "memfd:wf-data-process-map"


def _memfd_mappings(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as maps:
        return sum(MEMFD in line for line in maps)


def _memfd_allocated_bytes(pid: int) -> int:
    """Bytes of memory the ProcessMap shared files open in process ``pid`` hold."""
    files = {}  # by inode: an mmap holds its own dup of the fd
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if MEMFD in os.readlink(path):
                stat = os.stat(path)
                files[stat.st_dev, stat.st_ino] = stat.st_blocks * 512
        except FileNotFoundError:
            pass  # closed meanwhile (the listing fd itself)
    return sum(files.values())


def test_grown_slots_keep_one_mapping_and_free_old_memory():
    """Results that outgrow their slot at every element: each side keeps one mapping of the
    shared file, and the file holds only the current slots, not every region ever used."""
    gc.collect()  # pools of earlier tests, dropped without close(), unmap now
    mappings_before = _memfd_mappings(os.getpid())
    num_plans = 24
    parent = grain.MapDataset.range(num_plans).map(lambda index: {"index": index})
    with iter(ProcessMap(parent, growing, num_workers=1, lookahead=0)) as it:  # 2 slots
        for index in range(num_plans):
            values = next(it)["values"]
            assert values.shape == growing({"index": index})["values"].shape
            assert (values == index).all()
        (worker,) = it.worker_pids
        assert _memfd_mappings(worker) == 1
        assert _memfd_mappings(os.getpid()) == mappings_before + 1
        largest = growing({"index": num_plans - 1})["values"].nbytes
        # Two slots of at most 1.25 x the largest result (rounded up to a page); without the
        # freeing, every region of the run stays allocated: ~4.3 x the largest result here.
        assert _memfd_allocated_bytes(worker) <= 2 * (1.25 * largest + 4096)
    assert _memfd_mappings(os.getpid()) == mappings_before


class _Interrupt(BaseException):
    """Stands for KeyboardInterrupt (which would stop pytest itself if it came late)."""


def test_interrupted_next_restarts_workers_and_loses_nothing():
    """A signal whose handler raises (Ctrl-C) while next() waits: the pipes may hold half a
    message, so the next call starts fresh workers, and the stream is exact."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise _Interrupt

    parent = grain.MapDataset.range(6).map(make_plan)
    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with iter(ProcessMap(parent, SleepyRows(0.5), num_workers=2, lookahead=1)) as it:
            head = [next(it), next(it)]  # the second was computed beside the first
            pids = it.worker_pids
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
            with pytest.raises(_Interrupt):
                head.append(next(it))  # the third takes 0.5 s from now
            assert len(head) == 2
            rest = list(it)
            assert set(it.worker_pids).isdisjoint(pids)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert_same_stream(head + rest, reference(parent))


@pytest.mark.parametrize("factor", [1, 1000])
@pytest.mark.parametrize("num_workers,lookahead", [(1, 0), (2, 3)])
def test_results_built_in_lent_shared_memory(num_workers, lookahead, factor):
    """An fn whose `many` takes `allocate` builds results in its worker's slot; the stream is
    the inline one, also when a request outgrows the slot after part of it was lent."""
    with iter(
        ProcessMap(plans(), InPlaceRows(factor), num_workers=num_workers, lookahead=lookahead)
    ) as it:
        assert_same_stream(list(it), reference())


def test_slot_writer_sends_lent_memory_without_copying():
    """Arrays built in lent memory are described where they lie; the others are copied after
    them; a slot that must move copies everything; the consumer reads the same arrays."""
    fd = os.memfd_create("wf-data-test-slots")
    try:
        writer, reader = SlotWriter(fd), SlotReader(fd)
        for slot, size in ((0, 4096), (0, 4096), (1, 64), (0, 40_000)):
            lent = writer.allocate(slot, size)
            built = lent.view(np.int32)
            built[:] = np.arange(built.size, dtype=np.int32) + slot
            copied = np.arange(7, dtype=np.float64)
            in_other_memory = lent.copy()
            metas = writer.write(slot, {"built": built, "copied": copied, "other": lent[:0]})
            offsets = {key: offset for key, _, _, offset in metas}
            assert offsets["built"] == built.ctypes.data - writer._address  # noqa: SLF001
            assert offsets["copied"] >= offsets["built"] + built.nbytes
            result = reader.read(metas)
            np.testing.assert_array_equal(result["built"], built)
            np.testing.assert_array_equal(result["copied"], copied)
            np.testing.assert_array_equal(in_other_memory.view(np.int32), built)
        # A second request that no longer fits after lending: plain memory, copied by write.
        first = writer.allocate(1, 64)
        outside = writer.allocate(1, 1 << 20)
        first[:] = 5
        outside[:] = 9
        result = reader.read(writer.write(1, {"first": first, "outside": outside}))
        assert (result["first"] == 5).all() and (result["outside"] == 9).all()
        assert result["outside"].size == 1 << 20
    finally:
        reader.close()
        os.close(fd)


def test_consumer_computes_waiting_elements_while_workers_lag():
    """With workers slower than the consumer, the consumer computes the elements no worker has
    room for instead of waiting: both compute some, and the stream is the inline one."""
    fn = RowsAndPid(os.getpid(), slow_s=0.05)
    with iter(ProcessMap(plans(), fn, num_workers=1, lookahead=4)) as it:
        results = list(it)
        worker_pids = set(it.worker_pids)
    pids = [int(result.pop("pid")[0]) for result in results]
    assert os.getpid() in pids and worker_pids & set(pids), pids
    assert_same_stream(results, reference())


def test_lookahead_defaults_to_at_least_the_workers():
    assert "lookahead=2" in str(ProcessMap(plans(), rows, num_workers=0))
    pipeline = ProcessMap(plans(), rows, num_workers=3)
    assert "lookahead=3" in str(pipeline)
    with iter(pipeline) as it:
        assert_same_stream(list(it), reference())
