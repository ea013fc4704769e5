"""The fused kernels (interpret mode) against the XLA reference: outputs and dq, dk, dv.

Each case compiles once and runs every mask kind through it: Part A of length 0, the
whole row and random lengths, packed segments with padding, left padding and repeated
segment ids, at lengths that are not multiples of the block sizes, with and without
layer scaling and attention dropout (the kernels draw the reference's exact mask).
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import KINDS, mask_inputs
from glm_jax.kernels import flash_attention as fa
from glm_jax.kernels import reference

# lowering, dtype, (batch, length, heads, head_dim), block sizes, dropout, layer scale
CASES = [
    ("mosaic", "float32", (2, 40, 2, 64), fa.BlockSizes(16, 32, 32, 16), 0.0, 3.0),
    ("mosaic", "float32", (1, 57, 2, 128), fa.BlockSizes(16, 16, 16, 16), 0.1, 2.0),
    ("mosaic", "bfloat16", (2, 33, 1, 256), fa.BlockSizes(16, 16, 32, 16), 0.0, 7.0),
    ("triton", "float32", (2, 40, 2, 64), fa.BlockSizes(16, 32, 16, 16), 0.1, 5.0),
    ("triton", "bfloat16", (1, 50, 2, 128), fa.BlockSizes(32, 16, 16, 32), 0.0, 1.0),
]


def _outputs(impl, q, k, v, ct, part_a_end, segment_ids, rng, scale, rate):
    def f(q, k, v):
        return impl(q, k, v, part_a_end, segment_ids, layer_scale=scale, dropout_rate=rate, dropout_rng=rng)

    o, vjp = jax.vjp(f, q, k, v)
    return (o, *vjp(ct))


def _compare(got, want, dtype):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all(), name
        if dtype == "float32":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            rel = np.abs(a - b).max() / np.abs(b).max()
            assert rel <= 2e-2, f"{name}: relative error {rel:.3g}"


@pytest.mark.parametrize("lowering, dtype, shape, blocks, rate, scale", CASES, ids=lambda x: str(x))
def test_kernel_matches_reference(lowering, dtype, shape, blocks, rate, scale):
    rng = np.random.default_rng(zlib.crc32(repr((lowering, dtype, shape)).encode()))
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 5)
    q, k, v, ct = (jax.random.normal(x, shape, jnp.float32).astype(dtype) for x in keys[:4])

    def kernel(*args, **kwargs):
        return fa.attention(*args, **kwargs, block_sizes=blocks, lowering=lowering)

    run = jax.jit(lambda impl, *a: _outputs(impl, *a, jnp.float32(scale), rate), static_argnums=0)
    for kind in KINDS:
        part_a_end, segment_ids = mask_inputs(rng, shape[0], shape[1], kind)
        args = (q, k, v, ct, part_a_end, segment_ids, keys[4])
        _compare(run(kernel, *args), run(reference.attention, *args), dtype)


def test_without_segment_ids_or_layer_scale():
    b, n, h, d = 2, 24, 2, 32
    q, k, v, ct = (jax.random.normal(x, (b, n, h, d)) for x in jax.random.split(jax.random.key(1), 4))
    part_a_end = jnp.array([[9] * n, [0] * n], jnp.int32)
    blocks = fa.BlockSizes(8, 16, 16, 8)

    def kernel(*args, **kwargs):
        return fa.attention(*args, **kwargs, block_sizes=blocks)

    got = jax.jit(lambda: _outputs(kernel, q, k, v, ct, part_a_end, None, None, None, 0.0))()
    _compare(got, _outputs(reference.attention, q, k, v, ct, part_a_end, None, None, None, 0.0), "float32")


def test_bad_arguments_are_reported():
    q = jnp.zeros((1, 8, 2, 16))
    pae = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"q, k, v must share one \[batch, length, heads, head_dim\] shape"):
        fa.attention(q, q[:, :4], q, pae)
    with pytest.raises(ValueError, match="part_a_end must be"):
        fa.attention(q, q, q, pae[:, :4])
    with pytest.raises(ValueError, match="must share one dtype"):
        fa.attention(q, q.astype(jnp.bfloat16), q, pae)
    with pytest.raises(ValueError, match="power-of-two head_dim >= 16"):
        fa.attention(jnp.zeros((1, 8, 2, 24)), jnp.zeros((1, 8, 2, 24)), jnp.zeros((1, 8, 2, 24)), pae, lowering="triton")
    with pytest.raises(ValueError, match=r"block_sizes.kv=48 must be 0 \(default\) or a power of two"):
        fa.attention(q, q, q, pae, block_sizes=fa.BlockSizes(kv=48))
    with pytest.raises(ValueError, match="block_sizes.q=64: the mosaic kernels need a multiple of 128"):
        fa.attention(q, q, q, pae, block_sizes=fa.BlockSizes(q=64), interpret=False)
    with pytest.raises(ValueError, match="lowering='cuda' is not valid; valid values: auto, mosaic, triton"):
        fa.attention(q, q, q, pae, lowering="cuda")
