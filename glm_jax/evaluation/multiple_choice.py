"""Multiple-choice scoring as GLM-130B's evaluation lays it out (``MultiChoiceTaskDataset``).

A sample's row is its context, then ``[MASK]`` (``[gMASK]`` with ``use_task_mask``; none
added when the context already holds the mask: blank filling), then for each choice
``<sop> choice[:-1]``. The context and the mask are Part A, seen by every token; each
choice's tokens see the context and the earlier tokens of their own choice only. A
choice's score is the sum of its tokens' log-probabilities, read where ``<sop> choice[:-1]``
predict them. When every choice is one token the authors add a single ``<sop>`` and read
each choice's probability there.

Positions follow the authors: the context counts 0, 1, ...; a choice's tokens take the
mask's index (``[MASK]``), or count on from the end of the context (``[gMASK]``), each
choice starting again. With ChatGLM-6B's 2D positions a choice takes the mask's index
and block positions 1, 2, ..., as the model's own Part B does.

The packed row is evaluated with the model's shared-context mask (``shared_end``: the
context in a segment of its own, each choice in another); :func:`alone_rows` lays each
choice out in a row of its own with the plain GLM mask, the reference the packed scores
must equal.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from glm_jax.config import ModelConfig
from glm_jax.evaluation.samples import ChoiceSample

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


def _context(sample: ChoiceSample, cfg: ModelConfig, use_task_mask: bool) -> tuple[list[int], int]:
    mask = cfg.gmask_token_id if use_task_mask else cfg.mask_token_id
    tokens = list(sample.context)
    if mask in tokens:
        return tokens, tokens.index(mask)
    return tokens + [mask], len(tokens)


def _block_positions(cfg: ModelConfig, n: int, division: int, mask_position: int, use_task_mask: bool) -> np.ndarray:
    if cfg.two_d_positions:
        return np.stack([np.full(n, mask_position), np.arange(1, n + 1)]).astype(np.int32)
    if use_task_mask:
        return np.arange(division, division + n, dtype=np.int32)
    return np.full(n, mask_position, np.int32)


def _context_positions(cfg: ModelConfig, n: int) -> np.ndarray:
    if cfg.two_d_positions:
        return np.stack([np.arange(n), np.zeros(n)]).astype(np.int32)
    return np.arange(n, dtype=np.int32)


def _blocks(sample: ChoiceSample) -> tuple[list[tuple[int, ...]], bool]:
    single = all(len(c) == 1 for c in sample.choices)
    return ([sample.choices[0]] if single else list(sample.choices)), single


def packed_row(sample: ChoiceSample, cfg: ModelConfig, use_task_mask: bool) -> Row:
    """Every choice of ``sample`` in one row (the authors' layout)."""
    context, mask_position = _context(sample, cfg, use_task_mask)
    division = len(context)
    blocks, single = _blocks(sample)
    tokens, positions, segments = [context], [_context_positions(cfg, division)], [np.ones(division, np.int32)]
    at, starts = division, []
    for i, choice in enumerate(blocks):
        n = len(choice)
        tokens.append([cfg.sop_token_id, *choice[:-1]])
        positions.append(_block_positions(cfg, n, division, mask_position, use_task_mask))
        segments.append(np.full(n, i + 2, np.int32))
        starts.append(at)
        at += n
    if single:
        reads = tuple((np.asarray([starts[0]]), np.asarray(c)) for c in sample.choices)
    else:
        reads = tuple((np.arange(s, s + len(c)), np.asarray(c)) for s, c in zip(starts, sample.choices))
    return Row(np.asarray(sum(tokens, []), np.int32), np.concatenate(positions, axis=-1), np.concatenate(segments),
               (division,) + (0,) * len(blocks), division, reads)


def alone_rows(sample: ChoiceSample, cfg: ModelConfig, use_task_mask: bool) -> list[Row]:
    """Each choice in a row of its own (``context [MASK] <sop> choice[:-1]``, the plain mask)."""
    context, mask_position = _context(sample, cfg, use_task_mask)
    division = len(context)
    rows = []
    for choice in sample.choices:
        n = len(choice)
        positions = np.concatenate([_context_positions(cfg, division),
                                    _block_positions(cfg, n, division, mask_position, use_task_mask)], axis=-1)
        rows.append(Row(np.asarray(context + [cfg.sop_token_id, *choice[:-1]], np.int32), positions,
                        np.ones(division + n, np.int32), (division,), 0,
                        ((np.arange(division, division + n), np.asarray(choice)),)))
    return rows


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


def scores(read_log_probs: np.ndarray, rows: Sequence[Row]) -> list[list[float]]:
    """Each row's choice scores from the log-probabilities of its reads ``[b, R]`` (in
    ``batch``'s order: choice by choice), summed in float64."""
    out = []
    for lp, r in zip(read_log_probs, rows):
        at, row = 0, []
        for _, ids in r.reads:
            row.append(float(np.sum(lp[at: at + len(ids)], dtype=np.float64)))
            at += len(ids)
        out.append(row)
    return out


def read_log_probs(logits, read_pos, read_ids):
    """``log_softmax(logits)[b, read_pos, read_ids]`` in float32 without materialising the
    ``[b, L, vocab]`` log-probabilities: the picked logits minus their position's logsumexp."""
    import jax
    import jax.numpy as jnp

    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [b, L]
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits[rows, read_pos, read_ids] - jnp.take_along_axis(lse, read_pos, axis=1)


class Scorer:
    """Choice scores of samples with one model: rows batched ``batch_rows`` at a time through
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

    def row_scores(self, rows: Sequence[Row]) -> list[list[float]]:
        out = []
        for i in range(0, len(rows), self.batch_rows):
            part = list(rows[i: i + self.batch_rows])
            inputs = batch(part + [part[-1]] * (self.batch_rows - len(part)), self.cfg)  # a fixed batch: one program
            out.extend(scores(np.asarray(self._forward(self.params, inputs))[: len(part)], part))
        return out

    def sample_scores(self, samples: Sequence[ChoiceSample], use_task_mask: bool) -> list[list[float]]:
        """Each sample's choice scores, from its packed row."""
        return self.row_scores([packed_row(s, self.cfg, use_task_mask) for s in samples])
