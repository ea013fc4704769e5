"""What the TPU and GPU flash-attention kernels share: static settings and block math.

Each kernel holds one block of queries (rows) against one block of keys (columns) at a
time. The functions here are pure ``jnp`` on those blocks, so Mosaic, Triton and the
interpreter trace the same arithmetic:

* scores ``s = (q_s . k) * c`` in float32, q_s already divided by sqrt(d) * c in the
  compute dtype (the reference's arithmetic, MODEL.md §1.3);
* a partially visible block sets hidden scores to -inf (fully visible blocks skip this);
* online softmax with a finite running-max floor, so a row that has seen no visible key
  yet contributes exp(-inf) = 0 rather than NaN;
* dropout from :mod:`glm_jax.kernels.dropout_hash`, the reference's exact mask.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from glm_jax.kernels import dropout_hash

# Running-max floor: finite, so exp(m_prev - m_next) never sees inf - inf.
M_FLOOR = -1e30
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class Static:
    """Trace-time settings of one kernel call (hashable: a custom_vjp static argument)."""

    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int
    length: int  # the caller's sequence length (the dropout counter's row stride)
    padded: int  # length rounded up to every block size
    heads: int  # global head count (dropout counter)
    dropout_threshold: Optional[int]  # None: no dropout
    dropout_scale: float  # 1 / (1 - rate)
    interpret: bool
    count_visits: bool = False  # also return per-block visit counters (tests, benchmarks)

    @property
    def dropout(self) -> bool:
        return self.dropout_threshold is not None


def cost(batch: int, heads: int, head_dim: int, padded: int, matmuls: int, arrays: int, itemsize: int):
    """What XLA's scheduler is told a kernel costs: FLOPs and exps as if it visited every
    block (an upper bound: the visited share is data-dependent), and each of ``arrays``
    ``[batch, length, heads, head_dim]`` operands moved once."""

    pairs = batch * heads * padded * padded
    return pl.CostEstimate(
        flops=int(2 * matmuls * pairs * head_dim),
        transcendentals=int(pairs),
        bytes_accessed=int(arrays * batch * padded * heads * head_dim * itemsize),
    )


def precision(dtype) -> Optional[lax.Precision]:
    """Full float32 matmuls for float32 inputs (no TF32 / bf16 passes); default otherwise."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def matmul(a: jax.Array, b: jax.Array, dims=NN) -> jax.Array:
    """Float32-accumulated block matmul; ``a`` is cast to ``b``'s dtype first."""
    return lax.dot_general(a.astype(b.dtype), b, dims, preferred_element_type=jnp.float32, precision=precision(b.dtype))


def scores(q: jax.Array, k: jax.Array, scale: jax.Array) -> jax.Array:
    return matmul(q, k, NT) * scale


def visible(keys: jax.Array, lim_q: jax.Array, seg_q: jax.Array, seg_k: jax.Array) -> jax.Array:
    """GLM's rule on a block: key k is visible to query q iff same segment and k < lim[q].
    Arguments broadcast against each other: ``keys`` holds absolute key indices, the
    query-side values vary along the query axis and ``seg_k`` along the key axis."""
    return (keys < lim_q) & (seg_q == seg_k)


def hide(s: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def online_softmax(m_prev: jax.Array, l_prev: jax.Array, s: jax.Array):
    """One step of the running softmax; m, l are ``[rows, 1]``. Returns (m, l, alpha, p)."""
    m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next)
    l_next = alpha * l_prev + p.sum(axis=1, keepdims=True)
    return m_next, l_next, alpha, p


# dparams: (key0, key1, first_row, head_offset, row_stride), padded to a power of two
# (Triton blocks) with zeros.
DROPOUT_PARAMS = 8


def dropout_keep(st: Static, dparams, b, h, q0, k0, shape, *, keys_on_rows: bool = False) -> Optional[jax.Array]:
    """The reference's keep mask for queries q0.. and keys k0.. of (global) batch row
    first_row + row_stride * b, head h + offset; a ``[queries, keys]`` block, or
    ``[keys, queries]`` with keys_on_rows.
    dparams = (key0, key1, first_row, head_offset, row_stride) int32 scalars (the first
    five of the DROPOUT_PARAMS the kernels receive)."""
    if not st.dropout:
        return None
    key0, key1, first_row, h_off, row_stride = dparams
    base_hi, base_lo = dropout_hash.row_base(first_row + row_stride * b, h_off + h, q0, st.heads, st.length)
    queries = lax.broadcasted_iota(jnp.int32, shape, 1 if keys_on_rows else 0)
    keys = lax.broadcasted_iota(jnp.int32, shape, 0 if keys_on_rows else 1)
    offsets = queries * st.length + (keys + k0)
    return dropout_hash.keep_block(key0, key1, base_hi, base_lo, offsets, st.dropout_threshold)


def drop(x: jax.Array, keep: Optional[jax.Array]) -> jax.Array:
    return x if keep is None else jnp.where(keep, x, 0.0)


def bwd_block(st: Static, a, b, da, db, lse, delta, scale, mask, keep):
    """Gradient pieces of one block: (p_dropped, ds), ds = dL/d(a . b^T) with the scale folded in.

    Query rows: a, b, da, db = q, k, dO, v (lse, delta ``[rows, 1]``). Key rows (the
    transposed block): a, b, da, db = k, q, v, dO (lse, delta ``[1, cols]``). p_dropped
    feeds dV, ds feeds dQ and dK.
    """
    s = hide(scores(a, b, scale), mask)
    p = jnp.exp(s - lse)
    dp = matmul(da, db, NT)
    if keep is not None:
        dp = jnp.where(keep, dp * st.dropout_scale, 0.0)
        p_dropped = jnp.where(keep, p * st.dropout_scale, 0.0)
    else:
        p_dropped = p
    ds = p * (dp - delta) * scale
    return p_dropped, ds
