"""Benchmarks: ``python -m glm_jax.bench NAME [--json] [key=value ...]``, one JSON object per run.

Numbers are reported as ratios measured in the same run where possible, since the
machines we run on are shared and noisy.
"""
