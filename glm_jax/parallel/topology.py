"""Accelerator pods by name: chips, memory and peak rate per chip, and (for TPUs) the
compile-only devices of that topology, so a CPU host can build a pod's mesh and compile for it.

Names follow the cloud's accelerator types: ``v4-1024`` and ``v5p-512`` count TensorCores
(two per chip: 512 and 256 chips), ``v5e-256`` and ``v6e-64`` count chips. GPU clusters
are ``KIND:N`` for N GPUs (``a100-40g:64``, ``h100:512``); they cannot be compiled for
without a GPU, so only the abstract estimate of ``glm_jax.info`` applies to them.
Figures are the vendors' published ones (dense bf16 FLOP/s, HBM per chip).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

from glm_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class ChipKind:
    name: str
    hbm_bytes: int
    peak_flops: float  # dense bf16 per chip
    cores_per_chip: int = 1  # TensorCores a TPU accelerator-type name counts per chip
    torus_3d: bool = False  # v4 / v5p: 3D torus slices (AxBxC), else 2D (AxB)
    tpu: bool = True


GIB = 2**30
CHIPS = {
    "v4": ChipKind("v4", 32 * GIB, 275e12, cores_per_chip=2, torus_3d=True),
    "v5e": ChipKind("v5e", 16 * GIB, 197e12),
    "v5p": ChipKind("v5p", 95 * GIB, 459e12, cores_per_chip=2, torus_3d=True),
    "v6e": ChipKind("v6e", 32 * GIB, 918e12),
    "a100-40g": ChipKind("a100-40g", 40 * GIB, 312e12, tpu=False),
    "a100-80g": ChipKind("a100-80g", 80 * GIB, 312e12, tpu=False),
    "h100": ChipKind("h100", 80 * GIB, 989e12, tpu=False),
    "h200": ChipKind("h200", 141 * GIB, 989e12, tpu=False),
}


@dataclasses.dataclass(frozen=True)
class Pod:
    """``slices`` slices of ``chips_per_slice`` chips of one kind."""

    name: str
    kind: ChipKind
    chips_per_slice: int
    slices: int = 1

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.slices

    @property
    def shape(self) -> tuple[int, ...]:
        """The slice's chip grid: the smallest near-cube (3D tori) or near-square that
        holds the chips, in the cloud's orientation (ascending, unit dimensions last:
        v4-8 is 2x2x1, v4-1024 8x8x8, v5e-8 2x4)."""
        n = self.chips_per_slice
        dims = 3 if self.kind.torus_3d else 2
        out = [1] * dims
        i = dims - 1
        while math.prod(out) < n:  # double the dimensions in turn, last first
            out[i] *= 2
            i = (i - 1) % dims
        return tuple(sorted(out, key=lambda d: (d == 1, d)))

    def devices(self) -> list:
        """Compile-only jax devices of this pod (TPU only; needs libtpu)."""
        if not self.kind.tpu:
            raise ConfigError(f"--topology {self.name}: GPUs cannot be compiled for without a GPU; only an estimate is possible")
        from jax.experimental import topologies  # only a compile needs libtpu

        spec = f"{self.kind.name}:{'x'.join(map(str, self.shape))}"
        options: dict = {"num_slices": self.slices} if self.slices > 1 else {}
        if self.kind.torus_3d:
            options["chip_config_name"] = "megacore"  # one jax device per chip (both TensorCores)
        if self.chips_per_slice < 4:
            options["chips_per_host_bounds"] = self.shape + (1,) * (3 - len(self.shape))
        return list(topologies.get_topology_desc(spec, "tpu", **options).devices)


_NAME = re.compile(r"^(v4|v5e|v5p|v6e)-(\d+)$")
_GPU = re.compile(r"^([a-z0-9\-]+):(\d+)$")


def valid_names() -> str:
    return "v4-N, v5p-N (N TensorCores, 2 per chip), v5e-N, v6e-N (N chips), or GPU clusters " + ", ".join(
        f"{k}:N" for k, c in CHIPS.items() if not c.tpu
    )


def parse(name: str, slices: int = 1) -> Pod:
    """The pod a name stands for; ConfigError lists the valid names."""
    if slices < 1:
        raise ConfigError(f"--num-slices must be >= 1, got {slices}")
    tpu, gpu = _NAME.match(name), _GPU.match(name)
    kind: Optional[ChipKind] = None
    if tpu:
        kind, count = CHIPS[tpu.group(1)], int(tpu.group(2))
        if count % kind.cores_per_chip or count < kind.cores_per_chip:
            raise ConfigError(f"--topology {name}: {kind.name} names count TensorCores, {kind.cores_per_chip} per chip")
        chips = count // kind.cores_per_chip
        if chips & (chips - 1):
            raise ConfigError(f"--topology {name}: the chip count ({chips}) must be a power of two")
        return Pod(name, kind, chips, slices)
    if gpu and gpu.group(1) in CHIPS and not CHIPS[gpu.group(1)].tpu:
        if slices != 1:
            raise ConfigError("--num-slices is for TPU multislice; a GPU cluster is KIND:N for N GPUs")
        return Pod(name, CHIPS[gpu.group(1)], int(gpu.group(2)))
    raise ConfigError(f"--topology {name!r} is not valid; valid: {valid_names()}")
