"""The matmuls that read compact weights (glm_jax.model.linear): INT8/INT4 with one scale
per output row or per column block, and bfloat16 bits, fused or streamed block by block
(the CPU path), all equal the float matmul on the weights they stand for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.checkpoint import quantized
from glm_jax.model import linear
from glm_jax.model.linear import QuantizedWeight

# (spec, x shape, weight input axes, weight output axes): the model's four linears.
LINEARS = [
    ("bld,dthk->blthk", (2, 3, 64), (64,), (3, 4, 8)),
    ("blhk,hkd->bld", (1, 2, 4, 16), (4, 16), (32,)),
    ("blf,fd->bld", (2, 1, 96), (96,), (32,)),
]


def _quantized(rng, w_in, w_out, bits, groups):
    """A random QuantizedWeight and its exact float weight ``q * scale`` (per group)."""
    k, n = int(np.prod(w_in)), int(np.prod(w_out))
    qmax = 7 if bits == 4 else 127
    q = rng.integers(-qmax, qmax + 1, (k, n)).astype(np.int8)
    scale = (rng.random((groups, n)) * 0.02 + 1e-3).astype(np.float16)
    exact = (q.reshape(groups, k // groups, n) * scale[:, None].astype(np.float32)).reshape(w_in + w_out)
    stored = quantized.pack_int4(q.T).T if bits == 4 else q  # INT4: two input rows per byte
    q_shape = w_in[:-1] + (w_in[-1] * bits // 8,) + w_out
    s = scale.reshape((groups,) + w_out) if groups > 1 else scale.reshape(w_out)
    return QuantizedWeight(jnp.asarray(stored.reshape(q_shape)), jnp.asarray(s), bits=bits, groups=groups), exact, q, scale


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_matmul_equals_the_dequantized_weights(bits):
    """Fused and streamed, one scale per row or one per column block: x @ (q * scale)."""
    rng = np.random.default_rng(bits)
    run = jax.jit(linear.einsum, static_argnums=(0, 3))
    for spec, x_shape, w_in, w_out in LINEARS:
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        for groups in (1, 2):
            w, exact, _, _ = _quantized(rng, w_in, w_out, bits, groups)
            want = np.einsum(spec, np.asarray(x, np.float64), exact.astype(np.float64))
            np.testing.assert_array_equal(np.asarray(w.dequantize(jnp.float32)), exact)
            for stream in (False, True):
                got = run(spec, x, w.replace(stream=stream), jnp.float32)
                np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5, err_msg=f"{spec} groups={groups} stream={stream}")


def test_quantized_matmul_is_within_fp16_rounding_of_the_authors():
    """The authors' runtime contracts fp16(q * scale); glm_jax applies the scale to the
    float32 result. The two differ by at most the fp16 rounding of each weight (2^-11 of
    it), summed over the contraction."""
    rng = np.random.default_rng(0)
    spec, x_shape, w_in, w_out = LINEARS[2]
    w, exact, q, scale = _quantized(rng, w_in, w_out, 8, 1)
    x = rng.standard_normal(x_shape).astype(np.float32)
    authors = (q.astype(np.float16) * scale[0]).astype(np.float32)  # fp16 products, as the runtime's
    got = np.asarray(linear.einsum(spec, jnp.asarray(x), w, jnp.float32))
    want = np.einsum(spec, x, authors)
    bound = np.einsum(spec, np.abs(x), np.abs(exact)) * 2.0**-11 + 1e-5
    assert (np.abs(got - want) <= bound).all()
    assert not np.allclose(got, want, atol=1e-7, rtol=0)  # the numerics do differ


def test_bf16_bits_stream_and_tables():
    """A bfloat16 kernel stored as bits gives the bfloat16 matmul; an embedding table as
    bits gives its rows and, as a tied head (contracted on its last axis), the logits."""
    rng = np.random.default_rng(1)
    spec, x_shape, w_in, w_out = LINEARS[0]
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_in + w_out), jnp.bfloat16)
    want = np.einsum(spec, np.asarray(x, np.float64), np.asarray(w, np.float64))
    np.testing.assert_allclose(np.asarray(linear.einsum(spec, x, linear.bf16_bits(w), jnp.float32)), want, atol=1e-5, rtol=1e-5)
    table = np.asarray(rng.standard_normal((96, 64)), jnp.bfloat16)  # a host array, as loading makes them
    bits = linear.bf16_bits(table)
    ids = jnp.asarray([[3, 95, 0]])
    np.testing.assert_array_equal(np.asarray(linear.take(bits, ids, jnp.float32)), table[np.asarray(ids)].astype(np.float32))
    hidden = x[..., :64]
    tied = linear.einsum("bld,vd->blv", hidden, bits, jnp.float32)
    np.testing.assert_allclose(np.asarray(tied), np.einsum("bld,vd->blv", np.asarray(hidden, np.float64), table.astype(np.float64)), atol=1e-5, rtol=1e-5)
