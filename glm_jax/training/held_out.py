"""The held-out loss: the mean Part B loss of a model over batches of the validation split,
computed by the trainer's own eval step (the one place the train loop, ``bench finetune``
and anything else read it from)."""

from __future__ import annotations

from typing import Any

from glm_jax.config import Config
from glm_jax.data.pipeline import BatchStream
from glm_jax.parallel import distributed


def held_out_loss(trainer, params: Any, cfg: Config, batches: int, *, process_index: int = 0,
                  process_count: int = 1) -> float:
    """Mean loss over ``batches`` global batches of ``cfg``'s validation split (this process
    reads its share). Raises ``glm_jax.data.pipeline.EmptySplit`` when the split is empty."""
    stream = BatchStream(cfg, "validation", process_index=process_index, process_count=process_count)
    total = weight = 0.0
    try:
        for _ in range(batches):
            batch = distributed.global_batch(stream.next(cfg.train.batch_size), trainer.mesh)
            s, w = trainer.eval_step(params, batch)
            total, weight = total + float(s), weight + float(w)
    finally:
        stream.close()
    return total / max(weight, 1.0)
