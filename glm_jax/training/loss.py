"""Cross-entropy on Part B targets only, accumulated in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of weighted token losses and sum of weights (both float32 scalars)."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = weights.astype(jnp.float32)
    return jnp.sum((logz - gold) * w), jnp.sum(w)
