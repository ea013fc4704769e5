"""P-tuning v2's prefix: ``model.pre_seq_len`` trained keys and values per layer.

The encoder, as ChatGLM-6B's ``PrefixEncoder`` (parameter names follow its modules):

* ``prefix_projection`` false: ``embedding [P, layers * 2 * hidden]``;
* true: ``embedding [P, hidden]`` -> ``trans_0`` (hidden -> hidden) -> tanh -> ``trans_2``
  (hidden -> layers * 2 * hidden); ``trans_N`` kernels are ``[in, out]``.

Its output, cast to the compute dtype, is read per prefix position as ``[layers, 2, heads,
head_dim]``: layer i's keys at ``2i`` and values at ``2i + 1``. While training it passes
through dropout (``model.prefix_dropout``, the authors' 0.1), a mask per batch row. In
attention the prefix keys come before the sequence's, carry no rotary, and every token
sees all of them; the tokens keep their own positions (``kernels/reference.py``).
The encoder stays float32 whatever ``model.param_dtype`` says: it is what trains.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.config import ModelConfig
from glm_jax.model.dropout import DropoutRows, drop



def _uniform(bound: float, axes):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return nn.with_logical_partitioning(init, axes)


def _normal(axes):
    return nn.with_logical_partitioning(lambda key, shape, dtype=jnp.float32: jax.random.normal(key, shape, dtype), axes)


class PrefixEncoder(nn.Module):
    """``() -> [pre_seq_len, layers * 2 * hidden]`` float32. Initialised as PyTorch
    initialises the authors' modules: the embedding N(0, 1), each linear layer U(-1/sqrt(in),
    1/sqrt(in)) for weight and bias."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self) -> jax.Array:
        cfg = self.cfg
        h, out = cfg.hidden_size, cfg.num_layers * 2 * cfg.hidden_size
        if not cfg.prefix_projection:
            return self.param("embedding", _normal(("prefix", "prefix_kv")), (cfg.pre_seq_len, out), jnp.float32)
        x = self.param("embedding", _normal(("prefix", "embed")), (cfg.pre_seq_len, h), jnp.float32)
        for name, (n_in, n_out), axes in (("trans_0", (h, h), ("embed", "mlp")), ("trans_2", (h, out), ("mlp", "prefix_kv"))):
            bound = 1.0 / math.sqrt(n_in)
            w = self.param(f"{name}_kernel", _uniform(bound, axes), (n_in, n_out), jnp.float32)
            b = self.param(f"{name}_bias", _uniform(bound, axes[1:]), (n_out,), jnp.float32)
            x = x @ w + b
            if name == "trans_0":
                x = jnp.tanh(x)
        return x


def fold(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """For inference (no dropout, nothing trained): the encoder's output computed once and
    kept as the table of an encoder without projection, ``{"embedding": [P, layers * 2 *
    hidden]}`` float32, with the config saying so. The same numbers at every call without
    the projection's matmuls; parameters without a prefix pass through."""
    if not cfg.pre_seq_len or not cfg.prefix_projection:
        return params, cfg
    table = PrefixEncoder(cfg).apply({"params": jax.tree.map(jnp.asarray, params["prefix_encoder"])})
    return {**params, "prefix_encoder": {"embedding": table}}, dataclasses.replace(cfg, prefix_projection=False)


def key_values(encoded: jax.Array, cfg: ModelConfig, batch: int, dropout: Optional[DropoutRows]) -> jax.Array:
    """The encoder's output as per-layer prefix keys and values, ``[layers, rows, P, 2,
    heads, head_dim]`` in the compute dtype: with dropout (training) ``rows`` is the batch,
    a mask per row; without, 1 (the same prefix for every row)."""
    p, nh, hd = cfg.pre_seq_len, cfg.num_heads, cfg.head_dim
    kv = encoded.astype(jnp.dtype(cfg.dtype)).reshape(1, p, cfg.num_layers, 2, nh, hd)
    if dropout is not None and cfg.prefix_dropout > 0.0:
        # keyed like a layer past the last, so no layer's dropout shares its bits
        kv = drop(jnp.broadcast_to(kv, (batch, *kv.shape[1:])), cfg.prefix_dropout, dropout.for_layer(cfg.num_layers), 0)
    return jnp.moveaxis(kv, 2, 0)
