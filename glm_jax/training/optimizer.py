"""The optax chain from config: global-norm clipping, AdamW, warmup then cosine decay to 10%."""

from __future__ import annotations

import optax

from glm_jax.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """The learning rate of update ``count`` (0-based): linear warmup that reaches the peak
    at update ``warmup_steps``, then cosine decay to 10% at the last update.

    The curve is read one step ahead, so the first update already moves the weights
    (peak / warmup_steps) rather than spending a step at 0: a 1-step run trains."""
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=min(cfg.warmup_steps, cfg.steps),
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=0.1 * cfg.learning_rate,
    )
    return lambda count: base(count + 1)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.adam_b1,
            b2=cfg.adam_b2,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        ),
    )
