"""glm_jax: the GLM language-model family (GLM, GLM-130B, ChatGLM-6B) in JAX/Flax."""

__version__ = "0.1.0"
