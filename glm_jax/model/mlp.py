"""Feed-forward blocks: GeGLU (GLM-130B) and the plain 4h GELU MLP (ChatGLM-6B, GLM).

GeGLU: ``u = x W_i`` with W_i ``[embed, 2, mlp]``; the result is ``u[0] * gelu(u[1])``:
the first half is the linear branch, the second goes through exact (erf) GELU
(MODEL.md §1.2). The plain MLP uses the tanh GELU written as the authors write it.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.config import ModelConfig
from glm_jax.model import init, linear, lora
from glm_jax.model.dropout import DropoutRows


def gelu_tanh(x: jax.Array) -> jax.Array:
    """0.5 x (1 + tanh(0.7978845608028654 x (1 + 0.044715 x^2))), as in ChatGLM-6B."""
    return 0.5 * x * (1.0 + jnp.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def gelu(x: jax.Array, approximate: bool) -> jax.Array:
    return gelu_tanh(x) if approximate else jax.nn.gelu(x, approximate=False)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, dropout: Optional[DropoutRows] = None) -> jax.Array:
        """dropout: the layer's dropout rows, for LoRA adapters' dropout (glm_jax/model/lora.py)."""
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        h, f = cfg.hidden_size, cfg.mlp_dim
        if cfg.mlp_type == "geglu":
            w_i = linear.kernel(self, "wi_kernel", init.projection(cfg, h, f, ("embed", "glu", "mlp"), output=False), (h, 2, f), pdtype)
            u = linear.einsum("bld,dgf->blgf", x, w_i, dtype)
            adapted = lora.update(self, "mlp_in", x, (h,), (2, f), ("embed",), ("glu", "mlp"), dropout)
            u = u if adapted is None else u + adapted
            if cfg.use_bias:
                u = u + self.param("wi_bias", init.zeros(("glu", "mlp")), (2, f), pdtype).astype(dtype)
            u = nn.with_logical_constraint(u, ("batch", "length", None, "act_mlp"))
            a = u[:, :, 0] * gelu(u[:, :, 1], cfg.gelu_approximate)
        else:
            w_i = linear.kernel(self, "wi_kernel", init.projection(cfg, h, f, ("embed", "mlp"), output=False), (h, f), pdtype)
            u = linear.einsum("bld,df->blf", x, w_i, dtype)
            adapted = lora.update(self, "mlp_in", x, (h,), (f,), ("embed",), ("mlp",), dropout)
            u = u if adapted is None else u + adapted
            if cfg.use_bias:
                u = u + self.param("wi_bias", init.zeros(("mlp",)), (f,), pdtype).astype(dtype)
            a = gelu(u, cfg.gelu_approximate)
        a = nn.with_logical_constraint(a, ("batch", "length", "act_mlp"))
        w_o = linear.kernel(self, "wo_kernel", init.projection(cfg, f, h, ("mlp", "embed"), output=True), (f, h), pdtype)
        out = linear.einsum("blf,fd->bld", a, w_o, dtype)
        adapted = lora.update(self, "mlp_out", a, (f,), (h,), ("mlp",), ("embed",), dropout)
        out = out if adapted is None else out + adapted
        if cfg.use_bias:
            out = out + self.param("wo_bias", init.zeros(("embed",)), (h,), pdtype).astype(dtype)
        return nn.with_logical_constraint(out, ("batch", "length", "act_embed"))
