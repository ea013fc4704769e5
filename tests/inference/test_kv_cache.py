"""Cached decoding computes what the full forward pass computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference_fixtures import VARIANTS, prompts, random_params
from helpers import variant
from glm_jax.inference import kv_cache
from glm_jax.kernels import decode, reference
from glm_jax.model import GLM, prepare_inputs


@pytest.mark.parametrize("name", VARIANTS)
def test_incremental_logits_equal_full_forward(name):
    """Prefill + one token at a time against the cache gives the full forward's logits (1e-5,
    float32) for a left-padded batch of a [gMASK] prompt and a shorter [MASK] prompt."""
    cfg = variant(name)
    params = random_params(cfg, scale=0.5)
    rows = prompts(cfg)
    forced = [[31, 32, 33, 34], [41, 42, 43, 44]]
    width = max(len(r) for r in rows)
    padded = [[cfg.pad_token_id] * (width - len(r)) + r for r in rows]
    full = np.asarray([p + f for p, f in zip(padded, forced)])
    inputs = prepare_inputs(full, cfg)
    model = GLM(cfg)
    want = np.asarray(jax.jit(model.apply)({"params": params}, full, inputs["positions"], inputs["prefix_len"], inputs["segment_ids"]))

    start = np.asarray([width - len(r) for r in rows])
    cache = kv_cache.allocate(cfg, 2, full.shape[1] + 3, start)  # spare slots stay hidden
    positions = inputs["positions"]
    prefill = jax.jit(lambda p, c: model.apply(
        {"params": p}, full[:, :width], positions[..., :width], inputs["prefix_len"], inputs["segment_ids"][:, :width], cache=c))
    step = jax.jit(lambda p, tok, pos, c: model.apply({"params": p}, tok, pos, None, cache=c))
    got, cache = prefill(params, cache)
    np.testing.assert_allclose(np.asarray(got)[:, -1], want[:, width - 1], atol=1e-5, rtol=0)
    cache = cache.advance(width)
    for t in range(width, full.shape[1]):
        got, cache = step(params, full[:, t:t + 1], positions[..., t:t + 1], cache)
        cache = cache.advance(1)
        np.testing.assert_allclose(np.asarray(got)[:, 0], want[:, t], atol=1e-5, rtol=0)
    assert np.abs(want[:, width:]).max() > 1.0  # real signal
    # Keys are stored after rotary: slot j holds the key the full pass computed at j.
    assert int(cache.index) == full.shape[1] and cache.decoding


def test_decode_attention_matches_reference():
    """One query per example against a cache with per-example starts equals the reference's
    Part B row of the same sequence (layer scaling on, bf16 and f32)."""
    rng = np.random.default_rng(0)
    b, length, h, d, slots = 3, 9, 2, 8, 12
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
        q, k, v = (jnp.asarray(rng.standard_normal((b, length, h, d)), dtype) for _ in range(3))
        start = np.asarray([0, 2, 5])
        part_a_end = jnp.asarray(np.broadcast_to(np.asarray([4, 5, 7])[:, None], (b, length)))
        seg = jnp.asarray((np.arange(length)[None] >= start[:, None]).astype(np.int32))
        want = reference.attention(q, k, v, part_a_end, seg, layer_scale=jnp.asarray(3))
        pad = ((0, 0), (0, slots - length), (0, 0), (0, 0))
        junk = jnp.asarray(rng.standard_normal((b, slots, h, d)), dtype)  # slots past the query are never seen
        k_cache = jnp.where(jnp.arange(slots)[None, :, None, None] < length, jnp.pad(k, pad), junk)
        v_cache = jnp.where(jnp.arange(slots)[None, :, None, None] < length, jnp.pad(v, pad), junk)
        k_cache, v_cache = k_cache.transpose(0, 2, 3, 1), v_cache.transpose(0, 2, 1, 3)  # the cache's layout
        for qi in (7, 8):  # Part B queries
            got = decode.attention(q[:, qi:qi + 1], k_cache, v_cache, jnp.asarray(start), jnp.asarray(qi), layer_scale=jnp.asarray(3))
            np.testing.assert_allclose(np.asarray(got[:, 0], np.float32), np.asarray(want[:, qi], np.float32), atol=tol, rtol=0)
