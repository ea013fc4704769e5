"""glm_jax: the GLM language-model family (GLM, GLM-130B, ChatGLM-6B) in JAX/Flax."""

__version__ = "0.1.0"

from glm_jax import host  # noqa: E402

host.default_to_cpu()  # before anything imports jax: no libtpu start-up errors on CPU-only hosts

from glm_jax.inference.loading import LoadedModel, load  # noqa: E402  (imports neither jax nor torch)

__all__ = ["LoadedModel", "load"]
