"""JAX: a loader batch lands as global jax.Arrays on a 1-D mesh of 2 CPU devices, and feeds an
embedding lookup on meshes of both axis types.

JAX 0.10's `jax.make_mesh((n,), ("data",))` makes Explicit axes: the batch is then typed
`int32[B@data, L]` and model code must say where its results go (`.at[ids].get(out_sharding=)`
under `jax.set_mesh`); an ordinary lookup fails with "Resource axis: data ... not found in
mesh" (issue 19 case 17). The README's snippet makes the mesh with
`axis_types=(AxisType.Auto,)`, where ordinary model code works.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.clients.streams import OVERRIDES


def jax_checks():
    """The README's JAX snippet, checked (needs 2 JAX devices in this process)."""
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from wf_data.data import get_loader

    assert jax.device_count() >= 2, jax.devices()
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
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


@pytest.mark.slow
def test_embedding_lookup_on_auto_and_explicit_meshes(demo_cache):
    run_with_two_devices("embedding_checks", demo_cache)


def embedding_checks():
    """An embedding lookup on a loader batch, on an Auto mesh (ordinary model code, eager and
    jitted) and on an Explicit one (the batch typed along `data`, explicit-sharding code)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from wf_data.data import get_loader

    embedding = jnp.arange(8192 * 4, dtype=jnp.float32).reshape(8192, 4)
    ids = next(get_loader("demo", overrides=OVERRIDES, framework="numpy"))["input_ids"]
    want = np.asarray(embedding)[ids].sum(axis=(1, 2))
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((2,), ("data",), axis_types=(axis_type,))
        sharding = NamedSharding(mesh, P("data"))
        loader = get_loader("demo", overrides=OVERRIDES, framework="jax", jax_sharding=sharding)
        batch = next(loader)
        if axis_type == AxisType.Auto:
            lookups = [
                embedding[batch["input_ids"]].sum(axis=(1, 2)),
                jax.jit(lambda table, i: jnp.take(table, i, axis=0).sum(axis=(1, 2)))(
                    embedding, batch["input_ids"]
                ),
            ]
        else:
            assert jax.typeof(batch["input_ids"]).sharding.spec == P("data", None)
            with jax.set_mesh(mesh):
                table = jax.device_put(embedding, P())
                lookup = jax.jit(
                    lambda table, i: table.at[i].get(out_sharding=P("data")).sum(axis=(1, 2))
                )
                lookups = [lookup(table, batch["input_ids"])]
        for got in lookups:
            np.testing.assert_allclose(np.asarray(got), want, err_msg=str(axis_type))


def run_with_two_devices(function, demo_cache):
    """``function`` of this file, here if JAX has 2 devices, else in a subprocess with 2 CPU
    devices (the flag must be set before JAX starts)."""
    import jax

    if jax.device_count() >= 2:
        globals()[function]()
        return
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        WF_DATA_CACHE=str(demo_cache),
    )
    code = f"import runpy; runpy.run_path({__file__!r})[{function!r}]()"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=root
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow  # jax import, and a subprocess when this one has a single device
def test_batch_is_a_global_array_on_a_cpu_mesh(demo_cache):
    run_with_two_devices("jax_checks", demo_cache)
