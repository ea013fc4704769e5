"""The batch: one typed structure from the data pipeline to the loss, named after the
model's inputs.

``tokens``, ``positions``, ``prefix_len`` and ``segment_ids`` are exactly what
``GLM.__call__`` takes (``Batch.inputs()``); ``targets`` and ``loss_weights`` are what
the loss reads. Positions are ``[b, L]`` for 1D-position models (GLM-130B) and
``[b, 2, L]`` for 2D ones (ChatGLM-6B, the original GLM): row 0 the position ids, row 1
the block positions (0 in Part A, 1, 2, ... through each Part B span). The data
pipeline calls the latter ``block_positions`` too, from the blank-infilling layout to
here. A Batch is a pytree: ``jax.tree.map`` reaches its arrays, ``None`` segment ids
(unpacked rows) stay ``None``, and ``replace`` gives a changed copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.struct


@flax.struct.dataclass
class Batch:
    tokens: Any  # [b, L] int32 token ids
    positions: Any  # [b, L] or [b, 2, L] int32 (row 1: block positions)
    prefix_len: Any  # [b] Part A length per row, or [b, S] per packed segment
    targets: Any  # [b, L] int32 next-token targets (Part B)
    loss_weights: Any  # [b, L] float32, 1 where a target counts
    segment_ids: Optional[Any] = None  # [b, L] int32 packed segments (0 = padding), or None

    @property
    def size(self) -> int:
        """Rows in the batch."""
        return int(self.tokens.shape[0])

    def inputs(self) -> tuple[Any, Any, Any, Optional[Any]]:
        """``(tokens, positions, prefix_len, segment_ids)``, the model's positional arguments."""
        return self.tokens, self.positions, self.prefix_len, self.segment_ids

    def row(self, i: int) -> "Batch":
        """Row ``i`` alone (no batch axis): for printing and inspection."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Batch(**{k: None if v is None else v[i] for k, v in values.items()})
