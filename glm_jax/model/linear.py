"""Linear-layer weights that may be stored compactly, and the matmul that reads them.

A kernel in the parameter tree is a float array or one of two compact leaves:

* :class:`QuantizedWeight`: GLM-130B's / ChatGLM-6B's weight-only INT8 or INT4
  (MODEL.md §2.5) in glm_jax's layout. ``q`` has the kernel's shape with its contraction
  (input) axes first and, for INT4, the last contraction axis halved (two values per
  byte, the even input index in the high nibble); ``scale`` is float16 over the output
  axes (one per output row of the authors' ``[out, in]`` weight), or ``[groups, *out]``
  when the input is split into ``groups`` contiguous parts with a scale each (a GLM-130B
  SAT checkpoint quantized per tensor-parallel rank: each rank's columns of a
  row-parallel linear have their own scale of every output row).
* :class:`Bf16Bits`: a bfloat16 kernel kept as its uint16 bit patterns, for XLA's CPU
  backend, which widens a whole bfloat16 operand to float32 before every dot.

**Numerics.** The quantized matmul is ``y = (x @ q) * scale``: ``q`` (exact in any float
type) is contracted with ``x`` accumulating in float32, and the per-output-row scale is
applied to the result (per group, before the groups are summed). The scale commutes with
the contraction, so this is ``x @ (q * scale)`` with the products ``q * scale`` exact;
the authors' runtime rounds each dequantized weight to fp16 first (``fp16(q * scale)``),
which differs by at most 2^-11 relative per weight (``tests/inference/test_linear.py``
bounds the difference). Applying the scale after the contraction is what lets a backend
read the int8/int4 bytes straight into the dot: XLA fuses the int -> float convert into
the dot's operand on GPU and TPU, and there is no per-weight multiply at all.

**On a CPU** (leaves with ``stream=True``, set by ``glm_jax.inference.weights``) XLA
cannot fuse a convert into a dot, and materialising the widened weight costs more than
the matmul. The streaming matmul instead walks the weight in blocks of input rows (or,
for a ``[vocab, embed]`` table, of output rows): each block is widened to float32 in
cache and multiplied, so memory traffic is the compact bytes once.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Weights widened to float32 per step of the CPU streaming matmul: 2^20 elements (4 MiB)
# stays in cache on current server CPUs, and blocks this large keep the loop's per-step
# overhead small (measured on a 2-core EPYC: 2^18 and 2^19 were 2x slower, 2^21 and 2^22
# 10-40% slower).
STREAM_BLOCK_ELEMENTS = 1 << 20
# From this many rows of x (batch x tokens: a prefill) on, widening the whole weight once
# and multiplying once is faster than streaming (which re-reads its float32 accumulator
# per block): measured on [M, 4096] @ int8 [4096, 16384], 1.3x faster at M = 1024, even at 256.
STREAM_MAX_ROWS = 256


@flax.struct.dataclass
class QuantizedWeight:
    q: jax.Array  # int8: [*in_axes, *out_axes]; INT4 packs the last input axis (halved)
    scale: jax.Array  # float16 [*out_axes], or [groups, *out_axes]
    bits: int = flax.struct.field(pytree_node=False, default=8)
    groups: int = flax.struct.field(pytree_node=False, default=1)
    stream: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def num_in_axes(self) -> int:
        return self.q.ndim - self.scale.ndim + (1 if self.groups > 1 else 0)

    def unpacked(self) -> jax.Array:
        """int8 values; INT4 as ``[..., in/2, 2, out...]`` (even, odd input index on the new axis)."""
        if self.bits == 8:
            return self.q
        axis = self.num_in_axes  # the pair axis goes right after the packed input axis
        hi = jnp.right_shift(self.q, 4)
        lo = jnp.right_shift(jnp.left_shift(self.q, 4), 4)
        return jnp.stack([hi, lo], axis=axis)

    def dequantize(self, dtype) -> jax.Array:
        """The weight the matmul applies, ``q * scale`` (exact in float32), cast to ``dtype``,
        with the kernel's unpacked shape (INT4's input axis restored)."""
        q = self.unpacked().astype(jnp.float32)
        if self.bits == 4:
            axis = self.num_in_axes - 1
            q = q.reshape(q.shape[:axis] + (q.shape[axis] * 2,) + q.shape[axis + 2 :])
        scale = self.scale.astype(jnp.float32)
        if self.groups > 1:  # [G, *out] -> the first input axis in G parts
            n_in = self.num_in_axes
            first = q.shape[0]
            q = q.reshape((self.groups, first // self.groups) + q.shape[1:])
            scale = scale.reshape((self.groups,) + (1,) * n_in + scale.shape[1:])
            return (q * scale).reshape((first,) + q.shape[2:]).astype(dtype)
        return (q * scale).astype(dtype)


# The linears of a layer that weight-only quantization covers, and how many leading
# (input, contracted) axes each kernel has; the rest are its output axes.
QUANTIZED_KERNELS = {"qkv_kernel": 1, "out_kernel": 2, "wi_kernel": 1, "wo_kernel": 1}


def quantize_kernel(w: jax.Array, bits: int, num_in_axes: int, stacked: bool = False) -> QuantizedWeight:
    """A float kernel ``[*in, *out]`` (``[layers, *in, *out]`` when ``stacked``) quantized as
    the authors quantize their fp16 release (``glm_jax.checkpoint.quantized.quantize``, the
    same arithmetic on device): weights rounded to fp16, one fp16 scale per output unit
    ``absmax / (2^(bits-1) - 1)``, ``q = round_half_even(w / scale)`` in fp16, INT4 packed
    two per byte along the last input axis, the even index in the high nibble."""
    qmax = {8: 127, 4: 7}[bits]
    lead = 1 if stacked else 0
    in_axes = tuple(range(lead, lead + num_in_axes))
    # Each fp16 quotient is computed in float32 and rounded once to fp16, as numpy divides
    # fp16 (XLA's own fp16 division, and a divide by a constant, can round differently).
    w16 = w.astype(jnp.float16).astype(jnp.float32)
    divisor = lax.optimization_barrier(jnp.float32(qmax))
    scale = (jnp.max(jnp.abs(w16), axis=in_axes) / divisor).astype(jnp.float16)
    expand = scale.astype(jnp.float32).reshape(scale.shape[:lead] + (1,) * num_in_axes + scale.shape[lead:])
    q = jnp.round((w16 / expand).astype(jnp.float16))
    q = jnp.where(jnp.isfinite(q), q, 0).astype(jnp.int8)  # an all-zero output unit has scale 0: zeros
    if bits == 4:
        axis = lead + num_in_axes - 1
        even = lax.slice_in_dim(q, 0, None, 2, axis).astype(jnp.uint8)
        odd = lax.slice_in_dim(q, 1, None, 2, axis).astype(jnp.uint8)
        q = lax.bitcast_convert_type((even << 4) | (odd & 0x0F), jnp.int8)
    return QuantizedWeight(q, scale, bits=bits)


@flax.struct.dataclass
class Bf16Bits:
    """A bfloat16 kernel stored as its uint16 bit patterns (read by the streaming matmul)."""

    raw: jax.Array  # uint16, the kernel's shape
    stream: bool = flax.struct.field(pytree_node=False, default=True)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.raw.shape

    def value(self) -> jax.Array:
        return lax.bitcast_convert_type(self.raw, jnp.bfloat16)


Compact = (QuantizedWeight, Bf16Bits)
Weight = Union[jax.Array, QuantizedWeight, Bf16Bits]


def is_compact(w) -> bool:
    return isinstance(w, Compact)


def kernel(module: nn.Module, name: str, init_fn, shape, param_dtype):
    """``module.param(name, ...)``, or the stored compact weight of that name."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if is_compact(value):
            return value
    return module.param(name, init_fn, shape, param_dtype)


def take(table: Weight, ids: jax.Array, dtype) -> jax.Array:
    """Rows ``ids`` of an embedding table (float or :class:`Bf16Bits`), in ``dtype``."""
    if isinstance(table, Bf16Bits):
        return _widen_bf16(jnp.take(table.raw, ids, axis=0)).astype(dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)


def einsum(spec: str, x: jax.Array, w: Weight, dtype) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` in ``dtype`` for a float kernel or a compact one.

    For INT4 the packed input axis is contracted as (pair, even|odd): ``x``'s matching
    axis is viewed as ``[n/2, 2]``, so no interleaved weight is ever built and a sharded
    input axis stays split where it was.
    """
    if not is_compact(w):
        return jnp.einsum(spec, x, w.astype(dtype))
    if w.stream and _rows(spec, x) < STREAM_MAX_ROWS:
        return _streamed(spec, x, w, dtype)
    if isinstance(w, Bf16Bits):
        return jnp.einsum(spec, x, w.value().astype(dtype))
    ins, out = spec.split("->")
    x_spec, w_spec = ins.split(",")
    q = w.q
    if w.bits == 4:
        letter = w_spec[w.num_in_axes - 1]
        pair = _fresh(spec)
        axis = x_spec.index(letter)
        x = x.reshape(x.shape[:axis] + (x.shape[axis] // 2, 2) + x.shape[axis + 1 :])
        q = w.unpacked()
        x_spec, w_spec = x_spec.replace(letter, letter + pair), w_spec.replace(letter, letter + pair)
        spec = f"{x_spec},{w_spec}->{out}"
    if w.groups > 1:  # split the first input axis into (group, rest); keep the group in the output
        letter, group = w_spec[0], _fresh(spec)
        axis = x_spec.index(letter)
        x = x.reshape(x.shape[:axis] + (w.groups, x.shape[axis] // w.groups) + x.shape[axis + 1 :])
        q = q.reshape((w.groups, q.shape[0] // w.groups) + q.shape[1:])
        n_out = len(out) - len([c for c in x_spec if c in out])
        x_spec, w_spec = x_spec.replace(letter, group + letter), group + w_spec
        lead = out[: len(out) - n_out]
        y = jnp.einsum(f"{x_spec},{w_spec}->{lead}{group}{out[len(lead):]}", x, q.astype(dtype), preferred_element_type=jnp.float32)
        return jnp.sum(y * w.scale.astype(jnp.float32), axis=len(lead)).astype(dtype)
    y = jnp.einsum(f"{x_spec},{w_spec}->{out}", x, q.astype(dtype), preferred_element_type=jnp.float32)
    return (y * w.scale.astype(jnp.float32)).astype(dtype)


def _rows(spec: str, x: jax.Array) -> int:
    """Rows of ``x`` as a matrix: the product of its axes that are not contracted."""
    x_spec, out = spec.split(",")[0], spec.split("->")[1]
    return math.prod(n for c, n in zip(x_spec, x.shape) if c in out)


def _fresh(spec: str) -> str:
    return next(c for c in "pqrstuvwxyzabcdefghijklmno" if c not in spec)


# --------------------------------------------------------------------------------------
# The CPU streaming matmul.


def _widen_bf16(bits: jax.Array) -> jax.Array:
    """uint16 bfloat16 patterns -> float32 (a shift: exact, and vectorised on CPU)."""
    return lax.bitcast_convert_type(bits.astype(jnp.uint32) << 16, jnp.float32)


def _matrix_form(spec: str, x_shape, w_shape) -> tuple[int, int, int, bool, tuple[int, ...]]:
    """(M, K, N, contraction-first, output shape) of ``spec`` seen as ``[M, K] @ [K, N]``.

    The weight's contracted axes must be its leading (or trailing) axes and ``x``'s
    trailing axes, in the same order, with the output ``x``'s free axes then the weight's:
    true of every linear in the model (``bld,dthk->blthk``, ``blf,fd->bld``) and of the
    head (``bld,dv->blv``; tied, ``bld,vd->blv``)."""
    ins, out = spec.split("->")
    x_spec, w_spec = ins.split(",")
    con = "".join(c for c in w_spec if c not in out)
    if w_spec.startswith(con):
        first, w_free = True, w_spec[len(con) :]
    elif w_spec.endswith(con):
        first, w_free = False, w_spec[: len(w_spec) - len(con)]
    else:
        raise ValueError(f"streamed matmul: contracted axes of {spec!r} are neither the weight's first nor last")
    x_free = x_spec[: len(x_spec) - len(con)]
    if x_spec != x_free + con or out != x_free + w_free:
        raise ValueError(f"streamed matmul: {spec!r} is not [free..., contracted...] x weight")
    sizes = dict(zip(x_spec, x_shape))
    sizes.update((c, n) for c, n in zip(w_spec, w_shape) if c not in sizes)
    m = math.prod(sizes[c] for c in x_free)
    k = math.prod(sizes[c] for c in con)
    n = math.prod(sizes[c] for c in w_free)
    return m, k, n, first, tuple(sizes[c] for c in out)


def _block_rows(rows: int, row_size: int) -> int:
    """Rows per block: the largest power of two (at most ``rows``) whose block holds no more
    than STREAM_BLOCK_ELEMENTS; the rows that do not fill a last block are multiplied on
    their own."""
    r = 1
    while r * 2 * row_size <= STREAM_BLOCK_ELEMENTS and r * 2 <= rows:
        r *= 2
    return r


def _block(a: jax.Array, i: jax.Array, r: int) -> jax.Array:
    """Rows ``[i * r, (i + 1) * r)`` of ``a``, read in place (no slice of ``a`` is materialised)."""
    return lax.dynamic_slice_in_dim(a, i * r, r, axis=0)


def _streamed(spec: str, x: jax.Array, w, dtype) -> jax.Array:
    if isinstance(w, QuantizedWeight):
        data, bits, groups = w.q, w.bits, w.groups
        w_shape = list(w.q.shape)
        if bits == 4:
            w_shape[w.num_in_axes - 1] *= 2
    else:
        data, bits, groups = w.raw, 16, 1
        w_shape = list(w.raw.shape)
    m, k, n, first, out_shape = _matrix_form(spec, x.shape, w_shape)
    x2 = x.reshape(m, k).astype(jnp.float32)
    if first:
        pack = 2 if bits == 4 else 1
        y = _stream_rows(x2, data.reshape(k // pack, n), bits, groups, w.scale if bits != 16 else None)
    else:
        if bits != 16:
            raise ValueError("streamed matmul: quantized weights keep their input axes first")
        y = _stream_cols(x2, data.reshape(n, k))
    return y.reshape(out_shape).astype(dtype)


def _decode_block(block: jax.Array, bits: int) -> Union[jax.Array, tuple[jax.Array, jax.Array]]:
    if bits == 16:
        return _widen_bf16(block)
    if bits == 8:
        return block.astype(jnp.float32)
    hi = jnp.right_shift(block, 4).astype(jnp.float32)  # even input index
    lo = jnp.right_shift(jnp.left_shift(block, 4), 4).astype(jnp.float32)
    return hi, lo


def _stream_rows(x2: jax.Array, data: jax.Array, bits: int, groups: int, scale) -> jax.Array:
    """``x2 [M, K] @ W [K, N]`` with W stored as ``data [K / pack, N]``, a block of rows at a time."""
    m = x2.shape[0]
    rows, n = data.shape
    pack = 2 if bits == 4 else 1
    scales = None if scale is None else scale.astype(jnp.float32).reshape(groups, n)
    x_t = x2.T  # [K, M]: a block of rows of W meets a block of rows of x.T

    def part(xc_t, wc):
        w = _decode_block(wc, bits)
        if bits == 4:
            xc_t = xc_t.reshape(wc.shape[0], 2, m)
            return xc_t[:, 0].T @ w[0] + xc_t[:, 1].T @ w[1]
        return xc_t.T @ w

    per_group = rows // groups
    r = _block_rows(per_group if groups > 1 else rows, n)
    if groups > 1:
        while per_group % r:  # a block never straddles two groups
            r //= 2
    nblk = rows // r

    def body(i, acc):
        p = part(_block(x_t, i, r * pack), _block(data, i, r))
        if groups > 1:
            p = p * lax.dynamic_index_in_dim(scales, i // (per_group // r), keepdims=True)
        return acc + p

    acc = lax.fori_loop(0, nblk, body, jnp.zeros((m, n), jnp.float32))
    if nblk * r < rows:  # the last rows, fewer than a block (never with groups: r divides a group)
        acc = acc + part(x_t[nblk * r * pack :], data[nblk * r :])
    if scales is not None and groups == 1:
        acc = acc * scales
    return acc


def _stream_cols(x2: jax.Array, data: jax.Array) -> jax.Array:
    """``x2 [M, K] @ T.T`` for a bf16 table ``T [N, K]`` stored as bits, a block of its rows at
    a time (each block as the left operand, so no block is transposed)."""
    n, k = data.shape
    r = _block_rows(n, k)
    nblk = n // r

    def body(i, out):
        y = _widen_bf16(_block(data, i, r)) @ x2.T  # [r, M]
        return lax.dynamic_update_slice_in_dim(out, y, i * r, axis=0)

    out = lax.fori_loop(0, nblk, body, jnp.zeros((n, x2.shape[0]), jnp.float32))
    if nblk * r < n:
        out = lax.dynamic_update_slice_in_dim(out, _widen_bf16(data[nblk * r :]) @ x2.T, nblk * r, axis=0)
    return out.T


def bf16_bits(w) -> Bf16Bits:
    """A float kernel (device or host array) as :class:`Bf16Bits` (rounded to bfloat16)."""
    if isinstance(w, jax.Array):
        return Bf16Bits(lax.bitcast_convert_type(w.astype(jnp.bfloat16), jnp.uint16))
    return Bf16Bits(np.asarray(w).astype(jnp.bfloat16).view(np.uint16))


def map_compact(fn: Callable[[jax.Array], jax.Array], w: Weight) -> Weight:
    """Apply ``fn`` to each array of a weight (e.g. take one layer of a stacked weight)."""
    if isinstance(w, QuantizedWeight):
        return w.replace(q=fn(w.q), scale=fn(w.scale))
    if isinstance(w, Bf16Bits):
        return w.replace(raw=fn(w.raw))
    return fn(w)
