"""XLA attention with GLM's mask: the numerical reference for every fused kernel.

Follows the authors' arithmetic (MODEL.md §1.3): with c = layer index + 1,
q <- q / (sqrt(d) * c) in the compute dtype, scores = q.k accumulated in float32,
masked scores set to -10000, scores * c in float32, softmax in float32, then the
probabilities cast back to the compute dtype for the product with v. Without layer
scaling it is plain softmax(q.k / sqrt(d)). The L x L mask exists only inside this
function, built from one integer per token (see ``glm_jax.kernels.attention_mask``).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from glm_jax.kernels import attention_mask, dropout_hash

MASK_VALUE = -10000.0


def scale_query(q: jax.Array, layer_scale: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(q / (sqrt(d) * c) in q's dtype, c as float32); c = 1 without layer scaling.
    The scores are then (scaled q . k) * c in float32: every implementation shares this."""
    d = q.shape[-1]
    if layer_scale is None:
        return q / jnp.asarray(math.sqrt(d), q.dtype), jnp.float32(1.0)
    c = jnp.asarray(layer_scale, jnp.float32)
    return q / (jnp.float32(math.sqrt(d)) * c).astype(q.dtype), c


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    part_a_end: jax.Array,
    segment_ids: Optional[jax.Array],
    *,
    layer_scale: Optional[jax.Array] = None,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[jax.Array] = None,
    dropout_rows: tuple = (0, 1),
    prefix: Optional[tuple[jax.Array, jax.Array]] = None,
    shared_end: Optional[jax.Array] = None,
) -> jax.Array:
    """q, k, v: ``[batch, length, heads, head_dim]``; returns the same shape and dtype as q.

    layer_scale: c = layer_index + 1 (scalar), or None for no layer scaling.
    dropout_rows: (offset, stride): these rows are rows ``offset + stride * i`` of a larger
      batch, and draw that batch's dropout masks, ``jax.random.bernoulli(dropout_rng,
      1 - rate, [batch, heads, q, k])`` of the whole (the default: the batch itself).
    prefix: P-tuning's (keys, values), each ``[batch or 1, P, heads, head_dim]``: placed
      before the sequence's keys, visible to every token, with no rotary (the caller's
      keys have theirs already); the dropout masks then cover ``P + length`` keys.
    shared_end: ``[batch]``, keys before it are visible to every query of the row
      (``attention_mask``'s shared-context clause), or None.
    """

    q, c = scale_query(q, layer_scale)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    mask = attention_mask.dense_visibility(part_a_end, segment_ids, shared_end)[:, None, :, :]
    scores = jnp.where(mask, scores, jnp.float32(MASK_VALUE))
    if prefix is not None:
        k_p, v_p = (jnp.broadcast_to(t, (q.shape[0], *t.shape[1:])) for t in prefix)
        scores = jnp.concatenate([jnp.einsum("bqhd,bkhd->bhqk", q, k_p, preferred_element_type=jnp.float32), scores], -1)
    if layer_scale is not None:
        scores = scores * c
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        offset, stride = dropout_rows
        rows = jnp.asarray(offset, jnp.int32) + stride * jnp.arange(probs.shape[0], dtype=jnp.int32)
        keep = dropout_hash.keep_rows(dropout_rng, dropout_rate, rows, probs.shape[1:])
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    probs = probs.astype(v.dtype)
    if prefix is not None:
        n = k_p.shape[1]
        return jnp.einsum("bhqk,bkhd->bqhd", probs[..., :n], v_p) + jnp.einsum("bhqk,bkhd->bqhd", probs[..., n:], v)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
