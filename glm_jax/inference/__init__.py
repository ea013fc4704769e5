"""Inference: KV-cache generation with GLM's prefix rules, sampling, weight-only quantization."""
