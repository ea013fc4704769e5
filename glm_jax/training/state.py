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
from flax import traverse_util
from jax.sharding import Mesh

from glm_jax.config import Config
from glm_jax.model import GLM, Batch, init_params, linear
from glm_jax.model.glm import output_embedding
from glm_jax.model.grad_shrink import shrink_embedding_gradient
from glm_jax.parallel import rules
from glm_jax.training import finetune
from glm_jax.training.loss import chunked_cross_entropy, masked_cross_entropy


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    skipped: jax.Array  # updates skipped because the loss or a gradient was not finite


def _init_boxed(cfg: Config, model: GLM, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    params = quantize_base(init_params(cfg.model, rng), cfg)
    zero = jnp.zeros((), jnp.int32)
    trainable, _ = finetune.split(params, cfg.finetune.method)
    return TrainState(step=zero, params=params, opt_state=optimizer.init(trainable), skipped=zero)


def _quantized_box(box: nn.LogicallyPartitioned, bits: int, num_in_axes: int, stacked: bool) -> linear.QuantizedWeight:
    """A boxed float kernel as a QuantizedWeight of boxes: ``q`` split like the kernel,
    ``scale`` like its output axes."""
    w = linear.quantize_kernel(box.value, bits, num_in_axes, stacked)
    lead = 1 if stacked else 0
    names = tuple(box.names)
    return w.replace(q=box.replace_boxed(w.q),
                     scale=nn.LogicallyPartitioned(w.scale, names[:lead] + names[lead + num_in_axes:]))


def quantize_base(params: Any, cfg: Config) -> Any:
    """``params`` (boxed or plain) with the frozen base's linears quantized
    (``finetune.quantize_base``): every layer's QKV, attention output and MLP kernels."""
    bits = cfg.finetune.base_bits
    if not bits:
        return params
    flat = traverse_util.flatten_dict(params)
    for path, value in flat.items():
        if path[-1] not in linear.QUANTIZED_KERNELS or finetune.is_trainable(path, cfg.finetune.method):
            continue
        n_in, stacked = linear.QUANTIZED_KERNELS[path[-1]], path[0] == "layers"
        if isinstance(value, nn.LogicallyPartitioned):
            flat[path] = _quantized_box(value, bits, n_in, stacked)
        else:
            flat[path] = linear.quantize_kernel(value, bits, n_in, stacked)
    return traverse_util.unflatten_dict(flat)


def init_some_params(cfg: Config, mesh: Mesh, shardings: dict, rng: jax.Array) -> dict:
    """Initial values of only the parameters ``shardings`` names (a flat ``{path:
    sharding}``), as a fresh run would draw them: under jit the other leaves are never
    computed. How fine-tuning initialises what it adds to its base."""

    def init():
        flat = traverse_util.flatten_dict(rules.unbox(init_params(cfg.model, rng)))
        return {k: v for k, v in flat.items() if k in shardings}

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules.logical_axis_rules()):
        return jax.jit(init, out_shardings=shardings)()


def state_shardings(cfg: Config, model: GLM, optimizer, mesh: Mesh) -> TrainState:
    """NamedShardings of every leaf of the train state, from the logical-axis rules.

    ``mesh.param_sharding`` decides what the ``data`` axis holds besides the batch:
    nothing (replicated), the AdamW state (zero1), or parameters and AdamW state (fsdp).
    """
    plain, split = _both_shardings(cfg, model, optimizer, mesh)
    mode = cfg.mesh.param_sharding
    return TrainState(
        step=plain.step,
        params=split.params if mode == "fsdp" else plain.params,
        opt_state=plain.opt_state if mode == "replicated" else split.opt_state,
        skipped=plain.skipped,
    )


def _both_shardings(cfg: Config, model: GLM, optimizer, mesh: Mesh) -> tuple[TrainState, TrainState]:
    """The state's shardings by the plain rules and with parameter axes split over data."""
    abstract = jax.eval_shape(lambda r: _init_boxed(cfg, model, optimizer, r), jax.random.key(0))
    specs = rules.fit_to_shapes(rules.logical_specs(abstract), rules.unbox(abstract), dict(mesh.shape))
    return rules.logical_to_sharding(specs, mesh), rules.logical_to_sharding(specs, mesh, shard_params_over_data=True)


def gradient_shardings(cfg: Config, model: GLM, optimizer, mesh: Mesh):
    """Where the trainable parameters' gradients live before the update: with zero1 or
    fsdp, split over ``data`` like the AdamW moments (a reduce-scatter, not an all-reduce)."""
    plain, split = _both_shardings(cfg, model, optimizer, mesh)
    params = plain.params if cfg.mesh.param_sharding == "replicated" else split.params
    return finetune.split(params, cfg.finetune.method)[0]


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


def state_from_params(optimizer, mesh: Mesh, shardings: TrainState, params, method: str = "full") -> TrainState:
    """Step 0 with ``params`` (already in their shardings, donated) and a fresh optimizer
    state: where fine-tuning starts."""

    def build(p):
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=p, opt_state=optimizer.init(finetune.split(p, method)[0]), skipped=zero)

    with jax.set_mesh(mesh):
        return jax.jit(build, in_shardings=(shardings.params,), out_shardings=shardings, donate_argnums=0)(params)


def loss_sums(model: GLM, params, batch: Batch, dropout_rng: jax.Array | None = None, vocab_chunks: int = 1,
              dropout_rows: tuple = (0, 1)):
    """Summed Part B loss and target-token count of a batch (float32). ``dropout_rows``:
    which rows of the step's batch these are (see ``GLM.__call__``)."""
    out = model.apply(
        {"params": params},
        *batch.inputs(),
        return_hidden=vocab_chunks > 1,
        dropout_rows=dropout_rows,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng},
    )
    if vocab_chunks > 1:
        head = output_embedding(params, model.cfg)
        return chunked_cross_entropy(out, head, batch.targets, batch.loss_weights, vocab_chunks)
    return masked_cross_entropy(out, batch.targets, batch.loss_weights)


def split_microbatches(batch: Batch, n: int) -> Batch:
    """``[B, ...]`` -> ``[n, B/n, ...]`` taking every n-th row, so that each microbatch draws
    evenly from every data shard and stays split over ``data`` without moving rows."""

    def split(x):
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def loss_and_grads(
    model: GLM,
    params,
    batch: Batch,
    dropout_rng: jax.Array | None = None,
    *,
    microbatches: int = 1,
    vocab_chunks: int = 1,
    grad_shardings=None,
    frozen=None,
):
    """Loss, target-token count and the gradients the optimizer sees (embedding shrink applied).

    ``params`` is what is differentiated; ``frozen`` (the base under P-tuning or LoRA) the
    rest of the model's parameters, merged in and never differentiated.

    With ``microbatches`` > 1 the batch is processed in slices whose summed-loss gradients
    are accumulated in float32 and divided by the whole batch's target count at the end:
    the same loss and gradients as one pass, at a fraction of the activation memory --
    dropout included, since slice i (rows i, i + n, ...) draws those rows' masks.
    """

    def sums(p, mb, rng, rows=(0, 1)):
        return loss_sums(model, finetune.merge(p, frozen or {}), mb, rng, vocab_chunks, rows)

    def constrain(g):
        return g if grad_shardings is None else jax.lax.with_sharding_constraint(g, grad_shardings)

    if microbatches == 1:
        def mean(p):
            loss_sum, weight = sums(p, batch, dropout_rng)
            return loss_sum / jnp.maximum(weight, 1.0), weight

        (loss, weight), grads = jax.value_and_grad(mean, has_aux=True)(params)
        return loss, weight, shrink_embedding_gradient(constrain(grads), model.cfg)

    def accumulate(carry, xs):
        grads, loss_sum, weight = carry
        i, mb = xs
        (s, w), g = jax.value_and_grad(sums, has_aux=True)(params, mb, dropout_rng, (i, microbatches))
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, constrain(g))
        return (constrain(grads), loss_sum + s, weight + w), None

    zeros = constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    xs = (jnp.arange(microbatches), split_microbatches(batch, microbatches))
    (grads, loss_sum, weight), _ = jax.lax.scan(accumulate, init, xs)
    scale = 1.0 / jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params)
    return loss_sum * scale, weight, shrink_embedding_gradient(grads, model.cfg)


def make_train_step(cfg: Config, model: GLM, optimizer, mesh: Mesh, state_sharding) -> Callable:
    """A jitted ``(state, batch) -> (state, metrics)`` with explicit shardings; donates the state."""
    dropout = cfg.model.has_dropout
    seed_key = jax.random.key(cfg.train.seed + 1)
    grad_shardings = gradient_shardings(cfg, model, optimizer, mesh)
    zero1 = cfg.mesh.param_sharding == "zero1"
    method = cfg.finetune.method

    def train_step(state: TrainState, batch: Batch):  # the name XLA dumps and profiles show
        rng = jax.random.fold_in(seed_key, state.step) if dropout else None
        trainable, frozen = finetune.split(state.params, method)
        loss, weight, grads = loss_and_grads(
            model,
            trainable,
            batch,
            rng,
            microbatches=cfg.train.microbatches,
            vocab_chunks=cfg.train.loss_vocab_chunks,
            grad_shardings=grad_shardings,
            frozen=frozen,
        )
        grad_norm = optax.tree.norm(grads)
        # ZeRO-1: each data shard updates its slice of the parameters (where its AdamW
        # state lives); the jit's output sharding then gathers the full parameters.
        old = jax.lax.with_sharding_constraint(trainable, grad_shardings) if zero1 else trainable
        updates, opt_state = optimizer.update(grads, state.opt_state, old)
        new = optax.apply_updates(old, updates)
        # A non-finite loss or gradient leaves parameters and optimizer state as they were.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new, opt_state = jax.tree.map(
            lambda n, o: jnp.where(ok, n, o), (new, opt_state), (trainable, state.opt_state)
        )
        params = finetune.merge(new, frozen)  # the frozen base passes through untouched
        metrics = {"loss": loss, "grad_norm": grad_norm, "target_tokens": weight, "skipped": ~ok}
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, skipped=state.skipped + (~ok).astype(jnp.int32))
        return new_state, metrics

    return _jit_per_batch_keys(train_step, mesh, (state_sharding,), (state_sharding, rules.replicated(mesh)), donate=(0,))


def make_eval_step(model: GLM, mesh: Mesh, state_sharding, vocab_chunks: int = 1) -> Callable:
    """A jitted ``(params, batch) -> (loss_sum, weight)`` on the mesh."""

    def eval_step(params, batch):
        return loss_sums(model, params, batch, vocab_chunks=vocab_chunks)

    return _jit_per_batch_keys(eval_step, mesh, (state_sharding.params,), rules.replicated(mesh), donate=())


def _jit_per_batch_keys(step, mesh: Mesh, leading_shardings: tuple, out_shardings, donate: tuple) -> Callable:
    """jit ``step(*leading, batch)`` with the batch sharded over ``batch``; one compile per
    batch layout (with or without segment ids, 1D or 2D positions, per-segment Part A)."""

    def batch_sharding(batch):
        return jax.tree.map(lambda x: rules.batch_sharding(mesh, x.ndim), batch)

    jitted = {}

    def for_batch(batch):
        key = (jax.tree.structure(batch), tuple(x.ndim for x in jax.tree.leaves(batch)))
        if key not in jitted:
            jitted[key] = jax.jit(
                step,
                in_shardings=(*leading_shardings, batch_sharding(batch)),
                out_shardings=out_shardings,
                donate_argnums=donate,
            )
        return jitted[key]

    def run(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules.logical_axis_rules()):
            return for_batch(args[-1])(*args)

    def lower(*args):
        """The step lowered for these arguments (arrays or ``jax.ShapeDtypeStruct``s),
        without running or compiling it: ``.as_text()``, or ``.compile()`` ahead of time."""
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules.logical_axis_rules()):
            return for_batch(args[-1]).lower(*args)

    run.lower = lower
    return run
