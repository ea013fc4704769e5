"""How a training run pipelines its layers: ``mesh.pipe`` stages, ``train.pipeline_repeats``
layer groups per stage and ``train.pipeline_microbatches`` microbatches per step, checked
against the model and every batch size the run will use (ramp-up included).

``train.pipeline_microbatches=0`` (the default) picks 4, 2 or 1 times the stages, the
first that divides every batch into microbatches whose rows still split evenly over
``mesh.data``: more microbatches shrink the bubble, (P - 1) / (R·M + P - 1), at the cost
of smaller matrix multiplications.
"""

from __future__ import annotations

from glm_jax.config import Config, ConfigError
from glm_jax.parallel.pipeline import Pipelining
from glm_jax.training.batch_rampup import batch_sizes


def plan(cfg: Config, axis_sizes: dict[str, int]) -> Pipelining:
    """The run's pipelining on a mesh of ``axis_sizes``; ConfigError names the bad key."""
    stages, data = axis_sizes["pipe"], axis_sizes["data"]
    train = cfg.train
    repeats, requested = train.pipeline_repeats, train.pipeline_microbatches
    if stages == 1:
        return Pipelining()
    if cfg.model.pre_seq_len:
        raise ConfigError(f"mesh.pipe={stages}: a P-tuning prefix (model.pre_seq_len={cfg.model.pre_seq_len}) does not "
                          "run in a pipeline; use mesh.pipe=1 (the frozen base fits by data and model sharding)")
    if not cfg.model.scan_layers:
        raise ConfigError(f"mesh.pipe={stages} needs model.scan_layers=true (the pipeline runs stacked layer weights)")
    layers = cfg.model.num_layers
    if repeats * stages > layers:
        raise ConfigError(
            f"train.pipeline_repeats={repeats} does not fit: mesh.pipe={stages} stages x {repeats} repeats need at "
            f"least {repeats * stages} layers, model.num_layers is {layers}; valid values: "
            + ", ".join(str(r) for r in range(1, layers // stages + 1))
        )
    # Each accumulation slice (train.microbatches) is pipelined on its own.
    slices = sorted({size // train.microbatches for size in batch_sizes(train)})
    if requested:
        bad = [s for s in slices if s % requested]
        if bad:
            raise ConfigError(
                f"train.pipeline_microbatches={requested} does not divide the batch of {bad[0]} rows per step"
                + (f" (train.batch_size / train.microbatches={train.microbatches})" if train.microbatches > 1 else "")
                + f"; valid values: {', '.join(str(m) for m in _dividing(slices))}"
            )
        chosen = requested
    else:
        candidates = [k * stages for k in (4, 2, 1)]
        fitting = [m for m in candidates if all(s % m == 0 for s in slices)]
        even = [m for m in fitting if all((s // m) % data == 0 for s in slices)]
        if not fitting:
            raise ConfigError(
                f"train.pipeline_microbatches: no multiple of mesh.pipe={stages} ({', '.join(map(str, candidates))}) "
                f"divides the batch of {slices[0]} rows per step; set train.batch_size to a multiple of {stages}, "
                f"or train.pipeline_microbatches to one of: {', '.join(str(m) for m in _dividing(slices))}"
            )
        chosen = (even or fitting)[0]
    if repeats > 1 and chosen < stages:
        raise ConfigError(
            f"train.pipeline_repeats={repeats} (the circular schedule) needs train.pipeline_microbatches >= "
            f"mesh.pipe ({stages}), got {chosen}"
        )
    if train.pipeline_gather == "layer" and cfg.mesh.param_sharding != "fsdp":
        raise ConfigError(
            "train.pipeline_gather=layer gathers weights split over data, which needs mesh.param_sharding=fsdp "
            f"(got {cfg.mesh.param_sharding})"
        )
    return Pipelining(stages=stages, repeats=repeats, microbatches=chosen, gather=train.pipeline_gather)


def _dividing(slices: list[int]) -> list[int]:
    return [m for m in range(1, slices[0] + 1) if all(s % m == 0 for s in slices)]
