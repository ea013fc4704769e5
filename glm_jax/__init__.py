"""glm_jax: the GLM language-model family (GLM, GLM-130B, ChatGLM-6B) in JAX/Flax."""

__version__ = "0.1.0"

from glm_jax import host  # noqa: E402

host.default_to_cpu()  # before anything imports jax: no libtpu start-up errors on CPU-only hosts

from glm_jax.inference import loading as _loading  # noqa: E402  (imports neither jax nor torch)
from glm_jax.inference.loading import LoadedModel  # noqa: E402


def load(checkpoint_dir: str, *, ptuning_checkpoint: str | None = None, **options) -> LoadedModel:
    """A converted checkpoint or training workdir, ready to use (``glm_jax.inference.loading.load``
    documents ``dtype``, ``quantize``, ``mesh``, ``step``). ``ptuning_checkpoint``: a P-tuning
    v2 prefix to apply, the authors' checkpoint directory (config.json + pytorch_model.bin)
    or a glm_jax P-tuning run (``glm_jax.convert.ptuning``)."""
    if ptuning_checkpoint is not None:
        # Here, not at the top: the converters (and torch, for the authors' file) load only when asked.
        from glm_jax.convert import ptuning

        options["prefix"] = lambda base: ptuning.read(ptuning_checkpoint, base)
    return _loading.load(checkpoint_dir, **options)


__all__ = ["LoadedModel", "load"]
