"""Ahead-of-time compile of the trainer's own step for any mesh, real or compile-only.

``compile_step(cfg, mesh)`` builds the :class:`~glm_jax.training.trainer.Trainer` (the
same construction ``python -m glm_jax.train`` runs), lowers its train step for the
abstract state and a batch of the configured shape, compiles it, and reads what XLA
reports per device: argument, output, aliased (donated), temporary and code bytes, and
the FLOPs of the partitioned program. On compile-only TPU devices (``parallel/topology``)
this answers "does this run fit that pod" from a CPU host.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Optional

from jax.sharding import Mesh

from glm_jax.checkpoint import compiled_step
from glm_jax.config import Config
from glm_jax.data.pipeline import abstract_batch
from glm_jax.training.loop import check_batch_sizes
from glm_jax.training.trainer import Trainer


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Per-device bytes of a compiled step, as XLA's memory analysis reports them."""

    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments (the train state)
    temporaries: int
    generated_code: int

    @property
    def total(self) -> int:
        """What the step holds at once: arguments + outputs - aliased + temporaries + code."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

    @classmethod
    def of(cls, compiled) -> "StepMemory":
        m = compiled.memory_analysis()
        return cls(
            arguments=int(m.argument_size_in_bytes),
            outputs=int(m.output_size_in_bytes),
            aliased=int(m.alias_size_in_bytes),
            temporaries=int(m.temp_size_in_bytes),
            generated_code=int(m.generated_code_size_in_bytes),
        )


class DoesNotFit(Exception):
    """The compiler refused the step for lack of device memory (libtpu checks HBM while it
    compiles). ``required`` / ``available``: bytes per device, when the message says."""

    def __init__(self, message: str, required: Optional[int], available: Optional[int], compile_s: float):
        super().__init__(message)
        self.required, self.available, self.compile_s = required, available, compile_s


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _out_of_memory(message: str, compile_s: float) -> DoesNotFit:
    """Read libtpu's "memory required for ... (265.69G) exceeds available HBM (15.75G)"."""
    sizes = [float(v) * _UNITS[u] for v, u in re.findall(r"\(([\d.]+)([KMGT]?)i?B?\)", message)]
    required, available = (int(sizes[0]), int(sizes[1])) if len(sizes) >= 2 else (None, None)
    first = message.strip().splitlines()[0] if message.strip() else message
    return DoesNotFit(first, required, available, compile_s)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    compiled: Any  # jax.stages.Compiled
    memory: StepMemory
    flops: Optional[float]  # per device, from XLA's cost analysis (None if it gives none)
    compile_s: float
    trainer: Trainer

    def save(self, path: str, compiled_for: Optional[dict] = None) -> int:
        """Write the executable for ``train.compiled_step=path`` (checkpoint/compiled_step);
        returns its bytes."""
        return compiled_step.save(path, self.compiled, self.trainer.cfg, self.trainer.mesh, compiled_for)


def compile_step(cfg: Config, mesh: Mesh) -> CompiledStep:
    """Compile the train step of ``cfg`` for ``mesh`` at the full ``train.batch_size``.
    Config errors (batch, pipeline) are raised before any compile, as the trainer would;
    :class:`DoesNotFit` when the compiler refuses the step for lack of memory."""
    check_batch_sizes(cfg, dict(mesh.shape)["data"])
    trainer = Trainer.build(cfg, mesh)  # checks the pipeline plan
    batch = abstract_batch(cfg, cfg.train.batch_size)
    t = time.perf_counter()
    lowered = trainer.train_step.lower(trainer.abstract_state(), batch)
    try:
        compiled = lowered.compile()
    except Exception as e:  # libtpu stops compiling a program that cannot fit the chip
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise _out_of_memory(str(e), time.perf_counter() - t) from None
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    flops = float(cost["flops"]) if cost and cost.get("flops", -1) > 0 else None
    return CompiledStep(compiled, StepMemory.of(compiled), flops, compile_s, trainer)
