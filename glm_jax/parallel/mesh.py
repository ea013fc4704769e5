"""The device mesh from config: axes ``data``, ``pipe``, ``model``."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from glm_jax.config import MeshConfig
from glm_jax.parallel.rules import MESH_AXES

# GSPMD-style sharding: shardings come from jit arguments and logical constraints.
_AUTO = (AxisType.Auto,) * len(MESH_AXES)


def make_mesh(cfg: MeshConfig, devices: list | None = None, *, whole_system: bool | None = None) -> Mesh:
    """Build the mesh; raises ConfigError if the sizes do not multiply to the device count.

    whole_system: the devices are all of a system (default: all of ``jax.devices()``), so
    jax may order them by the physical topology; a pod's compile-only devices are one too.
    """
    devices = list(jax.devices()) if devices is None else list(devices)
    sizes = cfg.axis_sizes(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if whole_system if whole_system is not None else len(devices) == jax.device_count():
        # A topology-aware device order (ICI rings on TPU). Axes may split a physical
        # dimension: model=4 on a v4-1024's 8x8x8 torus takes half of one (jax.make_mesh
        # refuses that; found by compiling for the pod).
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=_AUTO)

    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=_AUTO)
