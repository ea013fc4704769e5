"""GLM's attention visibility and position ids.

The mask is never an L x L tensor passed between callers. Callers give, per example,
the Part A length (``prefix_len``) and, for packed sequences, ``segment_ids``; attention
implementations derive visibility from one integer per token:

    part_a_end[b, q] = absolute index one past the Part A of q's segment
    visible(q, k)    = seg[q] == seg[k] and (k < part_a_end[q] or k <= q)

so Part A is bidirectional, Part B (from ``<sop>`` on) is causal and sees all of Part A,
and packed segments never see each other. Segment id 0 marks padding.

``prepare_inputs`` builds positions and Part A lengths from token ids exactly as the
authors' inference code does (GLM_SPEC §1.6 for 1D positions, §2.3 for 2D).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.config import ModelConfig


def part_a_end(prefix_len: jax.Array, segment_ids: Optional[jax.Array], length: int) -> jax.Array:
    """Per-token end of its segment's Part A, ``[batch, length]`` int32.

    prefix_len: ``[batch]`` (no segment ids: one sequence per row) or ``[batch, S]``,
      the Part A length of segment s+1 relative to that segment's first token.
    segment_ids: ``[batch, length]`` or None; 0 is padding (Part A length 0).
    """
    prefix_len = jnp.asarray(prefix_len, jnp.int32)
    if segment_ids is None:
        if prefix_len.ndim != 1:
            raise ValueError(f"prefix_len must be [batch] without segment_ids, got shape {prefix_len.shape}")
        return jnp.broadcast_to(prefix_len[:, None], (prefix_len.shape[0], length))
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if prefix_len.ndim == 1:
        prefix_len = prefix_len[:, None]
    idx = jnp.arange(length, dtype=jnp.int32)[None, :]
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    starts = jnp.where(segment_ids != prev, idx, 0)
    seg_start = jax.lax.cummax(starts, axis=1)
    seg_index = jnp.clip(segment_ids - 1, 0, prefix_len.shape[1] - 1)
    plen = jnp.take_along_axis(prefix_len, seg_index, axis=1)
    plen = jnp.where(segment_ids > 0, plen, 0)
    return seg_start + plen


def visible(
    q_index: jax.Array,
    k_index: jax.Array,
    part_a_end_q: jax.Array,
    segment_q: Optional[jax.Array],
    segment_k: Optional[jax.Array],
) -> jax.Array:
    """Elementwise visibility rule; broadcasting decides the block shape."""
    ok = (k_index < part_a_end_q) | (k_index <= q_index)
    if segment_q is not None:
        ok = ok & (segment_q == segment_k)
    return ok


def dense_visibility(part_a_end_: jax.Array, segment_ids: Optional[jax.Array]) -> jax.Array:
    """``[batch, q, k]`` boolean, True where q may attend to k (for the XLA reference only)."""
    b, length = part_a_end_.shape
    q = jnp.arange(length, dtype=jnp.int32)[None, :, None]
    k = jnp.arange(length, dtype=jnp.int32)[None, None, :]
    seg_q = None if segment_ids is None else segment_ids[:, :, None]
    seg_k = None if segment_ids is None else segment_ids[:, None, :]
    return visible(q, k, part_a_end_[:, :, None], seg_q, seg_k)


# ---------------------------------------------------------------------------
# Positions and Part A lengths from token ids (host side, numpy).


def _first(row: np.ndarray, token: int) -> int:
    hits = np.flatnonzero(row == token)
    return int(hits[0]) if hits.size else -1


def _positions_1d(row: np.ndarray, cfg: ModelConfig, sop: int) -> np.ndarray:
    """GLM-130B (GLM_SPEC §1.6): arange; with [MASK]/[sMASK] every token from <sop> on
    takes the index of the first generation mask ([MASK] before [sMASK])."""
    pos = np.arange(len(row), dtype=np.int32)
    mask_pos = _first(row, cfg.mask_token_id)
    if mask_pos < 0:
        mask_pos = _first(row, cfg.smask_token_id)
    if mask_pos >= 0 and sop >= 0:
        pos[sop:] = mask_pos
    return pos


def _positions_2d(row: np.ndarray, cfg: ModelConfig, sop: int) -> np.ndarray:
    """ChatGLM-6B / original GLM (GLM_SPEC §2.3): row 0 is arange with every token from
    <sop> on set to the [gMASK] index (else [MASK]); row 1 is 0 on Part A, 1, 2, ... after."""
    n = len(row)
    pos = np.arange(n, dtype=np.int32)
    block = np.zeros(n, dtype=np.int32)
    mask_pos = _first(row, cfg.gmask_token_id)
    if mask_pos < 0:
        mask_pos = _first(row, cfg.mask_token_id)
    if sop >= 0:
        if mask_pos >= 0:
            pos[sop:] = mask_pos
        block[sop:] = np.arange(1, n - sop + 1, dtype=np.int32)
    return np.stack([pos, block])


def prepare_inputs(tokens, cfg: ModelConfig) -> dict:
    """Positions, Part A lengths and (for left-padded batches) segment ids for ``tokens``.

    tokens: ``[batch, seq]`` ints. Leading ``pad_token_id`` tokens are left padding
    (as ChatGLM's tokenizer pads); the real tokens are laid out as if unpadded.
    Part A is everything before the first ``<sop>`` (the whole row if there is none).

    Returns a dict with ``positions`` (``[b, L]`` or ``[b, 2, L]`` by the config's
    position encoding), ``prefix_len`` and ``segment_ids`` (None without padding; with
    padding, pads are segment 0, tokens segment 1 and ``prefix_len`` is ``[b, 1]``).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    b, n = tokens.shape
    two_d = cfg.position_encoding in ("rotary_2d", "learned_2d")
    positions = np.zeros((b, 2, n) if two_d else (b, n), np.int32)
    prefix_len = np.zeros((b,), np.int32)
    segment_ids = np.ones((b, n), np.int32)
    for i, full in enumerate(tokens):
        n_pad = 0
        while n_pad < n and full[n_pad] == cfg.pad_token_id:
            n_pad += 1
        row = full[n_pad:]
        segment_ids[i, :n_pad] = 0
        sop = _first(row, cfg.sop_token_id)
        prefix_len[i] = sop if sop >= 0 else len(row)
        if two_d:
            positions[i, :, n_pad:] = _positions_2d(row, cfg, sop)
        else:
            positions[i, n_pad:] = _positions_1d(row, cfg, sop)
    if (segment_ids == 1).all():
        return {"positions": positions, "prefix_len": prefix_len, "segment_ids": None}
    return {"positions": positions, "prefix_len": prefix_len[:, None], "segment_ids": segment_ids}
