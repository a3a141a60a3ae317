"""`tools/bench.py --quick` and `tools/bench_planning.py --quick` (CI smoke) and their helpers."""

import numpy as np
import pytest

from tools import bench, bench_common, bench_planning


def test_summarize_reports_median_spread_and_paired_ratios():
    ours = [
        bench_common.Timing(tokens, 1.0, first)
        for tokens, first in ((30, 0.3), (10, 0.1), (20, 0.2))
    ]
    grain = [bench_common.Timing(tokens, 1.0, 0.5) for tokens in (2, 1, 4)]
    row = bench_common.summarize("ours", ours, grain, ">= 2x")
    assert row["tokens_per_s"] == 20  # the median, not the best (30)
    assert row["spread"] == (10, 30)
    assert row["ratio"] == 10  # median 20 / median 2
    assert row["ratio_spread"] == (5, 15)  # round by round: 30/2, 10/1, 20/4
    assert row["first_ms"] == pytest.approx(200)
    assert row["target"] == ">= 2x"


def test_held_array_bytes_counts_each_buffer_once_and_skips_excluded():
    lengths = np.zeros(1000, dtype=np.int64)
    order = np.arange(100, dtype=np.int32)

    class Planner:
        def __init__(self):
            self.lengths = lengths[10:]  # a view of an excluded array
            self.orders = {0: order, 1: order[:50]}  # one buffer, seen twice
            self.plans = [(1, 2, 3)] * 4

    assert bench_planning.held_array_bytes(Planner(), [lengths]) == order.nbytes
    assert bench_planning.held_array_bytes(Planner(), []) == order.nbytes + lengths.nbytes


def test_lengths_only_source_refuses_token_reads():
    source = bench_common.LengthsOnly(np.array([5, 7]), "x")
    assert len(source) == 2
    with pytest.raises(RuntimeError, match="read document 1"):
        source[1]


@pytest.mark.slow
def test_quick_bench_prints_every_section(tmp_path, capsys):
    results = bench.main(["--quick", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "compare ratios" in out and "load average" in out
    for section in bench.SECTIONS:
        assert f"### {section}" in out
    packing = {row["name"]: row for row in results["packing"]}
    # Ours over a full epoch: every token read comes out; Grain's fit packers cut documents.
    for name in ("wf-data concat", "wf-data best_fit w=256"):
        assert packing[name]["truncated_pct"] == 0
    assert packing["grain shuffle+BestFit"]["truncated_pct"] > 0
    assert packing["wf-data best_fit w=256"]["fill"] > 0.97
    for row in results["vs_grain"] + results["concat"] + results["workers"]:
        assert row["tokens_per_s"] > 0 and "ratio" in row
    assert [row["documents"] for row in results["first_batch"]] == [100_000] * 4
    assert results["memory"][0]["growth"] < 0.05
    assert [row["name"].split(" + ")[0] for row in results["restore"]] == [
        "restore after 2 batches",
        "restore after 20 batches",
    ]
    for row in results["restore"]:
        parts = row["build_ms"] + row["restore_ms_part"] + row["first_ms_part"]
        assert row["restore_ms"] == pytest.approx(parts)  # one round: the sum of its parts
    planning = results["planning"]
    assert [(row["documents"], row["name"].split(", ")[-1]) for row in planning] == [
        (100_000, "256 rows a step"),
        (100_000, "4,096 rows a step"),
    ]
    assert all(row["us_per_row"] > 0 and row["max_over_mean"] >= 1 for row in planning)
    for bare in results["bare_packer"][:2]:
        assert bare["ratio"] > 0 and bare["truncated_pct"] == 0  # speed: the bench, not a test
    assert 0 < results["vs_grain"][0]["planning_pct"] < 100
    states = results["state"]
    assert states[-1]["state_bytes"] < 2 * states[0]["state_bytes"]


@pytest.mark.slow
def test_quick_planning_grid(tmp_path, capsys):
    cells = bench_planning.main(["--quick", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "planning ms/step" in out and "% of 1 s step" in out
    assert [(c["documents"], c["domains"], c["rows"]) for c in cells] == [
        (100_000, 1, 256),
        (100_000, 8, 256),
    ]
    for cell in cells:
        low, high = cell["ms_spread"]
        assert 0 < low <= cell["ms_per_step"] <= high <= cell["max_step_ms"] + 0.1
        assert cell["pct_1s"] == pytest.approx(cell["ms_per_step"] / 10)
        assert cell["lengths_mb"] == pytest.approx(100_000 * 8 / 2**20)


def test_update_page_replaces_the_sections_run_and_keeps_the_others(tmp_path):
    page = tmp_path / "benchmarks.md"
    bench.update_page(page, {"restore": "### restore\nfirst", "planning": "### planning\nold"})
    bench.update_page(page, {"planning": "### planning\nnew"})
    text = page.read_text()
    assert text.startswith(bench.PAGE_HEADER)
    assert "first" in text and "new" in text and "old" not in text
    # Sections stay in SECTIONS order whichever ran last.
    assert text.index("### restore") < text.index("### planning")
