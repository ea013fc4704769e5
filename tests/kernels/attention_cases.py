"""GLM mask inputs for the kernel tests: Part A lengths 0 / full / random, packed segments
with padding, left padding, and segment ids that repeat (not one run per id)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from glm_jax.kernels import attention_mask

KINDS = ("gmask", "packed", "left_pad", "repeated_ids")


def _packed_row(rng, length: int):
    seg = np.zeros(length, np.int32)
    plen = np.zeros(length, np.int32)
    pos, s = 0, 1
    end = length - int(rng.integers(0, length // 4 + 1))  # trailing padding (segment 0)
    while pos < end:
        n = min(int(rng.integers(1, max(2, length // 2))), end - pos)
        seg[pos:pos + n] = s
        plen[s - 1] = int(rng.choice([0, n, rng.integers(0, n + 1)]))
        pos, s = pos + n, s + 1
    return seg, plen


def mask_inputs(rng, batch: int, length: int, kind: str):
    """(part_a_end ``[b, L]``, segment_ids ``[b, L]``) for one of KINDS."""
    if kind == "gmask":
        choices = [0, length] + [int(x) for x in rng.integers(0, length + 1, batch)]
        plen = np.array([choices[i % len(choices)] for i in rng.permutation(batch)], np.int32)
        seg = np.ones((batch, length), np.int32)
        return attention_mask.part_a_end(jnp.asarray(plen[:, None]), jnp.asarray(seg), length), jnp.asarray(seg)
    if kind == "packed":
        rows = [_packed_row(rng, length) for _ in range(batch)]
        seg = np.stack([r[0] for r in rows])
        plen = np.stack([r[1] for r in rows])
    elif kind == "left_pad":
        pads = rng.integers(0, length // 2, batch)
        seg = (np.arange(length)[None, :] >= pads[:, None]).astype(np.int32)
        plen = np.array([[int(rng.integers(0, length - p + 1))] for p in pads], np.int32)
    elif kind == "repeated_ids":
        seg = rng.integers(0, 3, (batch, length)).astype(np.int32)
        plen = rng.integers(0, length // 2, (batch, 3)).astype(np.int32)
    else:
        raise ValueError(kind)
    return attention_mask.part_a_end(jnp.asarray(plen), jnp.asarray(seg), length), jnp.asarray(seg)


def nonempty_blocks(part_a_end, segment_ids, block_q: int, block_kv: int, padded: int) -> np.ndarray:
    """``[b, q blocks, kv blocks]`` bool from the dense mask (the kernels' padding rule)."""
    from glm_jax.kernels import block_mask

    return np.asarray(block_mask.dense_classes(part_a_end, segment_ids, block_q, block_kv, padded)) != block_mask.EMPTY
