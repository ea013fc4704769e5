"""The KV cache: every layer's post-rotary keys and values, one slot per token.

``k`` and ``v`` are ``[layers, batch, slots, heads, head_dim]``. A batch of prompts is
left-padded to one length (as ChatGLM's tokenizer pads), so every example writes the
same slot at each step: ``index`` is where the next call's first token goes, and
``start[b]`` is example b's first real slot (its padding count). The model stores
keys after rotary, so a cached key never depends on later positions.

The model (``glm_jax.model.attention``) calls :meth:`KVCache.write` and
:meth:`KVCache.layer`; :func:`allocate` makes an empty cache and :func:`sharding`
places one on a mesh through the logical-axis rules.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glm_jax.config import ModelConfig

# Logical axes of k and v (glm_jax.parallel.rules maps them to mesh axes).
LOGICAL_AXES = ("layers", "batch", "length", "act_heads", None)


@flax.struct.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array
    start: jax.Array  # [batch] int32: first real slot of each example
    index: jax.Array  # [] int32: slot of the first token of the next model call
    # False: the call is a prefill (GLM mask among its own tokens); True: its tokens are
    # Part B continuing the cached sequence (kernels/decode.py).
    decoding: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def write(self, layer, k: jax.Array, v: jax.Array) -> "KVCache":
        """Store one layer's ``[batch, L, heads, head_dim]`` keys and values at ``index``."""
        at = (layer, 0, self.index, 0, 0)
        return self.replace(
            k=lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), at),
            v=lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), at),
        )

    def layer(self, layer) -> tuple[jax.Array, jax.Array]:
        """One layer's ``[batch, slots, heads, head_dim]`` keys and values."""
        return (
            lax.dynamic_index_in_dim(self.k, layer, axis=0, keepdims=False),
            lax.dynamic_index_in_dim(self.v, layer, axis=0, keepdims=False),
        )

    def advance(self, n) -> "KVCache":
        """The cache for the next call: ``n`` more slots filled, decoding from now on."""
        return self.replace(index=self.index + n, decoding=True)


def allocate(cfg: ModelConfig, batch: int, slots: int, start, dtype=None) -> KVCache:
    """An empty cache of ``slots`` slots (keys and values in the compute dtype by default)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch, slots, cfg.num_heads, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        start=jnp.asarray(start, jnp.int32).reshape(batch),
        index=jnp.zeros((), jnp.int32),
    )


def nbytes(cfg: ModelConfig, batch: int, slots: int, dtype=None) -> int:
    """Bytes of keys and values for ``batch`` x ``slots`` tokens."""
    per = cfg.num_layers * cfg.num_heads * cfg.head_dim * jnp.dtype(dtype or cfg.dtype).itemsize
    return 2 * per * batch * slots


def sharding(mesh: Mesh, decoding: bool = False) -> KVCache:
    """Where a cache lives on ``mesh``: batch over the data axis, heads over the model axis."""
    from glm_jax.parallel import rules

    kv = NamedSharding(mesh, rules.logical_to_mesh_spec(PartitionSpec(*LOGICAL_AXES)))
    batch = NamedSharding(mesh, rules.logical_to_mesh_spec(PartitionSpec("batch")))
    return KVCache(k=kv, v=kv, start=batch, index=rules.replicated(mesh), decoding=decoding)
