"""Reading a glm_jax checkpoint back as the authors' rows, one block at a time.

The exporters (to-hf, to-sat) open a params directory or a training workdir through
``glm_jax.checkpoint.params`` (which checks every leaf against the config) and stream
each authors' tensor as runs of rows: one stored chunk per read where the chunks allow it, a few
reads in flight so decoding overlaps the permutes.
"""

from __future__ import annotations

import collections
from typing import Iterator, Optional

import numpy as np

from glm_jax.checkpoint import authors_layout, directory, params
from glm_jax.config import ModelConfig
from glm_jax.convert import blocks as blk
from glm_jax.convert.tensors import to_numpy, to_torch, torch_dtype
from glm_jax.errors import UnreadableCheckpoint, one_line

READ_AHEAD = 4


def open_source(src: str, step: Optional[int] = None) -> params.StoredParams:
    """The parameters of a params directory or a training workdir (at ``step``, default
    the newest checkpoint), checked leaf by leaf against its config.yaml."""
    return params.open_params(directory.resolve(src, step))


def _read_units(t: authors_layout.Transform, chunks: tuple[int, ...], stacked: bool) -> int:
    """Blocks that match the stored chunks (one chunk per read), else whole tensors."""
    ours = tuple(chunks[1:]) if stacked else tuple(chunks)
    units = ours[t.perm.index(t.block_axis)]
    if blk.chunk_shape(t, units) == ours:
        return units
    return t.split[t.block_axis]


def ours_blocks(e: authors_layout.Entry, arr, cfg: ModelConfig, where: str = "") -> Iterator[tuple[blk.Block, object]]:
    """``e``'s tensor as (block, its box of our layout as a torch tensor), in the authors' row
    order, a few reads in flight. A read that fails (a damaged checkpoint) is a
    CheckpointError naming ``where`` and the parameter."""
    t = e.transform
    prefix = authors_layout.leaf_index(e, cfg)
    units = _read_units(t, tuple(arr.chunk_layout.read_chunk.shape), bool(prefix))
    pending: collections.deque = collections.deque()

    def result(future):
        try:
            return to_torch(np.asarray(future.result()))
        except Exception as err:  # tensorstore reports a torn or missing file as ValueError
            raise UnreadableCheckpoint(f"{where or 'checkpoint'}: parameter {'/'.join(e.path)} cannot be read "
                                       f"({one_line(err)})") from None

    for b in blk.blocks(t, units):
        pending.append((b, arr[prefix + b.region].read()))
        if len(pending) > READ_AHEAD:
            b0, future = pending.popleft()
            yield b0, result(future)
    while pending:
        b0, future = pending.popleft()
        yield b0, result(future)


def authors_blocks(e: authors_layout.Entry, arr, cfg: ModelConfig, dtype: str, where: str = "") -> Iterator[tuple[blk.Block, np.ndarray]]:
    """``e``'s tensor in the authors' layout, as (block, rows cast to ``dtype``) in row order."""
    tdt = torch_dtype(dtype)
    for b, box in ours_blocks(e, arr, cfg, where):
        yield b, to_numpy(blk.ours_to_rows(e.transform, b, box).to(tdt))
