"""`tools/bench.py --quick` runs every section and prints its tables (CI smoke)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))


@pytest.mark.slow
def test_quick_bench_prints_every_section(tmp_path, capsys):
    import bench

    results = bench.main([
        "--quick", "--tokens", "300000", "--window-sizes", "256", "--grain-seconds", "2",
        "--cache-dir", str(tmp_path),
    ])
    out = capsys.readouterr().out
    for section in bench.SECTIONS:
        assert f"### {section}" in out
    packing = {row["name"]: row for row in results["packing"]}
    assert packing["wf-data best_fit w=256"]["truncated"] == 0
    assert packing["wf-data best_fit w=256"]["fill"] > 0.97
    assert results["memory"][0]["growth"] < 0.05
    states = results["state"]
    assert states[-1]["state_bytes"] < 2 * states[0]["state_bytes"]
