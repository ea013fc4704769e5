"""XLA decode attention: new Part B tokens against a KV cache with per-example lengths.

The cache holds every earlier token's (post-rotary) keys and values in slots
``[0, S)``, keys transposed (``[b, h, d, S]``) and values ``[b, h, S, d]``
(``glm_jax.inference.kv_cache``): both products read the cache as a batched matmul
wants it, so no step copies or transposes the cache. Example b's valid slots start at
``kv_start[b]`` (left padding before it).
The ``Lq`` new tokens sit in slots ``q_index + j`` (their own keys already written
there). They are Part B, so token j sees every valid slot up to its own:

    visible(j, k) = kv_start[b] <= k <= q_index[b] + j

which is what the GLM mask (``glm_jax.kernels.attention_mask``) gives a Part B query: all of Part A
and every earlier Part B token. The arithmetic is the reference's (MODEL.md §1.3):
q / (sqrt(d) * c) in the compute dtype, float32 scores, -10000 on hidden slots, * c,
float32 softmax, probabilities cast back for the product with v. Hidden slots weigh
exactly 0 after the softmax, as in ``kernels/reference.py``, so a cached step gives the
full forward's numbers.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from glm_jax.kernels.reference import MASK_VALUE


def attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_start: jax.Array,
    q_index: jax.Array,
    *,
    layer_scale: Optional[jax.Array] = None,
    prefix: Optional[tuple[jax.Array, jax.Array]] = None,
) -> jax.Array:
    """q: ``[b, Lq, h, d]``; k_cache ``[b, h, d, S]``; v_cache ``[b, h, S, d]``; kv_start: ``[b]``;
    q_index: the slot of the first new token, a scalar or ``[b]``. Returns ``[b, Lq, h, d]``.

    layer_scale: c = layer index + 1 (scalar), or None for no layer scaling.
    prefix: P-tuning's (keys, values) ``[b or 1, P, h, d]``, visible to every token, in
      front of the cache (as ``kernels/reference.py`` puts them in front of the sequence).
    """
    b, lq, _, d = q.shape
    slots = k_cache.shape[-1]
    if layer_scale is None:
        q = q / jnp.asarray(math.sqrt(d), q.dtype)
    else:
        c = jnp.asarray(layer_scale, jnp.float32)
        q = q / (jnp.float32(math.sqrt(d)) * c).astype(q.dtype)
    scores = jnp.einsum("bqhd,bhdk->bhqk", q, k_cache.astype(q.dtype), preferred_element_type=jnp.float32)
    k_pos = jnp.arange(slots, dtype=jnp.int32)[None, None, :]
    q_pos = jnp.broadcast_to(jnp.asarray(q_index, jnp.int32), (b,))[:, None, None] + jnp.arange(lq, dtype=jnp.int32)[None, :, None]
    start = jnp.asarray(kv_start, jnp.int32)[:, None, None]
    visible = (k_pos >= start) & (k_pos <= q_pos)  # [b, Lq, S]
    scores = jnp.where(visible[:, None], scores, jnp.float32(MASK_VALUE))
    if prefix is not None:
        k_p, v_p = (jnp.broadcast_to(t, (b, *t.shape[1:])) for t in prefix)
        scores = jnp.concatenate([jnp.einsum("bqhd,bkhd->bhqk", q, k_p.astype(q.dtype), preferred_element_type=jnp.float32),
                                  scores], -1)
    if layer_scale is not None:
        scores = scores * c
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    if prefix is not None:
        n = k_p.shape[1]
        out = jnp.einsum("bhqk,bkhd->bqhd", probs[..., :n], v_p.astype(v_cache.dtype))
        return (out + jnp.einsum("bhqk,bhkd->bqhd", probs[..., n:], v_cache)).astype(q.dtype)
    return jnp.einsum("bhqk,bhkd->bqhd", probs, v_cache).astype(q.dtype)
