"""THE table mapping logical axis names to mesh axes.

Model code names only logical axes (``vocab``, ``embed``, ``heads`` ...); this module
is the one place that says which mesh axis (``data``, ``model``, ``pipe``) each lands
on. Mesh axes of size 1 cost nothing, so the table is the same for every mesh shape.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "pipe", "model")

# A layer count the pipeline stages do not divide (GLM-130B: 70 layers on 8) cannot split
# the stacked layer axis over ``pipe``; those arrays split their ``embed`` axis over
# ``pipe`` instead (``embed_over_stages``, see :func:`fit_to_shapes`), so each device
# still keeps 1/pipe of the stack, and the pipeline regroups the weights by stage once per
# step (an all-to-all).
EMBED_OVER_STAGES = "embed_over_stages"

# FSDP with train.pipeline_gather=layer: the pipeline's stage-major weights keep ``embed``
# split over ``data``, so each layer gathers its weights where it uses them (every
# iteration) instead of the stage holding all its layers gathered for the whole step.
EMBED_OVER_DATA = "embed_over_data"

# (logical name, mesh axis or None). Unlisted names are replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Activations.
    ("batch", "data"),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "model"),
    ("act_mlp", "model"),
    ("act_vocab", "model"),
    # Parameters.
    ("vocab", "model"),
    ("embed", None),
    ("heads", "model"),
    ("head_dim", None),
    ("qkv", None),
    ("glu", None),
    ("mlp", "model"),
    ("positions", None),
    # The stacked layer axis: split over the pipeline stages, so each stage keeps its own
    # layers' weights and AdamW state (where the stages divide the layer count; else see
    # EMBED_OVER_STAGES).
    ("layers", "pipe"),
    # Pipeline stages (parallel/pipeline.py): the stage axis of the shifting buffer and of
    # the stage-major parameters.
    ("stages", "pipe"),
    (EMBED_OVER_STAGES, "pipe"),
    (EMBED_OVER_DATA, "data"),
)

# mesh.param_sharding=zero1 / fsdp: these parameter axes are also split over ``data``
# (AdamW state only for zero1; parameters, gradients and AdamW state for fsdp).
DATA_SHARDED_PARAM_AXES = ("embed",)


def logical_axis_rules(shard_params_over_data: bool = False) -> tuple[tuple[str, Any], ...]:
    """The table; with ``shard_params_over_data`` the axes above map to ``data`` instead."""
    if not shard_params_over_data:
        return LOGICAL_AXIS_RULES
    over_data = {name: "data" for name in DATA_SHARDED_PARAM_AXES}
    over_data[EMBED_OVER_STAGES] = ("data", "pipe")
    return tuple((name, over_data.get(name, axis)) for name, axis in LOGICAL_AXIS_RULES)


def logical_to_sharding(logical_spec_tree: Any, mesh: Mesh, shard_params_over_data: bool = False) -> Any:
    """Map a tree of logical PartitionSpecs to NamedShardings on ``mesh``."""
    return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, logical_axis_rules(shard_params_over_data))


def fit_to_shapes(logical_spec_tree: Any, shapes: Any, axis_sizes: dict[str, int]) -> Any:
    """Specs for arrays whose stacked ``layers`` axis the ``pipe`` size does not divide:
    that axis stays whole and ``embed`` becomes ``embed_over_stages`` (where ``pipe``
    divides it; else the array is replicated over ``pipe``). ``shapes``: the same tree
    with ``.shape`` leaves; ``axis_sizes``: mesh axis sizes (``mesh.shape``)."""
    pipe = math.prod(axis_sizes[a] for a in mesh_axes("layers", tuple(axis_sizes)))

    def fit(spec, leaf):
        names = list(spec)
        if "layers" not in names or leaf.shape[names.index("layers")] % pipe == 0:
            return spec
        names[names.index("layers")] = None
        if "embed" in names and leaf.shape[names.index("embed")] % pipe == 0:
            names[names.index("embed")] = EMBED_OVER_STAGES
        return PartitionSpec(*names)

    return jax.tree.map(fit, logical_spec_tree, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def logical_to_mesh_spec(logical_spec: PartitionSpec, shard_params_over_data: bool = False) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(logical_spec), logical_axis_rules(shard_params_over_data))


def mesh_axes(logical: str, axis_names: tuple[str, ...]) -> tuple[str, ...]:
    """The mesh axes (among ``axis_names``) that the logical axis ``logical`` is split over;
    empty when it is replicated. For code that must name mesh axes itself (shard_map)."""
    for name, axis in LOGICAL_AXIS_RULES:
        if name == logical:
            axes = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
            return tuple(a for a in axes if a in axis_names)
    return ()


def mesh_context(mesh: Mesh | None):
    """The context a model runs in on ``mesh``: the mesh set, and the logical-axis rules
    (nothing for ``None``: one device)."""
    if mesh is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(logical_axis_rules()))
    return stack


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding for an input array whose leading axis is the batch."""
    spec = logical_to_mesh_spec(PartitionSpec("batch", *([None] * (ndim - 1))))
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_shape(shape: tuple[int, ...], mesh_spec: PartitionSpec, axis_sizes: dict[str, int]) -> tuple[int, ...]:
    """Per-device shape of an array of ``shape`` laid out by ``mesh_spec`` (no devices needed)."""
    out = list(shape)
    for i, entry in enumerate(tuple(mesh_spec)):
        if entry is None:
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        n = 1
        for name in names:
            n *= axis_sizes[name]
        out[i] = -(-shape[i] // n)
    return tuple(out)


def unbox(tree: Any) -> Any:
    """Strip flax's LogicallyPartitioned boxes, keeping plain arrays."""
    return nn.meta.unbox(tree)


def logical_specs(boxed_tree: Any) -> Any:
    return nn.get_partition_spec(boxed_tree)


__all__ = [
    "DATA_SHARDED_PARAM_AXES",
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "EMBED_OVER_DATA",
    "EMBED_OVER_STAGES",
    "batch_sharding",
    "fit_to_shapes",
    "logical_axis_rules",
    "logical_specs",
    "logical_to_mesh_spec",
    "logical_to_sharding",
    "mesh_axes",
    "replicated",
    "shard_shape",
    "unbox",
]
