"""Cutting one tensor into row blocks that map to boxes of our layout.

Streaming conversion never holds a whole tensor: it reads a run of the authors' rows,
applies the tensor's :class:`~glm_jax.convert.layout.Transform` to just that run and
writes the result as exactly one storage chunk of our array (so no chunk is ever read
back and rewritten). This module works out those runs and boxes; it is pure index
arithmetic, shared by both directions.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterator

import numpy as np

from glm_jax.convert.layout import Transform

# 8 MiB blocks with 6 in flight measured fastest and smallest on 2 cores (bench convert).
DEFAULT_BLOCK_BYTES = 8 << 20


@dataclasses.dataclass(frozen=True)
class Block:
    """Authors' rows ``[row_start, row_stop)`` <-> our box ``region`` (a tuple of slices)."""

    row_start: int
    row_stop: int
    split: tuple[int, ...]  # the rows viewed with ``Transform.split``'s structure
    region: tuple[slice, ...]


def block_units(t: Transform, itemsize: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """How many indices of ``t.block_axis`` one block takes (at least 1)."""
    unit_elems = math.prod(t.split[t.block_axis + 1:])
    return max(1, min(t.split[t.block_axis], block_bytes // max(1, unit_elems * itemsize)))


def chunk_shape(t: Transform, units: int) -> tuple[int, ...]:
    """Our-layout shape of a full block: the storage chunk shape of the tensor."""
    split_chunk = [1] * t.block_axis + [units] + list(t.split[t.block_axis + 1:])
    return tuple(split_chunk[p] for p in t.perm)


def blocks(t: Transform, units: int) -> Iterator[Block]:
    """Blocks in the authors' row order (so a source file is read front to back)."""
    outer = t.split[: t.block_axis]
    n = t.split[t.block_axis]
    inner_rows = math.prod(t.split[t.block_axis + 1: t.lead])
    for idx in itertools.product(*(range(k) for k in outer)):
        for a in range(0, n, units):
            b = min(n, a + units)
            lead_index = tuple(idx) + (a,) + (0,) * (t.lead - t.block_axis - 1)
            row0 = int(np.ravel_multi_index(lead_index, t.split[: t.lead]))
            split_box = [slice(i, i + 1) for i in idx] + [slice(a, b)] + [slice(0, k) for k in t.split[t.block_axis + 1:]]
            yield Block(
                row_start=row0,
                row_stop=row0 + (b - a) * inner_rows,
                split=tuple(s.stop - s.start for s in split_box),
                region=tuple(split_box[p] for p in t.perm),
            )


def _permute(x, perm: tuple[int, ...]):
    """A contiguous permuted copy (torch tensors: torch's multi-threaded copy)."""
    if hasattr(x, "permute"):
        return x.permute(perm).contiguous()
    return np.ascontiguousarray(x.transpose(perm))


def rows_to_ours(t: Transform, blk: Block, rows):
    """The authors' rows of ``blk`` -> our box (contiguous; numpy array or torch tensor).

    With an identity permutation the result may share memory with ``rows``.
    """
    return _permute(rows.reshape(blk.split), t.perm)


def ours_to_rows(t: Transform, blk: Block, box):
    """Our box of ``blk`` -> the authors' rows (contiguous; numpy array or torch tensor)."""
    rows = blk.row_stop - blk.row_start
    return _permute(box, t.inverse_perm).reshape((rows,) + t.authors_shape[1:])
