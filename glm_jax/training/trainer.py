"""The trainer as a library: from a config and a mesh, everything a training step needs.

    trainer = Trainer.build(cfg, mesh)
    state = trainer.init_state()                    # or trainer.restore(checkpointer)
    state, metrics = trainer.train_step(state, batch)
    loss_sum, weight = trainer.eval_step(state.params, batch)

``python -m glm_jax.train`` is a loop around this object; the benchmarks, the
ahead-of-time compile and the tests build the same one, so there is one construction of
the step (model, optimizer, shardings, jitted train and eval steps) to keep right.
The numerics live in ``glm_jax.training.state`` (the state, the loss, the step function);
this module only assembles them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import optax
from flax import traverse_util
from jax.sharding import Mesh

from glm_jax.checkpoint import compiled_step, params
from glm_jax.checkpoint.train_state import Checkpointer, Restored, abstract_with_shardings
from glm_jax.config import Config
from glm_jax.data.pipeline import abstract_batch
from glm_jax.model import GLM
from glm_jax.model.linear import QuantizedWeight
from glm_jax.errors import CheckpointError
from glm_jax.training import finetune, pipeline_plan
from glm_jax.training import state as train_state
from glm_jax.training.optimizer import learning_rate_schedule, make_optimizer

TrainState = train_state.TrainState


@dataclasses.dataclass
class Trainer:
    """The assembled pieces of a training step on one mesh (build with :meth:`build`).

    model: the GLM with dropout on (as configured); optimizer: the optax chain;
    shardings: a TrainState of NamedShardings; train_step: jitted ``(state, batch) ->
    (state, metrics)`` that donates the state; eval_step: jitted ``(params, batch) ->
    (loss_sum, target_count)``.
    """

    cfg: Config
    mesh: Mesh
    model: GLM
    optimizer: optax.GradientTransformation
    shardings: TrainState
    train_step: Callable
    eval_step: Callable
    precompiled: Optional[compiled_step.LoadedStep] = None

    @classmethod
    def build(cls, cfg: Config, mesh: Mesh) -> "Trainer":
        pipelining = pipeline_plan.plan(cfg, dict(mesh.shape))
        model = GLM(cfg.model, deterministic=False, pipelining=pipelining)
        optimizer = make_optimizer(cfg.train)
        shardings = train_state.state_shardings(cfg, model, optimizer, mesh)
        trainer = cls(
            cfg=cfg,
            mesh=mesh,
            model=model,
            optimizer=optimizer,
            shardings=shardings,
            train_step=train_state.make_train_step(cfg, model, optimizer, mesh, shardings),
            eval_step=train_state.make_eval_step(GLM(cfg.model, pipelining=pipelining), mesh, shardings, cfg.train.loss_vocab_chunks),
        )
        if cfg.train.compiled_step:  # a step compiled ahead of time replaces the first compile
            loaded = compiled_step.load(cfg.train.compiled_step, cfg, mesh)
            loaded.check_arguments(trainer.abstract_state(), abstract_batch(cfg, cfg.train.batch_size))
            trainer.precompiled, trainer.train_step = loaded, loaded.dispatch(trainer.train_step)
        return trainer

    @property
    def pipelining(self):
        """How the step pipelines its layers (``stages == 1``: it does not)."""
        return self.model.pipelining

    @property
    def learning_rate(self) -> optax.Schedule:
        """The learning rate the optimizer uses at each (0-based) update."""
        return learning_rate_schedule(self.cfg.train)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the train state (nothing allocated): the target
        of a restore, and the argument of an ahead-of-time compile."""
        abstract = train_state.abstract_state(self.cfg, self.model, self.optimizer)
        return abstract_with_shardings(abstract, self.shardings)

    def init_state(self, seed: Optional[int] = None) -> TrainState:
        """Fresh parameters and optimizer state, created directly in their shardings."""
        seed = self.cfg.train.seed if seed is None else seed
        return train_state.init_state(self.cfg, self.model, self.optimizer, self.mesh, jax.random.key(seed), self.shardings)

    def init_state_from(self, path: str) -> TrainState:
        """Parameters read from a params directory or another run's workdir (any mesh it
        was saved from, cast to ``model.param_dtype``), each process reading only what its
        devices hold; a fresh optimizer state at step 0 (``train.init_from``)."""
        stored = params.open_for_init(path, self.cfg.model)
        targets = traverse_util.flatten_dict(self.abstract_state().params)
        absent = {k: v for k, v in targets.items() if k not in stored.shapes}
        for k in absent:
            if not finetune.is_new(k):
                raise CheckpointError(f"train.init_from={path}: parameter {'/'.join(k)} is missing from {stored.source.describe()}")
        quantized = {k: v for k, v in targets.items() if isinstance(v, QuantizedWeight)}
        plain = {k: v for k, v in targets.items() if k not in absent and k not in quantized}
        plain.update({k: jax.ShapeDtypeStruct(stored.shapes[k], self.cfg.model.param_dtype, sharding=v.q.sharding)
                      for k, v in quantized.items()})  # read as floats where the quantized bytes will live
        loaded = params.read_onto(stored, traverse_util.unflatten_dict(plain))
        if quantized:  # finetune.quantize_base: the frozen linears quantized on device, floats dropped
            flat = traverse_util.flatten_dict(loaded)
            floats = {k: flat.pop(k) for k in quantized}
            with jax.set_mesh(self.mesh):
                flat.update(jax.jit(lambda f: traverse_util.flatten_dict(train_state.quantize_base(
                    traverse_util.unflatten_dict(f), self.cfg)),
                    out_shardings={k: jax.tree.map(lambda x: x.sharding, v) for k, v in quantized.items()})(floats))
            loaded = traverse_util.unflatten_dict(flat)
        if absent:  # what fine-tuning adds (the P-tuning prefix): initialised as a fresh run would
            fresh = train_state.init_some_params(self.cfg, self.mesh, {k: v.sharding for k, v in absent.items()},
                                                 jax.random.key(self.cfg.train.seed))
            loaded = traverse_util.unflatten_dict({**traverse_util.flatten_dict(loaded), **fresh})
        return train_state.state_from_params(self.optimizer, self.mesh, self.shardings, loaded, self.cfg.finetune.method)

    def checkpointer(self, workdir: str) -> Checkpointer:
        return Checkpointer(workdir, self.cfg.train.checkpoint_every, self.cfg.train.keep_checkpoints)

    def restore(self, checkpointer: Checkpointer, warn: Callable[[str], None]) -> Optional[Restored]:
        """The newest checkpoint that restores onto this mesh, or None when there is none."""
        return checkpointer.restore_latest(self.abstract_state(), warn=warn)

    @staticmethod
    def parameter_count(state: TrainState) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))

