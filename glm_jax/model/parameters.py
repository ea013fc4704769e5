"""The one answer to "what are the model's parameters": their tree, shapes, dtypes and
logical axis names, from the model's own ``init`` (nothing is allocated for the
abstract form).

Training creates its state from :func:`init_params`, ``python -m glm_jax.info`` sizes a
model from :func:`abstract_params`, inference shards parameters by their logical axis
names, and the checkpoint layout's leaf shapes (``glm_jax.checkpoint.authors_layout``,
numpy-only so the converters need no jax) are tested equal to :func:`abstract_params`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.config import ModelConfig
from glm_jax.model.glm import GLM, example_inputs

def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
    """Freshly initialised parameters, boxed with their logical axis names
    (``flax.linen.LogicallyPartitioned``); ``nn.meta.unbox`` gives the plain arrays."""
    return GLM(cfg).init(rng, *example_inputs(cfg))["params"]


def abstract_params(cfg: ModelConfig, *, boxed: bool = False) -> Any:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything;
    ``boxed=True`` keeps the logical axis names (for the sharding rules)."""
    tree = jax.eval_shape(lambda rng: init_params(cfg, rng), jax.random.key(0))
    return tree if boxed else nn.meta.unbox(tree)


def leaf_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{path: shape}`` of every parameter leaf."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
    return {tuple(k.key for k in path): tuple(x.shape) for path, x in flat}
