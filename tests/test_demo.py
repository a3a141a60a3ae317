"""`wf-data demo` and `wf-data stream` end to end on the embedded corpus (short runs)."""

import json
import math

import pytest

from wf_data.cli import main


@pytest.mark.slow
def test_demo_trains_moves_weights_resumes_identically_and_compares(demo_cache, tmp_path, capsys):
    from wf_data.demo import DemoOptions, run_demo

    summary = run_demo(
        DemoOptions(
            steps=8, resume_check_steps=2, eval_batches=1, out_dir=str(tmp_path), compare=True
        )
    )
    assert summary["resume_identical"]
    assert sum(summary["final_weights"].values()) == pytest.approx(1.0)
    assert summary["final_weights"] != summary["initial_weights"]
    assert all(math.isfinite(v) for v in summary["eval_loss_after"].values())
    assert (tmp_path / "step-8").is_dir()
    comparison = summary["comparison"]
    assert comparison["online"] == summary["eval_loss_after"]
    assert comparison["static"] == summary["static_eval_loss_after"] != comparison["online"]
    assert json.loads((tmp_path / "summary.json").read_text())["comparison"] == comparison
    out = capsys.readouterr().out
    assert "Resume check" in out and "IDENTICAL" in out and "Summary" in out
    assert "online minus static" in out and "mixing wins" in out


def test_compare_arms_names_the_winner_by_the_average():
    from wf_data.demo import compare_arms

    online = {"prose": 6.0, "code": 5.0, "math": 1.0}
    static = {"prose": 5.8, "code": 5.1, "math": 1.3}
    result = compare_arms(online, static)
    assert result["average_online"] == pytest.approx(4.0)
    assert result["average_static"] == pytest.approx(4.0666666)
    assert result["difference"] == pytest.approx({"prose": 0.2, "code": -0.1, "math": -0.3})
    assert result["winner"] == "online"
    assert compare_arms(static, online)["winner"] == "static"
    assert compare_arms(online, {**online, "math": 1.0001})["winner"] == "tie"


def test_stream_reports_throughput_and_mixture(demo_cache, capsys):
    assert main(["stream", "--steps", "5", "seq_len=128", "mixing.kind=static"]) == 0
    out = capsys.readouterr().out
    assert "5 batches" in out and "tokens/s" in out
    for name in ("prose", "code", "math"):
        assert name in out
