"""Language-modelling tasks as GLM-130B's evaluation lays them out
(``LanguageModelTaskDataset``): perplexity over rolling windows of a document.

With ``M = max_seq_length`` and ``G = generation_length``, window i covers the document's
tokens ``[i * G, i * G + M - 1)``. The first window (every window of a
``unidirectional`` task) scores all its tokens from nothing but the mask; a later window
keeps its first ``M - 1 - G`` tokens as context and scores the remaining (at most ``G``)
tokens. A window's row is ``context [MASK] <sop> text[:-1]``: the context and the mask
are Part A (bidirectional), the rest causal, and ``<sop> text[:-1]`` predict ``text``.
There are ``ceil(max(n - (M - 1), 0) / G) + 1`` windows for n tokens.

Positions: 0, 1, 2, ... over the whole row for 1D models (the authors' code, whichever
mask the task uses); ChatGLM-6B's 2D positions as its own Part B (the mask's index, and
block positions 1, 2, ... from ``<sop>``).

The perplexity is ``exp(min(20, summed loss / the document's word count))``
(``metrics.perplexity``).
"""

from __future__ import annotations

import math

import numpy as np

from glm_jax.config import ModelConfig
from glm_jax.evaluation.samples import Document
from glm_jax.evaluation.scoring import Row


def window_count(n_tokens: int, max_seq_length: int, generation_length: int) -> int:
    return max(math.ceil(max(n_tokens - (max_seq_length - 1), 0) / generation_length) + 1, 1)


def window_rows(doc: Document, cfg: ModelConfig, *, max_seq_length: int, generation_length: int,
                use_task_mask: bool, unidirectional: bool) -> list[Row]:
    """One row per window, reading the tokens the window scores."""
    mask = cfg.gmask_token_id if use_task_mask else cfg.mask_token_id
    rows = []
    for i in range(window_count(len(doc.tokens), max_seq_length, generation_length)):
        tokens = list(doc.tokens[i * generation_length: i * generation_length + max_seq_length - 1])
        if i == 0 or unidirectional:
            context, text = [], tokens
        else:
            keep = max_seq_length - 1 - generation_length
            context, text = tokens[:keep], tokens[keep:]
        if not text:
            continue
        ids = context + [mask, cfg.sop_token_id] + text[:-1]
        division = len(context) + 1
        n = len(ids)
        if cfg.two_d_positions:
            part_b = n - division
            positions = np.concatenate([np.stack([np.arange(division), np.zeros(division)]),
                                        np.stack([np.full(part_b, division - 1), np.arange(1, part_b + 1)])], axis=1)
        else:
            positions = np.arange(n)
        rows.append(Row(np.asarray(ids, np.int32), positions.astype(np.int32), np.ones(n, np.int32), (division,), 0,
                        ((np.arange(division, n), np.asarray(text, np.int32)),)))
    return rows
