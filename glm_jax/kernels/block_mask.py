"""Which blocks of GLM's mask a kernel must visit, from one integer per token.

The rule (``glm_jax.kernels.attention_mask``): key k is visible to query q iff
``seg[k] == seg[q] and k < lim[q]`` with ``lim[q] = max(part_a_end[q], q + 1)``.

When every segment id occupies one contiguous run of tokens (what packing and padding
produce), the keys q sees form one interval ``[lo[q], hi[q])`` = [start of q's run,
min(lim[q], end of q's run)). Since ``lo[q + 1] <= q + 1 <= hi[q]``, the union over a
block of queries is an interval too, so per query block the key blocks to visit are one
contiguous range, and the fully visible ones another:

    visit  [lo_min // bk, ceil(hi_max / bk))       exactly the non-empty blocks
    full   [ceil(lo_max / bk), hi_min // bk)       exactly the fully visible blocks

A row whose segment ids repeat after another segment (not a run) gets the conservative
``lo = 0, hi = lim`` and no full blocks: the kernel then evaluates the mask on every block
it visits, which is always correct. Ranges per key block (for the dK/dV pass) come from
the per-block classification, a ``[batch, q_blocks, kv_blocks]`` array: tiny next to L x L.

All of this is O(batch * length) work in XLA before the kernel runs; no L x L mask exists.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.kernels import attention_mask

# Segment id of the rows a kernel appends to reach a multiple of its block size: never
# equal to a caller's id, so real queries never see them.
PAD_SEGMENT = np.int32(np.iinfo(np.int32).min)

EMPTY, PARTIAL, FULL = 0, 1, 2


class TokenMask(NamedTuple):
    """Per-token mask data of a length-padded batch, all ``[batch, padded_length]`` int32."""

    lim: jax.Array  # q sees keys k < lim[q] of its own segment
    seg: jax.Array  # segment id (PAD_SEGMENT on the appended rows)
    lo: jax.Array  # first key q may see
    hi: jax.Array  # one past the last key q may see
    runs: jax.Array  # [batch] bool: every segment id is one contiguous run


def token_mask(part_a_end: jax.Array, segment_ids: Optional[jax.Array], padded_length: int) -> TokenMask:
    part_a_end = jnp.asarray(part_a_end, jnp.int32)
    b, length = part_a_end.shape
    pad = padded_length - length
    if pad < 0:
        raise ValueError(f"padded_length {padded_length} is shorter than the sequence ({length})")
    seg = jnp.zeros((b, length), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)
    part_a_end = jnp.pad(part_a_end, ((0, 0), (0, pad)))
    idx = jnp.arange(padded_length, dtype=jnp.int32)[None, :]
    lim = jnp.maximum(part_a_end, idx + 1)

    new_run = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    run_ends = jnp.concatenate([seg[:, 1:] != seg[:, :-1], jnp.ones((b, 1), bool)], axis=1)
    run_start = jax.lax.cummax(jnp.where(new_run, idx, 0), axis=1)
    run_end = jax.lax.cummin(jnp.where(run_ends, idx + 1, padded_length), axis=1, reverse=True)
    runs = _one_run_per_id(seg[:, :length], new_run[:, :length])

    lo = jnp.where(runs[:, None], run_start, 0)
    # A real query never sees the appended keys (their segment is PAD_SEGMENT), and Part A
    # may be given as ending past the sequence.
    hi = jnp.where(runs[:, None], jnp.minimum(lim, run_end), jnp.minimum(lim, jnp.where(idx < length, length, padded_length)))
    return TokenMask(lim=lim, seg=seg, lo=lo, hi=hi, runs=runs)


def _one_run_per_id(seg: jax.Array, new_run: jax.Array) -> jax.Array:
    """[batch] bool: no segment id starts two runs. Run starts are counted per bucket
    ``id mod (length + 1)`` (a scatter-add: cheaper than sorting, which TPUs compile slowly);
    ids in [0, length] never share a bucket, and a shared bucket only makes the answer
    False, the safe direction."""
    buckets = seg.shape[1] + 1

    def row(ids, starts):
        return jnp.zeros((buckets,), jnp.int32).at[jnp.remainder(ids, buckets)].add(starts.astype(jnp.int32))

    return (jax.vmap(row)(seg, new_run) <= 1).all(axis=1)


def q_block_ranges(tm: TokenMask, block_q: int, block_kv: int) -> jax.Array:
    """``[batch, q_blocks, 4]`` int32 per query block: (visit_lo, visit_hi, full_lo, full_hi),
    key-block ranges with visit_lo <= full_lo <= full_hi <= visit_hi."""
    b, n = tm.lo.shape
    lo = tm.lo.reshape(b, n // block_q, block_q)
    hi = tm.hi.reshape(b, n // block_q, block_q)
    visit_lo = lo.min(-1) // block_kv
    visit_hi = -(-hi.max(-1) // block_kv)
    full_lo = -(-lo.max(-1) // block_kv)
    full_hi = hi.min(-1) // block_kv
    full_hi = jnp.where(tm.runs[:, None], full_hi, full_lo)
    full_lo = jnp.clip(full_lo, visit_lo, visit_hi)
    full_hi = jnp.clip(full_hi, full_lo, visit_hi)
    return jnp.stack([visit_lo, visit_hi, full_lo, full_hi], axis=-1).astype(jnp.int32)


def classes(ranges: jax.Array, n_other: int) -> jax.Array:
    """``[batch, n, n_other]`` int8 EMPTY / PARTIAL / FULL from per-block ranges."""
    j = jnp.arange(n_other, dtype=jnp.int32)
    r = ranges[..., None]
    visit = (r[:, :, 0] <= j) & (j < r[:, :, 1])
    full = (r[:, :, 2] <= j) & (j < r[:, :, 3])
    return jnp.where(full, FULL, jnp.where(visit, PARTIAL, EMPTY)).astype(jnp.int8)


def _first(flags: jax.Array, default: jax.Array) -> jax.Array:
    return jnp.where(flags.any(-1), jnp.argmax(flags, axis=-1), default).astype(jnp.int32)


def kv_block_ranges(tm: TokenMask, block_q: int, block_kv: int) -> jax.Array:
    """``[batch, kv_blocks, 4]`` int32 per key block: query-block ranges (visit_lo, visit_hi,
    full_lo, full_hi) for a pass that holds a key block and walks the queries."""
    n = tm.lo.shape[1]
    nq, nk = n // block_q, n // block_kv
    cls = jnp.swapaxes(classes(q_block_ranges(tm, block_q, block_kv), nk), 1, 2)  # [b, nk, nq]
    visit, full = cls != EMPTY, cls == FULL
    visit_lo = _first(visit, jnp.int32(0))
    visit_hi = nq - _first(visit[..., ::-1], jnp.int32(nq))
    full_lo = _first(full, visit_lo)
    i = jnp.arange(nq, dtype=jnp.int32)
    full_hi = _first((i >= full_lo[..., None]) & ~full, jnp.int32(nq))
    full_hi = jnp.where(full.any(-1), full_hi, full_lo)
    full_lo = jnp.clip(full_lo, visit_lo, visit_hi)
    full_hi = jnp.clip(full_hi, full_lo, visit_hi)
    return jnp.stack([visit_lo, visit_hi, full_lo, full_hi], axis=-1).astype(jnp.int32)


def dense_classes(
    part_a_end: jax.Array, segment_ids: Optional[jax.Array], block_q: int, block_kv: int, padded_length: int
) -> jax.Array:
    """EMPTY / PARTIAL / FULL per block from the dense L x L mask (tests and small checks only)."""
    vis = attention_mask.dense_visibility(jnp.asarray(part_a_end, jnp.int32), segment_ids)
    b, n, _ = vis.shape
    nq, nk = padded_length // block_q, padded_length // block_kv
    pad = padded_length - n
    vis = jnp.pad(vis, ((0, 0), (0, pad), (0, pad)))
    # The appended rows see each other causally, the kernels' padding rule.
    idx = jnp.arange(padded_length)
    vis = vis | ((idx[:, None] >= n) & (idx[None, :] >= n) & (idx[None, :] <= idx[:, None]))[None]
    blocks = vis.reshape(b, nq, block_q, nk, block_kv)
    any_, all_ = blocks.any((2, 4)), blocks.all((2, 4))
    return jnp.where(all_, FULL, jnp.where(any_, PARTIAL, EMPTY)).astype(jnp.int8)


def kept_pairs(tm: TokenMask, length: int) -> jax.Array:
    """``[batch]`` number of visible (query, key) pairs among the first ``length`` tokens;
    exact when segments are runs (an upper bound otherwise)."""
    return (tm.hi - tm.lo)[:, :length].astype(jnp.float32).sum(axis=1)


def visit_fraction(ranges: jax.Array, n_other: int) -> tuple[float, float]:
    """(visited, fully visible) shares of all blocks, from per-block ranges."""
    r = np.asarray(ranges).astype(np.int64)
    total = r.shape[0] * r.shape[1] * n_other
    return float((r[..., 1] - r[..., 0]).sum() / total), float((r[..., 3] - r[..., 2]).sum() / total)
