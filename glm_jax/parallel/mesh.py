"""The device mesh from config: axes ``data``, ``pipe``, ``model``."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from glm_jax.config import MeshConfig
from glm_jax.parallel.rules import MESH_AXES

# GSPMD-style sharding: shardings come from jit arguments and logical constraints.
_AUTO = (AxisType.Auto,) * len(MESH_AXES)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """Build the mesh; raises ConfigError if the sizes do not multiply to the device count."""
    devices = list(jax.devices()) if devices is None else list(devices)
    sizes = cfg.axis_sizes(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if len(devices) == jax.device_count():
        # Lets jax pick a topology-aware device order (ICI rings on TPU).
        return jax.make_mesh(shape, MESH_AXES, axis_types=_AUTO, devices=devices)

    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=_AUTO)
