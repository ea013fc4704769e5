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

from glm_jax.convert.hf_write import BinWriter, OutTensor
from glm_jax.convert.sat_layout import Split
from glm_jax.convert.sat_read import rank_file_name
from glm_jax.convert.tensors import np_dtype


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
        """Merged rows ``[start, start + len(rows))`` (whole merged rows; ``rows`` split kinds:
        those rows of the merged tensor; ``cols``: every rank's columns of them)."""
        stop = start + rows.shape[0]
        if self.replicated:
            self._buf(0)[start:stop] = rows
            self._filled(0, stop - start)
        elif self.split.kind == "rows":
            at = 0
            for r, a, b in self.split.row_pieces(self.merged_rows, self.writers.tp, start, stop):
                self._buf(r)[a:b] = rows[at:at + b - a]
                at += b - a
                self._filled(r, b - a)
        elif self.split.kind == "cols":
            width = self.shape[1]
            for r in range(self.writers.tp):
                self._buf(r)[start:stop] = rows[:, r * width:(r + 1) * width]
                self._filled(r, stop - start)
        else:
            raise ValueError(f"{self.key}: add() takes whole merged rows; use put() for {self.split.kind}")

    def put(self, r: int, start: int, rows: np.ndarray) -> None:
        """Rows ``[start, ...)`` of rank ``r``'s shard itself."""
        self._buf(r)[start:start + rows.shape[0]] = rows
        self._filled(r, rows.shape[0])

    def done(self) -> None:
        if self.bufs:
            raise AssertionError(f"{self.key}: shards of ranks {sorted(self.bufs)} were never completed")
