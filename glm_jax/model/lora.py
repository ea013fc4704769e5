"""LoRA: a rank-r update beside chosen linear layers, as PEFT applies it to ChatGLM-6B.

For a target linear with kernel ``W`` (input axes first), the layer computes
``x @ W + (dropout(x) @ A) @ B * (lora_alpha / lora_rank)`` with ``A [*in, r]`` and
``B [r, *out]``: PEFT's ``lora_A.weight [r, in]`` and ``lora_B.weight [out, r]`` in
glm_jax's orientation (``checkpoint/authors_layout`` maps them, with the query_key_value
rows interleaved per head as the base weight's are). ``A`` starts as PEFT's
``kaiming_uniform_(a=sqrt(5))``, U(-1/sqrt(in), 1/sqrt(in)), and ``B`` at zero, so an
untrained adapter changes nothing, exactly. Adapters are float32 whatever the base is.

Targets (``model.lora_targets``, comma-separated): ``qkv`` (attention.query_key_value),
``dense`` (attention.dense), ``mlp_in`` (mlp.dense_h_to_4h), ``mlp_out`` (mlp.dense_4h_to_h).
:func:`merge` folds trained adapters into the base kernels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from glm_jax.config import LORA_TARGETS, ModelConfig
from glm_jax.model.dropout import DropoutRows, drop

# target -> (module, kernel name, dropout site within the layer; the layer's own are 0..2)
KERNELS = {"qkv": ("attention", "qkv_kernel", 3), "dense": ("attention", "out_kernel", 4),
           "mlp_in": ("mlp", "wi_kernel", 5), "mlp_out": ("mlp", "wo_kernel", 6)}
assert set(KERNELS) == set(LORA_TARGETS)


def targets(cfg: ModelConfig) -> tuple[str, ...]:
    return tuple(t for t in cfg.lora_targets.split(",") if t) if cfg.lora_rank else ()


def leaf_names(kernel: str) -> tuple[str, str]:
    """The A and B leaves beside ``kernel`` (``qkv_kernel`` -> ``qkv_lora_a``, ``qkv_lora_b``)."""
    stem = kernel[: -len("_kernel")]
    return f"{stem}_lora_a", f"{stem}_lora_b"


def is_adapter(name: str) -> bool:
    return "_lora_" in name


def _init_a(fan_in: int, axes):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return nn.with_logical_partitioning(init, axes)


def update(module: nn.Module, target: str, x: jax.Array, in_shape: Sequence[int], out_shape: Sequence[int],
           in_axes: Sequence[str], out_axes: Sequence[str], dropout: Optional[DropoutRows]) -> Optional[jax.Array]:
    """The adapter's addition to ``target``'s output for ``x [b, l, *in_shape]`` (None when
    ``target`` has no adapter), creating its parameters in ``module``."""
    cfg = module.cfg
    if target not in targets(cfg):
        return None
    r = cfg.lora_rank
    a_name, b_name = leaf_names(KERNELS[target][1])
    fan_in = math.prod(in_shape)
    a = module.param(a_name, _init_a(fan_in, (*in_axes, None)), (*in_shape, r), jnp.float32)
    b = module.param(b_name, nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, *out_axes)),
                     (r, *out_shape), jnp.float32)
    dtype = jnp.dtype(cfg.dtype)
    x = drop(x, cfg.lora_dropout, dropout, KERNELS[target][2])
    n_in = len(in_shape)
    xa = jnp.tensordot(x, a.astype(dtype), axes=(tuple(range(2, 2 + n_in)), tuple(range(n_in))))
    y = jnp.tensordot(xa, b.astype(dtype), axes=((2,), (0,)))
    return y * jnp.asarray(cfg.lora_alpha / r, dtype)


def merged_kernel(w, a, b, scale: float, stacked: bool):
    """``w + a @ b * scale`` for one kernel (numpy, float32 math, ``w``'s dtype kept); with
    ``stacked`` every array carries a leading layers axis and the layers merge one by one."""
    import numpy as np  # the merge runs on host arrays: converters merge leaf by leaf

    if stacked:
        return np.stack([merged_kernel(w[i], a[i], b[i], scale, False) for i in range(w.shape[0])])
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    delta = np.tensordot(a32, b32, axes=((a32.ndim - 1,), (0,)))
    w = np.asarray(w)
    return (w.astype(np.float32) + delta * np.float32(scale)).astype(w.dtype)


def kernel_paths(flat: dict, cfg: ModelConfig):
    """(kernel path, A path, B path) of every adapted kernel in a flattened parameter tree."""
    for target in targets(cfg):
        kernel = KERNELS[target][1]
        a_name, b_name = leaf_names(kernel)
        for path in [k for k in flat if k[-1] == a_name]:
            yield path[:-1] + (kernel,), path, path[:-1] + (b_name,)


def merge(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """The parameters with every adapter folded into its kernel (``W + A @ B * alpha / r``,
    computed in float32, stored in the kernel's dtype) and the adapters removed; the config
    without LoRA. Works on stacked (``layers/block``) and unrolled layers; host arrays out."""
    if not cfg.lora_rank:
        return params, cfg
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if not is_adapter(k[-1])}
    for w_path, a_path, b_path in kernel_paths(flat, cfg):
        out[w_path] = merged_kernel(flat[w_path], flat[a_path], flat[b_path], cfg.lora_alpha / cfg.lora_rank,
                                    stacked=w_path[0] == "layers")
    return traverse_util.unflatten_dict(out), without_lora(cfg)


def without_lora(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the LoRA keys at their defaults (no adapters)."""
    defaults = ModelConfig()
    return dataclasses.replace(cfg, **{k: getattr(defaults, k) for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")})
