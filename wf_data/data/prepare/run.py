"""`wf-data prepare`: jsonl / parquet / txt inputs -> ArrayRecord shards + manifest.json.

The work is a map over input pieces and a reduce into shards, so it can later run on a
distributed engine:

1. `plan_tasks` splits the inputs into tasks: one per input file, large plain `.jsonl` files cut
   at line boundaries every `piece_bytes` and parquet files at row-group boundaries. The split
   depends only on the input files, never on the number of workers.
2. `prepare_file` turns one task into a *part* (an ArrayRecord file of encoded records plus,
   for tokens, its `(n,) int64` lengths) under `OUT/.wf-prepare/`. With `workers` > 1, the
   tasks' chunks (`plan_chunks`, ~1 MiB each) are read, parsed and tokenized by a pool of
   that many processes, a few ahead and across part boundaries, while this process writes the
   parts in order: one big input file keeps every worker busy. With 1, this process does it
   all, on one tokenizer thread.
3. `assemble_shard` copies the global record sequence (parts in task order) into shard k of N:
   records `[k * R // N, (k + 1) * R // N)`.
4. `finalize(out_dir)` writes `lengths.npy`, then `manifest.json`, from the per-shard results.

Every file is written through `wf_data.atomic` (unique temp file, fsync, rename); a part or
shard counts as finished only once its done-marker JSON (written atomically after the rename)
exists and carries the key of the current options, so a run killed at any moment and re-run
redoes only unfinished work, and the output is byte-identical whatever `workers` is.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

from wf_data import atomic
from wf_data.data.prepare import out_dir as out_dir_lib
from wf_data.data.prepare import out_guard
from wf_data.data.prepare.assemble import (
    SKIPPED_NAME,
    _refuse_replacing,
    _shard_done,
    _up_to_date,
    assemble_shard,
    finalize,
)
from wf_data.data.prepare.encoding import _BackendEncoder, _load_tokenizer, _tokenizer_identity
from wf_data.data.prepare.inputs import PrepareTask, expand_inputs, plan_chunks, plan_tasks
from wf_data.data.prepare.options import PrepareOptions
from wf_data.data.prepare.parts import (
    EncodedChunk,
    _marker_path,
    _out_path,
    _part_path,
    _read_marker,
    _work_dir,
    encode_chunk,
    prepare_file,
)
from wf_data.data.shards import sources
from wf_data.data.workers import lifetime as worker_lifetime

AUTO_SHARD_BYTES = 256 << 20  # num_shards=None: one shard per this many input bytes


MAX_AUTO_SHARDS = 1024


SKIPPED_SHOWN = 20  # skipped records in the returned summary (and printed by the CLI)


_WORKER: dict[str, Any] = {}


def _init_worker(saved_encoder: tuple[str, dict] | None, parent_pid: int) -> None:
    # A worker of a killed prepare must not live on.
    worker_lifetime.die_with_parent(parent_pid)
    # One tokenizer thread per worker process: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tokenizer"] = None if saved_encoder is None else _BackendEncoder.load(*saved_encoder)


def _encode_in_worker(chunk: PrepareTask, options: dict) -> EncodedChunk:
    return encode_chunk(chunk, tokenizer=_WORKER["tokenizer"], **options)


def _run_part(part_path: str, task: PrepareTask, key: str, options: dict, **run: Any) -> dict:
    """Prepare one part (`prepare_file` with `run`'s tokenizer, progress, encoded chunks),
    then write its done marker."""
    # A stale marker must not vouch for the file about to be rewritten.
    _marker_path(pathlib.Path(part_path)).unlink(missing_ok=True)
    result = prepare_file(task, part_path, **options, **run)
    atomic.write_json(_marker_path(pathlib.Path(part_path)), dict(result, key=key), indent=2)
    return result


class _Progress:
    """tqdm bar over documents with documents/s and tokens/s."""

    def __init__(self, enabled: bool):
        self.documents = self.tokens = self.parts_run = 0
        self.start = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc="prepare", unit="doc", unit_scale=True, file=sys.stderr)

    def update(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(documents)
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclasses.dataclass(frozen=True)
class PreparePlan:
    """What `prepare` decided before running anything; shared by the local and Beam runners.

    Part `i` is `prepare_file(tasks[i], part_paths[i], tokenizer=tokenizer, **options)`;
    `write(part_results)` then records the parts' results in `plan.json` of the build's
    `.wf-prepare/` (beside `out_dir`, `out_dir.build_dir`), which `assemble_shard` and
    `finalize` read. `plan` is that file's content; `part_keys[i]` is the
    identity of part `i` (inputs and options) for resume checks.
    """

    out_dir: pathlib.Path
    tasks: list[PrepareTask]
    part_keys: list[str]
    options: dict
    tokenizer: Any
    plan: dict

    @property
    def part_paths(self) -> list[pathlib.Path]:
        """Each task's part file in the build's `.wf-prepare/`: named by the task's index."""
        return [_part_path(self.out_dir, index) for index in range(len(self.tasks))]

    def part_marker_path(self, index: int) -> pathlib.Path:
        """Part `index`'s done marker: {result, key}, written once the part is complete."""
        return _marker_path(_part_path(self.out_dir, index))

    def check_out_dir(self, overwrite: bool = False) -> None:
        """Refuse, before any work, an `out_dir` that this plan may not replace (`OutDirError`:
        not writable, foreign files, or another plan's dataset without `overwrite`)."""
        out_dir_lib.prepare_out_dir(self.out_dir)
        _refuse_replacing(self.out_dir, self.plan, overwrite)

    def write(self, part_results: Sequence[dict]) -> None:
        """Write plan.json with the parts' record counts and dropped/skipped totals, in order."""
        plan = dict(
            self.plan,
            part_records=[result["records"] for result in part_results],
            dropped_empty=sum(result["dropped_empty"] for result in part_results),
            skipped_bad=sum(result["skipped_bad"] for result in part_results),
        )
        _work_dir(self.out_dir).mkdir(parents=True, exist_ok=True)
        atomic.write_json(_work_dir(self.out_dir) / "plan.json", plan, indent=2)


def plan_prepare(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    options: PrepareOptions | None = None,
    **option_values: Any,
) -> PreparePlan:
    """Plan `prepare`'s tasks, parts and shards for `options` (a `PrepareOptions`, or its
    fields as keywords); writes nothing."""
    options = PrepareOptions.of(options, **option_values)
    fields, name, num_shards = options.fields, options.name, options.num_shards
    out_dir = _out_path(out_dir)
    files = expand_inputs(inputs)
    tasks = plan_tasks(files, options.piece_bytes)
    if num_shards is None:
        total_bytes = sum(path.stat().st_size for path in files)
        num_shards = min(MAX_AUTO_SHARDS, max(1, -(-total_bytes // AUTO_SHARD_BYTES)))
    shard_files = [sources.shard_name(name, k, num_shards) for k in range(num_shards)]
    tokenizer = _load_tokenizer(options.tokenizer)
    identity = _tokenizer_identity(tokenizer)
    format = "tokens" if tokenizer is not None else ("chat" if fields.chat else "text")
    token_dtype = sources.token_dtype_for_vocab(identity["vocab_size"]).name if identity else None
    part_options = {
        "fields": fields,
        "append_eos": options.append_eos,
        "skip_bad": options.skip_bad,
        "token_dtype": token_dtype,
        "max_doc_bytes": options.max_doc_bytes,
    }
    options_key = json.dumps(
        [format, identity, dict(part_options, fields=fields.describe())], sort_keys=True
    )
    part_keys = [
        hashlib.sha256(f"{options_key}|{task.key()}".encode()).hexdigest() for task in tasks
    ]
    plan_key = hashlib.sha256(f"{options_key}|{part_keys}|{shard_files}".encode()).hexdigest()
    plan_append_eos = bool(options.append_eos or getattr(tokenizer, "add_eos", False))
    plan = {
        "name": name,
        "format": format,
        "token_dtype": token_dtype,
        "tokenizer": identity,
        "append_eos": plan_append_eos,
        "input_fields": fields.describe(),
        "num_shards": num_shards,
        "shards": shard_files,
        "shard_keys": [
            hashlib.sha256(f"{plan_key}|{k}".encode()).hexdigest() for k in range(num_shards)
        ],
        "parts": part_keys,
        "key": plan_key,
        # With the fields above, what `_plan_differences` names when refusing to replace.
        "skip_bad": options.skip_bad,
        "max_doc_bytes": options.max_doc_bytes,
        "piece_bytes": options.piece_bytes,
        "inputs": [
            {"path": os.path.realpath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            for path, stat in ((path, path.stat()) for path in files)
        ],
    }
    return PreparePlan(out_dir, tasks, part_keys, part_options, tokenizer, plan)


@out_guard.holding_lock
def prepare(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    options: PrepareOptions | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    **option_values: Any,
) -> dict:
    """Prepare `inputs` into the dataset directory `out_dir`; returns the manifest.

    `options` (a `PrepareOptions`, or its fields as keywords: `tokenizer=`, `text_key=`,
    `num_shards=`, ...) say what the dataset holds: token arrays with a tokenizer, else text,
    or chat records with `chat_key` / Nemotron-style columns. The manifest's `input_fields`
    records the record options; changing any option redoes the work. `workers` processes
    share the tasks; the output does not depend on it.

    The dataset is built beside `out_dir` and replaces it atomically once complete
    (`wf_data.data.prepare.out_dir`): a failed or killed run leaves `out_dir` as it was, and a
    re-run with the same inputs and options redoes only unfinished parts and shards (or nothing,
    when `out_dir` already holds that dataset intact). A dataset of other inputs or options
    in `out_dir` is replaced only with `overwrite` (`OutDirError` names the differences).
    Another prepare writing `out_dir` meanwhile, or a write that fails (a full disk, a
    read-only file system), is an `OutDirError` naming the pid, or the file and the fix
    (`out_guard.writing`).
    Records over `max_doc_bytes` are bad records; long documents are tokenized in pieces, so
    memory stays bounded. With `skip_bad`, every skipped record is listed in
    `out_dir/skipped.jsonl`.
    The returned manifest carries `summary` (elapsed seconds in all, documents/s and
    tokens/s from the first document on, tokenizer loading excluded, and the first 20
    skipped records), which is not on disk.
    """
    started = time.perf_counter()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_dir_lib.prepare_out_dir(_out_path(out_dir))
    prepared = plan_prepare(inputs, out_dir, options, **option_values)
    out_dir, tasks, part_keys = prepared.out_dir, prepared.tasks, prepared.part_keys
    tokenizer, part_options, plan = prepared.tokenizer, prepared.options, prepared.plan
    num_shards = plan["num_shards"]
    existing = _up_to_date(out_dir, plan)
    if existing is not None:
        return dict(existing, summary=_summary(started, _Progress(False), out_dir, 0))
    _refuse_replacing(out_dir, plan, overwrite)  # before any work, not only at the swap
    work_dir = _work_dir(out_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # In the build, a manifest means "finished" (`out_dir.recover`): it comes last.
    (out_dir_lib.build_dir(out_dir) / sources.MANIFEST_NAME).unlink(missing_ok=True)
    todo_shards = [k for k in range(num_shards) if _shard_done(out_dir, plan, k) is None]

    bar = _Progress(progress)
    pool = None
    scratch = tempfile.TemporaryDirectory(prefix="wf-prepare-")
    try:
        pool = _make_pool(workers, tokenizer, pathlib.Path(scratch.name))
        part_results = _run_parts(
            out_dir,
            tasks,
            part_keys,
            tokenizer,
            part_options,
            pool,
            workers,
            bar,
            bool(todo_shards),
        )
        prepared.write(part_results)
        if pool is None or len(todo_shards) <= 1:
            for shard in todo_shards:
                assemble_shard(out_dir, shard)
        else:
            list(pool.map(assemble_shard, [out_dir] * len(todo_shards), todo_shards))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        scratch.cleanup()
        bar.close()
    manifest = finalize(out_dir, overwrite)
    manifest["summary"] = _summary(started, bar, out_dir, len(todo_shards))
    return manifest


def _summary(started: float, bar: _Progress, out_dir: pathlib.Path, shards_written: int) -> dict:
    now = time.perf_counter()
    processing = max(now - bar.start, 1e-9)  # rates exclude loading the tokenizer
    skipped = []
    if (out_dir / SKIPPED_NAME).exists():
        with open(out_dir / SKIPPED_NAME, encoding="utf-8") as f:
            skipped = [json.loads(line) for line, _ in zip(f, range(SKIPPED_SHOWN), strict=False)]
    return {
        "elapsed_s": now - started,
        "documents_per_s": bar.documents / processing,
        "tokens_per_s": bar.tokens / processing,
        "parts_run": bar.parts_run,
        "shards_written": shards_written,
        "skipped": skipped,
    }


def _run_parts(out_dir, tasks, part_keys, tokenizer, options, pool, workers, bar, need_files):
    """Run the unfinished part tasks; returns every part's result, in task order.

    A part is finished when its marker carries the current key and, if a shard still has to be
    assembled from it (`need_files`), its files are still there (finalize deletes them).
    """
    results: list[dict | None] = [None] * len(tasks)
    todo = []
    for index, key in enumerate(part_keys):
        part_path = _part_path(out_dir, index)
        marker = _read_marker(part_path, key)
        has_files = part_path.exists() and (
            options["token_dtype"] is None
            or part_path.with_name(part_path.name + ".lengths.npy").exists()
        )
        if marker is not None and (has_files or not need_files):
            results[index] = marker
        else:
            todo.append(index)
    bar.parts_run = len(todo)
    ahead = None if pool is None else _EncodeAhead(pool, workers, [tasks[i] for i in todo], options)
    for position, index in enumerate(todo):
        results[index] = _run_part(
            os.fspath(_part_path(out_dir, index)),
            tasks[index],
            part_keys[index],
            options,
            tokenizer=tokenizer,
            progress=bar.update,
            encoded=None if ahead is None else ahead.part(position),
        )
    return results


def _make_pool(
    workers: int, tokenizer: Any, scratch: pathlib.Path
) -> futures.ProcessPoolExecutor | None:
    """A spawn-context process pool of `workers` (None for 1: everything runs in-process).

    Workers die with this process (`worker_lifetime`), so a kill -9 leaves none behind. Each
    loads the tokenizer from a JSON file in `scratch`: the executor starts its workers one
    after the other, each blocking until the last has read its arguments, and a tokenizer among
    them (hundreds of KB) would hold that until the worker has imported and unpickled it.
    """
    if workers <= 1:
        return None
    saved = None
    if tokenizer:
        saved = _BackendEncoder.of(tokenizer).save(scratch / "tokenizer-for-workers.json")
    return futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(saved, os.getpid()),
    )


QUEUED_PER_WORKER = 2  # one chunk encoding, one waiting: workers never wait for the writer


class _EncodeAhead:
    """The chunks (`plan_chunks`) of `tasks`, encoded by the processes of `pool` and handed
    out in order, part by part, while this process writes them.

    `QUEUED_PER_WORKER` chunks a worker are kept submitted, across part boundaries, so the
    workers never wait for the writer, and a part's last chunks overlap the next part's first.
    """

    def __init__(self, pool: futures.ProcessPoolExecutor, workers: int, tasks, options: dict):
        self._pool, self._options = pool, options
        self._limit = QUEUED_PER_WORKER * workers
        self._jobs = (
            (position, chunk) for position, task in enumerate(tasks) for chunk in plan_chunks(task)
        )
        self._pending: collections.deque[tuple[int, futures.Future]] = collections.deque()

    def part(self, position: int) -> Iterator[EncodedChunk]:
        """Task `position`'s encoded chunks, in order (chunks of earlier tasks left unread are
        dropped)."""
        while True:
            self._submit()
            while self._pending and self._pending[0][0] < position:
                self._pending.popleft()[1].cancel()
            if not self._pending or self._pending[0][0] != position:
                return
            future = self._pending.popleft()[1]
            self._submit()
            yield future.result()

    def _submit(self) -> None:
        while len(self._pending) < self._limit:
            job = next(self._jobs, None)
            if job is None:
                return
            future = self._pool.submit(_encode_in_worker, job[1], self._options)
            self._pending.append((job[0], future))
