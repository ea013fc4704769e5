"""Batch-size ramp-up, as GLM-130B trained (192 -> 4224 sequences over the first 2.5% of
samples, MODEL.md §5): the global batch grows in equal steps of
``train.batch_size_increment`` spaced evenly over ``train.rampup_samples`` sequences.

The size is a function of the sequences consumed so far (saved with each checkpoint),
so a resumed run, or one that rolled back past bad batches, keeps the same schedule.
Each distinct size compiles the train step once.
"""

from __future__ import annotations

from glm_jax.config import TrainConfig


def batch_size_at(cfg: TrainConfig, consumed_rows: int) -> int:
    if not cfg.batch_size_start or consumed_rows >= cfg.rampup_samples:
        return cfg.batch_size
    increments = (cfg.batch_size - cfg.batch_size_start) // cfg.batch_size_increment
    rows_per_increment = cfg.rampup_samples / increments
    return min(cfg.batch_size, cfg.batch_size_start + cfg.batch_size_increment * int(consumed_rows // rows_per_increment))


def batch_sizes(cfg: TrainConfig) -> list[int]:
    """Every size the schedule uses (for up-front checks against the mesh)."""
    if not cfg.batch_size_start:
        return [cfg.batch_size]
    return list(range(cfg.batch_size_start, cfg.batch_size + 1, cfg.batch_size_increment))
