"""The exploration notebooks run from a clean kernel and write their figures as PNG files.

Notebooks are committed with outputs cleared; this test regenerates them in memory (the file on
disk is never rewritten) and fails on the first cell that raises.
"""

from __future__ import annotations

import os
import pathlib
import struct

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MIXTURES = REPO_ROOT / "notebooks" / "mixtures.ipynb"
CELL_TIMEOUT_S = 60
EXPECTED_PNGS = (
    "length_histograms.png",
    "packing_fill.png",
    "exp3_policy.png",
    "exp3_token_share.png",
    "static_vs_exp3.png",
    "packed_rows.png",
    "sft_rows.png",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: pathlib.Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; fails on anything that is not a PNG."""
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_mixtures_notebook_is_committed_without_outputs():
    notebook = nbformat.read(MIXTURES, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    for index, cell in enumerate(code_cells):
        assert not cell.outputs, f"code cell {index} of {MIXTURES.name} has committed outputs"
        assert cell.execution_count is None, f"code cell {index} has an execution count"


@pytest.mark.slow
def test_mixtures_notebook_executes_and_writes_pngs(tmp_path, monkeypatch):
    # The kernel inherits this environment: figures go to tmp_path, the fast (simulation) path.
    monkeypatch.setenv("WF_DATA_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("WF_DATA_NOTEBOOK_FAST", "1")
    notebook = nbformat.read(MIXTURES, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO_ROOT)}},
        allow_errors=False,
    )
    client.execute(cwd=str(REPO_ROOT))  # raises CellExecutionError naming the failing cell

    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    written = sorted(path.name for path in tmp_path.glob("*.png"))
    assert written == sorted(EXPECTED_PNGS)
    for name in EXPECTED_PNGS:
        path = tmp_path / name
        width, height = png_size(path)
        assert width >= 300 and height >= 200, f"{name} is only {width}x{height}"
        assert path.stat().st_size > 10_000, f"{name} is nearly empty ({path.stat().st_size} B)"
    # Figures are also shown inline, and the last cell lists the PNG paths it wrote.
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) >= len(EXPECTED_PNGS)
    listing = "".join(output.get("text", "") for output in notebook.cells[-1].outputs)
    for name in EXPECTED_PNGS:
        assert os.path.join(str(tmp_path), name) in listing
