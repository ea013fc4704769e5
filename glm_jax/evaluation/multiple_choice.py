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

import numpy as np

from glm_jax.config import ModelConfig
from glm_jax.evaluation.samples import ChoiceSample
from glm_jax.evaluation.scoring import Row

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

