"""`wf-data demo` and `wf-data stream` end to end on the embedded corpus (short runs)."""

import math

import pytest

from wf_data.cli import main


@pytest.mark.slow
def test_demo_trains_moves_weights_and_resumes_identically(demo_cache, tmp_path, capsys):
    from wf_data.demo import DemoOptions, run_demo

    summary = run_demo(
        DemoOptions(steps=8, resume_check_steps=2, eval_batches=1, out_dir=str(tmp_path))
    )
    assert summary["resume_identical"]
    assert sum(summary["final_weights"].values()) == pytest.approx(1.0)
    assert summary["final_weights"] != summary["initial_weights"]
    assert all(math.isfinite(v) for v in summary["eval_loss_after"].values())
    assert (tmp_path / "step-8").is_dir()
    out = capsys.readouterr().out
    assert "Resume check" in out and "IDENTICAL" in out and "Summary" in out


def test_stream_reports_throughput_and_mixture(demo_cache, capsys):
    assert main(["stream", "--steps", "5", "seq_len=128", "mixing.kind=static"]) == 0
    out = capsys.readouterr().out
    assert "5 batches" in out and "tokens/s" in out
    for name in ("prose", "code", "math"):
        assert name in out
