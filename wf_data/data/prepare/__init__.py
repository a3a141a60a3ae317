"""Preparing shards: jsonl / parquet / txt inputs -> ArrayRecord shards + lengths.npy +
manifest.json, locally (`prepare`) or on Apache Beam (`beam`), atomically and resumably.

Modules by concern: `options` (`PrepareOptions`), `inputs` (files and tasks), `records`
(record -> document), `encoding` (document -> record bytes, the tokenizer), `parts` (task ->
part file), `assemble` (parts -> shards -> dataset), `out_dir` (the build beside `--out`, the
swap), `out_guard` (one writer at a time, failed writes in one line), `run` (the local
runner). May import `workers`, `text` and `shards`.
"""

from wf_data.data.prepare.assemble import assemble_shard, finalize
from wf_data.data.prepare.input_streams import InputFileError
from wf_data.data.prepare.inputs import PrepareTask, expand_inputs, plan_tasks
from wf_data.data.prepare.options import PrepareOptions
from wf_data.data.prepare.out_dir import OutDirError
from wf_data.data.prepare.parts import prepare_file
from wf_data.data.prepare.records import BadInputError, BadTypeError, RecordFields, iter_documents
from wf_data.data.prepare.run import PreparePlan, plan_prepare, prepare

__all__ = [
    "BadInputError",
    "BadTypeError",
    "InputFileError",
    "OutDirError",
    "PrepareOptions",
    "PreparePlan",
    "PrepareTask",
    "RecordFields",
    "assemble_shard",
    "expand_inputs",
    "finalize",
    "iter_documents",
    "plan_prepare",
    "plan_tasks",
    "prepare",
    "prepare_file",
]
