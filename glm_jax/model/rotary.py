"""Rotary position embeddings: 1D (GLM-130B) and 2D (ChatGLM-6B), GPT-NeoX ``rotate_half``.

Dimension i pairs with dimension i + rot_dim/2. ``inv_freq`` is rounded to fp16 as in
the authors' released code (MODEL.md §1.7); angles are computed in float32 by default,
or in float16 to reproduce the authors' half-precision inference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.config import ModelConfig


def inv_freq(rot_dim: int, base: float, fp16_round: bool) -> np.ndarray:
    """``1 / base^(2i / rot_dim)`` for i < rot_dim/2, float32 (values fp16-rounded if asked)."""
    f = 1.0 / (base ** (np.arange(0, rot_dim, 2, dtype=np.float32) / np.float32(rot_dim)))
    f = f.astype(np.float32)
    if fp16_round:
        f = f.astype(np.float16).astype(np.float32)
    return f


def cos_sin(positions: jax.Array, rot_dim: int, cfg: ModelConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin of ``[batch, length, rot_dim]`` for integer ``positions`` ``[batch, length]``."""
    freqs = jnp.asarray(inv_freq(rot_dim, cfg.rotary_base, cfg.rotary_inv_freq_fp16))
    angle_dtype = jnp.dtype(cfg.rotary_angle_dtype)
    angles = positions.astype(angle_dtype)[..., None] * freqs.astype(angle_dtype)
    angles = jnp.concatenate([angles, angles], axis=-1).astype(jnp.float32)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: ``[batch, length, heads, rot_dim]``; cos/sin: ``[batch, length, rot_dim]``."""
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin


def apply_rotary(q: jax.Array, k: jax.Array, positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Rotate q and k (``[batch, length, heads, head_dim]``) by the config's scheme.

    rotary_1d: positions ``[batch, length]``, rotation over the whole head.
    rotary_2d: positions ``[batch, 2, length]``; the first half of each head is rotated by
      the position ids, the second half by the block position ids.
    """
    d = q.shape[-1]
    if cfg.position_encoding == "rotary_1d":
        if positions.ndim != 2:
            raise ValueError(f"rotary_1d expects positions [batch, length], got {positions.shape}")
        cos, sin = cos_sin(positions, d, cfg, q.dtype)
        return rotate(q, cos, sin), rotate(k, cos, sin)
    if cfg.position_encoding == "rotary_2d":
        if positions.ndim != 3 or positions.shape[1] != 2:
            raise ValueError(f"rotary_2d expects positions [batch, 2, length], got {positions.shape}")
        half = d // 2
        cos_p, sin_p = cos_sin(positions[:, 0], half, cfg, q.dtype)
        cos_b, sin_b = cos_sin(positions[:, 1], half, cfg, q.dtype)

        def both(x):
            x1, x2 = x[..., :half], x[..., half:]
            return jnp.concatenate([rotate(x1, cos_p, sin_p), rotate(x2, cos_b, sin_b)], axis=-1)

        return both(q), both(k)
    return q, k
