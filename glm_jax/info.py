"""``python -m glm_jax.info``: parameter count and per-device memory, computed abstractly.

Nothing is allocated: shapes come from ``glm_jax.model.abstract_params`` and the
per-device share from the logical-axis rules on the configured mesh, so a laptop can
size GLM-130B on a pod.

    python -m glm_jax.info --config configs/glm-130b.yaml mesh.data=16 --json
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Optional, Sequence

import jax
import numpy as np

from glm_jax import cli
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


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.info", description=__doc__.splitlines()[0])
    cli.add_config_args(parser)
    parser.add_argument("--devices", type=int, default=None, help="device count to size for (default: the mesh's explicit sizes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    cfg = cli.config_from_args(args)
    r = report(cfg, args.devices)
    if args.json:
        print(json.dumps(r))
        return 0
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    b = r["per_device_bytes"]
    print(f"model        {r['model']}")
    print(f"parameters   {r['parameters']:,}")
    print(f"mesh         {mesh} ({r['devices']} devices)")
    print(f"per device   params {_gib(b['params'])} + AdamW state {_gib(b['adamw_state'])} = {_gib(b['total'])} ({r['param_dtype']})")
    print(f"largest      {_gib(r['largest_tensor_bytes'])} (one parameter array, unsharded; scanned layers are one stacked array)")
    if "pipeline" in r:
        p = r["pipeline"]
        print(f"pipeline     {p['stages']} stages x {p['repeats']} group(s), {p['microbatches']} microbatches, "
              f"bubble {100 * p['bubble']:.1f}%; layers per stage {p['layers_per_stage']}")
        heaviest = max(p["per_stage_layer_bytes"], key=lambda b: b["params"])
        print(f"per stage    up to params {_gib(heaviest['params'])} + AdamW state {_gib(heaviest['adamw_state'])} "
              f"of its own layers; {100 * p['layer_weights_split_over_pipe']:.1f}% of the layer weights split over pipe")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
