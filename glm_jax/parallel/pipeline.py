"""Pipeline parallelism inside one jitted function: a shifting buffer of microbatches.

The layers (stacked on a leading axis, as the model's scanned parameters are) are cut
into ``stages`` groups; with ``repeats`` R > 1 each stage holds R non-adjacent groups
(the circular / interleaved schedule). Every iteration all stages compute at once --
a ``vmap`` over the stage axis, which the rules table maps onto the ``pipe`` mesh axis,
so each device group runs its own stage -- and then the buffer shifts by one stage.

Schedule, for M microbatches: stage s at iteration t works on item w = t - s, which is
microbatch w mod M in repeat w div M, applying layer group (w div M)·S + s. An item's
output moves to stage s+1 for the next iteration; after the last stage it waits in a
per-microbatch buffer until stage 0 takes it up for the next repeat (so the circular
schedule needs M >= S), and after the last repeat it is the result. T = R·M + S - 1
iterations in all, so the bubble -- iterations a stage has no item -- is
(S - 1) / (R·M + S - 1) of the time.

Why vmap over a stage axis rather than ``shard_map`` + ``ppermute``: the step stays one
GSPMD program, so tensor parallelism inside a stage, ZeRO/FSDP sharding of the weights
and the rules table compose with it unchanged; XLA lowers the shift (a roll along the
sharded stage axis) to a collective permute between neighbouring stages.

Bubbles never leak: a stage with no item computes on zeros, its result is discarded by
selection, and the zeros' gradients are zero -- so garbage (even NaN) in the buffer
cannot reach the result or the gradients.

A layer count that the stages do not divide is padded with inactive layers that pass
their input through; the parameters keep their ``[layers, ...]`` shape on disk, so a
checkpoint is the same at every ``pipe`` size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.config import ConfigError

LayerFn = Callable[[Any, jax.Array, Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How ``layers`` layers and ``microbatches`` microbatches run on ``stages`` stages."""

    layers: int
    stages: int
    repeats: int
    microbatches: int

    def __post_init__(self):
        if self.stages < 1 or self.repeats < 1 or self.microbatches < 1:
            raise ConfigError(f"pipeline: stages, repeats and microbatches must be >= 1, got {self}")
        if self.repeats * self.stages > self.layers:
            raise ConfigError(
                f"pipeline: {self.stages} stages x train.pipeline_repeats={self.repeats} need at least "
                f"{self.repeats * self.stages} layers, the model has {self.layers}"
            )
        if self.repeats > 1 and self.microbatches < self.stages:
            raise ConfigError(
                f"pipeline: the circular schedule (train.pipeline_repeats={self.repeats}) needs at least as many "
                f"microbatches as stages ({self.stages}), got {self.microbatches}"
            )

    @property
    def groups(self) -> int:
        return self.repeats * self.stages

    @property
    def per_group(self) -> int:
        """Slots in each of the repeats x stages layer groups (some hold a padding layer)."""
        return math.ceil(self.layers / self.groups)

    @property
    def padded_layers(self) -> int:
        return self.per_group * self.repeats * self.stages

    @property
    def iterations(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """Share of stage-iterations without an item: (S - 1) / (R·M + S - 1)."""
        return (self.stages - 1) / self.iterations

    def slots(self) -> list[list[int]]:
        """The model's layer index in each slot of each group (group g = r·S + s), -1 for
        padding. Layers stay in order; the groups differ by at most one real layer, so
        the padding is spread (28 layers on 8 stages: four stages of 4, four of 3 + 1 pad)
        rather than idling whole stages."""
        base, extra = divmod(self.layers, self.groups)
        out, next_layer = [], 0
        for g in range(self.groups):
            n = base + (g < extra)
            out.append(list(range(next_layer, next_layer + n)) + [-1] * (self.per_group - n))
            next_layer += n
        return out

    def group_layers(self, r: int, s: int) -> list[int]:
        """The model's layer indices held by stage s in repeat r (padding left out)."""
        return [i for i in self.slots()[r * self.stages + s] if i >= 0]


def _stage_major(x: jax.Array, sched: Schedule) -> jax.Array:
    """``[groups, per_group, ...]`` -> ``[repeats, stages, per_group, ...]``."""
    return x.reshape((sched.repeats, sched.stages, sched.per_group) + x.shape[2:])


def _constrain_stages(x: jax.Array, axis: int) -> jax.Array:
    """Put the stage axis on the mesh axis the rules table gives ``stages`` (``pipe``)."""
    names = [None] * x.ndim
    names[axis] = "stages"
    return nn.with_logical_constraint(x, tuple(names))


def pipeline(
    layer_fn: LayerFn,
    layer_params: Any,
    xs: jax.Array,
    extras: Any = None,
    *,
    stages: int,
    repeats: int = 1,
    bubble_fill: Optional[float] = None,
) -> jax.Array:
    """Apply every layer to every microbatch, pipelined; equal to the plain loop
    ``for m: x = xs[m]; for l: x = layer_fn(params[l], x, extras[m], l)``.

    layer_fn(params_of_one_layer, x, extra, layer_index) -> x, with x ``[mb, ...]``.
    layer_params: a pytree of ``[layers, ...]`` arrays.
    xs: ``[M, mb, ...]`` microbatches; extras: a pytree of ``[M, ...]`` per-microbatch
      inputs (positions, Part A lengths, segment ids...) that travel with their microbatch.
    bubble_fill: what the buffer starts as (default zeros; tests fill it with NaN to show
      that bubbles do not leak).
    """
    n_layers = jax.tree.leaves(layer_params)[0].shape[0]
    M = xs.shape[0]
    sched = Schedule(n_layers, stages, repeats, M)
    S, R, k = sched.stages, sched.repeats, sched.per_group
    slots = jnp.asarray(sched.slots(), jnp.int32)  # [R·S, k]: layer index, -1 = padding
    params = jax.tree.map(lambda p: _constrain_stages(_stage_major(p[jnp.maximum(slots, 0)], sched), 1), layer_params)
    layer_ids = _stage_major(slots, sched)  # [R, S, k]

    def run_group(group_params, x, extra, ids):
        def one(x, p_and_id):
            p, i = p_and_id
            y = layer_fn(p, x, extra, jnp.maximum(i, 0))
            return jnp.where(i >= 0, y, x), None  # padding slots pass their input through

        x, _ = jax.lax.scan(one, x, (group_params, ids))
        return x

    stage_index = jnp.arange(S, dtype=jnp.int32)
    fill = jnp.zeros_like(xs[0]) if bubble_fill is None else jnp.full_like(xs[0], bubble_fill)
    state = _constrain_stages(jnp.broadcast_to(fill, (S,) + xs.shape[1:]), 0)
    waiting = jnp.zeros_like(xs)  # last-stage outputs waiting for their next repeat
    outputs = jnp.zeros_like(xs)

    def iteration(carry, t):
        state, waiting, outputs = carry
        w = t - stage_index  # [S] the item each stage works on
        valid = (w >= 0) & (w < R * M)
        m = jnp.clip(w, 0, R * M - 1) % M
        r = jnp.clip(w, 0, R * M - 1) // M
        # Stage 0 takes a fresh microbatch in repeat 0, else its own output of the last repeat.
        first_in = jnp.where(r[0] == 0, xs[m[0]], waiting[m[0]])
        state = state.at[0].set(first_in)
        state = jnp.where(valid.reshape((S,) + (1,) * (state.ndim - 1)), state, 0)  # bubbles compute on zeros
        if R == 1:  # GPipe: each stage always holds the same group; no per-iteration gather of weights
            group = jax.tree.map(lambda p: p[0], params)
            ids = layer_ids[0]
        else:
            group = jax.tree.map(lambda p: jax.vmap(lambda pr, rr: pr[rr])(jnp.moveaxis(p, 1, 0), r), params)
            ids = jax.vmap(lambda lr, rr: lr[rr])(jnp.moveaxis(layer_ids, 1, 0), r)
        extra = None if extras is None else jax.tree.map(lambda e: e[m], extras)
        y = jax.vmap(run_group)(group, state, extra, ids)
        y = _constrain_stages(y, 0)
        # The last stage's item is done with this repeat.
        last_ok = valid[S - 1]
        m_last, r_last = m[S - 1], r[S - 1]
        waiting = waiting.at[m_last].set(jnp.where(last_ok, y[S - 1], waiting[m_last]))
        done = last_ok & (r_last == R - 1)
        outputs = outputs.at[m_last].set(jnp.where(done, y[S - 1], outputs[m_last]))
        state = _constrain_stages(jnp.roll(y, 1, axis=0), 0)  # stage s's output feeds stage s+1
        return (state, waiting, outputs), None

    (_, _, outputs), _ = jax.lax.scan(iteration, (state, waiting, outputs), jnp.arange(sched.iterations))
    return outputs
