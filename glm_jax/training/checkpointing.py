"""Checkpoints with orbax-checkpoint's CheckpointManager.

Each checkpoint holds the sharded train state (tensorstore, written asynchronously while
training goes on) and a small JSON of metadata (the data position). Only committed
checkpoints are listed, so a save torn by a crash is never restored; a latest
checkpoint that fails to restore is skipped, with a warning, for the one before it.
Restoring takes the target shardings, so a run can resume on a different mesh.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("glm_jax")


class Checkpointer:
    def __init__(self, directory: str, every: int, keep: int):
        directory = str(directory)
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: Any, warn: Callable[[str], None]) -> Optional[tuple[Any, dict, int]]:
        """(state, metadata, step) from the newest checkpoint that restores, or None."""
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
                )
                return out.state, dict(out.meta), step
            except Exception as e:  # a damaged checkpoint: fall back to the previous one
                warn(f"checkpoint {step} in {self.directory} could not be restored ({type(e).__name__}: {str(e).splitlines()[0][:200]}); trying an older one")
        return None

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False, wait: bool = False) -> bool:
        if not force and (self.every <= 0 or step % self.every):
            return False
        if step in self.manager.all_steps():
            return False
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        if wait:
            self.manager.wait_until_finished()
        return True

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
