"""One GLM layer: attention + MLP with a DeepNorm post-LN or a pre-LN residual.

post (GLM-130B, ChatGLM-6B; MODEL.md §1.2): the residual is the LayerNorm *output*
scaled by alpha:  a = LN_in(x); y = a*alpha + Attn(a); b = LN_post(y); out = b*alpha + MLP(b).
pre (original GLM):  y = x + Attn(LN_in(x)); out = y + MLP(LN_post(y)).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.config import ModelConfig
from glm_jax.model import init
from glm_jax.model.attention import Attention
from glm_jax.model.dropout import AFTER_ATTENTION, AFTER_MLP, DropoutRows, drop
from glm_jax.model.mlp import MLP


def layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layernorm_epsilon,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        scale_init=init.ones(("embed",)),
        bias_init=init.zeros(("embed",)),
        name=name,
    )


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        layer_index: jax.Array,
        positions: jax.Array,
        part_a_end: jax.Array,
        segment_ids: Optional[jax.Array],
        cache: Optional[Any] = None,
        dropout: Optional[DropoutRows] = None,
        prefix: Optional[jax.Array] = None,
        shared_end: Optional[jax.Array] = None,
    ) -> tuple[jax.Array, Optional[Any]]:
        """Returns the layer's output and ``cache`` with its keys and values (see Attention).

        dropout: this layer's key and rows (``DropoutRows.for_layer``); None = no dropout.
        prefix: this layer's P-tuning keys and values (``glm_jax.model.prefix``), or None.
        shared_end: keys before it are seen by every token of the row (see Attention)."""
        cfg = self.cfg
        attn = Attention(cfg, name="attention")
        mlp = MLP(cfg, name="mlp")
        rate = cfg.hidden_dropout
        ln_in = layer_norm(cfg, "input_layernorm")
        ln_post = layer_norm(cfg, "post_attention_layernorm")
        if cfg.norm_order == "post":
            alpha = jnp.asarray(cfg.alpha, x.dtype)
            a = ln_in(x)
            attended, cache = attn(a, layer_index, positions, part_a_end, segment_ids, cache, dropout, prefix, shared_end)
            y = a * alpha + drop(attended, rate, dropout, AFTER_ATTENTION)
            b = ln_post(y)
            out = b * alpha + drop(mlp(b, dropout), rate, dropout, AFTER_MLP)
        else:
            attended, cache = attn(ln_in(x), layer_index, positions, part_a_end, segment_ids, cache, dropout, prefix,
                                   shared_end)
            y = x + drop(attended, rate, dropout, AFTER_ATTENTION)
            out = y + drop(mlp(ln_post(y), dropout), rate, dropout, AFTER_MLP)
        return nn.with_logical_constraint(out, ("batch", "length", "act_embed")), cache
