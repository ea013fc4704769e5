"""Fused GLM attention: block-skipping flash attention with a custom VJP, for TPU and GPU.

``attention`` takes the XLA reference's arguments (``glm_jax.kernels.reference``) and
returns the same values: q, k, v ``[batch, length, heads, head_dim]``, ``part_a_end`` and
optional ``segment_ids`` (one integer per token, ``glm_jax.kernels.attention_mask``), the layer scale
and attention dropout (in-kernel, the reference's exact mask). The mask is evaluated
inside the kernels from those integers; the blocks to visit come from
``glm_jax.kernels.block_mask`` (empty blocks are neither loaded nor computed).

Lowerings: Mosaic on TPU (``flash_tpu``), Triton on GPU (``flash_gpu``); on CPU the Mosaic
kernels run in Pallas interpret mode (for tests; not for speed). Under a device mesh the
kernels run inside ``shard_map`` over the batch and head axes that ``glm_jax.parallel.rules``
assigns to the logical names ``batch`` and ``act_heads`` (Pallas kernels cannot be
partitioned automatically); the mesh is the one in context (``jax.set_mesh``). Dropout
counts global batch rows and heads, so sharded and unsharded runs drop the same entries.
Called inside a caller's own ``shard_map`` (manual mesh axes), it works on the local shard
as given, and dropout then repeats its mask across those manual shards.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from glm_jax.kernels import block_mask, dropout_hash, flash_gpu, flash_tpu, reference
from glm_jax.kernels import flash_common as fc
from glm_jax.parallel import rules

LOWERINGS = ("auto", "mosaic", "triton")
_MODULES = {flash_tpu.NAME: flash_tpu, flash_gpu.NAME: flash_gpu}
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query / key block lengths of the forward and backward kernels; 0 = the lowering's
    default. Powers of two; on TPU multiples of 128 (they shrink for short sequences)."""

    q: int = 0
    kv: int = 0
    q_bwd: int = 0
    kv_bwd: int = 0

    @classmethod
    def from_config(cls, cfg) -> "BlockSizes":
        """From a ``ModelConfig``'s ``attention_block_*`` fields."""
        return cls(cfg.attention_block_q, cfg.attention_block_kv, cfg.attention_block_q_bwd, cfg.attention_block_kv_bwd)

    def validate(self, what: str = "block_sizes") -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v < 0 or (v and v & (v - 1)):
                raise ValueError(f"{what}.{f.name}={v} must be 0 (default) or a power of two")


class Ranges(NamedTuple):
    fwd: jax.Array  # [b, nq, 4] key-block ranges per query block (forward blocks)
    dq: jax.Array  # [b, nq_bwd, 4] key-block ranges per query block (backward blocks)
    dkv: jax.Array  # [b, nk_bwd, 4] query-block ranges per key block (backward blocks)


def default_impl() -> str:
    """What ``model.attention_impl=auto`` means on this backend."""
    return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"


def resolve_lowering(lowering: str = "auto", interpret: Optional[bool] = None) -> tuple[str, bool]:
    """(mosaic | triton, interpret mode) for this backend: auto = Triton on GPU, else Mosaic;
    interpret mode by default exactly on CPU."""
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering={lowering!r} is not valid; valid values: {', '.join(LOWERINGS)}")
    backend = jax.default_backend()
    if lowering == "auto":
        lowering = flash_gpu.NAME if backend == "gpu" else flash_tpu.NAME
    return lowering, (backend == "cpu") if interpret is None else interpret


def default_block_sizes(lowering: str, head_dim: int) -> tuple[int, int, int, int]:
    """The lowering's (q, kv, q_bwd, kv_bwd) block lengths for this head_dim."""
    return _MODULES[lowering].default_blocks(head_dim)


def _block_sizes(sizes: BlockSizes, lowering: str, interpret: bool, length: int, head_dim: int) -> tuple[int, int, int, int]:
    sizes.validate()
    mod = _MODULES[lowering]
    defaults = mod.default_blocks(head_dim)
    align = 8 if interpret else mod.MIN_BLOCK
    cap = max(align, 1 << max(0, (length - 1).bit_length()))
    out = []
    for name, want, default in zip(("q", "kv", "q_bwd", "kv_bwd"), dataclasses.astuple(sizes), defaults):
        v = want or default
        if not interpret and v % mod.MIN_BLOCK:
            raise ValueError(f"block_sizes.{name}={v}: the {lowering} kernels need a multiple of {mod.MIN_BLOCK}")
        out.append(min(v, cap))
    return tuple(out)


def _check(q, k, v, part_a_end, segment_ids, lowering: str) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one [batch, length, heads, head_dim] shape, got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype.name not in DTYPES:
        raise ValueError(f"q, k, v must share one dtype among {', '.join(DTYPES)}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if part_a_end.shape != q.shape[:2]:
        raise ValueError(f"part_a_end must be [batch, length] = {q.shape[:2]}, got {part_a_end.shape}")
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids must be [batch, length] = {q.shape[:2]}, got {segment_ids.shape}")
    _MODULES[lowering].check_head_dim(q.shape[-1])


# ---------------------------------------------------------------------------
# The kernel call on one shard, and its VJP.


@dataclasses.dataclass(frozen=True)
class _Plan:
    st: fc.Static
    lowering: str
    layout: object


def _plan(q_shape, lowering, interpret, sizes, batch_global, heads_global, dropout_rate, count_visits=False) -> _Plan:
    b, length, heads, d = q_shape
    bq, bk, bqb, bkb = _block_sizes(sizes, lowering, interpret, length, d)
    padded = -(-length // max(bq, bk, bqb, bkb)) * max(bq, bk, bqb, bkb)
    threshold = None
    if dropout_rate > 0.0:
        dropout_hash.check_size(batch_global, heads_global, length)
        threshold = dropout_hash.keep_threshold(dropout_rate)
    st = fc.Static(
        block_q=bq, block_kv=bk, block_q_bwd=bqb, block_kv_bwd=bkb, length=length, padded=padded,
        heads=heads_global, dropout_threshold=threshold,
        dropout_scale=1.0 / (1.0 - dropout_rate), interpret=interpret, count_visits=count_visits,
    )
    return _Plan(st, lowering, _MODULES[lowering].Layout(heads, d))


def _mask_inputs(plan: _Plan, part_a_end, segment_ids):
    st = plan.st
    tm = block_mask.token_mask(part_a_end, segment_ids, st.padded)
    ranges = Ranges(
        fwd=block_mask.q_block_ranges(tm, st.block_q, st.block_kv),
        dq=block_mask.q_block_ranges(tm, st.block_q_bwd, st.block_kv_bwd),
        dkv=block_mask.kv_block_ranges(tm, st.block_q_bwd, st.block_kv_bwd),
    )
    return _MODULES[plan.lowering].prepare(tm), ranges


def _to_kernel(plan: _Plan, x):
    return plan.layout.to_kernel(jnp.pad(x, ((0, 0), (0, plan.st.padded - x.shape[1]), (0, 0), (0, 0))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan: _Plan, q, k, v, tok, ranges: Ranges, dparams, scale):
    o, _, _ = _MODULES[plan.lowering].forward(plan.st, plan.layout, q, k, v, tok, ranges.fwd, dparams, scale, save_lse=False)
    return o


def _flash_fwd(plan: _Plan, q, k, v, tok, ranges: Ranges, dparams, scale):
    o, lse, _ = _MODULES[plan.lowering].forward(plan.st, plan.layout, q, k, v, tok, ranges.fwd, dparams, scale, save_lse=True)
    return o, (q, k, v, o, lse, tok, ranges, dparams, scale)


def _flash_bwd(plan: _Plan, res, do):
    q, k, v, o, lse, tok, ranges, dparams, scale = res
    dq, dk, dv, _ = _MODULES[plan.lowering].backward(plan.st, plan.layout, q, k, v, o, lse, do, tok, ranges.dq, ranges.dkv, dparams, scale)
    no_grad = jax.tree.map(lambda _: None, (tok, ranges, dparams))
    return (dq, dk, dv, *no_grad, jnp.zeros_like(scale))


_flash.defvjp(_flash_fwd, _flash_bwd)


def _local(q, k, v, part_a_end, segment_ids, scale, key, row_offset, *, lowering, interpret, sizes, dropout_rate, row_stride,
           batch_axes, head_axes, shards):
    """One shard's attention (q already scaled). ``shards`` = (batch shards, head shards).
    Local row b is row ``row_offset + row_stride * (shard offset + b)`` of the batch whose
    dropout masks are drawn."""
    b, length, heads, _ = q.shape
    plan = _plan(q.shape, lowering, interpret, sizes, b * shards[0] * row_stride, heads * shards[1], dropout_rate)
    b_off = jax.lax.axis_index(batch_axes) * b if batch_axes else 0
    h_off = jax.lax.axis_index(head_axes) * heads if head_axes else 0
    first_row = row_offset + row_stride * jnp.int32(b_off)
    words = [key[0], key[1], first_row, jnp.int32(h_off), jnp.int32(row_stride)]
    dparams = jnp.stack(words + [jnp.int32(0)] * (fc.DROPOUT_PARAMS - len(words))).astype(jnp.int32)
    tok, ranges = _mask_inputs(plan, part_a_end, segment_ids)
    o = _flash(plan, _to_kernel(plan, q), _to_kernel(plan, k), _to_kernel(plan, v), tok, ranges, dparams, scale)
    return plan.layout.from_kernel(o)[:, :length]


def _mesh_axes(mesh, logical: str, size: int) -> tuple[str, ...]:
    """Mesh axes for a logical axis, if they divide ``size`` (else replicated: correct, redundant)."""
    free = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    axes = rules.mesh_axes(logical, free)
    return axes if size % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    part_a_end: jax.Array,
    segment_ids: Optional[jax.Array] = None,
    *,
    layer_scale: Optional[jax.Array] = None,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[jax.Array] = None,
    dropout_rows: tuple = (0, 1),
    block_sizes: Optional[BlockSizes] = None,
    lowering: str = "auto",
    interpret: Optional[bool] = None,
) -> jax.Array:
    """GLM attention through the fused kernels; same arguments and result as
    ``reference.attention`` (plus kernel options). ``lowering``: auto | mosaic | triton;
    ``interpret``: None = interpret mode exactly when running on CPU."""
    lowering, interpret = resolve_lowering(lowering, interpret)
    _check(q, k, v, part_a_end, segment_ids, lowering)
    q, scale = reference.scale_query(q, layer_scale)
    rate = float(dropout_rate) if dropout_rng is not None else 0.0
    key = dropout_hash.key_words(dropout_rng if rate > 0.0 else None)
    part_a_end = jnp.asarray(part_a_end, jnp.int32)
    row_offset, row_stride = jnp.asarray(dropout_rows[0], jnp.int32), int(dropout_rows[1])
    opts = dict(lowering=lowering, interpret=interpret, sizes=block_sizes or BlockSizes(), dropout_rate=rate,
                row_stride=row_stride)

    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = head_axes = ()
    if not mesh.empty:
        batch_axes = _mesh_axes(mesh, "batch", q.shape[0])
        head_axes = _mesh_axes(mesh, "act_heads", q.shape[2])
    if not batch_axes and not head_axes:
        return _local(q, k, v, part_a_end, segment_ids, scale, key, row_offset, batch_axes=(), head_axes=(), shards=(1, 1), **opts)

    shards = tuple(math.prod(mesh.shape[a] for a in axes) for axes in (batch_axes, head_axes))
    qkv = P(batch_axes or None, None, head_axes or None, None)
    tok = P(batch_axes or None, None)
    has_seg = segment_ids is not None

    def shard(q, k, v, part_a_end, scale, key, row_offset, *seg):
        return _local(q, k, v, part_a_end, seg[0] if has_seg else None, scale, key, row_offset,
                      batch_axes=batch_axes, head_axes=head_axes, shards=shards, **opts)

    args = (q, k, v, part_a_end, scale, key, row_offset) + ((segment_ids,) if has_seg else ())
    specs = (qkv, qkv, qkv, tok, P(), P(), P()) + ((tok,) if has_seg else ())
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        # Explicit-sharding meshes want the inputs already laid out as shard_map splits them.
        args = tuple(jax.sharding.reshard(a, s) for a, s in zip(args, specs))
    return jax.shard_map(shard, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)(*args)


def visit_counts(
    q, k, v, part_a_end, segment_ids=None, *, block_sizes: Optional[BlockSizes] = None, lowering: str = "auto",
    interpret: Optional[bool] = None,
) -> dict:
    """Blocks each kernel actually computed, from counters inside the kernels (one shard, no
    dropout): ``fwd`` / ``dq`` ``[batch, heads, query blocks]`` and ``dkv`` ``[batch, heads,
    key blocks]``, with the plan's block sizes and padded length. For tests and benchmarks."""
    lowering, interpret = resolve_lowering(lowering, interpret)
    _check(q, k, v, part_a_end, segment_ids, lowering)
    b, _, heads, _ = q.shape
    plan = _plan(q.shape, lowering, interpret, block_sizes or BlockSizes(), b, heads, 0.0, count_visits=True)
    counts = _counted_run(plan, q, k, v, jnp.asarray(part_a_end, jnp.int32), segment_ids)
    return {**counts, "static": plan.st}


@functools.partial(jax.jit, static_argnums=0)
def _counted_run(plan: _Plan, q, k, v, part_a_end, segment_ids):
    tok, ranges = _mask_inputs(plan, part_a_end, segment_ids)
    dparams = jnp.zeros((fc.DROPOUT_PARAMS,), jnp.int32)
    scale = jnp.float32(1.0)
    qk, kk, vk = (_to_kernel(plan, x) for x in (q, k, v))
    mod = _MODULES[plan.lowering]
    o, lse, fwd = mod.forward(plan.st, plan.layout, qk, kk, vk, tok, ranges.fwd, dparams, scale, save_lse=True)
    _, _, _, (dq, dkv) = mod.backward(plan.st, plan.layout, qk, kk, vk, o, lse, o, tok, ranges.dq, ranges.dkv, dparams, scale)
    return {"fwd": fwd, "dq": dq, "dkv": dkv, "ranges": ranges}
