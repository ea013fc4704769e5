"""Parameter initialisation.

``deepnorm`` (GLM-130B, MODEL.md §1.4): Xavier-normal, std = gain * sqrt(2 / (fan_in + fan_out))
with fans of the full (unsharded) matrix; gain beta = (2N)^-0.5 on V, the attention output,
each GLU half and the FFN output, gain 1 on Q and K. Word embeddings normal(0, init_std).

``normal`` (original GLM, Megatron style): normal(0, init_std) everywhere, output
projections scaled by 1/sqrt(2N).

Every initializer here is wrapped with the parameter's logical axis names.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.config import ModelConfig


def _normal(std: float):
    def init(key, shape, dtype=jnp.float32):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def xavier_std(fan_in: int, fan_out: int, gain: float) -> float:
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def _boxed(init, axes: Sequence[str]):
    return nn.with_logical_partitioning(init, tuple(axes))


def embedding(cfg: ModelConfig, axes=("vocab", "embed")):
    return _boxed(_normal(cfg.init_std), axes)


def zeros(axes):
    return _boxed(nn.initializers.zeros_init(), axes)


def ones(axes):
    return _boxed(nn.initializers.ones_init(), axes)


def qkv(cfg: ModelConfig):
    """Kernel ``[embed, 3, heads, head_dim]``: Q and K gain 1, V gain beta (deepnorm)."""
    h = cfg.hidden_size

    def init(key, shape, dtype=jnp.float32):
        if cfg.init == "deepnorm":
            std = xavier_std(h, 3 * h, 1.0)
            stds = jnp.asarray([std, std, std * cfg.deepnorm_beta], jnp.float32)
        else:
            stds = jnp.full((3,), cfg.init_std, jnp.float32)
        w = jax.random.normal(key, shape, jnp.float32) * stds[None, :, None, None]
        return w.astype(dtype)

    return _boxed(init, ("embed", "qkv", "heads", "head_dim"))


def projection(cfg: ModelConfig, fan_in: int, fan_out: int, axes: Sequence[str], output: bool):
    """A linear kernel. ``output``: it writes into the residual stream (scaled init)."""
    if cfg.init == "deepnorm":
        std = xavier_std(fan_in, fan_out, cfg.deepnorm_beta)
    else:
        std = cfg.init_std / math.sqrt(2.0 * cfg.num_layers) if output else cfg.init_std
    return _boxed(_normal(std), axes)
