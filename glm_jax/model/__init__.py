"""The GLM model family in Flax."""

from glm_jax.model.glm import GLM
from glm_jax.model.masks import prepare_inputs

__all__ = ["GLM", "prepare_inputs"]
