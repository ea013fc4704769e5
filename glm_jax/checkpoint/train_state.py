"""A training workdir's checkpoints, with orbax-checkpoint's CheckpointManager.

The layout (``checkpoints/<step>/state``, ``.../meta``) is described in
``glm_jax.checkpoint.directory``. Each checkpoint holds the sharded train state (tensorstore, written asynchronously while
training goes on) and a small JSON of metadata (the data position). Only committed
checkpoints are listed, so a save torn by a crash is never restored; a latest
checkpoint that fails to restore is skipped, with a warning, for the one before it.
Restoring takes the target shardings, so a run can resume on a different mesh.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp

from glm_jax.checkpoint import directory as layout

log = logging.getLogger("glm_jax")


class Restored(NamedTuple):
    state: Any
    step: int
    data_rows: Optional[int]  # where the data stood, in global rows (None: a checkpoint from before it was saved)


class Checkpointer:
    """The train-state checkpoints of ``workdir``: saved every ``every`` steps (0: only when
    forced), the newest ``keep`` kept."""

    def __init__(self, workdir: str, every: int, keep: int):
        directory = str(workdir).rstrip("/") + "/" + layout.CHECKPOINTS
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: Any, warn: Callable[[str], None]) -> Optional[Restored]:
        """The newest checkpoint that restores onto ``abstract_state`` (shapes, dtypes and
        target shardings), or None."""
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(**{layout.STATE: ocp.args.StandardRestore(abstract_state),
                                               layout.META: ocp.args.JsonRestore()}),
                )
                meta = dict(out[layout.META])
                return Restored(out[layout.STATE], step, meta.get("data_rows"))
            except Exception as e:  # a damaged checkpoint: fall back to the previous one
                warn(f"checkpoint {step} in {self.directory} could not be restored ({type(e).__name__}: {str(e).splitlines()[0][:200]}); trying an older one")
        return None

    def save(self, step: int, state: Any, data_rows: int, *, force: bool = False, wait: bool = False) -> bool:
        """Save at ``step`` if it is a checkpoint step (or ``force``), asynchronously unless
        ``wait``; ``data_rows``: global rows of data consumed so far."""
        meta = {"step": step, "data_rows": data_rows}
        if not force and (self.every <= 0 or step % self.every):
            return False
        if step in self.manager.all_steps():
            return False
        self.manager.save(
            step,
            args=ocp.args.Composite(**{layout.STATE: ocp.args.StandardSave(state), layout.META: ocp.args.JsonSave(meta)}),
            force=True,
        )
        if wait:
            self.manager.wait_until_finished()
        return True

    def wait(self) -> None:
        """Block until every asynchronous save has committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
