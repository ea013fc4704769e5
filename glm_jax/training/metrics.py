"""Model FLOPs utilisation (MFU): model FLOPs per second over the devices' peak.

Model FLOPs per trained token = 6 x (matmul parameters, the output head included) +
12 x layers x hidden x seq_len for attention scores and values, forward and backward
(Megatron's accounting; GLM's bidirectional Part A makes the dense count the right
one for the XLA attention, which computes every pair). Rematerialisation is not counted:
this is MFU, not hardware utilisation.

Peak: the published dense bf16 rate per chip for known TPUs and GPUs; on CPU (or an
unknown device) a float32 matmul measured at startup, so MFU there is a ratio taken
within one run on one machine.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from glm_jax.config import ModelConfig

# Dense bf16 FLOP/s per chip, from the vendors' published figures.
PEAK_FLOPS = (
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),  # v5p reports its kind as "TPU v5"; after the v5 lite entries
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def matmul_params(cfg: ModelConfig) -> int:
    h, f, n = cfg.hidden_size, cfg.mlp_dim, cfg.num_layers
    mlp_in = 2 * f if cfg.mlp_type == "geglu" else f
    per_layer = h * 3 * h + h * h + h * mlp_in + f * h
    return n * per_layer + cfg.vocab_size * h  # the head is a matmul whether tied or not


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len


def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_flops(devices=None) -> tuple[float, str]:
    """(total peak FLOP/s of ``devices``, where the number comes from)."""
    devices = jax.devices() if devices is None else devices
    kind = devices[0].device_kind
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops * len(devices), f"published peak of {len(devices)} x {kind}"
    # CPU: simulated devices share the host's cores, so the host's measured rate is the peak.
    return measured_matmul_flops(), f"measured float32 matmul on this {kind} host"
