"""`wf-data prepare --runner beam`: the same map/reduce as `prepare`, on Apache Beam.

`build_pipeline` plans on the launching machine with `prepare.plan_prepare` (so tasks, part
names and shard names are the local ones), then builds:

    Start (clear manifest) -> one element per task -> Reshuffle -> SplitParts (plan_chunks)
      -> one element per chunk -> Reshuffle -> EncodeChunks (encode_chunk) -> GroupByKey(part)
      -> WriteParts (prepare_file over the part's chunks, in order) -> all parts (ToList)
      -> WritePlan (plan.json) -> one element per shard -> Reshuffle
      -> AssembleShard (assemble_shard) -> all shards (ToList) -> Finalize (finalize, once)

Chunks (about 1 MiB of a task) spread the encoding over the workers even for one large
input file; the work is `prepare`'s own (`plan_chunks`, `encode_chunk`, `prepare_file`,
`assemble_shard`, `finalize`), so the output is byte-identical to a local run whatever the
runner's parallelism. Beam re-runs failed bundles, so every step is idempotent: a part is
written under a name unique to the attempt and renamed over the part's deterministic name;
shards, plan and manifest are written to a temp file and renamed. As locally, a part whose
done marker (same inputs and options) and files exist is not encoded again, so re-running a
failed job redoes only unfinished parts (shards are always assembled again). Input and
output paths must be visible to every worker (a local disk for the DirectRunner, a shared
filesystem on a cluster).

Needs the optional extra: `pip install 'wf-data[beam]'`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shlex
import time
import uuid
from collections.abc import Sequence
from typing import Any

from wf_data import atomic
from wf_data.data.prepare import assemble, encoding, out_guard, parts
from wf_data.data.prepare import out_dir as out_dir_lib
from wf_data.data.prepare import run as prepare_lib
from wf_data.data.prepare.inputs import plan_chunks
from wf_data.data.prepare.options import PrepareOptions
from wf_data.data.shards import sources
from wf_data.extras import requires

with requires("beam", feature="wf-data prepare --runner beam"):
    import apache_beam as beam
    from apache_beam.metrics.metric import Metrics, MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

__all__ = ["build_pipeline", "run"]

# Parts actually encoded (not found finished from an earlier run), summed over the workers.
PARTS_RUN = Metrics.counter("wf_data.prepare_beam", "parts_run")


def build_pipeline(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    options: PrepareOptions | None = None,
    *,
    pipeline_options: PipelineOptions | Sequence[str] | str | None = None,
    overwrite: bool = False,
    **option_values: Any,
) -> beam.Pipeline:
    """A Beam pipeline that prepares `inputs` into `out_dir` exactly as `prepare` does.

    `options` are `prepare`'s (a `PrepareOptions`, or its fields as keywords); the tokenizer
    is a name or path: each worker loads it in `setup` and checks its fingerprint against the
    one planned here. `pipeline_options` are Beam's (a `PipelineOptions`, an argv list, or one
    string such as "--runner=DirectRunner --direct_num_workers=2"); default: the in-process
    DirectRunner. Nothing is written until the pipeline runs.
    """
    options = PrepareOptions.of(options, **option_values)
    return _build(inputs, out_dir, options, pipeline_options, overwrite)[0]


def _build(inputs, out_dir, options, pipeline_options, overwrite):
    """(pipeline, the plan it runs): `build_pipeline`, with the plan for `run`'s summary."""
    tokenizer = options.tokenizer
    if tokenizer is not None and not isinstance(tokenizer, str | os.PathLike):
        raise TypeError(
            f"prepare on Beam loads the tokenizer on each worker by name: pass its name or "
            f"path, not a {type(tokenizer).__name__}"
        )
    planned = prepare_lib.plan_prepare(inputs, out_dir, options)
    planned.check_out_dir(overwrite)
    fingerprint = (planned.plan["tokenizer"] or {}).get("sha256")
    # Workers get the plan without the loaded tokenizer (they load their own by name).
    planned = dataclasses.replace(planned, tokenizer=None)
    jobs = [
        (index, task, os.fspath(path), os.fspath(planned.part_marker_path(index)), key)
        for index, (task, path, key) in enumerate(
            zip(planned.tasks, planned.part_paths, planned.part_keys, strict=True)
        )
    ]
    tokenizer_name = tokenizer and os.fspath(tokenizer)
    tokens = planned.options["token_dtype"] is not None
    pipeline = beam.Pipeline(options=_pipeline_options(pipeline_options))
    _ = (
        pipeline
        | "Start" >> beam.Create([None])
        | "ClearManifest" >> beam.FlatMap(_start, planned.out_dir, jobs)
        | "SpreadTasks" >> beam.Reshuffle()
        | "SplitParts" >> beam.FlatMap(_split_part, tokens)
        | "SpreadChunks" >> beam.Reshuffle()
        | "EncodeChunks" >> beam.ParDo(_EncodeChunk(tokenizer_name, fingerprint, planned.options))
        | "ByPart" >> beam.GroupByKey()
        | "WriteParts" >> beam.ParDo(_WritePart(tokens, planned.options, jobs))
        | "AllParts" >> beam.combiners.ToList()
        | "WritePlan" >> beam.FlatMap(_write_plan, planned)
        | "SpreadShards" >> beam.Reshuffle()
        | "AssembleShards" >> beam.Map(_assemble_shard, os.fspath(planned.out_dir))
        | "AllShards" >> beam.combiners.ToList()
        | "Finalize" >> beam.Map(_finalize, planned, overwrite)
    )
    return pipeline, planned


@out_guard.holding_lock
def run(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    options: PrepareOptions | None = None,
    *,
    pipeline_options: PipelineOptions | Sequence[str] | str | None = None,
    overwrite: bool = False,
    **option_values: Any,
) -> dict:
    """Build the pipeline (`build_pipeline`'s arguments), run it to the end; returns the manifest.

    The manifest carries `summary` (elapsed seconds including the runner's start-up, records/s
    and tokens/s over that time, parts encoded, shards written), as `prepare` returns it. As
    locally, a re-run after a failure re-encodes only the parts that were not finished.
    """
    started = time.perf_counter()
    options = PrepareOptions.of(options, **option_values)
    pipeline, planned = _build(inputs, out_dir, options, pipeline_options, overwrite)
    result = pipeline.run()
    state = result.wait_until_finish()
    if state != beam.runners.runner.PipelineState.DONE:
        raise RuntimeError(f"{out_dir}: Beam prepare pipeline ended in state {state}")
    manifest = sources.read_manifest(out_dir)
    elapsed = max(time.perf_counter() - started, 1e-9)
    manifest["summary"] = {
        "elapsed_s": elapsed,
        "documents_per_s": manifest["totals"]["records"] / elapsed,
        "tokens_per_s": manifest["totals"]["tokens"] / elapsed,
        "parts_run": _committed_count(result, PARTS_RUN),
        "shards_written": len(manifest["shards"]),
    }
    return manifest


def _committed_count(result: beam.runners.runner.PipelineResult, counter: Any) -> int | None:
    """A counter's total over successful bundles (a retried bundle counts once).

    Runners that do not commit metrics report attempts; None where a runner reports neither.
    """
    query = MetricsFilter().with_namespace(counter.metric_name.namespace)
    query = query.with_name(counter.metric_name.name)
    try:
        found = result.metrics().query(query)["counters"]
    except NotImplementedError:
        return None
    if not found:  # never incremented: every part was found finished
        return 0
    values = [c.committed if c.committed is not None else c.attempted for c in found]
    return None if None in values else sum(values)


def _pipeline_options(value: PipelineOptions | Sequence[str] | str | None) -> PipelineOptions:
    if isinstance(value, PipelineOptions):
        return value
    if value is None:
        value = ["--runner=DirectRunner"]
    elif isinstance(value, str):
        value = shlex.split(value)
    return PipelineOptions(list(value))


def _start(_: None, out_dir: pathlib.Path, jobs: list) -> list:
    """Create the build's work folder beside `out_dir` and remove a manifest of an unfinished
    build there (it is written last); `out_dir` itself is left alone. Emit the jobs."""
    out_dir_lib.prepare_out_dir(out_dir)
    (out_dir_lib.build_dir(out_dir) / out_dir_lib.WORK_DIR_NAME).mkdir(parents=True, exist_ok=True)
    (out_dir_lib.build_dir(out_dir) / sources.MANIFEST_NAME).unlink(missing_ok=True)
    return jobs


def _split_part(job: tuple, tokens: bool):
    """A part's job -> its chunks (index, (chunk number, chunk)); a part finished by an earlier
    run -> (index, (-1, its result)), so a re-run after a failure encodes only unfinished ones."""
    index, task, part_path, marker_path, key = job
    finished = _finished_part(pathlib.Path(marker_path), key, _part_files(part_path, tokens))
    if finished is not None:
        yield index, (-1, finished)
        return
    for number, chunk in enumerate(plan_chunks(task)):
        yield index, (number, chunk)


class _EncodeChunk(beam.DoFn):
    """(index, (number, chunk)) -> (index, (number, its `EncodedChunk`)); found results pass.

    Loads the planned tokenizer by name on its worker (`setup`).
    """

    def __init__(self, tokenizer: str | None, fingerprint: str | None, options: dict):
        self._tokenizer_name = tokenizer
        self._fingerprint = fingerprint
        self._options = options
        self._tokenizer = None

    def setup(self) -> None:
        if self._tokenizer_name is None:
            return
        # A worker seeing other tokenizer files under the same name would write other tokens:
        # refuse rather than mix two tokenizers in one dataset.
        tokenizer = encoding._load_tokenizer(self._tokenizer_name)
        if tokenizer.fingerprint() != self._fingerprint:
            raise ValueError(
                f"tokenizer {self._tokenizer_name!r} on this worker has fingerprint "
                f"{tokenizer.fingerprint()}, the launcher planned with {self._fingerprint}: "
                "give every worker the same tokenizer files (a path on shared storage)"
            )
        self._tokenizer = tokenizer

    def process(self, element: tuple):
        index, (number, chunk) = element
        if number >= 0:
            chunk = parts.encode_chunk(chunk, tokenizer=self._tokenizer, **self._options)
        yield index, (number, chunk)


class _WritePart(beam.DoFn):
    """A part's encoded chunks -> its part file (`prepare_file`), renamed into place; emits
    (index, result). Holds one part's records (those of ~`piece_bytes` of input) at a time."""

    def __init__(self, tokens: bool, options: dict, jobs: list):
        self._tokens, self._options, self._jobs = tokens, options, jobs

    def process(self, element: tuple):
        index, numbered = element
        numbered = sorted(numbered, key=lambda item: item[0])
        if numbered[0][0] < 0:  # found finished
            yield index, numbered[0][1]
            return
        _, task, part_path, marker_path, key = self._jobs[index]
        part_path, marker_path = pathlib.Path(part_path), pathlib.Path(marker_path)
        # A name unique to this attempt (random, but only a name: the bytes are the task's): a
        # retried or duplicated bundle never writes into a file another attempt is writing; the
        # finished part is renamed over the deterministic name.
        attempt = part_path.with_name(f"{part_path.name}.attempt-{uuid.uuid4().hex}")
        files = list(
            zip(
                _part_files(attempt, self._tokens),
                _part_files(part_path, self._tokens),
                strict=True,
            )
        )
        finished = _finished_part(marker_path, key, [final for _, final in files])
        if finished is not None:  # a retried bundle after the part was written
            yield index, finished
            return
        # As the local runner: a stale marker must not vouch for a part about to change, and the
        # new one (written last) lets a later run, local or Beam, resume from this one's parts.
        marker_path.unlink(missing_ok=True)
        PARTS_RUN.inc()
        encoded = [chunk for _, chunk in numbered]
        try:
            result = parts.prepare_file(task, attempt, encoded=encoded, **self._options)
            for written, final in files:  # lengths first: the part's presence vouches for both
                atomic.publish_file(written, final)
        finally:
            for written, _ in files:  # the writers removed their own temp files on failure
                written.unlink(missing_ok=True)
        atomic.write_json(marker_path, dict(result, key=key), indent=2)
        yield index, result


def _finished_part(marker_path: pathlib.Path, key: str, files: list[pathlib.Path]) -> dict | None:
    """The part's result if its marker is for `key` and its files are all there, else None."""
    try:
        marker = json.loads(marker_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if marker.get("key") != key or not all(path.exists() for path in files):
        return None
    return {name: value for name, value in marker.items() if name != "key"}


def _lengths_path(part_path: pathlib.Path) -> pathlib.Path:
    return part_path.with_name(part_path.name + ".lengths.npy")


def _part_files(part_path: str | os.PathLike, tokens: bool) -> list[pathlib.Path]:
    """A part's files: for tokens its lengths, then the part itself (published in this order,
    so the part's presence vouches for both)."""
    path = pathlib.Path(part_path)
    return [_lengths_path(path), path] if tokens else [path]


def _write_plan(results: list[tuple[int, dict]], planned: prepare_lib.PreparePlan) -> range:
    """Record every part's result in plan.json (in task order); emit the shard indices."""
    by_index = dict(results)
    if sorted(by_index) != list(range(len(planned.tasks))):
        missing = sorted(set(range(len(planned.tasks))) - set(by_index))
        raise RuntimeError(f"{planned.out_dir}: parts {missing} produced no result")
    planned.write([by_index[index] for index in range(len(planned.tasks))])
    return range(planned.plan["num_shards"])


def _assemble_shard(shard: int, out_dir: str) -> int:
    assemble.assemble_shard(out_dir, shard)
    return shard


def _finalize(shards: list[int], planned: prepare_lib.PreparePlan, overwrite: bool) -> dict:
    """Write lengths.npy and manifest.json once every shard is done; drop attempt leftovers."""
    if sorted(shards) != list(range(planned.plan["num_shards"])):
        raise RuntimeError(f"{planned.out_dir}: shards {sorted(shards)} assembled, not all")
    for part_path in planned.part_paths:  # attempts killed before their own cleanup ran
        for leftover in part_path.parent.glob(f"{part_path.name}.attempt-*"):
            leftover.unlink(missing_ok=True)
    return assemble.finalize(planned.out_dir, overwrite)
