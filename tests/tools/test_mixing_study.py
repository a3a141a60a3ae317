"""`tools/mixing_study.py` end to end on a few steps: every reward arm runs, report is sane."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))


@pytest.mark.slow
def test_quick_study_runs_arms_and_writes_table_json_plot_and_docs(demo_cache, tmp_path, capsys):
    import mixing_study

    page = tmp_path / "mixing.md"
    begin, end = mixing_study.docs_markers([0])
    page.write_text(f"# Mixing\n\n{begin}\nold\n{end}\nafter\n")
    argv = ["--steps", "10", "--eval-every", "5", "--seeds", "0", "--out-dir", str(tmp_path)]
    argv += ["--jobs", "1", "--arms", "static", "prop-excess-auto"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--docs", str(page)]
    assert mixing_study.main(argv) == 0
    table = (tmp_path / "mixing_study.md").read_text()
    for arm in ("static", "prop-excess-auto"):
        assert f"| {arm} |" in table
    assert "| mean ± std |" in table  # the per-seed table
    text = page.read_text()
    assert table in text and "old" not in text and text.endswith(f"{end}\nafter\n")
    assert "seeds 0." in text and "cores" in text
    assert (tmp_path / "mixing_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads((tmp_path / "mixing_study.json").read_text())
    assert [run["arm"] for run in runs] == ["static", "prop-excess-auto"]
    for run in runs:
        assert run["eval_steps"] == [0, 5, 10]
        assert set(run["token_share"]) == set(mixing_study.DOMAINS)
        assert sum(run["token_share"].values()) == pytest.approx(1.0)
        assert all(np.isfinite(v) for losses in run["eval_loss"] for v in losses.values())
    static, auto = runs
    # Same seed, same model init: the first evaluation is identical across arms.
    assert static["eval_loss"][0] == auto["eval_loss"][0]
    assert static["final_weights"] == pytest.approx({d: 0.2 for d in mixing_study.DOMAINS})
    # Warm-up of 2 updates (20% of 10), references measured after updates 1 and 2, then moved.
    assert auto["final_weights"] != static["final_weights"]
    assert "runs in" in capsys.readouterr().out

    # Again: both runs come from the cache, with the same results.
    assert mixing_study.main(argv) == 0
    assert capsys.readouterr().out.count(", cached)") == 2
    assert json.loads((tmp_path / "mixing_study.json").read_text()) == runs


def test_steps_to_reach_and_summary():
    import mixing_study

    def result(arm, seed, averages):
        losses = [{d: value for d in mixing_study.DOMAINS} for value in averages]
        return mixing_study.ArmResult(
            arm, seed, [0, 10, 20], losses, dict.fromkeys(mixing_study.DOMAINS, 0.2), {}, 1.0
        )

    static = result("static", 0, [9.0, 6.0, 5.0])
    faster = result("online", 0, [9.0, 4.9, 4.0])
    slower = result("online", 1, [9.0, 7.0, 5.5])
    static_1 = result("static", 1, [9.0, 6.0, 5.2])
    assert mixing_study.steps_to_reach(faster, 5.0) == 10
    assert mixing_study.steps_to_reach(slower, 5.2) is None
    rows = mixing_study.summarise([static, static_1, faster, slower])
    online = rows[1]
    assert online["arm"] == "online" and online["reach"] == [10, None]
    assert online["average_mean"] == pytest.approx(4.75)
    assert online["average_std"] == pytest.approx(0.75)
