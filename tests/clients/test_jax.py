"""JAX: a loader batch lands as global jax.Arrays on a 1-D mesh of 2 CPU devices."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.clients.streams import OVERRIDES


def jax_checks():
    """The README's JAX snippet, checked (needs 2 JAX devices in this process)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from wf_data.data import get_loader

    assert jax.device_count() >= 2, jax.devices()
    mesh = jax.make_mesh((2,), ("data",))
    loader = get_loader(
        "demo",
        overrides=OVERRIDES,
        framework="jax",
        jax_sharding=NamedSharding(mesh, P("data")),
        dp_rank=jax.process_index(),
        dp_world_size=jax.process_count(),
    )
    batch = next(loader)
    want = next(get_loader("demo", overrides=OVERRIDES, framework="numpy"))
    for key, array in want.items():
        value = batch[key]
        assert isinstance(value, jax.Array) and value.is_fully_addressable
        assert value.shape == array.shape and value.dtype == np.int32
        assert value.sharding.spec == P("data", *[None] * (array.ndim - 1))
        shards = sorted(value.addressable_shards, key=lambda s: s.index[0].start)
        assert [s.data.shape[0] for s in shards] == [array.shape[0] // 2] * 2
        assert {s.device for s in shards} == set(mesh.devices.flat)
        np.testing.assert_array_equal(np.asarray(value), array)


@pytest.mark.slow  # jax import, and a subprocess when this one has a single device
def test_batch_is_a_global_array_on_a_cpu_mesh(demo_cache):
    import jax

    if jax.device_count() >= 2:
        jax_checks()
        return
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        WF_DATA_CACHE=str(demo_cache),
    )
    code = f"import runpy; runpy.run_path({__file__!r})['jax_checks']()"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=root
    )
    assert result.returncode == 0, result.stdout + result.stderr
