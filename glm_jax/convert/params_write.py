"""Writing a glm_jax checkpoint from the authors' rows, one block at a time.

Every importer (from-hf, from-sat) reads a source tensor a run of the authors' rows at
a time; this module turns each run into our layout (``glm_jax.checkpoint.authors_layout``) and
writes it as exactly one storage chunk of the orbax checkpoint, filling a stacked
``[layers, ...]`` leaf one layer slice at a time. It also keeps a quantized source's
own INT8/INT4 tensors (``quantized/``) so that the exporters can write them back bit
for bit, and (``glm_jax.checkpoint.params.write_config`` writes the ``config.yaml`` that describes them).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np

from glm_jax.config import ModelConfig
from glm_jax.convert import blocks as blk
from glm_jax.checkpoint import authors_layout, store
from glm_jax.convert.errors import ConvertError
from glm_jax.convert.tensors import np_dtype, to_numpy, torch_dtype

DTYPES = ("float32", "float16", "bfloat16")


def check_dtype(dtype: Optional[str]) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")


def leaf_dtypes(entries: list[authors_layout.Entry], stored: Callable[[authors_layout.Entry], str], dtype: Optional[str]) -> dict[tuple[str, ...], np.dtype]:
    """The dtype of each leaf: ``dtype`` if given, else what the source stores (promoted
    over the layers a stacked leaf holds). ``stored(e)`` names the source dtype of ``e``."""
    out: dict[tuple[str, ...], np.dtype] = {}
    for e in entries:
        d = np_dtype(dtype or stored(e))
        out[e.path] = d if e.path not in out else np.promote_types(out[e.path], d)
    return out


def weights_dtype(dtypes: dict[tuple[str, ...], np.dtype]) -> str:
    """The dtype most of the bytes are in (the embedding's): model.param_dtype of the output."""
    name = np.dtype(dtypes[("word_embeddings",)]).name
    return name if name in DTYPES else "float32"


class ParamWriter:
    """The parameter leaves of ``cfg`` in ``directory``, chunked so that each block of
    :meth:`blocks` is one chunk; :meth:`write` takes that block's authors' rows."""

    def __init__(self, directory: str, cfg: ModelConfig, entries: list[authors_layout.Entry],
                 dtypes: dict[tuple[str, ...], np.dtype], *, block_bytes: int = blk.DEFAULT_BLOCK_BYTES,
                 compression: bool = True):
        self.cfg, self.dtypes = cfg, dtypes
        self.writer = store.CheckpointWriter(directory, compression=compression)
        self.arrays, self.units = {}, {}
        for path, shape in authors_layout.leaf_shapes(cfg).items():
            e = next(x for x in entries if x.path == path)
            self.units[path] = blk.block_units(e.transform, dtypes[path].itemsize, block_bytes)
            chunks = blk.chunk_shape(e.transform, self.units[path])
            if len(shape) > len(chunks):  # stacked: one layer per chunk
                chunks = (1,) + chunks
            self.arrays[path] = self.writer.create(path, shape, dtypes[path], chunks)

    def blocks(self, e: authors_layout.Entry) -> Iterator[blk.Block]:
        return blk.blocks(e.transform, self.units[e.path])

    def block_rows(self, e: authors_layout.Entry) -> int:
        """The most authors' rows any block of ``e`` has (the row chunk of kept tensors)."""
        return max(b.row_stop - b.row_start for b in self.blocks(e))

    def write(self, e: authors_layout.Entry, b: blk.Block, rows) -> None:
        """``rows``: the authors' rows of ``b`` as a torch tensor (any dtype; cast here)."""
        box = blk.rows_to_ours(e.transform, b, rows.to(torch_dtype(self.dtypes[e.path].name)))
        if box.data_ptr() == rows.data_ptr():  # no copy was made: the view may die with the block
            box = box.clone()
        self.writer.write(self.arrays[e.path], authors_layout.leaf_index(e, self.cfg) + b.region, to_numpy(box))

    def write_pieces(self, e: authors_layout.Entry, b: blk.Block, pieces: list, dim: int) -> None:
        """Like :meth:`write` for rows given as ``pieces`` that join along the authors'
        dimension ``dim`` (0 or 1), each one tensor-parallel rank's share
        (``blocks.piece_split``): every piece is permuted straight into its part of our
        box, so the joined rows never exist."""
        if len(pieces) == 1:
            return self.write(e, b, pieces[0])
        import torch

        t = e.transform
        axis = t.perm.index(blk.joined_axis(t, dim))
        out = torch.empty(tuple(b.split[p] for p in t.perm), dtype=torch_dtype(self.dtypes[e.path].name))
        at = 0
        for piece in pieces:
            split, n = blk.piece_split(t, b, piece, dim)
            out.narrow(axis, at, n).copy_(blk.permuted(split, t.perm))
            at += n
        self.writer.write(self.arrays[e.path], authors_layout.leaf_index(e, self.cfg) + b.region, to_numpy(out))

    def finish(self) -> None:
        self.writer.finish()


class KeptWriter:
    """A quantized source's own tensors, unchanged, one leaf per key (``quantized/``).

    Each tensor is chunked along its rows axis (the axis of the linear's output rows), in
    runs of the converting blocks' rows, and written a run at a time.
    """

    def __init__(self, directory: str):
        self.writer = store.CheckpointWriter(directory)
        self.arrays: dict[str, tuple] = {}

    def add(self, key: str, shape: tuple[int, ...], dtype, step: int, rows_axis: int = 0) -> None:
        chunks = list(shape)
        chunks[rows_axis] = step
        self.arrays[key] = (self.writer.create((key,), shape, np.dtype(dtype), chunks), rows_axis)

    def write(self, key: str, start: int, value: np.ndarray) -> None:
        arr, axis = self.arrays[key]
        region = (slice(None),) * axis + (slice(start, start + value.shape[axis]),)
        self.writer.write(arr, region, value)

    def finish(self) -> None:
        self.writer.finish()
