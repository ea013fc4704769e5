"""Scoring rows with one forward pass: the sum of log-probabilities of chosen tokens.

A :class:`Row` is one model row (tokens, positions, segments, each segment's Part A
length, the shared context's end) and where to read: per item, (token indices, the ids
they should predict). Multiple-choice tasks read each choice's tokens
(``multiple_choice.py``), language-modelling tasks each window's new tokens
(``language_model.py``). Rows are padded to a multiple of ``TILE`` and batched
``batch_rows`` at a time, so a few compiled programs serve a task; the log-softmax is
read at the chosen (position, id) pairs only, never materialised over the vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from glm_jax.config import ModelConfig

TILE = 32  # rows are padded to a multiple of this, so a few compiled programs serve a task


@dataclasses.dataclass(frozen=True)
class Row:
    """One model row and where to read its choices' scores.

    tokens ``[L]``; positions ``[L]`` or ``[2, L]``; segments ``[L]`` (1 = the context, then
    one per choice block); prefix_len: Part A length of each segment; shared_end: tokens
    seen by every token (0: none); reads: per choice, (token indices, target ids)."""

    tokens: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    prefix_len: tuple[int, ...]
    shared_end: int
    reads: tuple[tuple[np.ndarray, np.ndarray], ...]


def batch(rows: Sequence[Row], cfg: ModelConfig) -> dict:
    """Model inputs for ``rows``, padded to the longest rounded up to TILE, with the
    (position, id) pairs to read: ``read_pos`` / ``read_ids`` ``[b, R]``."""
    longest = max(len(r.tokens) for r in rows)
    length = -(-longest // TILE) * TILE
    n_reads = -(-max(sum(len(ids) for _, ids in r.reads) for r in rows) // TILE) * TILE
    segments_max = max(len(r.prefix_len) for r in rows)
    b = len(rows)
    tokens = np.full((b, length), cfg.pad_token_id, np.int32)
    positions = np.zeros((b, 2, length) if cfg.two_d_positions else (b, length), np.int32)
    segments = np.zeros((b, length), np.int32)
    prefix_len = np.zeros((b, segments_max), np.int32)
    shared = np.zeros((b,), np.int32)
    read_pos = np.zeros((b, n_reads), np.int32)
    read_ids = np.zeros((b, n_reads), np.int32)
    for i, r in enumerate(rows):
        n = len(r.tokens)
        tokens[i, :n], positions[i, ..., :n], segments[i, :n] = r.tokens, r.positions, r.segments
        prefix_len[i, : len(r.prefix_len)] = r.prefix_len
        shared[i] = r.shared_end
        pos = np.concatenate([idx for idx, _ in r.reads])
        ids = np.concatenate([ids for _, ids in r.reads])
        read_pos[i, : len(pos)], read_ids[i, : len(ids)] = pos, ids
    return {"tokens": tokens, "positions": positions, "segment_ids": segments, "prefix_len": prefix_len,
            "shared_end": shared, "read_pos": read_pos, "read_ids": read_ids}


def scores(read_log_probs: np.ndarray, rows: Sequence[Row], greedy: Optional[np.ndarray] = None) -> list[list]:
    """Each row's item scores from the log-probabilities of its reads ``[b, R]`` (in
    ``batch``'s order: item by item), summed in float64; with ``greedy`` ``[b, R]`` (each
    read id is its position's most likely token) ``(score, every read greedy)`` pairs."""
    out = []
    for i, (lp, r) in enumerate(zip(read_log_probs, rows)):
        at, row = 0, []
        for _, ids in r.reads:
            value = float(np.sum(lp[at: at + len(ids)], dtype=np.float64))
            row.append(value if greedy is None else (value, bool(np.all(greedy[i, at: at + len(ids)]))))
            at += len(ids)
        out.append(row)
    return out


def read_log_probs(logits, read_pos, read_ids):
    """``log_softmax(logits)[b, read_pos, read_ids]`` in float32 without materialising the
    ``[b, L, vocab]`` log-probabilities (the picked logits minus their position's
    logsumexp), and whether each read id is its position's most likely token."""
    import jax
    import jax.numpy as jnp

    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [b, L]
    best = jnp.max(logits, axis=-1)  # [b, L]
    rows = jnp.arange(logits.shape[0])[:, None]
    picked = logits[rows, read_pos, read_ids]
    return picked - jnp.take_along_axis(lse, read_pos, axis=1), picked >= jnp.take_along_axis(best, read_pos, axis=1)


class Scorer:
    """Item scores of rows with one model: rows batched ``batch_rows`` at a time through
    one jitted forward pass per padded shape."""

    def __init__(self, cfg: ModelConfig, params, batch_rows: int = 8):
        import jax

        from glm_jax.model import GLM

        self.cfg, self.params, self.batch_rows = cfg, params, batch_rows
        model = GLM(cfg)

        def forward(params, inputs):
            logits = model.apply({"params": params}, inputs["tokens"], inputs["positions"], inputs["prefix_len"],
                                 inputs["segment_ids"], shared_end=inputs["shared_end"])
            return read_log_probs(logits, inputs["read_pos"], inputs["read_ids"])

        self._forward = jax.jit(forward)

    def row_scores(self, rows: Sequence[Row], *, greedy: bool = False) -> list[list]:
        """Per row, each item's summed log-probability (``greedy``: with whether greedy
        decoding would produce the item)."""
        out = []
        for i in range(0, len(rows), self.batch_rows):
            part = list(rows[i: i + self.batch_rows])
            inputs = batch(part + [part[-1]] * (self.batch_rows - len(part)), self.cfg)  # a fixed batch: one program
            lp, top = (np.asarray(x)[: len(part)] for x in self._forward(self.params, inputs))
            out.extend(scores(lp, part, top if greedy else None))
        return out
