"""Reading a glm_jax checkpoint back as the authors' rows, one block at a time.

The exporters (to-hf, to-sat) open the ``config.yaml`` and ``params/`` of a converted or
trained checkpoint, check every leaf against the config, and stream each authors'
tensor as runs of rows: one stored chunk per read where the chunks allow it, a few
reads in flight so decoding overlaps the permutes.
"""

from __future__ import annotations

import collections
import os
from typing import Iterator

import numpy as np

from glm_jax.config import ConfigError, ModelConfig, load_config
from glm_jax.convert import blocks as blk
from glm_jax.convert import layout, output, store
from glm_jax.convert.errors import ConvertError
from glm_jax.convert.tensors import to_numpy, to_torch, torch_dtype

READ_AHEAD = 4


def read_model_config(src: str) -> ModelConfig:
    path = os.path.join(src, output.CONFIG)
    if not os.path.isfile(path):
        raise ConvertError(f"{src}: no {output.CONFIG} (expected a glm_jax checkpoint directory, e.g. from from-hf or from-sat)")
    try:
        return load_config(path).model
    except ConfigError as e:
        raise ConvertError(f"{path}: {e}") from None


def open_params(src: str, cfg: ModelConfig) -> tuple[store.CheckpointReader, dict]:
    """The parameter checkpoint, checked leaf by leaf against the config."""
    try:
        reader = store.CheckpointReader(os.path.join(src, output.PARAMS))
    except FileNotFoundError as e:
        raise ConvertError(str(e)) from None
    arrays = {}
    for path, shape in layout.leaf_shapes(cfg).items():
        if path not in reader.leaves:
            raise ConvertError(f"{src}: parameter {'/'.join(path)} is missing from {output.PARAMS}/ (config.yaml implies it)")
        arr = reader.open(path)
        if tuple(arr.shape) != shape:
            raise ConvertError(f"{src}: parameter {'/'.join(path)} has shape {list(arr.shape)}, but config.yaml implies {list(shape)}")
        arrays[path] = arr
    return reader, arrays


def stored_dtype(arr) -> str:
    """A tensorstore array's dtype name (float16, bfloat16, ...)."""
    return np.dtype(arr.dtype.numpy_dtype).name


def _read_units(t: layout.Transform, chunks: tuple[int, ...], stacked: bool) -> int:
    """Blocks that match the stored chunks (one chunk per read), else whole tensors."""
    ours = tuple(chunks[1:]) if stacked else tuple(chunks)
    units = ours[t.perm.index(t.block_axis)]
    if blk.chunk_shape(t, units) == ours:
        return units
    return t.split[t.block_axis]


def ours_blocks(e: layout.Entry, arr, cfg: ModelConfig) -> Iterator[tuple[blk.Block, object]]:
    """``e``'s tensor as (block, its box of our layout as a torch tensor), in the authors' row
    order, a few reads in flight."""
    t = e.transform
    prefix = layout.leaf_index(e, cfg)
    units = _read_units(t, tuple(arr.chunk_layout.read_chunk.shape), bool(prefix))
    pending: collections.deque = collections.deque()
    for b in blk.blocks(t, units):
        pending.append((b, arr[prefix + b.region].read()))
        if len(pending) > READ_AHEAD:
            b0, future = pending.popleft()
            yield b0, to_torch(np.asarray(future.result()))
    while pending:
        b0, future = pending.popleft()
        yield b0, to_torch(np.asarray(future.result()))


def authors_blocks(e: layout.Entry, arr, cfg: ModelConfig, dtype: str) -> Iterator[tuple[blk.Block, np.ndarray]]:
    """``e``'s tensor in the authors' layout, as (block, rows cast to ``dtype``) in row order."""
    tdt = torch_dtype(dtype)
    for b, box in ours_blocks(e, arr, cfg):
        yield b, to_numpy(blk.ours_to_rows(e.transform, b, box).to(tdt))
