"""Writing a tensor-parallel SAT checkpoint: every rank's file at once, tensor by tensor.

All ``tp`` rank files are open together (``glm_jax.convert.hf_write.BinWriter``: the
pickle of ``{"module": state_dict, ...}`` first, then one storage record per tensor), so
each merged tensor is read from the glm_jax checkpoint once: its blocks of merged rows
are shared out to the ranks' shard buffers by the split rules of
``glm_jax.convert.sat_layout``, and each shard is written and freed as soon as it is
complete. Memory is one shard for tensors split by rows and one merged tensor for
those split by columns (every shard completes with the last block).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np

from glm_jax.convert.blocks import Block, joined_axis, permuted, piece_split
from glm_jax.convert.hf_write import BinWriter, OutTensor
from glm_jax.checkpoint.authors_layout import Transform
from glm_jax.convert.sat_layout import Split
from glm_jax.convert.sat_read import rank_file_name
from glm_jax.convert.tensors import np_dtype, to_torch


class RankWriters:
    """The ``tp`` rank files of one iteration directory, written together."""

    def __init__(self, step_dir: str, tp: int, tensors: Sequence[OutTensor], wrap: Callable[[dict, int], Any]):
        os.makedirs(step_dir, exist_ok=True)
        self.files = [BinWriter(os.path.join(step_dir, rank_file_name(r)), tensors, lambda sd, r=r: wrap(sd, r))
                      for r in range(tp)]
        self.tp = tp

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> "RankWriters":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:  # an error: finish every rank file now (BinWriter.abort)
            for f in self.files:
                f.abort()


class Shards:
    """One tensor's per-rank buffers, filled from blocks of merged rows and written to
    each rank's file as soon as that rank's shard is complete."""

    def __init__(self, writers: RankWriters, key: str, split: Split, merged_shape: tuple[int, ...], dtype: str):
        self.writers, self.key, self.split = writers, key, split
        self.merged_rows = merged_shape[-1] if split.kind == "stacked" else merged_shape[0]
        self.shape = split.shard_shape(merged_shape, writers.tp)
        self.dtype = np_dtype(dtype)
        self.bufs: dict[int, np.ndarray] = {}
        self.filled = [0] * writers.tp
        self.rows = self.shape[0] if self.shape else 1
        self.replicated = split.kind == "replicated"

    def _buf(self, r: int) -> np.ndarray:
        if r not in self.bufs:
            self.bufs[r] = np.empty(self.shape, self.dtype)
        return self.bufs[r]

    def _filled(self, r: int, n: int) -> None:
        self.filled[r] += n
        if self.filled[r] == self.rows:
            if self.replicated:
                for f in self.writers.files:
                    f.write(self.key, self.bufs[r])
            else:
                self.writers.files[r].write(self.key, self.bufs[r])
            del self.bufs[r]

    def add(self, start: int, rows: np.ndarray) -> None:
        """Merged rows ``[start, start + len(rows))`` of a tensor split by rows, as an array."""
        if self.split.kind != "rows":
            raise ValueError(f"{self.key}: add() shares out rows; a {self.split.kind} tensor takes add_box() or put()")
        stop, at = start + rows.shape[0], 0
        for r, a, b in self.split.row_pieces(self.merged_rows, self.writers.tp, start, stop):
            self._buf(r)[a:b] = rows[at:at + b - a]
            at += b - a
            self._filled(r, b - a)

    def add_box(self, t: Transform, b: Block, box) -> None:
        """Block ``b`` given as its box of our layout (a torch tensor): each rank's share is
        permuted straight into that rank's buffer (``blocks.piece_split``)."""
        start, stop = b.row_start, b.row_stop
        back = t.inverse_perm
        if self.replicated:
            split, _ = piece_split(t, b, to_torch(self._buf(0)[start:stop]), 0)
            split.copy_(permuted(box, back))
            self._filled(0, stop - start)
        elif self.split.kind == "rows":
            axis, at = t.perm.index(joined_axis(t, 0)), 0
            for r, lo, hi in self.split.row_pieces(self.merged_rows, self.writers.tp, start, stop):
                split, n = piece_split(t, b, to_torch(self._buf(r)[lo:hi]), 0)
                split.copy_(permuted(box.narrow(axis, at, n), back))
                at += n
                self._filled(r, hi - lo)
        elif self.split.kind == "cols":
            axis = t.perm.index(joined_axis(t, 1))
            for r in range(self.writers.tp):
                split, n = piece_split(t, b, to_torch(self._buf(r)[start:stop]), 1)
                split.copy_(permuted(box.narrow(axis, r * n, n), back))
                self._filled(r, stop - start)
        else:
            raise ValueError(f"{self.key}: add_box() takes whole merged rows, not a {self.split.kind} tensor")

    def put(self, r: int, start: int, rows: np.ndarray) -> None:
        """Rows ``[start, ...)`` of rank ``r``'s shard itself."""
        self._buf(r)[start:start + rows.shape[0]] = rows
        self._filled(r, rows.shape[0])

    def done(self) -> None:
        if self.bufs:
            raise AssertionError(f"{self.key}: shards of ranks {sorted(self.bufs)} were never completed")
