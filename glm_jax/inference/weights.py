"""Parameters laid out for generation, once, when a model is loaded or a Generator built.

    cfg, params = for_generation(cfg, params, mesh=None)

What changes (the numbers the model computes do not):

* **Layers unrolled.** One array per layer (``layers_i``) instead of a stacked ``layers``
  axis, and ``cfg.scan_layers=False``: a scanned decoding step slices every layer's
  weights out of the stack on each token, and XLA's CPU backend materialises that slice
  (a copy of all the weights per token, 3x the memory traffic of the step); unrolled,
  every dot reads its weight where it lies. The KV cache follows (one buffer per layer,
  ``kv_cache.allocate``).
* **Matrices in the compute dtype, converted once.** Linear kernels and biases, embedding
  tables and the head are cast here rather than inside every step (the model casts them
  to the compute dtype anyway, so the numbers are the same). A stored dtype narrower than
  the compute dtype (float16 weights computing in float32) is kept on GPU/TPU, where XLA
  fuses the widening into the dot and the narrow bytes are what is read, and widened on a
  CPU, where XLA cannot fuse it. LayerNorm parameters keep their dtype.
* **A P-tuning prefix computed once.** With ``prefix_projection`` the prefix encoder's MLP
  runs here, once, in float32, and its output becomes the table of an encoder without
  projection (``glm_jax.model.prefix.fold``); the table is then cast to the compute dtype
  like the other tables, as the authors cast the encoder's float32 output, so a decoding
  step neither recomputes nor converts it.
* **On a CPU** (one device), compact weights for the streaming matmul of
  ``glm_jax.model.linear``: INT8/INT4 leaves get ``stream=True``, and with a bfloat16
  compute dtype the four linears of every layer, the word embeddings and the head become
  ``Bf16Bits``. XLA's CPU backend computes bfloat16 in float32: it would widen each whole
  bfloat16 weight before every dot, and the embedding table (a loop invariant) once per
  call, in new buffers far larger than the step's useful reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.config import ModelConfig
from glm_jax.checkpoint import authors_layout, quantized
from glm_jax.model import linear, prefix
from glm_jax.model.linear import Bf16Bits, QuantizedWeight

# Leaves that are not matrices: kept in their stored dtype.
_KEEP_DTYPE = ("layernorm",)


def generation_config(cfg: ModelConfig) -> ModelConfig:
    """The same model unrolled, without rematerialisation (nothing is differentiated)."""
    return dataclasses.replace(cfg, scan_layers=False, remat_policy="none")


def unstack(params: dict, cfg: ModelConfig) -> dict:
    """A scanned model's parameters as the unrolled model's (``layers/block`` -> ``layers_i``)."""
    if not cfg.scan_layers:
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    stacked = params["layers"]["block"]
    for i in range(cfg.num_layers):
        out[authors_layout.layer_prefix(generation_config(cfg), i)[0]] = jax.tree.map(
            lambda w, i=i: linear.map_compact(lambda a: a[i], w), stacked, is_leaf=linear.is_compact
        )
    return out


def _streams(mesh, backend: Optional[str]) -> bool:
    if mesh is not None and mesh.size > 1:
        return False
    return (backend or jax.default_backend()) == "cpu"


def for_generation(cfg: ModelConfig, params: Any, *, mesh=None, backend: Optional[str] = None, place=None) -> tuple[ModelConfig, dict]:
    """(generation config, parameters in the generation layout); see the module doc.

    Idempotent. ``place(path, leaf)``, if given, is applied to every finished leaf (e.g.
    ``jax.device_put``), one leaf at a time, so a host tree need not be copied whole.
    backend: where the parameters will live (default ``jax.default_backend()``).
    """
    params, cfg = prefix.fold(params, cfg)  # a projected prefix becomes its output table, computed once
    gen_cfg = generation_config(cfg)
    params = unstack(params, cfg)
    dtype = jnp.dtype(cfg.dtype)
    if backend is None and mesh is not None:
        backend = mesh.devices.flat[0].platform
    cpu = (backend or jax.default_backend()) == "cpu"
    stream = _streams(mesh, backend)
    linears = {e.path for e in authors_layout.entries(gen_cfg) if quantized.is_quantized_linear(e.key)}
    tables = {("word_embeddings",), ("lm_head",)}
    bits16 = stream and dtype == jnp.bfloat16

    def one(path: tuple[str, ...], w):
        if isinstance(w, QuantizedWeight):
            w = w.replace(stream=stream)
        elif isinstance(w, Bf16Bits):
            w = w if stream else _cast(w.value(), dtype)
        elif not any(k in p for p in path for k in _KEEP_DTYPE):
            stored = np.dtype(w.dtype)
            if stored.itemsize >= dtype.itemsize or cpu:
                w = _cast(w, dtype)
            if bits16 and (path in linears or path in tables):
                w = linear.bf16_bits(w)
        return place(path, w) if place is not None else w

    return gen_cfg, _map_paths(one, params)


def _cast(w, dtype):
    if np.dtype(w.dtype) == dtype:
        return w
    return w.astype(dtype) if isinstance(w, jax.Array) else np.asarray(w).astype(dtype)


def _map_paths(fn, tree: dict, prefix: tuple[str, ...] = ()) -> dict:
    out = {}
    for k, v in tree.items():
        path = prefix + (k,)
        out[k] = _map_paths(fn, v, path) if isinstance(v, dict) else fn(path, v)
    return out


def as_float(params: Any) -> Any:
    """``params`` with every :class:`Bf16Bits` back as a bfloat16 array (for re-quantizing)."""
    return jax.tree.map(lambda w: w.value() if isinstance(w, Bf16Bits) else w, params, is_leaf=linear.is_compact)
