"""In-kernel dropout draws exactly ``jax.random.bernoulli``'s mask (threefry, int32 arithmetic)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry2x32_p

from glm_jax.kernels import dropout_hash as dh


def _u32(x):
    return np.asarray(x).astype(np.int64) & 0xFFFFFFFF


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.999])
def test_keep_mask_is_the_references(rate):
    b, h, n = 2, 3, 37
    rng = jax.random.key(11)
    want = jax.random.bernoulli(rng, 1.0 - rate, (b, h, n, n))

    @jax.jit
    def keep(words):
        bi, hi, qi, ki = (jnp.asarray(x, jnp.int32) for x in np.ix_(np.arange(b), np.arange(h), np.arange(n), np.arange(n)))
        base_hi, base_lo = dh.row_base(bi, hi, qi, h, n)
        return dh.keep_block(words[0], words[1], base_hi, base_lo, ki, dh.keep_threshold(rate))

    assert (np.asarray(keep(dh.key_words(rng))) == np.asarray(want)).all()


def test_threefry_and_64_bit_counters_beyond_two_to_the_32():
    rng = np.random.default_rng(0)
    k = rng.integers(0, 2**32, 2, dtype=np.uint64).astype(np.uint32)
    x = rng.integers(0, 2**32, (2, 64), dtype=np.uint64).astype(np.uint32)
    want = threefry2x32_p.bind(jnp.uint32(k[0]), jnp.uint32(k[1]), jnp.asarray(x[0]), jnp.asarray(x[1]))
    as_i32 = lambda a: jax.lax.bitcast_convert_type(jnp.asarray(a, jnp.uint32), jnp.int32)
    got = jax.jit(dh.threefry2x32)(as_i32(k[0]), as_i32(k[1]), as_i32(x[0]), as_i32(x[1]))
    for g, w in zip(got, want):
        assert (_u32(g) == _u32(w)).all()
    # The flat index of [batch, head, row, col] past 2**32, as (hi, lo) words.
    batch, heads, length = 2047, 96, 8192
    idx = [(2046, 95, 8191, 8191), (1000, 7, 123, 4567), (0, 0, 0, 1)]

    @jax.jit
    def flat_index(b, h, q, c):
        hi, lo = dh.row_base(b, h, q, heads, length)
        lo = lo + c
        return hi + dh.unsigned_less(lo, c).astype(jnp.int32), lo

    for b, h, q, c in idx:
        hi, lo = flat_index(*(jnp.int32(x) for x in (b, h, q, c)))
        assert (int(_u32(hi)) << 32) | int(_u32(lo)) == ((b * heads + h) * length + q) * length + c


def test_limits_and_key_types_are_reported():
    with pytest.raises(ValueError, match=r"batch\*heads\*length < 2\*\*31"):
        dh.check_size(4096, 128, 8192)
    with pytest.raises(ValueError, match="reproduces threefry dropout only; got a .*rbg key"):
        dh.key_words(jax.random.key(0, impl="rbg"))
    raw = jax.random.key_data(jax.random.key(3))
    assert (np.asarray(dh.key_words(raw)) == np.asarray(dh.key_words(jax.random.key(3)))).all()


@pytest.mark.parametrize("row_shape", [(3, 37, 37), (16, 24)], ids=["attention-probs", "hidden"])
def test_keep_rows_draws_the_batch_masks_of_any_rows(row_shape):
    """Any subset of rows (a strided microbatch, a shifted slice) gets exactly its rows of
    the whole batch's ``jax.random.bernoulli`` mask."""
    rng, rate, n = jax.random.key(5), 0.3, 8
    want = np.asarray(jax.random.bernoulli(rng, 1.0 - rate, (n,) + row_shape))
    keep = jax.jit(lambda rows: dh.keep_rows(rng, rate, rows, row_shape))
    np.testing.assert_array_equal(keep(jnp.arange(n)), want)
    for rows in ([1, 3, 5, 7], [6, 2], [4]):
        np.testing.assert_array_equal(keep(jnp.asarray(rows)), want[rows])
