"""GLM's attention mask rule, from one integer per token.

The mask is never an L x L tensor passed between callers. Callers give, per example,
the Part A length (``prefix_len``) and, for packed sequences, ``segment_ids``; attention
implementations derive visibility from one integer per token:

    part_a_end[b, q] = absolute index one past the Part A of q's segment
    visible(q, k)    = seg[q] == seg[k] and (k < part_a_end[q] or k <= q)

so Part A is bidirectional, Part B (from ``<sop>`` on) is causal and sees all of Part A,
and packed segments never see each other. Segment id 0 marks padding.

One extension, for scoring several continuations of one context in one row (the
authors' packed multiple-choice rows, ``glm_jax.evaluation``): with ``shared_end[b]``, the
first ``shared_end`` keys of row b are visible to every query of the row as well,

    visible(q, k)   |= k < shared_end

so a context in its own segment at the front is seen by every continuation, each in a
segment of its own. Only the XLA reference evaluates this clause (the model routes rows
with ``shared_end`` there). Every attention
implementation (the XLA reference, the fused kernels, decoding) evaluates this rule and
only this rule; ``glm_jax.kernels.block_mask`` derives from it which blocks a kernel visits.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def part_a_end(prefix_len: jax.Array, segment_ids: Optional[jax.Array], length: int) -> jax.Array:
    """Per-token end of its segment's Part A, ``[batch, length]`` int32.

    prefix_len: ``[batch]`` (no segment ids: one sequence per row) or ``[batch, S]``,
      the Part A length of segment s+1 relative to that segment's first token.
    segment_ids: ``[batch, length]`` or None; 0 is padding (Part A length 0).
    """
    prefix_len = jnp.asarray(prefix_len, jnp.int32)
    if segment_ids is None:
        if prefix_len.ndim != 1:
            raise ValueError(f"prefix_len must be [batch] without segment_ids, got shape {prefix_len.shape}")
        return jnp.broadcast_to(prefix_len[:, None], (prefix_len.shape[0], length))
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if prefix_len.ndim == 1:
        prefix_len = prefix_len[:, None]
    idx = jnp.arange(length, dtype=jnp.int32)[None, :]
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    starts = jnp.where(segment_ids != prev, idx, 0)
    seg_start = jax.lax.cummax(starts, axis=1)
    seg_index = jnp.clip(segment_ids - 1, 0, prefix_len.shape[1] - 1)
    plen = jnp.take_along_axis(prefix_len, seg_index, axis=1)
    plen = jnp.where(segment_ids > 0, plen, 0)
    return seg_start + plen


def visible(
    q_index: jax.Array,
    k_index: jax.Array,
    part_a_end_q: jax.Array,
    segment_q: Optional[jax.Array],
    segment_k: Optional[jax.Array],
    shared_end: Optional[jax.Array] = None,
) -> jax.Array:
    """Elementwise visibility rule; broadcasting decides the block shape."""
    ok = (k_index < part_a_end_q) | (k_index <= q_index)
    if segment_q is not None:
        ok = ok & (segment_q == segment_k)
    if shared_end is not None:
        ok = ok | (k_index < shared_end)
    return ok


def dense_visibility(part_a_end_: jax.Array, segment_ids: Optional[jax.Array],
                     shared_end: Optional[jax.Array] = None) -> jax.Array:
    """``[batch, q, k]`` boolean, True where q may attend to k (for the XLA reference only)."""
    b, length = part_a_end_.shape
    q = jnp.arange(length, dtype=jnp.int32)[None, :, None]
    k = jnp.arange(length, dtype=jnp.int32)[None, None, :]
    seg_q = None if segment_ids is None else segment_ids[:, :, None]
    seg_k = None if segment_ids is None else segment_ids[:, None, :]
    shared = None if shared_end is None else jnp.asarray(shared_end, jnp.int32)[:, None, None]
    return visible(q, k, part_a_end_[:, :, None], seg_q, seg_k, shared)
