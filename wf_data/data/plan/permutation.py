"""A seeded permutation of `[0, size)` computed on demand: O(1) construction and memory.

`LazyPermutation(size, seed)[i]` is the element at position `i` of a pseudo-random shuffle of
`range(size)`, without materialising the shuffle (`rng.permutation` at 100M documents costs
seconds and 800 MB). It is a Feistel network over the smallest power of two >= `size`, made a
bijection of `[0, size)` by cycle-walking: a value that lands outside the range is encrypted again
until it falls inside (under one extra pass on average: the power of two is < 2 * size).

The network alternates unbalanced half-rounds (left ^= F(right), then right ^= F(left)), each
invertible whatever the widths of the halves, so the domain is never more than twice `size`.
A Feistel network on a few bits is far from uniform over whole permutations, so sizes up to
SMALL_SIZE use a table instead: the order of per-element 64-bit hashes (a uniform shuffle).

Keys come from the seed through splitmix64 and are mixed by integer hashes with fixed constants:
the permutation is the same across processes, platforms and numpy versions (no global RNG, no
numpy RNG stream).
"""

from __future__ import annotations

import operator

import numpy as np

__all__ = ["LazyPermutation"]

# Feistel rounds: Luby-Rackoff needs 4 for a pseudo-random permutation; 2 more for margin.
NUM_ROUNDS = 6
# At most this many elements: a table (int64, <= 32 KiB, built in well under a millisecond).
SMALL_SIZE = 1 << 12
# `take` works through this many positions at a time: temporaries stay in cache while numpy's
# per-call overhead stays small against the arithmetic.
TAKE_CHUNK = 1 << 17

_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
# (shift, multiplier) steps of two bijective xorshift-multiply mixers with full avalanche:
# splitmix64's finaliser (keys, table hashes) and Wellons' "lowbias32" (Feistel round function).
_SPLITMIX64 = ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, 1))
_LOWBIAS32 = ((16, 0x7FEB352D), (15, 0x846CA68B), (16, 1))


def _mix_int(value: int, steps: tuple, mask: int) -> int:
    """A mixer on one Python int; `_mix_array` computes the same bits on an array."""
    for shift, multiplier in steps:
        value ^= value >> shift
        value = (value * multiplier) & mask
    return value


def _mix_array(values: np.ndarray, steps: tuple, scratch: np.ndarray) -> None:
    """A mixer on an unsigned array, in place (arithmetic wraps at the dtype's width).

    `scratch` is a preallocated array like `values`: fresh temporaries would cost as much as the
    arithmetic.
    """
    dtype = values.dtype.type
    for shift, multiplier in steps:
        np.right_shift(values, dtype(shift), out=scratch)
        values ^= scratch
        if multiplier != 1:
            values *= dtype(multiplier)


def _splitmix64(seed: int, count: int) -> list[int]:
    """The first `count` outputs of splitmix64 seeded with `seed` (its reference stream)."""
    return [
        _mix_int((seed + (i + 1) * _GOLDEN) & _MASK64, _SPLITMIX64, _MASK64) for i in range(count)
    ]


class LazyPermutation:
    """A bijection of `[0, size)` keyed by `seed`: `perm[i]` and vectorised `perm.take(positions)`.

    Stateless and immutable; construction and memory are O(1) in `size`. Negative positions
    count from the end, as for a list.
    """

    def __init__(self, size: int, seed: int):
        size = _as_int(size, "size")
        seed = _as_int(seed, "seed")
        if not 0 <= size < 1 << 63:
            raise ValueError(f"LazyPermutation size must be in [0, 2**63), got {size}")
        if not 0 <= seed < 1 << 64:
            raise ValueError(
                f"LazyPermutation seed must be in [0, 2**64), got {seed}; "
                "fold a larger or negative seed into that range first (e.g. seed % 2**64)"
            )
        self._size = size
        self._seed = seed
        *round_keys, table_key = _splitmix64(seed, NUM_ROUNDS + 1)
        # Feistel round keys are 32-bit: every half of a domain < 2**64 fits in 32-bit lanes, at
        # half the memory traffic of 64-bit ones.
        self._keys = tuple(key & _MASK32 for key in round_keys)
        bits = max(size - 1, 1).bit_length()
        self._left_bits = bits // 2
        self._right_bits = bits - self._left_bits
        self._table = self._build_table(table_key) if size <= SMALL_SIZE else None

    @property
    def size(self) -> int:
        return self._size

    @property
    def seed(self) -> int:
        return self._seed

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"LazyPermutation(size={self._size}, seed={self._seed})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LazyPermutation):
            return NotImplemented
        return (self._size, self._seed) == (other._size, other._seed)

    def __hash__(self) -> int:
        return hash((LazyPermutation, self._size, self._seed))

    def __getitem__(self, index: int) -> int:
        """The element at position `index`: a Python int (a few microseconds)."""
        position = _as_int(index, "index")
        if position < 0:
            position += self._size
        if not 0 <= position < self._size:
            raise IndexError(f"LazyPermutation index {index} out of range for size {self._size}")
        if self._table is not None:
            return int(self._table[position])
        value = self._encrypt_int(position)
        while value >= self._size:  # cycle-walk back into [0, size)
            value = self._encrypt_int(value)
        return value

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Elements at `positions` (an integer array of any shape): int64 array of that shape.

        Vectorised over the whole array (~30 ns per position), in chunks of TAKE_CHUNK.
        """
        positions = np.asarray(positions)
        if positions.dtype.kind not in "iu" and positions.size:
            raise TypeError(
                f"LazyPermutation.take needs integer positions, got dtype {positions.dtype}"
            )
        if positions.size:
            # Range-check before the int64 cast, which would wrap uint64 positions >= 2**63.
            low, high = int(positions.min()), int(positions.max())
            if low < -self._size or high >= self._size:
                bad = low if low < -self._size else high
                raise IndexError(
                    f"LazyPermutation.take: position {bad} out of range for size {self._size}"
                )
        flat = positions.astype(np.int64).reshape(-1)
        if positions.size and low < 0:
            flat[flat < 0] += self._size
        if self._table is not None:
            return self._table[flat].reshape(positions.shape)
        out = np.empty(flat.shape, dtype=np.int64)
        for start in range(0, flat.size, TAKE_CHUNK):
            out[start : start + TAKE_CHUNK] = self._take_chunk(flat[start : start + TAKE_CHUNK])
        return out.reshape(positions.shape)

    def _build_table(self, key: int) -> np.ndarray:
        """Sort the elements by a 64-bit hash of (key, element): a uniform shuffle, (size,) int64.

        The stable sort breaks (improbable) hash ties by element, so the result is exact.
        """
        hashes = np.arange(self._size, dtype=np.uint64) * np.uint64(_GOLDEN) + np.uint64(key)
        _mix_array(hashes, _SPLITMIX64, np.empty_like(hashes))
        return np.argsort(hashes, kind="stable").astype(np.int64)

    def _take_chunk(self, positions: np.ndarray) -> np.ndarray:
        """`take` on a 1-D int64 array of positions in [0, size): int64 array."""
        right_bits = self._right_bits
        left = (positions >> right_bits).astype(np.uint32)
        right = (positions & ((1 << right_bits) - 1)).astype(np.uint32)
        self._encrypt_halves(left, right)
        # Cycle-walk only the lanes still outside [0, size); each pass keeps < 1/2 of them. Lanes
        # stay split in 32-bit halves until the end: a cast costs about as much as a round.
        outside = np.flatnonzero(self._outside(left, right))
        while outside.size:
            walk_left, walk_right = left[outside], right[outside]
            self._encrypt_halves(walk_left, walk_right)
            left[outside], right[outside] = walk_left, walk_right
            outside = outside[self._outside(walk_left, walk_right)]
        result = left.astype(np.int64)
        result <<= right_bits
        result |= right
        return result

    def _outside(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Boolean mask of the lanes whose value `left << right_bits | right` is >= size."""
        size_left = np.uint32(self._size >> self._right_bits)
        size_right = np.uint32(self._size & ((1 << self._right_bits) - 1))
        return (left > size_left) | ((left == size_left) & (right >= size_right))

    def _encrypt_halves(self, left: np.ndarray, right: np.ndarray) -> None:
        """The Feistel network on uint32 arrays of left and right halves, in place."""
        masks = (np.uint32((1 << self._left_bits) - 1), np.uint32((1 << self._right_bits) - 1))
        mixed, scratch = np.empty_like(left), np.empty_like(left)
        for r, key in enumerate(self._keys):
            source, target = (right, left) if r % 2 == 0 else (left, right)
            np.bitwise_xor(source, np.uint32(key), out=mixed)
            _mix_array(mixed, _LOWBIAS32, scratch)
            mixed &= masks[r % 2]
            target ^= mixed

    def _encrypt_int(self, value: int) -> int:
        """`_encrypt_halves` on one Python int (same bits, so `perm[i]` equals `take([i])`)."""
        masks = ((1 << self._left_bits) - 1, (1 << self._right_bits) - 1)
        left, right = value >> self._right_bits, value & masks[1]
        for r, key in enumerate(self._keys):
            if r % 2 == 0:
                left ^= _mix_int(right ^ key, _LOWBIAS32, _MASK32) & masks[0]
            else:
                right ^= _mix_int(left ^ key, _LOWBIAS32, _MASK32) & masks[1]
        return (left << self._right_bits) | right


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"LazyPermutation {name} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"LazyPermutation {name} must be an integer, got {type(value).__name__} {value!r}"
        ) from None
