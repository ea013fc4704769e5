"""Embedding gradient shrink (GLM-130B, MODEL.md §1.4).

The authors write ``E[ids]*a + E[ids].detach()*(1-a)`` (and the same on the tied output
weight): the forward value is unchanged and only dL/dE is scaled by ``a``. Applying that
scale to the gradient tree is the same thing, costs one multiply on the table's gradient,
and is exact, whereas a scale inside the differentiated graph gets fused by XLA into
neighbouring adds and rounds differently.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from glm_jax.config import ModelConfig


def shrink_embedding_gradient(grads: Any, cfg: ModelConfig) -> Any:
    """Scale the word-embedding gradient (which includes a tied head's) by ``cfg.embedding_grad_shrink``."""
    alpha = cfg.embedding_grad_shrink
    if alpha == 1.0 or "word_embeddings" not in grads:  # frozen embeddings (P-tuning, LoRA) have no gradient
        return grads
    grads = dict(grads)
    g = grads["word_embeddings"]
    grads["word_embeddings"] = g * jnp.asarray(alpha, g.dtype)
    return grads
