"""Train state created directly in its sharded layout, and the jitted train step.

Shardings come from the parameters' logical axis names through the one rules table
(``glm_jax.parallel.rules``); AdamW moments inherit their parameter's layout.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from glm_jax.config import Config
from glm_jax.model import GLM
from glm_jax.model.grad_shrink import shrink_embedding_gradient
from glm_jax.parallel import rules
from glm_jax.training.loss import masked_cross_entropy


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    skipped: jax.Array  # updates skipped because the loss or a gradient was not finite


def _example_inputs(cfg: Config, batch: int = 1):
    m = cfg.model
    length = cfg.train.seq_len
    tokens = jnp.zeros((batch, length), jnp.int32)
    two_d = m.position_encoding in ("rotary_2d", "learned_2d")
    positions = jnp.zeros((batch, 2, length) if two_d else (batch, length), jnp.int32)
    prefix = jnp.zeros((batch,), jnp.int32)
    return tokens, positions, prefix


def _init_boxed(cfg: Config, model: GLM, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    params = model.init(rng, *_example_inputs(cfg))["params"]
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=optimizer.init(params), skipped=zero)


def state_shardings(cfg: Config, model: GLM, optimizer, mesh: Mesh):
    abstract = jax.eval_shape(lambda r: _init_boxed(cfg, model, optimizer, r), jax.random.key(0))
    return rules.logical_to_sharding(rules.logical_specs(abstract), mesh)


def abstract_state(cfg: Config, model: GLM, optimizer) -> TrainState:
    """Shapes and dtypes of the train state (no allocation)."""
    return rules.unbox(jax.eval_shape(lambda r: _init_boxed(cfg, model, optimizer, r), jax.random.key(0)))


def init_state(cfg: Config, model: GLM, optimizer, mesh: Mesh, rng: jax.Array, shardings=None) -> TrainState:
    """Initialise parameters and optimizer state directly into their shardings."""
    if shardings is None:
        shardings = state_shardings(cfg, model, optimizer, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules.logical_axis_rules()):
        init = jax.jit(lambda r: rules.unbox(_init_boxed(cfg, model, optimizer, r)), out_shardings=shardings)
        return init(rng)


def loss_sums(model: GLM, params, batch: dict, dropout_rng: jax.Array | None = None):
    """Summed Part B loss and target-token count of a batch (float32)."""
    logits = model.apply(
        {"params": params},
        batch["tokens"],
        batch["positions"],
        batch["prefix_len"],
        batch.get("segment_ids"),
        rngs=None if dropout_rng is None else {"dropout": dropout_rng},
    )
    return masked_cross_entropy(logits, batch["targets"], batch["loss_weights"])


def loss_fn(model: GLM, params, batch: dict, dropout_rng: jax.Array | None = None):
    loss_sum, weight = loss_sums(model, params, batch, dropout_rng)
    return loss_sum / jnp.maximum(weight, 1.0), weight


def loss_and_grads(model: GLM, params, batch: dict, dropout_rng: jax.Array | None = None):
    """Loss, target-token count and the gradients the optimizer sees (embedding shrink applied)."""
    (loss, weight), grads = jax.value_and_grad(lambda p: loss_fn(model, p, batch, dropout_rng), has_aux=True)(params)
    return loss, weight, shrink_embedding_gradient(grads, model.cfg)


def make_train_step(cfg: Config, model: GLM, optimizer, mesh: Mesh, state_sharding) -> Callable:
    """A jitted ``(state, batch) -> (state, metrics)`` with explicit shardings; donates the state."""
    dropout = cfg.model.attention_dropout > 0 or cfg.model.hidden_dropout > 0
    seed_key = jax.random.key(cfg.train.seed + 1)

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(seed_key, state.step) if dropout else None
        loss, weight, grads = loss_and_grads(model, state.params, batch, rng)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient leaves parameters and optimizer state as they were.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(ok, new, old), (params, opt_state), (state.params, state.opt_state)
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "target_tokens": weight, "skipped": ~ok}
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, skipped=state.skipped + (~ok).astype(jnp.int32))
        return new_state, metrics

    return _jit_per_batch_keys(step, mesh, (state_sharding,), (state_sharding, rules.replicated(mesh)), donate=(0,))


def make_eval_step(model: GLM, mesh: Mesh, state_sharding) -> Callable:
    """A jitted ``(params, batch) -> (loss_sum, weight)`` on the mesh."""

    def step(params, batch):
        return loss_sums(model, params, batch)

    return _jit_per_batch_keys(step, mesh, (state_sharding.params,), rules.replicated(mesh), donate=())


def _jit_per_batch_keys(step, mesh: Mesh, leading_shardings: tuple, out_shardings, donate: tuple) -> Callable:
    """jit ``step(*leading, batch)`` with the batch sharded over ``batch``; one compile per batch layout."""

    def batch_sharding(batch):
        return jax.tree.map(lambda x: rules.batch_sharding(mesh, x.ndim), batch)

    jitted = {}

    def run(*args):
        *leading, batch = args
        key = tuple(sorted(batch))
        if key not in jitted:
            jitted[key] = jax.jit(
                step,
                in_shardings=(*leading_shardings, batch_sharding(batch)),
                out_shardings=out_shardings,
                donate_argnums=donate,
            )
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules.logical_axis_rules()):
            return jitted[key](*leading, batch)

    return run
