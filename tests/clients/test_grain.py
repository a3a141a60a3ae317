"""Grain as a client: what a user composes around `DataLoader.pipeline` (a `ProcessMap`)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MP_PREFETCH = """
import sys
from absl import flags
import grain
from tests.data.deliver.test_loader import make_loader

if __name__ == "__main__":  # Grain starts its mp_prefetch workers with spawn
    flags.FLAGS(sys.argv[:1])
    pipeline = make_loader(num_workers=0).pipeline
    if sys.argv[1] == "composed":
        pipeline = pipeline.map(lambda batch: batch)
    options = grain.MultiprocessingOptions(num_workers=2)
    try:
        next(iter(pipeline.mp_prefetch(options)))
    except ValueError as error:
        print(error)
"""


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["loader.pipeline", "composed"])
def test_mp_prefetch_over_the_pipeline_names_process_map_workers(tmp_path, pipeline):
    """Issue 19 case 16: Grain's mp_prefetch over `loader.pipeline`, or a pipeline composed on
    it, raised Grain's "Cannot slice `IterDataset` source. <class '...BestFitPlans'>": it now
    says why the stream cannot be sliced and what to use (ProcessMap's own workers)."""
    script = tmp_path / "mp_prefetch.py"
    script.write_text(textwrap.dedent(MP_PREFETCH))
    result = subprocess.run(
        [sys.executable, str(script), pipeline],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    message = result.stdout
    assert "ProcessMap cannot run under Grain's mp_prefetch" in message, result.stderr[-3000:]
    assert "get_loader(..., num_workers=N)" in message
    assert "Cannot slice" not in message
