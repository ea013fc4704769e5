"""A synthetic GLM task that needs no files: document-level infilling of a copy.

Each row is ``x [gMASK] <sop> x`` with targets ``x <eop>`` on Part B: the model must
learn to copy Part A through attention, so the loss falls quickly when training works.
Row r is a pure function of (seed, r), so batches of any size, in any number of
processes, cut the same stream.
"""

from __future__ import annotations

import numpy as np

from glm_jax.config import ModelConfig
from glm_jax.model.batch import Batch
from glm_jax.model.positions import prepare_inputs


def _special_ids(cfg: ModelConfig) -> list[int]:
    return [getattr(cfg, f) for f in cfg.__dataclass_fields__ if f.endswith("_token_id")]


def copy_batch(cfg: ModelConfig, batch_size: int, seq_len: int, seed: int, step: int, vocab: int = 64) -> Batch:
    """Batch ``step`` of a stream of ``batch_size``-row batches."""
    return copy_rows(cfg, step * batch_size, batch_size, seq_len, seed, vocab)


def copy_rows(cfg: ModelConfig, first_row: int, n_rows: int, seq_len: int, seed: int, vocab: int = 64) -> Batch:
    """Rows ``first_row ..`` of the stream; text tokens are ``vocab`` ordinary ids from 10."""
    specials = set(_special_ids(cfg))
    hi = min([i for i in specials if i > 10] + [cfg.vocab_size, 10 + vocab])  # ordinary ids lie below the specials
    tokens = np.full((n_rows, seq_len), cfg.pad_token_id, np.int32)
    targets = np.zeros((n_rows, seq_len), np.int32)
    weights = np.zeros((n_rows, seq_len), np.float32)
    max_n = max(1, (seq_len - 2) // 2)
    for i in range(n_rows):
        rng = np.random.default_rng([seed, first_row + i])
        n = int(rng.integers(1, max_n + 1))
        x = rng.integers(10, hi, size=n)
        a = n + 1  # Part A: x [gMASK]
        tokens[i, :n] = x
        tokens[i, n] = cfg.gmask_token_id
        tokens[i, a] = cfg.sop_token_id
        tokens[i, a + 1 : a + 1 + n] = x
        targets[i, a : a + n] = x
        targets[i, a + n] = cfg.eop_token_id
        weights[i, a : a + n + 1] = 1.0
    inputs = prepare_inputs(tokens, cfg)
    return Batch(tokens=tokens, positions=inputs["positions"], prefix_len=inputs["prefix_len"], targets=targets,
                 loss_weights=weights)
