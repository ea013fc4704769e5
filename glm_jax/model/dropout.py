"""Dropout whose mask for each row depends only on the step's key, the layer, the site and
the row's index in the step's batch.

So cutting a batch into pieces -- gradient accumulation (``train.microbatches``), the
pipeline's microbatches -- draws exactly the masks of the whole batch: every way of running
a step computes the same loss and gradients, with dropout on as with it off. Each layer
folds its index into the key (``for_layer``) and each use within a layer a site number;
the bits are threefry's, as ``jax.random.bernoulli`` would draw them for the whole batch
(``glm_jax.kernels.dropout_hash.keep_rows``), and the fused attention kernel draws the same
ones in-kernel.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from glm_jax.kernels import dropout_hash

ATTENTION_PROBS, AFTER_ATTENTION, AFTER_MLP = 0, 1, 2  # the sites within a layer


@flax.struct.dataclass
class DropoutRows:
    """The step's dropout key and which rows of the step's batch a call holds: rows
    ``row_offset, row_offset + row_stride, ...`` (int32 ``row_offset`` may be traced)."""

    key: jax.Array
    row_offset: jax.Array
    row_stride: int = flax.struct.field(pytree_node=False, default=1)

    def rows(self, n: int) -> jax.Array:
        return self.row_offset + self.row_stride * jnp.arange(n, dtype=jnp.int32)

    def for_layer(self, layer_index) -> "DropoutRows":
        return self.replace(key=jax.random.fold_in(self.key, layer_index))

    def site(self, site: int) -> jax.Array:
        return jax.random.fold_in(self.key, site)

    def microbatches(self, n: int) -> "DropoutRows":
        """For the n microbatches of every n-th row: ``row_offset`` becomes ``[n]``."""
        offsets = self.row_offset + self.row_stride * jnp.arange(n, dtype=jnp.int32)
        return DropoutRows(self.key, offsets, self.row_stride * n)


def drop(x: jax.Array, rate: float, dropout: Optional[DropoutRows], site: int) -> jax.Array:
    """Inverted dropout of ``x [rows, ...]`` at ``site`` (identity without ``dropout``)."""
    if dropout is None or rate == 0.0:
        return x
    keep = dropout_hash.keep_rows(dropout.site(site), rate, dropout.rows(x.shape[0]), x.shape[1:])
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
