"""Self-attention: fused QKV projection, rotary, dispatch to an attention implementation.

The QKV kernel is ``[embed, 3, heads, head_dim]`` (q|k|v per head, the authors' per-head
interleaved layout made explicit); the converters map checkpoint layouts onto it.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.config import ModelConfig
from glm_jax.kernels import flash_attention, reference
from glm_jax.model import init, rotary

IMPLEMENTATIONS = {"xla": reference.attention, "pallas": flash_attention.attention}


def resolve_impl(name: str) -> str:
    """``auto`` picks the fused Pallas kernel on TPU/GPU and the XLA reference on CPU."""
    return flash_attention.default_impl() if name == "auto" else name


class Attention(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        layer_index: jax.Array,
        positions: jax.Array,
        part_a_end: jax.Array,
        segment_ids: Optional[jax.Array],
    ) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        h, nh, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        w_qkv = self.param("qkv_kernel", init.qkv(cfg), (h, 3, nh, hd), jnp.dtype(cfg.param_dtype))
        qkv = jnp.einsum("bld,dthk->tblhk", x, w_qkv.astype(dtype))
        if cfg.use_bias:
            b_qkv = self.param("qkv_bias", init.zeros(("qkv", "heads", "head_dim")), (3, nh, hd), jnp.dtype(cfg.param_dtype))
            qkv = qkv + b_qkv.astype(dtype)[:, None, None]
        q, k, v = qkv[0], qkv[1], qkv[2]
        axes = ("batch", "length", "act_heads", None)
        q = nn.with_logical_constraint(q, axes)
        k = nn.with_logical_constraint(k, axes)
        v = nn.with_logical_constraint(v, axes)

        q, k = rotary.apply_rotary(q, k, positions, cfg)

        dropout_rng = None
        if cfg.attention_dropout > 0.0 and not self.deterministic:
            dropout_rng = self.make_rng("dropout")
        name = resolve_impl(cfg.attention_impl)
        kernel_options = {"block_sizes": flash_attention.BlockSizes.from_config(cfg)} if name == "pallas" else {}
        ctx = IMPLEMENTATIONS[name](
            q,
            k,
            v,
            part_a_end,
            segment_ids,
            layer_scale=(layer_index + 1) if cfg.attention_layer_scaling else None,
            dropout_rate=cfg.attention_dropout,
            dropout_rng=dropout_rng,
            **kernel_options,
        )
        ctx = nn.with_logical_constraint(ctx, axes)

        w_o = self.param(
            "out_kernel",
            init.projection(cfg, h, h, ("heads", "head_dim", "embed"), output=True),
            (nh, hd, h),
            jnp.dtype(cfg.param_dtype),
        )
        out = jnp.einsum("blhk,hkd->bld", ctx, w_o.astype(dtype))
        if cfg.use_bias:
            b_o = self.param("out_bias", init.zeros(("embed",)), (h,), jnp.dtype(cfg.param_dtype))
            out = out + b_o.astype(dtype)
        return nn.with_logical_constraint(out, ("batch", "length", "act_embed"))
