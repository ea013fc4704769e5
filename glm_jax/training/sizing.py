"""Parameter count and per-device bytes of parameters and AdamW state on a mesh, computed
abstractly (nothing allocated): shapes from ``glm_jax.model.abstract_params``, each
device's share from the logical-axis rules. ``python -m glm_jax.info`` prints it, and
``python -m glm_jax.compile`` uses it as the estimate for GPU clusters it cannot compile for.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import numpy as np

from glm_jax.config import Config
from glm_jax.model import abstract_params
from glm_jax.parallel import rules
from glm_jax.training import pipeline_plan


def mesh_sizes(cfg: Config, devices: Optional[int]) -> dict[str, int]:
    if devices is None:
        devices = math.prod(v for v in (cfg.mesh.data, cfg.mesh.model, cfg.mesh.pipe) if v != -1)
    return cfg.mesh.axis_sizes(devices)


def report(cfg: Config, devices: Optional[int] = None) -> dict:
    sizes = mesh_sizes(cfg, devices)
    boxed = abstract_params(cfg.model, boxed=True)
    shapes = rules.unbox(boxed)
    specs = rules.fit_to_shapes(rules.logical_specs(boxed), shapes, sizes)
    leaves = jax.tree.leaves(shapes)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    n_params = sum(math.prod(x.shape) for x in leaves)
    # mesh.param_sharding: what the data axis splits besides the batch -- nothing
    # (replicated), the AdamW moments (zero1), or parameters and moments (fsdp).
    mode = cfg.mesh.param_sharding
    plain = split = 0
    largest = 0
    for x, spec in zip(leaves, spec_leaves):
        plain += math.prod(rules.shard_shape(x.shape, rules.logical_to_mesh_spec(spec), sizes))
        split += math.prod(rules.shard_shape(x.shape, rules.logical_to_mesh_spec(spec, shard_params_over_data=True), sizes))
        largest = max(largest, math.prod(x.shape) * np.dtype(x.dtype).itemsize)
    p_bytes = np.dtype(cfg.model.param_dtype).itemsize
    params_bytes = (split if mode == "fsdp" else plain) * p_bytes
    # AdamW keeps two moments shaped like the parameters, in the param dtype.
    adam_bytes = 2 * (plain if mode == "replicated" else split) * p_bytes
    return {
        "model": cfg.model.name,
        "parameters": int(n_params),
        "mesh": sizes,
        "devices": math.prod(sizes.values()),
        "param_dtype": cfg.model.param_dtype,
        "param_sharding": mode,
        "per_device_bytes": {
            "params": int(params_bytes),
            "adamw_state": int(adam_bytes),
            "total": int(params_bytes + adam_bytes),
        },
        "largest_tensor_bytes": int(largest),
        **_pipeline_report(cfg, sizes, shapes, specs),
    }


def _pipeline_report(cfg: Config, sizes: dict[str, int], shapes, specs) -> dict:
    """With ``mesh.pipe`` > 1: the schedule, each stage's layers, the parameter and AdamW
    bytes of those layers (the stage's share of the model, before data/model splitting)
    and the bubble fraction."""
    plan = pipeline_plan.plan(cfg, sizes)
    if not plan.active:
        return {}
    sched = plan.schedule(cfg.model.num_layers)
    layers = shapes["layers"]
    per_layer = sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(layers)) * np.dtype(cfg.model.param_dtype).itemsize
    counts = [sum(len(sched.group_layers(r, s)) for r in range(sched.repeats)) for s in range(sched.stages)]
    layer_specs = jax.tree.leaves(specs["layers"], is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    # The layer axis split over pipe, or (stages that do not divide the layers) the embed axis.
    split = sum(math.prod(x.shape) for x, spec in zip(jax.tree.leaves(layers), layer_specs)
                if spec and (spec[0] == "layers" or rules.EMBED_OVER_STAGES in spec))
    split_share = split / sum(math.prod(x.shape) for x in jax.tree.leaves(layers))
    return {
        "pipeline": {
            "stages": plan.stages,
            "repeats": plan.repeats,
            "microbatches": plan.microbatches,
            "layer_slots_per_group": sched.per_group,
            "layers_per_stage": counts,
            "bubble": round(sched.bubble, 4),
            "per_stage_layer_bytes": [{"params": n * per_layer, "adamw_state": 2 * n * per_layer} for n in counts],
            # Share of the layer weights each device keeps 1/pipe of (the rest, where neither
            # the layer count nor the embed axis divides over the stages, is on every stage).
            "layer_weights_split_over_pipe": round(split_share, 4),
        }
    }
