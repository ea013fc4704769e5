"""The optax chain from config: global-norm clipping, AdamW, warmup then cosine decay to 10%."""

from __future__ import annotations

import optax

from glm_jax.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=min(cfg.warmup_steps, cfg.steps),
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=0.1 * cfg.learning_rate,
    )


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
