"""Bridge from numpy batches to torch tensors (DLPack) and JAX arrays (global, over a mesh).

A batch is a dict of numpy arrays (``input_ids`` ``(B, L) int32``, ``domain_ids`` ``(B,)``...).
``to_torch`` hands each array to torch through DLPack: on CPU the tensor *is* the numpy
buffer (no copy); for CUDA it is pinned and copied asynchronously. ``labels`` alone become int64
for torch (loss functions want Long targets). ``to_jax`` builds
``jax.Array``s, global ones over a mesh when given a sharding. Dtypes and shapes are kept.

An array is copied (once, on the host) only when sharing it would be wrong:
- read-only (``np.frombuffer`` views of shard bytes): torch has no read-only tensors, so an
  in-place op would write into memory its owner holds immutable;
- not C-contiguous (slices, transposes, negative strides): trainers expect contiguous rows,
  and pinned copies need them;
- non-native byte order or unaligned: DLPack cannot describe them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from wf_data.extras import requires

__all__ = ["host_array", "to_jax", "to_torch"]

# Kinds DLPack and both frameworks represent: bool, signed/unsigned int, float, complex.
_NUMERIC_KINDS = "biufc"


def host_array(value: Any, key: str = "array") -> np.ndarray:
    """``value`` as a C-contiguous, writeable, aligned, native-order numpy array.

    Returns ``value`` itself when it already is one (zero-copy), else one host copy.
    Raises ``TypeError`` naming ``key`` for dtypes that are not numeric (str, object...).
    """
    array = np.asarray(value)
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(
            f"{key}: cannot convert an array of dtype {array.dtype} to a tensor; "
            "expected bool, integer, float or complex"
        )
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    flags = array.flags
    if not (flags.c_contiguous and flags.writeable and flags.aligned):
        array = np.array(array, order="C", copy=True)
    return array


def _map_batch(batch: Any, convert: Callable[[tuple, Any], Any], path: tuple = ()) -> Any:
    """Apply ``convert(key_path, array)`` to every leaf of a (nested) mapping, or to one array."""
    if isinstance(batch, Mapping):
        return {name: _map_batch(value, convert, (*path, name)) for name, value in batch.items()}
    return convert(path, batch)


def _key_name(path: tuple) -> str:
    return ".".join(map(str, path)) or "array"


# ----------------------------------------------------------------------------- torch


def to_torch(
    batch: Any,
    device: Any = None,
    non_blocking: bool = True,
    pin_memory: bool | None = None,
    labels_dtype: Any = "int64",
) -> Any:
    """Torch tensors of a numpy batch (dict of arrays, nested dicts, or one array).

    ``labels`` become int64 (``labels_dtype``; ``None`` keeps int32): torch's cross-entropy,
    and so every Hugging Face model's loss, wants Long targets. That one array is copied.

    With ``device`` ``None`` or CPU, a C-contiguous writeable array becomes a tensor sharing
    its memory (``tensor.data_ptr() == array.__array_interface__["data"][0]``); other arrays
    are copied once (see the module docstring). With a CUDA ``device`` each tensor is copied
    to page-locked memory and then to the device with ``non_blocking`` (the host buffer is
    free to reuse on return). ``pin_memory`` ``None`` pins exactly when the device is CUDA;
    ``True`` with a CPU device returns pinned CPU tensors (a copy), for a later async move.
    Without CUDA, pinning is skipped with a warning (as ``torch.utils.data.DataLoader`` does).
    Torch tensors in the batch pass through, moved to ``device`` when elsewhere.
    """
    with requires("torch", feature="to_torch"):
        import torch

    target = torch.device("cpu" if device is None else device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"to_torch: device {target} requested but CUDA is not available")
    pin = target.type == "cuda" if pin_memory is None else bool(pin_memory)
    if pin and not torch.cuda.is_available():
        warnings.warn(
            "to_torch: pin_memory=True but CUDA is not available; tensors are not pinned",
            stacklevel=2,
        )
        pin = False

    labels_dtype = getattr(torch, labels_dtype) if isinstance(labels_dtype, str) else labels_dtype
    # The common case, CPU tensors unpinned, skips the device checks (a few us per array).
    host_only = target.type == "cpu" and not pin

    def convert(path: tuple, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensor = value
        else:
            tensor = torch.from_dlpack(host_array(value, _key_name(path)))
        if labels_dtype is not None and tensor.dtype != labels_dtype and path[-1:] == ("labels",):
            tensor = tensor.to(labels_dtype)
        if host_only and tensor.device.type == "cpu":
            return tensor
        if pin and tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        if tensor.device != target:
            tensor = tensor.to(target, non_blocking=non_blocking and tensor.is_pinned())
        return tensor

    return _map_batch(batch, convert)


# ----------------------------------------------------------------------------- JAX


def to_jax(batch: Any, sharding: Any = None, *, global_batch_size: int | None = None) -> Any:
    """JAX arrays of a numpy batch (dict of arrays, nested dicts, or one array).

    ``sharding`` ``None``: ``jnp.asarray`` of each array on the default device. A
    ``jax.sharding.NamedSharding``: each array becomes a *global* array with
    ``jax.make_array_from_process_local_data``, this process's rows being its slice of the batch
    dimension; the spec is fitted to each array's rank (``P("data", None)`` gives ``P("data")``
    for ``domain_ids (B,)`` and ``P()`` for scalars). A ``jax.sharding.Mesh`` means the batch
    dimension over its ``"data"`` axis (else its first axis). A mapping ``{key: Sharding}`` sets
    the sharding per key, as given. ``global_batch_size`` fixes the global leading dimension
    (default: inferred by JAX, local rows x processes along the batch axis). Without
    ``jax_enable_x64``, JAX stores 64-bit dtypes as 32-bit; the batch schema is int32 anyway.
    The arrays keep the mesh's axis types: on Explicit axes (``jax.make_mesh``'s default from
    JAX 0.10) they are typed ``int32[B@data, L]`` for explicit-sharding model code; ordinary
    model code needs a mesh made with ``axis_types=(AxisType.Auto,)``.
    """
    with requires("jax", feature="to_jax"):
        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if isinstance(sharding, Mesh):
        axis = "data" if "data" in sharding.axis_names else sharding.axis_names[0]
        sharding = NamedSharding(sharding, PartitionSpec(axis))

    def convert(path: tuple, value: Any) -> Any:
        key = _key_name(path)
        if sharding is None:
            if isinstance(value, jax.Array):
                return value
            return jnp.asarray(host_array(value, key))
        local = np.asarray(value)
        if local.dtype.kind not in _NUMERIC_KINDS:
            host_array(local, key)  # raises the TypeError naming the key
        leaf_sharding = _leaf_sharding(sharding, path, local.ndim)
        global_shape = None
        if global_batch_size is not None and local.ndim > 0:
            global_shape = (global_batch_size, *local.shape[1:])
        try:
            return jax.make_array_from_process_local_data(leaf_sharding, local, global_shape)
        except ValueError as error:
            raise ValueError(
                f"{key}: cannot place local array of shape {local.shape} with "
                f"{leaf_sharding}: {error}"
            ) from error

    return _map_batch(batch, convert)


def _leaf_sharding(sharding: Any, path: tuple, ndim: int) -> Any:
    """The sharding of one array: per-key lookup, or a NamedSharding's spec fitted to ``ndim``."""
    from jax.sharding import NamedSharding, PartitionSpec

    if isinstance(sharding, Mapping):
        name = path[-1] if path else None
        if name not in sharding:
            raise KeyError(
                f"{_key_name(path)}: no sharding given for this key (have {sorted(sharding)})"
            )
        return sharding[name]
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec)[:ndim]
    spec = spec + (None,) * (ndim - len(spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)
