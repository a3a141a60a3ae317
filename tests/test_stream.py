"""`wf-data stream`: arguments it refuses, and a stream that ends before --steps."""

import pytest

from wf_data.cli import main


def test_steps_must_be_positive(capsys):
    # --steps 0 used to stream one batch.
    with pytest.raises(SystemExit) as raised:
        main(["stream", "--steps", "0"])
    assert raised.value.code == 2
    assert "--steps: must be an int >= 1, got 0" in capsys.readouterr().err


def test_a_stream_that_ends_early_says_so(demo_cache, capsys):
    # One epoch holds fewer rows than this global batch: zero batches, and now a line saying why.
    args = ["stream", "--steps", "3", "num_epochs=1", "global_batch_size=100000"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0 batches" in out
    assert "the data ended after 0 of 3 batches (num_epochs 1" in out
