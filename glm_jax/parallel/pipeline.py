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
from jax.sharding import PartitionSpec

from glm_jax.config import ConfigError
from glm_jax.parallel import rules

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


@dataclasses.dataclass(frozen=True)
class Pipelining:
    """How a model runs its layers pipelined: on ``stages`` stages (the ``pipe`` mesh
    axis), each holding ``repeats`` layer groups, with each batch cut into
    ``microbatches`` microbatches. ``stages == 1`` means no pipeline."""

    stages: int = 1
    repeats: int = 1
    microbatches: int = 1
    # "step": each stage's weights are gathered (FSDP) once per step and held; "layer":
    # they stay split over data and each layer gathers its own where it runs.
    gather: str = "step"

    @property
    def active(self) -> bool:
        return self.stages > 1

    def schedule(self, layers: int) -> Schedule:
        return Schedule(layers, self.stages, self.repeats, self.microbatches)


def _stage_major(x: jax.Array, sched: Schedule) -> jax.Array:
    """``[groups, per_group, ...]`` -> ``[repeats, stages, per_group, ...]``."""
    return x.reshape((sched.repeats, sched.stages, sched.per_group) + x.shape[2:])


def _constrain(x: jax.Array, names: Optional[tuple]) -> jax.Array:
    """A logical sharding constraint, skipped where the caller gave no names."""
    return x if names is None else nn.with_logical_constraint(x, tuple(names))


def stage_axis_name() -> Optional[tuple[str, ...]]:
    """The mesh axes the rules table puts ``stages`` on, in the current mesh (None outside
    one): the SPMD axis of the vmap over stages, so that sharding constraints inside a
    layer keep each stage's work on its own devices."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    axes = rules.mesh_axes("stages", mesh.axis_names)
    return axes or None


def stage_params(layer_params: Any, sched: Schedule, param_names: Any = None, keep_split_over_data: bool = False) -> Any:
    """``[layers, ...]`` -> ``[repeats, stages, per_group, ...]`` in schedule order, with
    padding slots holding a copy of layer 0 (never applied). Done once per step: with
    FSDP the weights are gathered here, not in every iteration -- unless
    ``keep_split_over_data``, which leaves ``embed`` split over ``data`` for each layer to
    gather where it runs. ``param_names``: the logical names of each ``[layers, ...]``
    leaf (first name the layer axis)."""
    even = sched.repeats == 1 and sched.padded_layers == sched.layers
    if keep_split_over_data and param_names is not None:
        param_names = jax.tree.map(
            lambda names: tuple(rules.EMBED_OVER_DATA if n in ("embed", rules.EMBED_OVER_STAGES) else n for n in names),
            param_names, is_leaf=lambda x: isinstance(x, PartitionSpec),
        )

    def one(p, names):
        if even:  # GPipe with whole groups: stage s holds layers [s·k, (s+1)·k), a reshape
            staged = p.reshape((1, sched.stages, sched.per_group) + p.shape[1:])
        else:
            staged = _stage_major(p[jnp.maximum(jnp.asarray(sched.slots(), jnp.int32), 0)], sched)
        return _constrain(staged, None if names is None else (None, "stages", None) + tuple(names[1:]))

    if param_names is None:
        return jax.tree.map(lambda p: one(p, None), layer_params)
    return jax.tree.map(one, layer_params, param_names, is_leaf=lambda x: isinstance(x, jax.Array))


def pipeline(
    layer_fn: LayerFn,
    layer_params: Any,
    xs: jax.Array,
    extras: Any = None,
    *,
    stages: int,
    repeats: int = 1,
    bubble_fill: Optional[float] = None,
    x_names: Optional[tuple] = None,
    param_names: Any = None,
    gather: str = "step",
) -> jax.Array:
    """Apply every layer to every microbatch, pipelined; equal to the plain loop
    ``for m: x = xs[m]; for l: x = layer_fn(params[l], x, extras[m], l)``.

    layer_fn(params_of_one_layer, x, extra, layer_index) -> x, with x ``[mb, ...]``.
    layer_params: a pytree of ``[layers, ...]`` arrays.
    xs: ``[M, mb, ...]`` microbatches; extras: a pytree of ``[M, ...]`` per-microbatch
      inputs (positions, Part A lengths, segment ids...) that travel with their microbatch.
    bubble_fill: what the buffer starts as (default zeros; tests fill it with NaN to show
      that bubbles do not leak).
    x_names: logical axis names of one microbatch (e.g. ``("batch", "length",
      "act_embed")``), param_names: a pytree of the layer parameters' logical names; with
      them the buffers and stage-major weights keep their data / model sharding.
    gather: "step" (FSDP weights gathered once, before the loop) or "layer" (they stay
      split over data; each layer gathers its own in every iteration).
    """
    n_layers = jax.tree.leaves(layer_params)[0].shape[0]
    M = xs.shape[0]
    sched = Schedule(n_layers, stages, repeats, M)
    S, R = sched.stages, sched.repeats
    params = stage_params(layer_params, sched, param_names, keep_split_over_data=gather == "layer")
    layer_ids = _stage_major(jnp.asarray(sched.slots(), jnp.int32), sched)  # [R, S, k]; -1 = padding
    stage_names = ("stages",) + (tuple(x_names) if x_names is not None else (None,) * (xs.ndim - 1))
    queue_names = None if x_names is None else (None,) + tuple(x_names)

    def run_group(group_params, x, extra, ids):
        def one(x, p_and_id):
            p, i = p_and_id
            y = layer_fn(p, x, extra, jnp.maximum(i, 0))
            return jnp.where(i >= 0, y, x), None  # padding slots pass their input through

        x, _ = jax.lax.scan(one, x, (group_params, ids))
        return x

    stage_index = jnp.arange(S, dtype=jnp.int32)
    fill = jnp.zeros_like(xs[0]) if bubble_fill is None else jnp.full_like(xs[0], bubble_fill)
    state = _constrain(jnp.broadcast_to(fill, (S,) + xs.shape[1:]), stage_names)
    waiting = _constrain(jnp.zeros_like(xs), queue_names)  # last-stage outputs waiting for their next repeat
    outputs = _constrain(jnp.zeros_like(xs), queue_names)
    vmapped = jax.vmap(run_group, spmd_axis_name=stage_axis_name())

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
        y = _constrain(vmapped(group, _constrain(state, stage_names), extra, ids), stage_names)
        # The last stage's item is done with this repeat.
        last_ok = valid[S - 1]
        m_last, r_last = m[S - 1], r[S - 1]
        waiting = waiting.at[m_last].set(jnp.where(last_ok, y[S - 1], waiting[m_last]))
        done = last_ok & (r_last == R - 1)
        outputs = outputs.at[m_last].set(jnp.where(done, y[S - 1], outputs[m_last]))
        state = _constrain(jnp.roll(y, 1, axis=0), stage_names)  # stage s's output feeds stage s+1
        return (state, _constrain(waiting, queue_names), _constrain(outputs, queue_names)), None

    (_, _, outputs), _ = jax.lax.scan(iteration, (state, waiting, outputs), jnp.arange(sched.iterations))
    return outputs
