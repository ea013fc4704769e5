"""Weight-only INT8/INT4 parameters in GLM-130B's / ChatGLM-6B's format (MODEL.md §2.5).

The four linears of every layer (QKV, attention output, both MLP projections) become
:class:`glm_jax.model.linear.QuantizedWeight` leaves; embeddings, the output head,
LayerNorms and biases stay as they are. The arithmetic is the authors' and lives in one
place, ``glm_jax.checkpoint.quantized`` (per output row absmax scale in fp16, round half to
even, INT4 in [-7, 7], two values per byte with the even input column in the high
nibble): each kernel is mapped to the authors' ``[out, in]`` rows by the converters'
layout (``glm_jax.checkpoint.authors_layout``), quantized there, and the packed bytes and scales
mapped back, so a quantized checkpoint's own tensors load bit for bit
(:func:`from_authors`) and :func:`to_authors` gives them back.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from glm_jax.config import ConfigError, ModelConfig
from glm_jax.checkpoint import authors_layout, quantized
from glm_jax.model.linear import QuantizedWeight

BITS = quantized.BITS


def check_bits(bits) -> int:
    if bits not in BITS:
        raise ConfigError(f"quantization bits must be one of {', '.join(map(str, BITS))} (or 0 for none), got {bits}")
    return int(bits)


def packed_transform(t: authors_layout.Transform, bits: int) -> authors_layout.Transform:
    """The kernel's transform for its packed ``[out, in * bits / 8]`` int8 rows. Our layouts
    keep the authors' input dimension last in ``split`` and first in our axes, so packing
    along the authors' columns packs our last input axis."""
    if bits == 8:
        return t
    rows, cols = t.authors_shape
    split = t.split[:-1] + (t.split[-1] * bits // 8,)
    return authors_layout.Transform((rows, cols * bits // 8), split, t.perm, t.lead, t.block_axis)


def scale_transform(t: authors_layout.Transform) -> authors_layout.Transform:
    """The transform of the per-output-row scale ``[out]``: our output axes, in our order."""
    perm = tuple(p for p in t.perm if p < t.lead)
    return authors_layout.Transform((t.authors_shape[0],), t.split[: t.lead], perm, lead=t.lead)


def _linear_entries(cfg: ModelConfig) -> dict[tuple[str, ...], list[authors_layout.Entry]]:
    """Each quantized leaf's path -> its per-layer entries (one entry when unrolled)."""
    out: dict[tuple[str, ...], list[authors_layout.Entry]] = {}
    for e in authors_layout.entries(cfg):
        if quantized.is_quantized_linear(e.key):
            out.setdefault(e.path, []).append(e)
    return out


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of nested dict ``tree`` with ``path`` replaced (only the dicts on the path are copied)."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
    return out


def _build(
    params: dict, cfg: ModelConfig, bits: int, authors_rows: Callable[[authors_layout.Entry], tuple[np.ndarray, np.ndarray]]
) -> dict:
    """Replace every quantized linear leaf; ``authors_rows(entry)`` gives its (weight, scale)
    in the authors' layout (int8 ``[out, in * bits / 8]``, and ``[out]``, or ``[groups, out]``
    for a weight quantized in ``groups`` contiguous column blocks with a scale each: a
    row-parallel linear of a tensor-parallel SAT checkpoint, one block per rank)."""
    for path, group in _linear_entries(cfg).items():
        t = group[0].transform
        pt, st = packed_transform(t, bits), scale_transform(t)
        qs, scales, groups = [], [], set()
        for e in group:
            w, s = authors_rows(e)
            s = np.asarray(s, np.float16)
            qs.append(pt.to_ours(np.asarray(w, np.int8)))
            scales.append(np.stack([st.to_ours(r) for r in s]) if s.ndim == 2 else st.to_ours(s))
            groups.add(s.shape[0] if s.ndim == 2 else 1)
        if len(groups) != 1:
            raise ValueError(f"{group[0].key}: layers quantized with different numbers of scale groups {sorted(groups)}")
        if cfg.scan_layers:
            q, s = np.stack(qs), np.stack(scales)
        else:
            q, s = qs[0], scales[0]
        params = _set(params, path, QuantizedWeight(jnp.asarray(q), jnp.asarray(s), bits=bits, groups=groups.pop()))
    return params


def quantize(params: dict, cfg: ModelConfig, bits: int) -> dict:
    """Float parameters -> the same tree with the four linears of every layer quantized.

    Weights are rounded to fp16 first, as the authors quantize their fp16 release.
    """
    bits = check_bits(bits)

    def rows(e: authors_layout.Entry):
        leaf = _get(params, e.path)
        w = np.asarray(leaf[authors_layout.leaf_index(e, cfg)], np.float32)
        return quantized.quantize(e.transform.to_authors(w).astype(np.float16), bits)

    return _build(params, cfg, bits, rows)


def from_authors(params: dict, cfg: ModelConfig, bits: int, tensors: Callable[[str], tuple[np.ndarray, np.ndarray]]) -> dict:
    """Put a pre-quantized checkpoint's own tensors in place: ``tensors(key)`` gives the
    int8 ``weight`` and fp16 ``weight_scale`` stored under the authors' key."""
    bits = check_bits(bits)
    return _build(params, cfg, bits, lambda e: tensors(e.key))


def to_authors(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(key, int8 weight, fp16 weight_scale) of every quantized linear, in the authors' layout
    (the scale ``[groups, out]`` for a weight quantized per column block)."""
    for path, group in _linear_entries(cfg).items():
        w = _get(params, path)
        if not isinstance(w, QuantizedWeight):
            continue
        t = group[0].transform
        pt, st = packed_transform(t, w.bits), scale_transform(t)
        q, s = np.asarray(w.q), np.asarray(w.scale)
        for e in group:
            idx = authors_layout.leaf_index(e, cfg)
            scale = np.stack([st.to_authors(g) for g in s[idx]]) if w.groups > 1 else st.to_authors(s[idx])
            yield e.key, pt.to_authors(q[idx]), scale


def is_quantized(params: Any) -> Optional[int]:
    """The bits of the quantized leaves in ``params`` (None if there are none)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    bits = {w.bits for w in leaves if isinstance(w, QuantizedWeight)}
    return bits.pop() if len(bits) == 1 else (None if not bits else max(bits))


def linear_bytes(params: Any) -> dict:
    """Bytes the quantized linears take on device, against the same weights in bf16."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    stored = bf16 = 0
    for w in leaves:
        if isinstance(w, QuantizedWeight):
            stored += w.q.nbytes + w.scale.nbytes
            bf16 += 2 * w.q.size * (8 // w.bits)
    return {"quantized_bytes": stored, "bf16_bytes": bf16, "ratio": stored / bf16 if bf16 else None}


def logical_specs(params: Any, float_specs: Any) -> Any:
    """Logical PartitionSpecs for ``params`` (some leaves quantized) from the float model's.

    ``q`` is split like the float kernel; ``scale`` like the kernel's output axes (its
    group axis, if any, unsplit).
    """
    def one(leaf, spec):
        if not isinstance(leaf, QuantizedWeight):
            return spec
        names = tuple(spec) + (None,) * (leaf.q.ndim - len(tuple(spec)))
        stacked = 1 if names and names[0] == "layers" else 0
        scale_names = names[:stacked] + ((None,) if leaf.groups > 1 else ()) + names[stacked + leaf.num_in_axes :]
        return leaf.replace(q=PartitionSpec(*names), scale=PartitionSpec(*scale_names))

    return jax.tree.map(one, params, float_specs, is_leaf=lambda x: isinstance(x, QuantizedWeight))
