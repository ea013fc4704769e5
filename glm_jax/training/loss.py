"""Cross-entropy on Part B targets only, accumulated in float32.

Two forms with the same result:

* ``masked_cross_entropy(logits, ...)`` from logits the model already produced;
* ``chunked_cross_entropy(hidden, head, ...)`` from the final hidden states and the
  output embedding, one slice of the vocabulary at a time. Only ``[b, L, vocab/chunks]``
  float32 logits exist at once, forward and backward (each slice is recomputed in the
  backward pass), which is what makes 150k-token vocabularies at long sequence lengths
  fit. Slices interleave the vocabulary (slice j holds ids j, j+n, j+2n, ...), so each
  slice keeps the vocabulary's sharding over the ``model`` axis and no device idles.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of weighted token losses and sum of weights (both float32 scalars)."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = weights.astype(jnp.float32)
    return jnp.sum((logz - gold) * w), jnp.sum(w)


def chunked_cross_entropy(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array, chunks: int
) -> tuple[jax.Array, jax.Array]:
    """Like :func:`masked_cross_entropy` of ``hidden @ head.T`` without the full logits.

    ``hidden``: ``[b, L, d]`` in the compute dtype; ``head``: ``[vocab, d]`` (the tied word
    embeddings, or the untied head transposed) in the compute dtype. Logits of each slice
    are accumulated in float32 (``preferred_element_type``), so in bfloat16 this is, if
    anything, more exact than rounding full logits to bfloat16 first.
    """
    vocab, d = head.shape
    if vocab % chunks:
        raise ValueError(f"vocabulary size {vocab} is not divisible into {chunks} chunks")
    targets = targets.astype(jnp.int32)
    # [vocab, d] -> [chunks, vocab/chunks, d]: slice j holds the ids congruent to j mod chunks.
    slices = head.reshape(vocab // chunks, chunks, d).swapaxes(0, 1)
    slices = nn.with_logical_constraint(slices, (None, "vocab", "embed"))
    target_slice, target_index = targets % chunks, targets // chunks

    @jax.checkpoint
    def body(carry, xs):
        running_max, running_sum, gold = carry
        j, w = xs
        logits = jnp.einsum("bld,vd->blv", hidden, w, preferred_element_type=jnp.float32)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        # The shift is a constant for differentiation: logsumexp does not depend on it.
        new_max = jax.lax.stop_gradient(jnp.maximum(running_max, jnp.max(logits, axis=-1)))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(jnp.exp(logits - new_max[..., None]), axis=-1)
        picked = jnp.take_along_axis(logits, target_index[..., None], axis=-1)[..., 0]
        gold = gold + jnp.where(target_slice == j, picked, 0.0)
        return (new_max, running_sum, gold), None

    shape = targets.shape
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    (running_max, running_sum, gold), _ = jax.lax.scan(body, init, (jnp.arange(chunks), slices))
    logz = running_max + jnp.log(running_sum)
    w = weights.astype(jnp.float32)
    return jnp.sum((logz - gold) * w), jnp.sum(w)
