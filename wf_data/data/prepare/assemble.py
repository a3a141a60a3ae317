"""Parts to shards to a dataset: `assemble_shard` copies the global record order into
shard k of N, `finalize` writes `lengths.npy` and the manifest and swaps the build in.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import shutil
from collections.abc import Iterator

import numpy as np

from wf_data import atomic
from wf_data.data.prepare import out_dir as out_dir_lib
from wf_data.data.prepare.out_dir import WORK_DIR_NAME, OutDirError
from wf_data.data.prepare.parts import (
    _marker_path,
    _out_path,
    _part_path,
    _read_json,
    _read_marker,
    _save_lengths,
    _skipped_path,
    _work_dir,
)
from wf_data.data.shards import sources

SKIPPED_NAME = "skipped.jsonl"  # every skipped bad record, beside the manifest


def _shard_lengths_path(out_dir: pathlib.Path, shard: int) -> pathlib.Path:
    return _work_dir(out_dir) / f"shard-{shard:05d}.lengths.npy"


def assemble_shard(out_dir: str | os.PathLike, shard: int) -> dict:
    """Copy shard `shard`'s slice of the global record order from the parts into its shard file.

    Reads the plan and part markers of the build of `out_dir` (`out_dir.build_dir`); writes the
    shard there atomically, its lengths, then its done marker. Returns the shard entry
    {file, records, tokens, sha256}. Records are copied one at a time: memory holds one.
    """
    from array_record.python.array_record_module import ArrayRecordReader

    out_dir = _out_path(out_dir)
    plan = json.loads((_work_dir(out_dir) / "plan.json").read_text())
    counts = [plan["part_records"][i] for i in range(len(plan["parts"]))]
    starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    total, num_shards = int(starts[-1]), plan["num_shards"]
    lo, hi = shard * total // num_shards, (shard + 1) * total // num_shards
    tokens = plan["format"] == "tokens"
    shard_lengths: list[np.ndarray] = []

    def records() -> Iterator[bytes]:
        for part in range(len(counts)):
            a, b = max(lo, int(starts[part])), min(hi, int(starts[part + 1]))
            if a >= b:
                continue
            part_path = _part_path(out_dir, part)
            if tokens:
                part_lengths = np.load(part_path.with_name(part_path.name + ".lengths.npy"))
                shard_lengths.append(part_lengths[a - starts[part] : b - starts[part]])
            reader = ArrayRecordReader(os.fspath(part_path), sources.READER_OPTIONS)
            try:
                for index in range(int(a - starts[part]), int(b - starts[part])):
                    reader.seek(index)
                    yield reader.read()
            finally:
                reader.close()

    file_name = plan["shards"][shard]
    build = out_dir_lib.build_dir(out_dir)
    _marker_path(_work_dir(out_dir) / file_name).unlink(missing_ok=True)
    written = sources.write_shard(build / file_name, records(), format=plan["format"])
    lengths = np.concatenate(shard_lengths) if shard_lengths else np.zeros(0, np.int64)
    _save_lengths(_shard_lengths_path(out_dir, shard), lengths)
    entry = {
        "file": file_name,
        "records": written["records"],
        "tokens": int(lengths.sum()),
        "sha256": written["sha256"],
    }
    atomic.write_json(
        _marker_path(_work_dir(out_dir) / file_name),
        dict(entry, key=plan["shard_keys"][shard], size=(build / file_name).stat().st_size),
        indent=2,
    )
    return entry


def _shard_done(out_dir: pathlib.Path, plan: dict, shard: int) -> dict | None:
    file_name = plan["shards"][shard]
    marker = _read_marker(_work_dir(out_dir) / file_name, plan["shard_keys"][shard])
    path = out_dir_lib.build_dir(out_dir) / file_name
    if marker is None or not path.exists() or path.stat().st_size != marker["size"]:
        return None
    if not _shard_lengths_path(out_dir, shard).exists():
        return None
    return marker


def finalize(out_dir: str | os.PathLike, overwrite: bool = False) -> dict:
    """Write `lengths.npy`, `skipped.jsonl`, then `manifest.json`, and swap the dataset in.

    Needs every shard's done marker in the build of `out_dir`. The finished build replaces
    `out_dir` in one atomic step (`out_dir.swap_in`), unless `out_dir` holds a dataset of
    another plan and not `overwrite` (`OutDirError`). Deletes the temporary part files
    afterwards. Returns the manifest.
    """
    out_dir = _out_path(out_dir)
    build = out_dir_lib.build_dir(out_dir)
    plan = json.loads((_work_dir(out_dir) / "plan.json").read_text())
    entries, missing = [], []
    for shard in range(plan["num_shards"]):
        marker = _shard_done(out_dir, plan, shard)
        if marker is None:
            missing.append(plan["shards"][shard])
        else:
            entries.append({key: marker[key] for key in ("file", "records", "tokens", "sha256")})
    if missing:
        raise ValueError(f"{out_dir}: cannot finalize, unfinished shards: {missing}")
    if plan["format"] == "tokens":
        lengths = [np.load(_shard_lengths_path(out_dir, k)) for k in range(plan["num_shards"])]
        _save_lengths(build / sources.LENGTHS_NAME, np.concatenate(lengths))
    _write_skipped(out_dir, plan)
    manifest = {
        "name": plan["name"],
        "format": plan["format"],
        "token_dtype": plan["token_dtype"],
        "tokenizer": plan["tokenizer"],
        "append_eos": plan["append_eos"],
        "input_fields": plan.get("input_fields"),
        "shards": entries,
        "totals": {
            "records": sum(entry["records"] for entry in entries),
            "tokens": sum(entry["tokens"] for entry in entries),
            "dropped_empty": plan["dropped_empty"],
            "skipped_bad": plan["skipped_bad"],
        },
    }
    manifest = sources.write_manifest(build, manifest)
    # Shards of an earlier build with another shard count, and temp files of killed writers
    # (every shard is done, so no writer of this build is still live).
    current = set(plan["shards"])
    for path in build.glob(f"{glob.escape(plan['name'])}-?????-of-?????.array_record*"):
        if path.name not in current:
            path.unlink(missing_ok=True)
    for path in atomic.temp_files(build):
        path.unlink(missing_ok=True)
    _refuse_replacing(out_dir, plan, overwrite)
    out_dir_lib.swap_in(build, out_dir)
    work = out_dir / WORK_DIR_NAME
    for path in [*work.glob("part-*"), *atomic.temp_files(work)]:
        if not path.name.endswith(".done.json"):  # markers stay: they record the parts' results
            path.unlink(missing_ok=True)
    return manifest


def _write_skipped(out_dir: pathlib.Path, plan: dict) -> None:
    """Concatenate the parts' skipped-record lists, in input order, into `skipped.jsonl`."""
    path = out_dir_lib.build_dir(out_dir) / SKIPPED_NAME
    if not plan["skipped_bad"]:
        path.unlink(missing_ok=True)
        return
    with atomic.AtomicWriter(path) as out:
        for part in range(len(plan["parts"])):
            part_log = _skipped_path(_part_path(out_dir, part))
            if part_log.exists():
                with open(part_log, "rb") as f:
                    shutil.copyfileobj(f, out)


_PLAN_SETTINGS = (
    "format",
    "tokenizer",
    "input_fields",
    "append_eos",
    "skip_bad",
    "max_doc_bytes",
    "num_shards",
    "name",
    "piece_bytes",
)


def _plan_differences(old: dict | None, new: dict) -> list[str]:
    """What differs between the plan of the dataset in `--out` and the new one, in words
    (nothing: the two plans make the same dataset)."""
    if old is None or "inputs" not in old or "inputs" not in new:
        return ["the inputs and settings of one of them are not recorded (.wf-prepare/plan.json)"]
    differences = [
        f"{key} {old.get(key)!r} -> {new.get(key)!r}"
        for key in _PLAN_SETTINGS
        if old.get(key) != new.get(key)
    ]
    old_inputs = {item["path"]: item for item in old["inputs"]}
    new_inputs = {item["path"]: item for item in new["inputs"]}
    differences += [f"input added: {path}" for path in new_inputs if path not in old_inputs]
    differences += [f"input removed: {path}" for path in old_inputs if path not in new_inputs]
    differences += [
        f"input changed (size or modification time): {path}"
        for path, item in new_inputs.items()
        if path in old_inputs and old_inputs[path] != item
    ]
    if not differences and list(old_inputs) != list(new_inputs):
        differences.append("inputs in another order")
    return differences


def _same_dataset(old: dict | None, new: dict) -> bool:
    """Whether the plan recorded with a dataset (`old`) makes the dataset `new` does: the same
    key, or every recorded input and setting equal (a plan whose key an older wf-data
    computed from the inputs' spelling)."""
    if old is None:
        return False
    return old.get("key") == new.get("key") or not _plan_differences(old, new)


def _refuse_replacing(out_dir: pathlib.Path, plan: dict, overwrite: bool) -> None:
    """OutDirError unless `out_dir` is free, holds no finished dataset, or the same plan's.

    A file prepare never writes is refused even with `overwrite` (the swap would delete it).
    """
    if not out_dir_lib.dataset_files_only(out_dir) or overwrite:
        return
    if not (out_dir / sources.MANIFEST_NAME).exists():
        return  # an unfinished build of an older wf-data: nothing readable to lose
    old = _read_json(out_dir / WORK_DIR_NAME / "plan.json")
    if _same_dataset(old, plan):
        return  # the same dataset, rebuilt (it was damaged)
    differences = _plan_differences(old, plan)
    shown = "; ".join(differences[:5])
    more = f"; and {len(differences) - 5} more" if len(differences) > 5 else ""
    raise OutDirError(
        f"--out {out_dir}: holds a dataset prepared from other inputs or settings "
        f"({shown}{more}); pass --overwrite to replace it once the new one is complete, or "
        "choose another --out"
    )


def _up_to_date(out_dir: pathlib.Path, plan: dict) -> dict | None:
    """The manifest of `out_dir` if it holds this plan's dataset with its files intact."""
    if not _same_dataset(_read_json(out_dir / WORK_DIR_NAME / "plan.json"), plan):
        return None
    try:
        sources.DocumentSource(out_dir)  # checks manifest, file sizes and lengths
    except (OSError, ValueError):
        return None  # damaged: build it again beside, then swap
    return sources.read_manifest(out_dir)
