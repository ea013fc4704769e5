"""Linear-layer weights that may be stored quantized, and the matmul that reads them.

A kernel in the parameter tree is either a float array or a :class:`QuantizedWeight`:
GLM-130B's / ChatGLM-6B's weight-only INT8 or INT4 (GLM_SPEC §2.5) in glm_jax's layout.
``q`` has the kernel's shape with its contraction (input) axes first and, for INT4, the
last contraction axis halved (two values per byte, the even input index in the high
nibble); ``scale`` is float16 over the output axes (one per output row of the authors'
``[out, in]`` weight). The matmul dequantizes on the fly the way the authors' runtime
does, ``fp16(q * scale)`` in the compute dtype, so the weights stay quantized in memory
and a quantized model computes what the float model computes on the dequantized weights.
``glm_jax.inference.quantize`` builds these from float parameters or from a
pre-quantized checkpoint.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class QuantizedWeight:
    q: jax.Array  # int8: [*in_axes, *out_axes]; INT4 packs the last input axis (halved)
    scale: jax.Array  # float16 [*out_axes]
    bits: int = flax.struct.field(pytree_node=False, default=8)

    @property
    def num_in_axes(self) -> int:
        return self.q.ndim - self.scale.ndim

    def unpacked(self) -> jax.Array:
        """int8 values; INT4 as ``[..., in/2, 2, out...]`` (even, odd input index on the new axis)."""
        if self.bits == 8:
            return self.q
        axis = self.num_in_axes  # the pair axis goes right after the packed input axis
        hi = jnp.right_shift(self.q, 4)
        lo = jnp.right_shift(jnp.left_shift(self.q, 4), 4)
        return jnp.stack([hi, lo], axis=axis)

    def dequantize(self, dtype) -> jax.Array:
        """The authors' runtime weight ``fp16(q * scale)``, cast to ``dtype``."""
        q = self.unpacked()
        scale = self.scale.astype(jnp.float32)
        w = q.astype(jnp.float32) * scale
        return w.astype(jnp.float16).astype(dtype)


def kernel(module: nn.Module, name: str, init_fn, shape, param_dtype):
    """``module.param(name, ...)``, or the stored :class:`QuantizedWeight` of that name."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if isinstance(value, QuantizedWeight):
            return value
    return module.param(name, init_fn, shape, param_dtype)


def einsum(spec: str, x: jax.Array, w, dtype) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` in ``dtype`` for a float kernel or a :class:`QuantizedWeight`.

    For INT4 the packed input axis is contracted as (pair, even|odd): ``x``'s matching
    axis is viewed as ``[n/2, 2]``, so no interleaved weight is ever built and a sharded
    input axis stays split where it was.
    """
    if not isinstance(w, QuantizedWeight):
        return jnp.einsum(spec, x, w.astype(dtype))
    wq = w.dequantize(dtype)
    if w.bits == 4:
        ins, rest = spec.split("->")
        x_spec, w_spec = ins.split(",")
        letter = w_spec[w.num_in_axes - 1]
        pair = next(c for c in "pqrstuvwxyzabcdefghijklmno" if c not in spec)
        axis = x_spec.index(letter)
        x = x.reshape(x.shape[:axis] + (x.shape[axis] // 2, 2) + x.shape[axis + 1 :])
        spec = f"{x_spec.replace(letter, letter + pair)},{w_spec.replace(letter, letter + pair)}->{rest}"
    return jnp.einsum(spec, x, wq)
