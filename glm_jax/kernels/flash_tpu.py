"""Mosaic (TPU) lowering of the GLM flash-attention kernels: forward, dQ and dK/dV.

Grid ``(batch, heads, blocks, steps)``. Per held block the visited blocks of the other side
are one contiguous range (``glm_jax.kernels.block_mask``), scalar-prefetched into SMEM.
Step t of a held block works on block ``lo + t`` while ``lo + t < hi``; later steps map to
block ``hi - 1`` again, so the pipeline issues no copy for them (an unchanged block index
is not re-fetched) and ``pl.when`` skips their compute: empty blocks cost neither loads nor
FLOPs, only the grid step itself. Blocks inside the fully visible range skip the mask.

Layouts: with head_dim a multiple of 128, q/k/v stay ``[batch, length, heads*head_dim]``
(a free reshape; a head is a lane-aligned column block). Otherwise they are transposed to
``[batch, heads, length, head_dim]``. Per-token integers (lim, segment id) and row
statistics (log-sum-exp, delta) travel as compact ``[..., 1, length]`` rows; a kernel turns
its held block's values into a lane-broadcast column once, with one in-VMEM transpose.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from glm_jax.kernels import flash_common as fc
from glm_jax.kernels.block_mask import TokenMask

LANES = 128
SUBLANES = 8
NAME = "mosaic"
MIN_BLOCK = LANES  # key blocks fill whole lanes; query blocks are multiples too


def default_blocks(head_dim: int) -> tuple[int, int, int, int]:
    """(q, kv, q_bwd, kv_bwd): 512 keeps the MXU busy and per-step overhead small while the
    float32 score block (512 x 512 x 4 B = 1 MiB) and buffers stay well inside VMEM."""
    return (512, 512, 512, 512) if head_dim <= 128 else (512, 512, 256, 256)


def check_head_dim(head_dim: int) -> None:
    """Any head_dim lowers (a multiple of 128 without a transpose); no check needed."""


def visited_block(ranges_ref, b, held, step, n_held):
    """Block visited at ``step`` of held block ``held``: the index maps' and kernels' rule.
    ``ranges_ref`` is the flat ``[batch * n_held * 4]`` range table (SMEM ref or array)."""
    base = (b * n_held + held) * 4
    return jnp.minimum(ranges_ref[base] + step, ranges_ref[base + 1] - 1)


@dataclasses.dataclass(frozen=True)
class Layout:
    heads: int
    head_dim: int

    @property
    def fused(self) -> bool:
        return self.head_dim % LANES == 0

    def to_kernel(self, x: jax.Array) -> jax.Array:
        b, n, h, d = x.shape
        return x.reshape(b, n, h * d) if self.fused else x.transpose(0, 2, 1, 3)

    def from_kernel(self, x: jax.Array) -> jax.Array:
        if self.fused:
            b, n, _ = x.shape
            return x.reshape(b, n, self.heads, self.head_dim)
        return x.transpose(0, 2, 1, 3)

    def spec(self, block: int, seq_index) -> pl.BlockSpec:
        d = self.head_dim
        if self.fused:
            return pl.BlockSpec((None, block, d), lambda b, h, i, j, *r: (b, seq_index(b, h, i, j, *r), h))
        return pl.BlockSpec((None, None, block, d), lambda b, h, i, j, *r: (b, h, seq_index(b, h, i, j, *r), 0))

    def row_sum(self, x: jax.Array) -> jax.Array:
        """Sum over head_dim of a kernel-layout array -> ``[batch, heads, length]``."""
        if self.fused:
            b, n, _ = x.shape
            return x.reshape(b, n, self.heads, self.head_dim).sum(-1).transpose(0, 2, 1)
        return x.sum(-1)


def prepare(tm: TokenMask) -> tuple:
    """Kernel inputs from the per-token mask: lim and seg as rows ``[b, 1, L]``."""
    return tm.lim[:, None, :], tm.seg[:, None, :]


def _to_column(row_ref, col_scr) -> None:
    """A held block's per-token values, a ``[1, n]`` row, into ``col_scr`` as ``[n, 128]``
    (each row one token's value in every lane): one aligned transpose per held block, in
    place of streaming 128 lane copies of every value from HBM."""
    row = row_ref[...]
    col_scr[...] = jnp.transpose(jnp.broadcast_to(row, (LANES, row.shape[1])))


def _query_mask(lim_col, seg_col, segk_row, k0, shape):
    """[queries, keys] block held by query: query data as columns, key ids a row."""
    keys = k0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    return fc.visible(keys, lim_col[...][:, :1], seg_col[...][:, :1], segk_row[...])


def _key_mask(limq_row, segq_row, segk_col, k0, shape):
    """[keys, queries] block held by key: key ids a column, query data rows."""
    keys = k0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    return fc.visible(keys, limq_row[...], segq_row[...], segk_col[...][:, :1])


def _steps(ranges_ref, b, held, step, n_held, body):
    """Run ``body(block, masked)`` for this step if it visits a block."""
    base = (b * n_held + held) * 4
    blk = ranges_ref[base] + step
    active = blk < ranges_ref[base + 1]
    full = (ranges_ref[base + 2] <= blk) & (blk < ranges_ref[base + 3])

    @pl.when(active & full)
    def _():
        body(blk, False)

    @pl.when(active & jnp.logical_not(full))
    def _():
        body(blk, True)

    return active


def _count(count_ref, step, active):
    if count_ref is None:
        return

    @pl.when(step == 0)
    def _():
        count_ref[...] = jnp.zeros(count_ref.shape, jnp.int32)

    @pl.when(active)
    def _():
        count_ref[...] += 1


# ---------------------------------------------------------------------------
# Forward.


def _fwd_kernel(ranges_ref, dparams_ref, scale_ref, q_ref, k_ref, v_ref, limq_ref, segq_ref, segk_ref, *refs, st, nq, save_lse):
    o_ref, refs = refs[0], refs[1:]
    lse_ref, refs = (refs[0], refs[1:]) if save_lse else (None, refs)
    count_ref, refs = (refs[0], refs[1:]) if st.count_visits else (None, refs)
    m_scr, l_scr, acc_scr, lim_col, seg_col = refs
    b, h, i, j = (pl.program_id(a) for a in range(4))
    bq, bk = st.block_q, st.block_kv
    dparams = tuple(dparams_ref[x] for x in range(5))

    @pl.when(j == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, fc.M_FLOOR, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
        _to_column(limq_ref, lim_col)
        _to_column(segq_ref, seg_col)

    def body(blk, masked):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = fc.scores(q, k, scale_ref[0])
        if masked:
            s = fc.hide(s, _query_mask(lim_col, seg_col, segk_ref, blk * bk, s.shape))
        m, l, alpha, p = fc.online_softmax(m_scr[...][:, :1], l_scr[...][:, :1], s)
        keep = fc.dropout_keep(st, dparams, b, h, i * bq, blk * bk, s.shape)
        acc_scr[...] = acc_scr[...] * alpha + fc.matmul(fc.drop(p, keep), v)
        m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
        l_scr[...] = jnp.broadcast_to(l, l_scr.shape)

    active = _steps(ranges_ref, b, i, j, nq, body)
    _count(count_ref, j, active)

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        l = l_scr[...][:, :1]
        o_ref[...] = (acc_scr[...] * (st.dropout_scale / l)).astype(o_ref.dtype)
        if lse_ref is not None:  # stored as a row: transpose the lane-broadcast column
            lse = jnp.broadcast_to(m_scr[...][:, :1] + jnp.log(l), (bq, LANES))
            lse_ref[...] = jnp.transpose(lse)[:1, :]


def _call(kernel, name: str, st: fc.Static, grid, in_specs, outs, scratch, ranges, dparams, args, cost):
    """One pallas_call with the range table and dropout words scalar-prefetched.
    outs: (ShapeDtypeStruct, BlockSpec) pairs; with ``count_visits`` a visit counter per
    held block is appended and returned separately as ``[batch, heads, held blocks]``."""
    shapes, specs = [s for s, _ in outs], [p for _, p in outs]
    if st.count_visits:
        shapes.append(jax.ShapeDtypeStruct((*grid[:3], SUBLANES, LANES), jnp.int32))
        specs.append(pl.BlockSpec((None, None, None, SUBLANES, LANES), lambda b, h, i, j, *r: (b, h, i, 0, 0)))
    results = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=grid, in_specs=in_specs, out_specs=specs, scratch_shapes=scratch
        ),
        out_shape=shapes,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=st.interpret,
        name=name,
        cost_estimate=cost,
    )(ranges.reshape(-1), dparams, *args)
    results = list(results)
    counts = results.pop()[..., 0, 0] if st.count_visits else None
    return results, counts


def _held(b, h, i, j, *refs):
    return i


def _walker(n_held: int):
    def index(b, h, i, j, ranges_ref, dparams_ref):
        return visited_block(ranges_ref, b, i, j, n_held)

    return index


def _specs(layout: Layout, bq: int, bk: int, q_idx, kv_idx) -> dict:
    """Block specs of the kernels' inputs, given which query / key block a step uses;
    per-token data (lim, seg) and row statistics (lse, delta) travel as [1, block] rows."""
    row = lambda block, idx: pl.BlockSpec((None, 1, block), lambda b, h, i, j, *r: (b, 0, idx(b, h, i, j, *r)))
    return dict(
        scale=pl.BlockSpec(memory_space=pltpu.SMEM),
        q=layout.spec(bq, q_idx),
        kv=layout.spec(bk, kv_idx),
        q_row=row(bq, q_idx),
        k_row=row(bk, kv_idx),
        stat_row=pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *r: (b, h, 0, q_idx(b, h, i, j, *r))),
    )


def _vmem(*shapes, dtype=jnp.float32):
    return [pltpu.VMEM(shape, dtype) for shape in shapes]


def forward(st: fc.Static, layout: Layout, q, k, v, tok, ranges, dparams, scale, *, save_lse: bool):
    """o (kernel layout), lse ``[b, h, L]`` or None, visit counts ``[b, h, nq]`` or None."""
    b = q.shape[0]
    bq, bk, n = st.block_q, st.block_kv, st.padded
    nq, nk = n // bq, n // bk
    sp = _specs(layout, bq, bk, _held, _walker(nq))
    outs = [(jax.ShapeDtypeStruct(q.shape, q.dtype), sp["q"])]
    if save_lse:
        outs.append((jax.ShapeDtypeStruct((b, layout.heads, 1, n), jnp.float32), sp["stat_row"]))
    scratch = _vmem((bq, LANES), (bq, LANES), (bq, layout.head_dim)) + _vmem((bq, LANES), (bq, LANES), dtype=jnp.int32)
    lim_row, seg_row = tok
    results, counts = _call(
        functools.partial(_fwd_kernel, st=st, nq=nq, save_lse=save_lse), "glm_flash_fwd", st, (b, layout.heads, nq, nk),
        [sp["scale"], sp["q"], sp["kv"], sp["kv"], sp["q_row"], sp["q_row"], sp["k_row"]], outs, scratch,
        ranges, dparams, (scale.reshape(1), q, k, v, lim_row, seg_row, seg_row),
        fc.cost(b, layout.heads, layout.head_dim, n, 2, 4, q.dtype.itemsize),
    )
    lse = results[1][:, :, 0] if save_lse else None
    return results[0], lse, counts


# ---------------------------------------------------------------------------
# Backward: dQ holds a query block and walks key blocks ([queries, keys] blocks); dK/dV
# holds a key block and walks query blocks with the block transposed ([keys, queries]), so
# the walked side's per-token data are rows and no matmul needs a transposed operand.


def _dq_kernel(ranges_ref, dparams_ref, scale_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, limq_ref, segq_ref,
               segk_ref, dq_ref, *rest, st, nq):
    count_ref, (acc_scr, lse_col, delta_col, lim_col, seg_col) = (rest[0], rest[1:]) if st.count_visits else (None, rest)
    b, h, i, j = (pl.program_id(a) for a in range(4))
    bq, bk = st.block_q_bwd, st.block_kv_bwd

    @pl.when(j == 0)
    def _():
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
        for row_ref, col in ((lse_ref, lse_col), (delta_ref, delta_col), (limq_ref, lim_col), (segq_ref, seg_col)):
            _to_column(row_ref, col)

    def body(blk, masked):
        q, k = q_ref[...], k_ref[...]
        mask = _query_mask(lim_col, seg_col, segk_ref, blk * bk, (bq, bk)) if masked else None
        keep = fc.dropout_keep(st, tuple(dparams_ref[x] for x in range(5)), b, h, i * bq, blk * bk, (bq, bk))
        _, ds = fc.bwd_block(st, q, k, do_ref[...], v_ref[...], lse_col[...][:, :1], delta_col[...][:, :1], scale_ref[0], mask, keep)
        acc_scr[...] += fc.matmul(ds, k)

    active = _steps(ranges_ref, b, i, j, nq, body)
    _count(count_ref, j, active)

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        dq_ref[...] = acc_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(ranges_ref, dparams_ref, scale_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, limq_ref, segq_ref,
                segk_ref, dk_ref, dv_ref, *rest, st, nk):
    count_ref, (dk_scr, dv_scr, segk_col) = (rest[0], rest[1:]) if st.count_visits else (None, rest)
    b, h, j, t = (pl.program_id(a) for a in range(4))
    bq, bk = st.block_q_bwd, st.block_kv_bwd

    @pl.when(t == 0)
    def _():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)
        _to_column(segk_ref, segk_col)

    def body(qblk, masked):
        q, do = q_ref[...], do_ref[...]
        mask = _key_mask(limq_ref, segq_ref, segk_col, j * bk, (bk, bq)) if masked else None
        keep = fc.dropout_keep(st, tuple(dparams_ref[x] for x in range(5)), b, h, qblk * bq, j * bk, (bk, bq), keys_on_rows=True)
        p_t, ds_t = fc.bwd_block(st, k_ref[...], q, v_ref[...], do, lse_ref[...], delta_ref[...], scale_ref[0], mask, keep)
        dv_scr[...] += fc.matmul(p_t, do)
        dk_scr[...] += fc.matmul(ds_t, q)

    active = _steps(ranges_ref, b, j, t, nk, body)
    _count(count_ref, t, active)

    @pl.when(t == pl.num_programs(3) - 1)
    def _():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(st: fc.Static, layout: Layout, q, k, v, o, lse, do, tok, dq_ranges, dkv_ranges, dparams, scale):
    """(dq, dk, dv) in kernel layout, and visit counts (dq, dkv) or None."""
    b, heads, d = q.shape[0], layout.heads, layout.head_dim
    bq, bk, n = st.block_q_bwd, st.block_kv_bwd, st.padded
    nq, nk = n // bq, n // bk
    delta = layout.row_sum(do.astype(jnp.float32) * o.astype(jnp.float32))
    lim_row, seg_row = tok
    args = (scale.reshape(1), q, k, v, do, lse[:, :, None, :], delta[:, :, None, :], lim_row, seg_row, seg_row)

    def inputs(sp):
        return [sp["scale"], sp["q"], sp["kv"], sp["kv"], sp["q"], sp["stat_row"], sp["stat_row"], sp["q_row"], sp["q_row"],
                sp["k_row"]]

    sp = _specs(layout, bq, bk, _held, _walker(nq))
    (dq,), dq_counts = _call(
        functools.partial(_dq_kernel, st=st, nq=nq), "glm_flash_dq", st, (b, heads, nq, nk), inputs(sp),
        [(jax.ShapeDtypeStruct(q.shape, q.dtype), sp["q"])],
        _vmem((bq, d), (bq, LANES), (bq, LANES)) + _vmem((bq, LANES), (bq, LANES), dtype=jnp.int32),
        dq_ranges, dparams, args, fc.cost(b, heads, d, n, 3, 5, q.dtype.itemsize),
    )
    sp = _specs(layout, bq, bk, _walker(nk), _held)
    (dk, dv), dkv_counts = _call(
        functools.partial(_dkv_kernel, st=st, nk=nk), "glm_flash_dkv", st, (b, heads, nk, nq), inputs(sp),
        [(jax.ShapeDtypeStruct(k.shape, k.dtype), sp["kv"]), (jax.ShapeDtypeStruct(v.shape, v.dtype), sp["kv"])],
        _vmem((bk, d), (bk, d)) + _vmem((bk, LANES), dtype=jnp.int32),
        dkv_ranges, dparams, args, fc.cost(b, heads, d, n, 4, 6, q.dtype.itemsize),
    )
    return dq, dk, dv, (dq_counts, dkv_counts) if st.count_visits else None
