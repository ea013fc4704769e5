"""The GLM model family in Flax."""

from glm_jax.model.batch import Batch
from glm_jax.model.glm import GLM
from glm_jax.model.positions import prepare_inputs
from glm_jax.model.parameters import abstract_params, init_params

__all__ = ["Batch", "GLM", "abstract_params", "init_params", "prepare_inputs"]
