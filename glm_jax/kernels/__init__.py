"""Attention implementations: ``reference`` (XLA, the numerical reference for every kernel)
and ``flash_attention`` (the fused Pallas kernel for GLM's mask, TPU and GPU)."""
