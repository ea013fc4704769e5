"""The KV cache: every layer's post-rotary keys and values, one slot per token.

Keys are stored transposed, ``k [batch, heads, head_dim, slots]``, and values as
``v [batch, heads, slots, head_dim]``: the two decode products (``q . k`` and
``probs . v``, ``kernels/decode.py``) then read the cache in the layout a batched matmul
wants, with no transposed copy of the whole cache per step (on XLA's CPU backend that
copy cost more than the attention itself). A cache is either one buffer per layer (a
tuple: the unrolled model used for generation writes each layer's buffer in place and
reads it without slicing) or, for a model whose layers are scanned, one stacked buffer
with a leading layers axis.

A batch of prompts is left-padded to one length (as ChatGLM's tokenizer pads), so every
example writes the same slot at each step: ``index`` is where the next call's first
token goes, and ``start[b]`` is example b's first real slot (its padding count). The
model stores keys after rotary, so a cached key never depends on later positions.

The model (``glm_jax.model.attention``) calls :meth:`KVCache.write` and
:meth:`KVCache.layer`; :func:`allocate` makes an empty cache and :func:`sharding`
places one on a mesh through the logical-axis rules.
"""

from __future__ import annotations

import operator
from typing import Any, Optional, Union

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glm_jax.config import ModelConfig
from glm_jax.parallel import rules

# Logical axes of one layer's k and v (glm_jax.parallel.rules maps them to mesh axes).
K_AXES = ("batch", "act_heads", None, "length")
V_AXES = ("batch", "act_heads", "length", None)

Buffers = Union[jax.Array, tuple]


def _static_layer(layer) -> Optional[int]:
    """The layer index as a Python int when it is known at trace time (unrolled model)."""
    try:
        return operator.index(layer)
    except TypeError:
        try:
            return int(layer)  # a concrete (non-traced) array
        except (TypeError, jax.errors.ConcretizationTypeError):
            return None


@flax.struct.dataclass
class KVCache:
    k: Buffers  # per layer [batch, heads, head_dim, slots] (a tuple), or stacked with a layers axis
    v: Buffers  # per layer [batch, heads, slots, head_dim]
    start: jax.Array  # [batch] int32: first real slot of each example
    index: jax.Array  # [] int32: slot of the first token of the next model call ([batch]: each row's own)
    # False: the call is a prefill (GLM mask among its own tokens); True: its tokens are
    # Part B continuing the cached sequence (kernels/decode.py).
    decoding: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, tuple)

    @property
    def slots(self) -> int:
        return (self.v[0] if self.per_layer else self.v).shape[-2]

    def write(self, layer, k: jax.Array, v: jax.Array) -> "KVCache":
        """Store one layer's ``[batch, L, heads, head_dim]`` keys and values at ``index``."""
        k_t = jnp.transpose(k, (0, 2, 3, 1))  # [b, h, d, L]
        v_t = jnp.transpose(v, (0, 2, 1, 3))  # [b, h, L, d]
        if self.per_layer:
            i = _static_layer(layer)
            if i is None:
                raise ValueError("a per-layer KV cache needs the layer index at trace time (an unrolled model)")
            ks, vs = list(self.k), list(self.v)
            if jnp.ndim(self.index) == 1:  # every row at its own slot (continuous batching)
                put_k = jax.vmap(lambda buf, new, at: lax.dynamic_update_slice_in_dim(buf, new, at, 2))
                put_v = jax.vmap(lambda buf, new, at: lax.dynamic_update_slice_in_dim(buf, new, at, 1))
                ks[i] = put_k(ks[i], k_t.astype(ks[i].dtype), self.index)
                vs[i] = put_v(vs[i], v_t.astype(vs[i].dtype), self.index)
            else:
                ks[i] = lax.dynamic_update_slice(ks[i], k_t.astype(ks[i].dtype), (0, 0, 0, self.index))
                vs[i] = lax.dynamic_update_slice(vs[i], v_t.astype(vs[i].dtype), (0, 0, self.index, 0))
            return self.replace(k=tuple(ks), v=tuple(vs))
        if jnp.ndim(self.index) == 1:
            raise ValueError("per-row write slots need a per-layer cache (an unrolled model)")
        return self.replace(
            k=lax.dynamic_update_slice(self.k, k_t[None].astype(self.k.dtype), (layer, 0, 0, 0, self.index)),
            v=lax.dynamic_update_slice(self.v, v_t[None].astype(self.v.dtype), (layer, 0, 0, self.index, 0)),
        )

    def layer(self, layer) -> tuple[jax.Array, jax.Array]:
        """One layer's keys ``[batch, heads, head_dim, slots]`` and values ``[batch, heads, slots, head_dim]``."""
        if self.per_layer:
            i = _static_layer(layer)
            return self.k[i], self.v[i]
        return (
            lax.dynamic_index_in_dim(self.k, layer, axis=0, keepdims=False),
            lax.dynamic_index_in_dim(self.v, layer, axis=0, keepdims=False),
        )

    def take(self, rows: jax.Array) -> "KVCache":
        """The cache of rows ``rows`` (beam search: each new beam continues its parent's row)."""
        axis = 0 if self.per_layer else 1
        pick = lambda x: jnp.take(x, rows, axis=axis)  # noqa: E731
        k = tuple(map(pick, self.k)) if self.per_layer else pick(self.k)
        v = tuple(map(pick, self.v)) if self.per_layer else pick(self.v)
        return self.replace(k=k, v=v, start=jnp.take(self.start, rows, axis=0))

    def advance(self, n) -> "KVCache":
        """The cache for the next call: ``n`` more slots filled, decoding from now on."""
        return self.replace(index=self.index + n, decoding=True)


def _shapes(cfg: ModelConfig, batch: int, slots: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    h, d = cfg.num_heads, cfg.head_dim
    return (batch, h, d, slots), (batch, h, slots, d)


def allocate(cfg: ModelConfig, batch: int, slots: int, start, dtype=None) -> KVCache:
    """An empty cache of ``slots`` slots (keys and values in the compute dtype by default):
    one buffer per layer for an unrolled model, stacked for a scanned one."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    k_shape, v_shape = _shapes(cfg, batch, slots)
    if cfg.scan_layers:
        k = jnp.zeros((cfg.num_layers,) + k_shape, dtype)
        v = jnp.zeros((cfg.num_layers,) + v_shape, dtype)
    else:
        k = tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers))
        v = tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(k=k, v=v, start=jnp.asarray(start, jnp.int32).reshape(batch), index=jnp.zeros((), jnp.int32))


def nbytes(cfg: ModelConfig, batch: int, slots: int, dtype=None) -> int:
    """Bytes of keys and values for ``batch`` x ``slots`` tokens."""
    per = cfg.num_layers * cfg.num_heads * cfg.head_dim * jnp.dtype(dtype or cfg.dtype).itemsize
    return 2 * per * batch * slots


def sharding(mesh: Mesh, cfg: ModelConfig, decoding: bool = False, split_batch: bool = True) -> KVCache:
    """Where a cache lives on ``mesh``: batch over the data axis (unless ``split_batch`` is
    False: every row on every data replica), heads over the model axis."""

    def place(axes: tuple, stacked: bool) -> Any:
        axes = axes if split_batch else (None,) + axes[1:]
        spec = PartitionSpec(*((("layers",) if stacked else ()) + axes))
        return NamedSharding(mesh, rules.logical_to_mesh_spec(spec))

    if cfg.scan_layers:
        k, v = place(K_AXES, True), place(V_AXES, True)
    else:
        k = tuple(place(K_AXES, False) for _ in range(cfg.num_layers))
        v = tuple(place(V_AXES, False) for _ in range(cfg.num_layers))
    batch = NamedSharding(mesh, rules.logical_to_mesh_spec(PartitionSpec("batch" if split_batch else None)))
    return KVCache(k=k, v=v, start=batch, index=rules.replicated(mesh), decoding=decoding)
