"""Self-attention: fused QKV projection, rotary, dispatch to an attention implementation.

The QKV kernel is ``[embed, 3, heads, head_dim]`` (q|k|v per head, the authors' per-head
interleaved layout made explicit); the converters map checkpoint layouts onto it.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.config import ModelConfig
from glm_jax.kernels import decode, flash_attention, reference
from glm_jax.model import init, linear, lora, rotary
from glm_jax.model.dropout import ATTENTION_PROBS, DropoutRows

IMPLEMENTATIONS = {"xla": reference.attention, "pallas": flash_attention.attention}


def resolve_impl(name: str) -> str:
    """``auto`` picks the fused Pallas kernel on TPU/GPU and the XLA reference on CPU."""
    return flash_attention.default_impl() if name == "auto" else name


class Attention(nn.Module):
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
        """Returns the attention output and ``cache`` with this layer's keys and values stored.

        dropout: the layer's dropout key and rows; the probabilities are dropped with the
          masks the whole batch would draw (``glm_jax.model.dropout``).

        cache: a ``glm_jax.inference.kv_cache.KVCache`` or None. These tokens' (post-rotary)
          keys and values go into it at ``cache.index``; with ``cache.decoding`` the tokens
          are Part B continuing the cached sequence and attend to its valid slots
          (``kernels/decode.py``) rather than to each other by the GLM mask.

        prefix: this layer's P-tuning keys and values ``[batch or 1, P, 2, heads, head_dim]``
          (``glm_jax.model.prefix``), seen by every token; they run the XLA attention.

        shared_end: ``[batch]``: keys before it are seen by every token of the row
          (``kernels/attention_mask``'s shared context); such rows run the XLA attention.
        """
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        h, nh, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        w_qkv = linear.kernel(self, "qkv_kernel", init.qkv(cfg), (h, 3, nh, hd), jnp.dtype(cfg.param_dtype))
        qkv = linear.einsum("bld,dthk->blthk", x, w_qkv, dtype)
        adapted = lora.update(self, "qkv", x, (h,), (3, nh, hd), ("embed",), ("qkv", "heads", "head_dim"), dropout)
        if adapted is not None:
            qkv = qkv + adapted
        if cfg.use_bias:
            b_qkv = self.param("qkv_bias", init.zeros(("qkv", "heads", "head_dim")), (3, nh, hd), jnp.dtype(cfg.param_dtype))
            qkv = qkv + b_qkv.astype(dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        axes = ("batch", "length", "act_heads", None)
        q = nn.with_logical_constraint(q, axes)
        k = nn.with_logical_constraint(k, axes)
        v = nn.with_logical_constraint(v, axes)

        def project_out(ctx: jax.Array) -> jax.Array:
            ctx = nn.with_logical_constraint(ctx, axes)
            w_o = linear.kernel(
                self,
                "out_kernel",
                init.projection(cfg, h, h, ("heads", "head_dim", "embed"), output=True),
                (nh, hd, h),
                jnp.dtype(cfg.param_dtype),
            )
            out = linear.einsum("blhk,hkd->bld", ctx, w_o, dtype)
            adapted = lora.update(self, "dense", ctx, (nh, hd), (h,), ("heads", "head_dim"), ("embed",), dropout)
            if adapted is not None:
                out = out + adapted
            if cfg.use_bias:
                b_o = self.param("out_bias", init.zeros(("embed",)), (h,), jnp.dtype(cfg.param_dtype))
                out = out + b_o.astype(dtype)
            return nn.with_logical_constraint(out, ("batch", "length", "act_embed"))

        q, k = rotary.apply_rotary(q, k, positions, cfg)
        layer_scale = (layer_index + 1) if cfg.attention_layer_scaling else None
        prefix_kv = None if prefix is None else (prefix[:, :, 0], prefix[:, :, 1])
        if cache is not None:
            cache = cache.write(layer_index, k, v)
            if cache.decoding:
                k_all, v_all = cache.layer(layer_index)
                ctx = decode.attention(q, k_all, v_all, cache.start, cache.index, layer_scale=layer_scale, prefix=prefix_kv)
                return project_out(ctx), cache

        dropout_options = {}
        if cfg.attention_dropout > 0.0 and dropout is not None:
            dropout_options = dict(dropout_rate=cfg.attention_dropout, dropout_rng=dropout.site(ATTENTION_PROBS),
                                   dropout_rows=(dropout.row_offset, dropout.row_stride))
        name = "xla" if prefix is not None or shared_end is not None else resolve_impl(cfg.attention_impl)
        kernel_options = {"block_sizes": flash_attention.BlockSizes.from_config(cfg)} if name == "pallas" else {}
        if prefix is not None:
            kernel_options["prefix"] = prefix_kv
        if shared_end is not None:
            kernel_options["shared_end"] = shared_end
        ctx = IMPLEMENTATIONS[name](
            q,
            k,
            v,
            part_a_end,
            segment_ids,
            layer_scale=layer_scale,
            **dropout_options,
            **kernel_options,
        )
        return project_out(ctx), cache
