"""Attention dropout inside a kernel, bit-identical to ``jax.random.bernoulli``.

The XLA reference drops attention probabilities with
``jax.random.bernoulli(rng, 1 - rate, [batch, heads, q, k])``. With JAX's default
threefry key and ``jax_threefry_partitionable`` (on by default), element n of that array
(n = the row-major flat index) is kept iff

    bits = y0 ^ y1,  (y0, y1) = threefry2x32(key, (n >> 32, n & 0xffffffff))
    (bits >> 9) < ceil(float32(1 - rate) * 2**23)

(``uniform`` takes the top 23 bits as a mantissa in [1, 2) and subtracts 1). Threefry is a
counter-based hash (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011),
so a kernel can compute the bits of exactly the scores it holds: the kernel's dropout mask
is the reference's, and switching ``model.attention_impl`` does not change training.

Everything here is int32 arithmetic with logical shifts (two's-complement wrap-around
gives the same bits as uint32), so it lowers on Mosaic, Triton and XLA alike.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA
_SIGN = np.int32(-(2**31))


def _rotl(x: jax.Array, r: int) -> jax.Array:
    return lax.shift_left(x, np.int32(r)) | lax.shift_right_logical(x, np.int32(32 - r))


def threefry2x32(k0, k1, x0, x1):
    """Threefry-2x32 with 20 rounds on int32 words; returns the two output words."""
    ks = (k0, k1, k0 ^ k1 ^ np.int32(_PARITY))
    x0 = x0 + ks[0]
    x1 = x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.int32(i + 1)
    return x0, x1


def unsigned_less(a, b):
    """``a < b`` reading both int32 values as uint32."""
    return (a ^ _SIGN) < (b ^ _SIGN)


def mul_wide(a, b):
    """(hi, lo) words of the 64-bit product of two non-negative int32 values (< 2**31)."""
    mask16 = np.int32(0xFFFF)
    a0, a1 = a & mask16, lax.shift_right_logical(a, np.int32(16))
    b0, b1 = b & mask16, lax.shift_right_logical(b, np.int32(16))
    p00 = a0 * b0
    mid = a0 * b1 + a1 * b0  # < 2**32: exact as uint32 bits
    lo = p00 + lax.shift_left(mid, np.int32(16))
    carry = unsigned_less(lo, p00).astype(jnp.int32)
    hi = a1 * b1 + lax.shift_right_logical(mid, np.int32(16)) + carry
    return hi, lo


def keep_threshold(rate: float) -> int:
    """Kept iff (bits >> 9) < this; reproduces ``uniform(...) < float32(1 - rate)``."""
    p = float(np.float32(1.0 - rate))
    return int(math.ceil(p * 2**23))


def row_base(batch, head, row, heads: int, length: int):
    """(hi, lo) of the flat index of element [batch, head, row, 0] in a
    ``[*, heads, length, length]`` array (batch, head, row are global indices; the caller
    checks that batch * heads * length < 2**31, see :func:`check_size`)."""
    r = (batch * heads + head) * length + row
    return mul_wide(r, jnp.int32(length))


def check_size(batch: int, heads: int, length: int) -> None:
    if batch * heads * length >= 2**31:
        raise ValueError(
            f"in-kernel attention dropout needs batch*heads*length < 2**31, got {batch}*{heads}*{length}; "
            "use model.attention_impl=xla for this shape"
        )


def keep_block(key0, key1, base_hi, base_lo, offsets, threshold: int):
    """Boolean keep mask for the elements at ``base + offsets`` (offsets: int32 >= 0)."""
    lo = base_lo + offsets
    hi = base_hi + unsigned_less(lo, offsets).astype(jnp.int32)
    y0, y1 = threefry2x32(key0, key1, hi, lo)
    return lax.shift_right_logical(y0 ^ y1, np.int32(9)) < np.int32(threshold)


def keep_rows(rng: jax.Array, rate: float, rows: jax.Array, row_shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.bernoulli(rng, 1 - rate, (N,) + row_shape)[rows]`` for any N above the
    largest row, computing only the requested rows: ``[len(rows), *row_shape]`` booleans.

    A row's mask depends on the key and its index alone, so a batch cut into microbatches
    (every M-th row: rows ``m, m + M, ...``) draws exactly the masks of the whole batch.
    ``rows * prod(row_shape[:-1])`` must stay below 2**31 (as for the kernel).
    """
    words = key_words(rng)
    lead, last = math.prod(row_shape[:-1]), row_shape[-1]
    outer = jnp.asarray(rows, jnp.int32)[:, None] * np.int32(lead) + jnp.arange(lead, dtype=jnp.int32)[None, :]
    base_hi, base_lo = mul_wide(outer, jnp.int32(last))
    offsets = jnp.arange(last, dtype=jnp.int32)
    keep = keep_block(words[0], words[1], base_hi[..., None], base_lo[..., None], offsets, keep_threshold(rate))
    return keep.reshape((outer.shape[0],) + tuple(row_shape))


def key_words(rng: Optional[jax.Array]) -> jax.Array:
    """The two int32 words of a threefry key (typed or raw ``uint32[2]``)."""
    if rng is None:
        return jnp.zeros((2,), jnp.int32)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(rng))
        if "threefry" not in impl:
            raise ValueError(
                f"the Pallas attention kernel reproduces threefry dropout only; got a {impl} key "
                "(use the default jax_default_prng_impl=threefry2x32 or model.attention_impl=xla)"
            )
        rng = jax.random.key_data(rng)
    if rng.shape != (2,):
        raise ValueError(f"dropout_rng must be one threefry key (2 uint32 words), got shape {rng.shape}")
    return lax.bitcast_convert_type(rng.astype(jnp.uint32), jnp.int32)
