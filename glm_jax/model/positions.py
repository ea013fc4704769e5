"""GLM's position ids and Part A lengths, built from token ids by the authors' rules.

``prepare_inputs`` gives what the model takes besides the tokens: positions (1D for
GLM-130B, ``[b, 2, L]`` position / block position rows for ChatGLM-6B and the original
GLM), the Part A length of each example and segment ids for left padding (MODEL.md §1.6
for 1D positions, §2.3 for 2D). What a token may attend to, given those, is the rule in
``glm_jax.kernels.attention_mask``.
"""

from __future__ import annotations

import numpy as np

from glm_jax.config import ModelConfig




def _first(row: np.ndarray, token: int) -> int:
    hits = np.flatnonzero(row == token)
    return int(hits[0]) if hits.size else -1


def _positions_1d(row: np.ndarray, cfg: ModelConfig, sop: int) -> np.ndarray:
    """GLM-130B (MODEL.md §1.6): arange; with [MASK]/[sMASK] every token from <sop> on
    takes the index of the first generation mask ([MASK] before [sMASK])."""
    pos = np.arange(len(row), dtype=np.int32)
    mask_pos = _first(row, cfg.mask_token_id)
    if mask_pos < 0:
        mask_pos = _first(row, cfg.smask_token_id)
    if mask_pos >= 0 and sop >= 0:
        pos[sop:] = mask_pos
    return pos


def _positions_2d(row: np.ndarray, cfg: ModelConfig, sop: int) -> np.ndarray:
    """ChatGLM-6B / original GLM (MODEL.md §2.3): row 0 is arange with every token from
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
    two_d = cfg.two_d_positions
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
