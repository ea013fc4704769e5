"""Weight-only INT8/INT4 quantization exactly as GLM-130B and ChatGLM-6B store it (MODEL.md §2.5).

Per output row r of a torch ``[out, in]`` fp16 weight, symmetric:

    scale[r] = fp16( max_j |W[r, j]| / (2^(b-1) - 1) )          127 for INT8, 7 for INT4
    q[r, j]  = int8( round_half_even( fp16(W[r, j] / scale[r]) ) )

Every step is rounded to fp16 the way the authors' half-precision tensors round it
(compute in float32, round the result to fp16), and ``round`` is half-to-even
(``torch.round``): dropping either changes some q. INT4 packs two values per byte
along the input dimension, the even column in the high nibble:
``byte = (q[2j] << 4) | (q[2j+1] & 0xF)``; unpacking sign-extends both nibbles. The
stored tensors are ``weight`` int8 ``[out, in * b / 8]`` and ``weight_scale`` fp16
``[out]``; the runtime weight is ``fp16(q * scale[row])``.

Requantizing a dequantized weight does not always give the stored q and scale back:
rows whose scale is subnormal in fp16 (INT8 rows with max |W| below ~0.008) can round
it to a neighbouring value. So the converters keep a quantized source's own tensors and
reuse them while the weights are unchanged: a params directory converted from a quantized
release keeps them in ``quantized/`` under the authors' keys (:class:`KeptTensors`), and
``glm_jax.load``, to-hf and to-sat read them back from there.

All functions work on row blocks as well as whole tensors (everything is per row).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from glm_jax.checkpoint import store

BITS = (4, 8)
# The four linears per layer the authors quantize; embeddings, lm_head, LayerNorms and
# biases stay fp16.
LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def is_quantized_linear(key: str) -> bool:
    """True for the ``.weight`` of one of the four quantized linears."""
    return key.endswith(".weight") and any(key.endswith(f".{name}.weight") for name in LINEARS)


def scale_key(weight_key: str) -> str:
    """The authors' key of a quantized linear's scales: ``....weight`` -> ``....weight_scale``."""
    return weight_key[: -len("weight")] + "weight_scale"


def packed_shape(shape: tuple[int, int], bits: int) -> tuple[int, int]:
    out, inp = shape
    return (out, inp * bits // 8)


def _check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"quantization bits must be 4 or 8, got {bits}")
    return (1 << (bits - 1)) - 1


def quantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """fp16 rows ``[n, in]`` -> (``weight`` int8 ``[n, in*b/8]``, ``weight_scale`` fp16 ``[n]``)."""
    qmax = _check_bits(bits)
    w = np.asarray(w, np.float16)
    if bits == 4 and w.shape[1] % 2:
        raise ValueError(f"INT4 needs an even input size, got {w.shape[1]}")
    scale = (np.abs(w).max(axis=1) / np.float16(qmax)).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.round(w / scale[:, None])  # fp16 / fp16 rounds to fp16, then half-to-even
    q = np.nan_to_num(q, nan=0.0).astype(np.int8)  # an all-zero row has scale 0: store zeros
    return (pack_int4(q) if bits == 4 else q), scale


def dequantize(weight: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """The runtime weight: ``fp16(q * scale[row])``, ``[n, in]`` fp16."""
    _check_bits(bits)
    q = unpack_int4(weight) if bits == 4 else np.asarray(weight, np.int8)
    return q.astype(np.float16) * np.asarray(scale, np.float16)[:, None]


def reproduces(weight: np.ndarray, scale: np.ndarray, dense: np.ndarray, bits: int) -> bool:
    """True if the stored ``weight``/``weight_scale`` dequantize to ``dense`` bit for bit (as fp16)."""
    got = dequantize(weight, np.asarray(scale).astype(np.float16), bits)
    return bool(np.array_equal(got.view(np.uint16), np.asarray(dense, np.float16).view(np.uint16)))


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], ``[n, 2m]`` -> ``[n, m]`` bytes, even column in the high nibble."""
    u = np.asarray(q, np.int8).view(np.uint8)
    return ((u[:, 0::2] << 4) | (u[:, 1::2] & 0x0F)).astype(np.uint8).view(np.int8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """``[n, m]`` bytes -> ``[n, 2m]`` int8, both nibbles sign-extended."""
    b = np.asarray(packed, np.int8)
    out = np.empty((b.shape[0], 2 * b.shape[1]), np.int8)
    out[:, 0::2] = b >> 4
    out[:, 1::2] = (b << 4).astype(np.int8) >> 4
    return out


class KeptTensors:
    """A quantized release's own tensors (``quantized/``: one leaf per authors' key, the
    int8 ``weight`` and its ``weight_scale``), opened lazily; empty when ``directory`` is None.

    Tensor-parallel SAT releases quantize each rank's shard separately, so a row-parallel
    linear's scales are stored ``[ranks, out]`` (one row per source rank).
    """

    def __init__(self, directory: Optional[str]):
        self.reader = store.CheckpointReader(directory) if directory and os.path.isdir(directory) else None
        self._open: dict = {}

    def has(self, key: str) -> bool:
        return self.reader is not None and (key,) in self.reader.leaves

    def array(self, key: str):
        """The tensorstore array of ``key`` (reads are ``array[region].read().result()``)."""
        if key not in self._open:
            self._open[key] = self.reader.open((key,))
        return self._open[key]

    def read(self, key: str, region: Optional[tuple] = None) -> np.ndarray:
        arr = self.array(key)
        return np.asarray((arr if region is None else arr[region]).read().result())

    def dtype_name(self, key: str, default: str = "float16") -> str:
        return np.dtype(self.array(key).dtype.numpy_dtype).name if self.has(key) else default

    def pair(self, weight_key: str, rows: Optional[slice] = None) -> tuple[np.ndarray, np.ndarray]:
        """(``weight``, ``weight_scale``) of a linear, all rows or a run of them."""
        region = None if rows is None else (rows,)
        return self.read(weight_key, region), self.read(scale_key(weight_key), region)
