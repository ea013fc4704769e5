"""Embedding gradient shrink (GLM-130B, GLM_SPEC §1.4): identity forward, gradient x alpha.

Applied to the embedding table itself, so the gradient reaching it is exactly alpha
times the unshrunk one, and a tied output head shares the same shrink.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def shrink_grad(x: jax.Array, alpha: float) -> jax.Array:
    return x


def _fwd(x, alpha):
    return x, None


def _bwd(alpha, _, g):
    return (g * jnp.asarray(alpha, g.dtype),)


shrink_grad.defvjp(_fwd, _bwd)
