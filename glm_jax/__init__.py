"""glm_jax: the GLM language-model family (GLM, GLM-130B, ChatGLM-6B) in JAX/Flax."""

__version__ = "0.1.0"

from glm_jax import host  # noqa: E402

host.default_to_cpu()  # before anything imports jax: no libtpu start-up errors on CPU-only hosts

from glm_jax.inference import loading as _loading  # noqa: E402  (imports neither jax nor torch)
from glm_jax.inference.loading import LoadedModel  # noqa: E402


def load(checkpoint_dir: str, *, ptuning_checkpoint: str | None = None, lora_adapter: str | None = None,
         **options) -> LoadedModel:
    """A converted checkpoint or training workdir, ready to use (``glm_jax.inference.loading.load``
    documents ``dtype``, ``quantize``, ``mesh``, ``step``). ``ptuning_checkpoint``: a P-tuning
    v2 prefix to apply, the authors' checkpoint directory (config.json + pytorch_model.bin)
    or a glm_jax P-tuning run (``glm_jax.convert.ptuning``). ``lora_adapter``: LoRA adapters
    to merge into the weights, a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors) or a glm_jax LoRA run (``glm_jax.convert.lora_adapter``)."""
    # Here, not at the top: the converters (and torch / safetensors) load only when asked.
    if ptuning_checkpoint is not None:
        from glm_jax.convert import ptuning

        options["prefix"] = lambda base: ptuning.read(ptuning_checkpoint, base)
    if lora_adapter is not None:
        from glm_jax.convert import lora_adapter as adapters

        options["adapter"] = lambda base: adapters.read(lora_adapter, base)
    return _loading.load(checkpoint_dir, **options)


__all__ = ["LoadedModel", "load"]
