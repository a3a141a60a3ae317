"""Tests of `wf_data.data.deliver.interop`: zero-copy torch tensors, copies, JAX arrays."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from wf_data.data.deliver.interop import host_array, to_jax, to_torch

CUDA = torch.cuda.is_available()


def make_batch(batch_size: int = 4, seq_len: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of the schema in DESIGN.md, (B, L) int32 plus domain_ids (B,) int32."""
    rng = np.random.default_rng([seed, batch_size, seq_len])
    input_ids = rng.integers(0, 1000, size=(batch_size, seq_len), dtype=np.int32)
    return {
        "input_ids": input_ids,
        "labels": np.where(input_ids % 5 == 0, -100, input_ids).astype(np.int32),
        "position_ids": np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1)),
        "segment_ids": np.ones((batch_size, seq_len), dtype=np.int32),
        "domain_ids": rng.integers(0, 3, size=batch_size, dtype=np.int32),
    }


def data_ptr(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


# ----------------------------------------------------------------------------- torch, CPU


def test_to_torch_is_zero_copy_on_cpu():
    batch = make_batch()
    tensors = to_torch(batch)
    assert list(tensors) == list(batch)
    for key, array in batch.items():
        tensor = tensors[key]
        assert tensor.device.type == "cpu" and tuple(tensor.shape) == array.shape
        if key == "labels":  # int64 for torch losses: the one converted copy
            assert tensor.dtype == torch.int64
            np.testing.assert_array_equal(tensor.numpy(), array)
            continue
        assert tensor.data_ptr() == data_ptr(array), key
        assert tensor.dtype == torch.int32
    # Shared memory both ways: a write on either side is seen by the other.
    batch["input_ids"][0, 0] = 123456
    assert tensors["input_ids"][0, 0].item() == 123456
    tensors["segment_ids"][1, 2] = -7
    assert batch["segment_ids"][1, 2] == -7


def test_to_torch_labels_dtype():
    batch = make_batch()
    kept = to_torch(batch, labels_dtype=None)["labels"]
    assert kept.dtype == torch.int32 and kept.data_ptr() == data_ptr(batch["labels"])
    nested = to_torch({"inputs": {"labels": batch["labels"]}}, labels_dtype=torch.int16)
    assert nested["inputs"]["labels"].dtype == torch.int16
    # HF's loss is torch cross-entropy: int32 targets fail, the default int64 ones work.
    logits = torch.zeros(*batch["labels"].shape, 1000)
    with pytest.raises(RuntimeError, match="Long"):
        torch.nn.functional.cross_entropy(logits.transpose(1, 2), kept, ignore_index=-100)
    torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), to_torch(batch)["labels"], ignore_index=-100
    )


@pytest.mark.parametrize(
    "dtype", [np.int32, np.uint32, np.int64, np.uint16, np.float32, np.float16, np.bool_, np.int8]
)
@pytest.mark.parametrize("shape", [(4, 8), (4,), (), (0, 8)])
def test_to_torch_preserves_dtype_shape_values(dtype, shape):
    rng = np.random.default_rng(list(shape) + [np.dtype(dtype).itemsize])
    values = rng.integers(0, 2 if dtype is np.bool_ else 100, size=shape)
    array = np.array(values, dtype=dtype)  # a 0-d array for shape (), not a numpy scalar
    tensor = to_torch({"x": array})["x"]
    assert tensor.dtype == torch.from_numpy(np.zeros(1, dtype)).dtype
    assert tuple(tensor.shape) == shape
    if array.size:
        assert tensor.data_ptr() == data_ptr(array)
    np.testing.assert_array_equal(np.asarray(tensor.numpy()), array)


def test_to_torch_single_array_and_nested_and_tensors():
    array = np.arange(6, dtype=np.int32).reshape(2, 3)
    tensor = to_torch(array)
    assert isinstance(tensor, torch.Tensor) and tensor.data_ptr() == data_ptr(array)
    nested = to_torch({"inputs": {"ids": array}, "t": torch.ones(2)})
    assert nested["inputs"]["ids"].data_ptr() == data_ptr(array)
    assert torch.equal(nested["t"], torch.ones(2))
    scalar = to_torch(np.int32(5))
    assert scalar.dtype == torch.int32 and scalar.shape == () and scalar.item() == 5


def test_to_torch_copies_read_only_arrays_safely():
    raw = np.arange(12, dtype=np.int32).tobytes()
    readonly = np.frombuffer(raw, dtype=np.int32).reshape(3, 4)  # a shard-bytes view
    assert not readonly.flags.writeable
    tensor = to_torch({"input_ids": readonly})["input_ids"]
    assert tensor.dtype == torch.int32 and tuple(tensor.shape) == (3, 4)
    assert tensor.data_ptr() != data_ptr(readonly)  # a copy: torch may write to it
    tensor.add_(1)  # must not write into the immutable bytes
    assert raw == np.arange(12, dtype=np.int32).tobytes()
    np.testing.assert_array_equal(tensor.numpy(), readonly + 1)


@pytest.mark.parametrize(
    "view",
    [lambda a: a[:, ::2], lambda a: a.T, lambda a: a[::-1], lambda a: a[1:, 1:]],
    ids=["strided", "transposed", "negative-stride", "offset-2d"],
)
def test_to_torch_makes_non_contiguous_contiguous(view):
    base = np.arange(48, dtype=np.int32).reshape(6, 8)
    array = view(base)
    assert not array.flags.c_contiguous
    tensor = to_torch({"x": array})["x"]
    assert tensor.is_contiguous() and tensor.dtype == torch.int32
    np.testing.assert_array_equal(tensor.numpy(), array)
    tensor.zero_()
    assert base.sum() == 48 * 47 // 2  # the copy does not alias the base array


def test_to_torch_contiguous_row_slice_stays_zero_copy():
    base = np.arange(48, dtype=np.int32).reshape(6, 8)
    rows = base[2:4]  # this rank's rows of a global batch: contiguous
    assert to_torch(rows).data_ptr() == data_ptr(rows)


def test_to_torch_non_native_byte_order_and_unaligned():
    swapped = np.arange(5, dtype=">i4")
    tensor = to_torch(swapped)
    assert tensor.dtype == torch.int32
    np.testing.assert_array_equal(tensor.numpy(), np.arange(5))
    buffer = np.zeros(4 * 5 + 1, dtype=np.uint8)
    unaligned = buffer[1:].view(np.int32)
    unaligned[:] = np.arange(5)
    np.testing.assert_array_equal(to_torch(unaligned).numpy(), np.arange(5))


def test_to_torch_rejects_non_numeric_with_key_name():
    with pytest.raises(TypeError, match=r"names: cannot convert an array of dtype <U"):
        to_torch({"names": np.array(["a", "b"])})
    with pytest.raises(TypeError, match=r"meta\.obj: .*dtype object"):
        to_torch({"meta": {"obj": np.array([{}, 1], dtype=object)}})


@pytest.mark.skipif(CUDA, reason="checks the CPU-only fallback")
def test_to_torch_without_cuda():
    batch = make_batch()
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        to_torch(batch, device="cuda")
    with pytest.warns(UserWarning, match="not pinned"):
        tensors = to_torch(batch, device="cpu", pin_memory=True)
    assert tensors["input_ids"].data_ptr() == data_ptr(batch["input_ids"])


def test_host_array_returns_input_when_already_fine():
    array = np.arange(4, dtype=np.int32)
    assert host_array(array) is array
    assert host_array(array[::2]) is not array


# ----------------------------------------------------------------------------- torch, CUDA


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_to_torch_cuda_pinned_async():
    batch = make_batch(batch_size=64, seq_len=512)
    tensors = to_torch(batch, device="cuda")
    torch.cuda.synchronize()
    for key, array in batch.items():
        assert tensors[key].device.type == "cuda" and tensors[key].dtype == torch.int32
        np.testing.assert_array_equal(tensors[key].cpu().numpy(), array)
    pinned = to_torch(batch, pin_memory=True)
    assert all(t.is_pinned() and t.device.type == "cpu" for t in pinned.values())
    moved = to_torch(pinned, device="cuda:0")
    torch.cuda.synchronize()
    assert torch.equal(moved["labels"].cpu(), pinned["labels"])
    readonly = np.frombuffer(batch["input_ids"].tobytes(), dtype=np.int32)
    np.testing.assert_array_equal(to_torch(readonly, device="cuda").cpu().numpy(), readonly)


# ----------------------------------------------------------------------------- JAX


def jax_checks() -> None:
    """Global arrays on a CPU mesh of 2 devices (needs 2 JAX devices in this process)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    assert len(jax.devices()) >= 2, jax.devices()
    batch = make_batch(batch_size=4, seq_len=8)
    batch["step"] = np.int32(7)

    plain = to_jax(batch)
    for key, array in batch.items():
        assert isinstance(plain[key], jax.Array)
        assert plain[key].dtype == np.int32 and plain[key].shape == np.shape(array)
        np.testing.assert_array_equal(np.asarray(plain[key]), array)

    mesh = jax.make_mesh((2,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data", None))
    arrays = to_jax(batch, sharding)
    assert arrays["input_ids"].shape == (4, 8)
    assert arrays["input_ids"].sharding.spec == PartitionSpec("data", None)
    assert [s.data.shape for s in arrays["input_ids"].addressable_shards] == [(2, 8), (2, 8)]
    assert arrays["domain_ids"].shape == (4,)
    assert arrays["domain_ids"].sharding.spec == PartitionSpec("data")
    assert [s.data.shape for s in arrays["domain_ids"].addressable_shards] == [(2,), (2,)]
    assert arrays["step"].shape == () and arrays["step"].sharding.spec == PartitionSpec()
    for key, array in batch.items():
        assert arrays[key].dtype == np.int32
        np.testing.assert_array_equal(np.asarray(arrays[key]), array)

    # Read-only and non-contiguous inputs, a Mesh shorthand, a 2-axis mesh, per-key shardings.
    readonly = np.frombuffer(batch["input_ids"].tobytes(), np.int32).reshape(4, 8)
    strided = np.ascontiguousarray(np.repeat(batch["labels"], 2, axis=1))[:, ::2]
    out = to_jax({"input_ids": readonly, "labels": strided}, mesh)
    np.testing.assert_array_equal(np.asarray(out["input_ids"]), batch["input_ids"])
    np.testing.assert_array_equal(np.asarray(out["labels"]), batch["labels"])
    assert out["labels"].sharding.spec == PartitionSpec("data", None)

    mesh2 = jax.make_mesh((2, 1), ("data", "model"))
    out = to_jax(batch, NamedSharding(mesh2, PartitionSpec("data")))
    assert out["input_ids"].sharding.spec == PartitionSpec("data", None)
    assert out["domain_ids"].sharding.spec == PartitionSpec("data")
    replicated = NamedSharding(mesh, PartitionSpec())
    out = to_jax({"domain_ids": batch["domain_ids"]}, {"domain_ids": replicated})
    assert out["domain_ids"].sharding.spec == PartitionSpec()

    explicit = to_jax(batch, sharding, global_batch_size=4)
    assert explicit["input_ids"].shape == (4, 8)
    try:
        to_jax({"input_ids": np.zeros((3, 8), np.int32)}, sharding)
    except ValueError as error:
        assert "input_ids" in str(error) and "(3, 8)" in str(error)
    else:
        raise AssertionError("a batch of 3 rows cannot split over 2 devices")


@pytest.mark.slow  # importing jax takes seconds; the subprocess fallback imports it again
def test_to_jax_global_arrays_on_cpu_mesh():
    import jax

    if len(jax.devices()) >= 2:
        jax_checks()
        return
    # jax was initialised before tests/conftest.py could ask for 2 CPU devices: use a subprocess.
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    code = textwrap.dedent(f"""
        import runpy
        runpy.run_path({__file__!r})["jax_checks"]()
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
