"""Helpers of the real-client tests: the small demo settings and batch-stream comparison."""

import numpy as np

# Small rows and batches keep every client test fast; the demo corpus is prepared once.
OVERRIDES = ["seq_len=64", "global_batch_size=4", "mixing.kind=static"]


def as_numpy(batch):
    """A batch of torch / JAX / numpy arrays as numpy arrays, by key."""
    return {key: np.asarray(value) for key, value in batch.items()}


def assert_streams_equal(got, want):
    """Two lists of batches are equal step by step, key by key, value by value."""
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert sorted(a) == sorted(b), step
        for key in a:
            np.testing.assert_array_equal(
                np.asarray(a[key]), np.asarray(b[key]), err_msg=f"step {step} key {key}"
            )
