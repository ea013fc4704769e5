"""Benchmarks: ``python -m glm_jax.bench NAME [--json] [key=value ...]``, one JSON object per run.

Numbers are reported as ratios measured in the same run where possible, since the
machines we run on are shared and noisy.

Each benchmark imports jax, torch or TensorFlow inside the functions that measure with
them, deliberately: ``--help``, bad flags and the jax-free converter benchmark start in a
fraction of a second, and a measured child process imports only what it measures.
"""
