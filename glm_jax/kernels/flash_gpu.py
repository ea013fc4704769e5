"""Triton (GPU) lowering of the GLM flash-attention kernels: forward, dQ and dK/dV.

Grid ``(batch, heads, held blocks)``: each program holds one block and loops over the
visited blocks of the other side, which form one contiguous range
(``glm_jax.kernels.block_mask``). The loop runs in three parts, partial / fully visible /
partial, so fully visible blocks never evaluate the mask and empty blocks are never
touched. Arrays keep the model's ``[batch, length, heads, head_dim]`` layout.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from glm_jax.kernels import flash_common as fc
from glm_jax.kernels.block_mask import TokenMask

NAME = "triton"
MIN_BLOCK = 16  # tl.dot's smallest tile


def default_blocks(head_dim: int) -> tuple[int, int, int, int]:
    """(q, kv, q_bwd, kv_bwd): larger head dims take smaller blocks to fit registers."""
    return (128, 64, 64, 64) if head_dim <= 128 else (64, 32, 32, 32)


def check_head_dim(head_dim: int) -> None:
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(
            f"the Triton attention kernels need a power-of-two head_dim >= 16, got {head_dim}; use model.attention_impl=xla"
        )


def _compiler(head_dim: int):
    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The model's layout as is: ``[batch, length, heads, head_dim]``."""

    heads: int
    head_dim: int

    def to_kernel(self, x: jax.Array) -> jax.Array:
        return x

    def from_kernel(self, x: jax.Array) -> jax.Array:
        return x

    def row_sum(self, x: jax.Array) -> jax.Array:
        return x.sum(-1).transpose(0, 2, 1)


def prepare(tm: TokenMask) -> tuple:
    return tm.lim, tm.seg, tm.seg


def _spec(block: int, head_dim: int, seq_index):
    return pl.BlockSpec((None, block, None, head_dim), lambda b, h, i: (b, seq_index(i), h, 0))


def _whole(n: int, head_dim: int):
    return pl.BlockSpec((None, n, None, head_dim), lambda b, h, i: (b, 0, h, 0))


def _loop(ranges_ref, body, carry):
    """Run ``body(block, carry, masked)`` over the visited range: partial, full, partial."""
    lo, hi, flo, fhi = (ranges_ref[x] for x in range(4))
    carry = lax.fori_loop(lo, flo, lambda blk, c: body(blk, c, True), carry)
    carry = lax.fori_loop(flo, fhi, lambda blk, c: body(blk, c, False), carry)
    return lax.fori_loop(fhi, hi, lambda blk, c: body(blk, c, True), carry)


def _counted(st, body):
    """With ``count_visits`` the carry ends in a visit counter."""
    if not st.count_visits:
        return body

    def wrapped(blk, carry, masked):
        return (*body(blk, carry[:-1], masked), carry[-1] + 1)

    return wrapped


def _dparams(st, ref):
    return tuple(ref[x] for x in range(5)) if st.dropout else None  # the rest of the 8 is padding


def _fwd_kernel(ranges_ref, dparams_ref, scale_ref, q_ref, k_ref, v_ref, lim_ref, segq_ref, segk_ref, *outs, st, save_lse):
    o_ref, outs = outs[0], outs[1:]
    lse_ref, outs = (outs[0], outs[1:]) if save_lse else (None, outs)
    count_ref = outs[0] if st.count_visits else None
    b, h, i = (pl.program_id(a) for a in range(3))
    bq, bk = st.block_q, st.block_kv
    q, scale = q_ref[...], scale_ref[0]
    lim, segq = lim_ref[...][:, None], segq_ref[...][:, None]
    dparams = _dparams(st, dparams_ref)

    def body(blk, carry, masked):
        m, l, acc = carry
        start = pl.multiple_of(blk * bk, bk)
        k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
        s = fc.scores(q, k, scale)
        if masked:
            cols = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            s = fc.hide(s, fc.visible(cols, lim, segq, segk_ref[pl.ds(start, bk)][None, :]))
        m, l, alpha, p = fc.online_softmax(m, l, s)
        keep = fc.dropout_keep(st, dparams, b, h, i * bq, start, s.shape)
        return m, l, acc * alpha + fc.matmul(fc.drop(p, keep), v)

    carry = (jnp.full((bq, 1), fc.M_FLOOR, jnp.float32), jnp.zeros((bq, 1), jnp.float32), jnp.zeros(q.shape, jnp.float32))
    if st.count_visits:
        carry += (jnp.int32(0),)
    carry = _loop(ranges_ref, _counted(st, body), carry)
    m, l, acc = carry[:3]
    o_ref[...] = (acc * (st.dropout_scale / l)).astype(o_ref.dtype)
    if lse_ref is not None:
        lse_ref[...] = (m + jnp.log(l))[:, 0]
    if count_ref is not None:
        count_ref[...] = jnp.full((bq,), carry[3], jnp.int32)


def _call(kernel, name: str, st: fc.Static, head_dim: int, grid, in_specs, outs, args, held_block: int, matmuls: int):
    """One pallas_call; outs are (ShapeDtypeStruct, BlockSpec) pairs. With ``count_visits``
    a visit counter per held block is appended and returned as ``[batch, heads, blocks]``."""
    shapes, specs = [s for s, _ in outs], [p for _, p in outs]
    if st.count_visits:
        shapes.append(jax.ShapeDtypeStruct((grid[0], grid[1], grid[2] * held_block), jnp.int32))
        specs.append(pl.BlockSpec((None, None, held_block), lambda b, h, i: (b, h, i)))
    results = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=specs, out_shape=shapes,
        compiler_params=_compiler(head_dim), interpret=st.interpret, name=name,
        cost_estimate=fc.cost(grid[0], grid[1], head_dim, st.padded, matmuls, len(outs) + 3, args[3].dtype.itemsize),
    )(*args)
    results = list(results)
    counts = results.pop()[..., ::held_block] if st.count_visits else None
    return results, counts


_RANGES = pl.BlockSpec((None, None, 4), lambda b, h, i: (b, i, 0))
_SMALL = [pl.BlockSpec((fc.DROPOUT_PARAMS,), lambda b, h, i: (0,)), pl.BlockSpec((1,), lambda b, h, i: (0,))]


def _tokens(block: int):
    return pl.BlockSpec((None, block), lambda b, h, i: (b, i))


def _rows(block: int):
    return pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))


def _whole_tokens(n: int):
    return pl.BlockSpec((None, n), lambda b, h, i: (b, 0))


def _whole_rows(n: int):
    return pl.BlockSpec((None, None, n), lambda b, h, i: (b, h, 0))


def forward(st: fc.Static, layout: Layout, q, k, v, tok, ranges, dparams, scale, *, save_lse: bool):
    b, n, heads, d = q.shape
    bq = st.block_q
    outs = [(jax.ShapeDtypeStruct(q.shape, q.dtype), _spec(bq, d, lambda i: i))]
    if save_lse:
        outs.append((jax.ShapeDtypeStruct((b, heads, n), jnp.float32), _rows(bq)))
    results, counts = _call(
        functools.partial(_fwd_kernel, st=st, save_lse=save_lse), "glm_flash_fwd", st, d, (b, heads, n // bq),
        [_RANGES, *_SMALL, _spec(bq, d, lambda i: i), _whole(n, d), _whole(n, d), _tokens(bq), _tokens(bq), _whole_tokens(n)],
        outs, (ranges, dparams, scale.reshape(1), q, k, v, *tok), bq, 2,
    )
    return results[0], results[1] if save_lse else None, counts


def _dq_kernel(ranges_ref, dparams_ref, scale_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lim_ref, segq_ref, segk_ref,
               *outs, st):
    dq_ref = outs[0]
    b, h, i = (pl.program_id(a) for a in range(3))
    bq, bk = st.block_q_bwd, st.block_kv_bwd
    q, do, scale = q_ref[...], do_ref[...], scale_ref[0]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    lim, segq = lim_ref[...][:, None], segq_ref[...][:, None]
    dparams = _dparams(st, dparams_ref)

    def body(blk, carry, masked):
        (acc,) = carry
        start = pl.multiple_of(blk * bk, bk)
        k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
        mask = None
        if masked:
            cols = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            mask = fc.visible(cols, lim, segq, segk_ref[pl.ds(start, bk)][None, :])
        keep = fc.dropout_keep(st, dparams, b, h, i * bq, start, (bq, bk))
        _, ds = fc.bwd_block(st, q, k, do, v, lse, delta, scale, mask, keep)
        return (acc + fc.matmul(ds, k),)

    carry = (jnp.zeros(q.shape, jnp.float32),) + ((jnp.int32(0),) if st.count_visits else ())
    carry = _loop(ranges_ref, _counted(st, body), carry)
    dq_ref[...] = carry[0].astype(dq_ref.dtype)
    if st.count_visits:
        outs[1][...] = jnp.full((bq,), carry[1], jnp.int32)


def _dkv_kernel(ranges_ref, dparams_ref, scale_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lim_ref, segq_ref, segk_ref,
                *outs, st):
    dk_ref, dv_ref = outs[0], outs[1]
    b, h, j = (pl.program_id(a) for a in range(3))
    bq, bk = st.block_q_bwd, st.block_kv_bwd
    k, v, scale = k_ref[...], v_ref[...], scale_ref[0]
    segk = segk_ref[...][None, :]
    cols = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    dparams = _dparams(st, dparams_ref)

    def body(qblk, carry, masked):
        dk, dv = carry
        start = pl.multiple_of(qblk * bq, bq)
        q, do = q_ref[pl.ds(start, bq), :], do_ref[pl.ds(start, bq), :]
        lse, delta = lse_ref[pl.ds(start, bq)][:, None], delta_ref[pl.ds(start, bq)][:, None]
        mask = None
        if masked:
            mask = fc.visible(cols, lim_ref[pl.ds(start, bq)][:, None], segq_ref[pl.ds(start, bq)][:, None], segk)
        keep = fc.dropout_keep(st, dparams, b, h, start, j * bk, (bq, bk))
        p, ds = fc.bwd_block(st, q, k, do, v, lse, delta, scale, mask, keep)
        return dk + fc.matmul(ds, q, fc.TN), dv + fc.matmul(p, do, fc.TN)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)) + ((jnp.int32(0),) if st.count_visits else ())
    carry = _loop(ranges_ref, _counted(st, body), carry)
    dk_ref[...] = carry[0].astype(dk_ref.dtype)
    dv_ref[...] = carry[1].astype(dv_ref.dtype)
    if st.count_visits:
        outs[2][...] = jnp.full((bk,), carry[2], jnp.int32)


def backward(st: fc.Static, layout: Layout, q, k, v, o, lse, do, tok, dq_ranges, dkv_ranges, dparams, scale):
    b, n, heads, d = q.shape
    bq, bk = st.block_q_bwd, st.block_kv_bwd
    delta = layout.row_sum(do.astype(jnp.float32) * o.astype(jnp.float32))
    args = (dparams, scale.reshape(1), q, k, v, do, lse, delta, *tok)
    own_q, own_kv = _spec(bq, d, lambda i: i), _spec(bk, d, lambda j: j)
    (dq,), dq_counts = _call(
        functools.partial(_dq_kernel, st=st), "glm_flash_dq", st, d, (b, heads, n // bq),
        [_RANGES, *_SMALL, own_q, _whole(n, d), _whole(n, d), own_q, _rows(bq), _rows(bq), _tokens(bq), _tokens(bq), _whole_tokens(n)],
        [(jax.ShapeDtypeStruct(q.shape, q.dtype), own_q)], (dq_ranges, *args), bq, 3,
    )
    (dk, dv), dkv_counts = _call(
        functools.partial(_dkv_kernel, st=st), "glm_flash_dkv", st, d, (b, heads, n // bk),
        [_RANGES, *_SMALL, _whole(n, d), own_kv, own_kv, _whole(n, d), _whole_rows(n), _whole_rows(n), _whole_tokens(n),
         _whole_tokens(n), _tokens(bk)],
        [(jax.ShapeDtypeStruct(k.shape, k.dtype), own_kv), (jax.ShapeDtypeStruct(v.shape, v.dtype), own_kv)],
        (dkv_ranges, *args), bk, 4,
    )
    return dq, dk, dv, (dq_counts, dkv_counts) if st.count_visits else None
