"""Scoring rows with one forward pass: the sum of log-probabilities of chosen tokens.

A :class:`Row` is one model row (tokens, positions, segments, each segment's Part A
length, the shared context's end) and where to read: per item, (token indices, the ids
they should predict). Multiple-choice tasks read each choice's tokens
(``multiple_choice.py``), language-modelling tasks each window's new tokens
(``language_model.py``). Rows are padded to a multiple of ``TILE`` and batched
``batch_rows`` at a time, so a few compiled programs serve a task. The vocabulary head
runs only on the hidden states of the read positions, ``READ_CHUNK`` of them at a time,
and the log-softmax is read at the chosen ids inside the step: no ``[rows, length,
vocab]`` logits exist, so 2048-token windows of a 150k-vocabulary model fit.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from glm_jax.config import ModelConfig
from glm_jax.parallel import rules

TILE = 32  # rows are padded to a multiple of this, so a few compiled programs serve a task
# The vocabulary head runs on the read positions' hidden states only, this many at a time:
# a chunk's logits are [rows, READ_CHUNK, vocab] (1.2 GB for 8 rows of GLM-130B's 150k
# vocabulary in float32), never [rows, length, vocab].
READ_CHUNK = 256


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
    if n_reads > READ_CHUNK:  # the head runs READ_CHUNK reads at a time
        n_reads = -(-n_reads // READ_CHUNK) * READ_CHUNK
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


def scores(log_probs: np.ndarray, rows: Sequence[Row], greedy: Optional[np.ndarray] = None) -> list[list]:
    """Each row's item scores from the log-probabilities of its reads ``[b, R]`` (in
    ``batch``'s order: item by item), summed in float64; with ``greedy`` ``[b, R]`` (each
    read id is its position's most likely token) ``(score, every read greedy)`` pairs."""
    out = []
    for i, (lp, r) in enumerate(zip(log_probs, rows)):
        at, row = 0, []
        for _, ids in r.reads:
            value = float(np.sum(lp[at: at + len(ids)], dtype=np.float64))
            row.append(value if greedy is None else (value, bool(np.all(greedy[i, at: at + len(ids)]))))
            at += len(ids)
        out.append(row)
    return out


def read_log_probs(logits, read_ids):
    """``log_softmax(logits)`` at ``read_ids`` (``logits [b, R, vocab]``, ``read_ids [b, R]``),
    float32, as the picked logit minus the logsumexp, and whether each read id is the most
    likely token."""
    import jax
    import jax.numpy as jnp

    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, read_ids[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1), picked >= jnp.max(logits, axis=-1)


class Scorer:
    """Item scores of rows with one model: rows batched ``batch_rows`` at a time through
    one jitted forward pass per padded shape. With ``mesh`` (the parameters placed on it,
    as ``glm_jax.load(..., mesh=)`` places them) the rows are split over its ``data`` axis
    and heads and MLP over ``model``, by the logical-axis rules; ``batch_rows`` is rounded
    up to a multiple of the data axis."""

    def __init__(self, cfg: ModelConfig, params, batch_rows: int = 8, mesh=None):
        import jax
        import jax.numpy as jnp

        from glm_jax.model import GLM

        if mesh is not None:
            data = mesh.shape.get("data", 1)
            batch_rows = -(-batch_rows // data) * data
        self.cfg, self.params, self.batch_rows, self.mesh = cfg, params, batch_rows, mesh
        model = GLM(cfg)

        def forward(params, inputs):
            hidden = model.apply({"params": params}, inputs["tokens"], inputs["positions"], inputs["prefix_len"],
                                 inputs["segment_ids"], shared_end=inputs["shared_end"], return_hidden=True)
            read = jnp.take_along_axis(hidden, inputs["read_pos"][..., None], axis=1)  # [b, R, hidden]
            b, r, d = read.shape
            chunk = min(r, READ_CHUNK)

            def head(part):
                h, ids = part
                return read_log_probs(model.apply({"params": params}, h, method=GLM.head), ids)

            lp, top = jax.lax.map(head, (read.reshape(b, r // chunk, chunk, d).swapaxes(0, 1),
                                         inputs["read_ids"].reshape(b, r // chunk, chunk).swapaxes(0, 1)))
            return lp.swapaxes(0, 1).reshape(b, r), top.swapaxes(0, 1).reshape(b, r)

        self._forward = jax.jit(forward)

    def row_scores(self, rows: Sequence[Row], *, greedy: bool = False) -> list[list]:
        """Per row, each item's summed log-probability (``greedy``: with whether greedy
        decoding would produce the item)."""
        import jax

        out = []
        for i in range(0, len(rows), self.batch_rows):
            part = list(rows[i: i + self.batch_rows])
            inputs = batch(part + [part[-1]] * (self.batch_rows - len(part)), self.cfg)  # a fixed batch: one program
            with rules.mesh_context(self.mesh):
                if self.mesh is not None:
                    inputs = {k: jax.device_put(v, rules.batch_sharding(self.mesh, v.ndim)) for k, v in inputs.items()}
                lp, top = (np.asarray(x)[: len(part)] for x in self._forward(self.params, inputs))
            out.extend(scores(lp, part, top if greedy else None))
        return out
