"""Cutting one tensor into row blocks that map to boxes of our layout.

Streaming conversion never holds a whole tensor: it reads a run of the authors' rows,
applies the tensor's :class:`~glm_jax.checkpoint.authors_layout.Transform` to just that run and
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

from glm_jax.checkpoint.authors_layout import Transform

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


def permuted(x, perm: tuple[int, ...]):
    """``x.permute(perm)`` as a new contiguous torch tensor, copied the fast way.

    torch's strided copy is several times slower on some permutations than on a plain
    2-D transpose (an axis of size 1 in the middle, a 4-D reorder such as the fused
    QKV's). So size-1 axes are dropped first, and a permutation that moves the innermost
    axis outermost (or the outermost innermost) -- every one the layouts use that is not
    already 2-D -- becomes one 2-D transpose followed by a reorder that keeps contiguous
    runs together.
    """
    perm = tuple(perm)
    out_shape = tuple(x.shape[p] for p in perm)
    keep = [i for i, n in enumerate(x.shape) if n != 1]
    if len(keep) < x.dim():
        squeezed = x.reshape([x.shape[i] for i in keep])
        return permuted(squeezed, tuple(keep.index(p) for p in perm if x.shape[p] != 1)).reshape(out_shape)
    n = x.dim()
    if perm == tuple(range(n)):
        return x.contiguous()
    if n > 2 and perm[0] == n - 1:
        y = x.reshape(-1, x.shape[-1]).t().contiguous().reshape((x.shape[-1],) + tuple(x.shape[:-1]))
        rest = (0,) + tuple(p + 1 for p in perm[1:])
    elif n > 2 and perm[-1] == 0:
        y = x.reshape(x.shape[0], -1).t().contiguous().reshape(tuple(x.shape[1:]) + (x.shape[0],))
        rest = tuple(p - 1 for p in perm[:-1]) + (n - 1,)
    else:
        return x.permute(perm).contiguous()
    return y if rest == tuple(range(n)) else y.permute(rest).contiguous()


def _permute(x, perm: tuple[int, ...]):
    """A contiguous permuted copy (torch tensors: :func:`permuted`, multi-threaded)."""
    if hasattr(x, "permute"):
        return permuted(x, perm)
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


# ---------------------------------------------------------------------------
# Tensor-parallel pieces of a block: one rank's share of its rows (dimension 0) or of
# its columns (dimension 1), always a whole number of units of one axis of ``split``.


def joined_axis(t: Transform, dim: int) -> int:
    """The axis of ``t.split`` that the authors' dimension ``dim`` is shared out along:
    the block axis for rows, the first column axis for columns."""
    return t.block_axis if dim == 0 else t.lead


def piece_split(t: Transform, blk: Block, piece, dim: int):
    """(``piece`` viewed with its part of ``blk.split``'s structure, its length along
    :func:`joined_axis`).

    ``piece`` is a contiguous torch tensor of the authors' layout: a run of ``blk``'s rows
    (``dim`` 0) or all of its rows and a run of the columns (``dim`` 1). The view stays in
    the authors' order: ``.permute(t.perm)`` of it is the piece in our layout, and copying
    ``box_part.permute(t.inverse_perm)`` into it fills the piece from our box (torch
    copies fastest into a contiguous destination).
    """
    axis = joined_axis(t, dim)
    unit = math.prod(blk.split[axis + 1:t.lead]) if dim == 0 else math.prod(t.split[t.lead + 1:])
    n, rest = divmod(piece.shape[dim], unit)
    if rest:
        raise ValueError(f"a piece of {piece.shape[dim]} along dimension {dim} is not a whole number of units of {unit}")
    shape = list(blk.split)
    shape[axis] = n
    return piece.reshape(shape), n
