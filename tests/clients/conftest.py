"""Shared pieces of the real-client tests: a small demo config and batch comparison."""

import numpy as np
import pytest

# Small rows and batches keep every client test fast; the demo corpus is prepared once.
OVERRIDES = ["seq_len=64", "global_batch_size=4", "mixing.kind=static"]


@pytest.fixture
def demo_config(demo_cache):
    """The demo config with OVERRIDES, resolved (absolute source paths)."""
    from wf_data.config import load_data_config

    return load_data_config("demo", OVERRIDES)


def as_numpy(batch):
    return {key: np.asarray(value) for key, value in batch.items()}


def assert_streams_equal(got, want):
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert sorted(a) == sorted(b), step
        for key in a:
            np.testing.assert_array_equal(
                np.asarray(a[key]), np.asarray(b[key]), err_msg=f"step {step} key {key}"
            )
