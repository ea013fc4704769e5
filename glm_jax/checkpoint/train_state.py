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
import sys
from typing import Any, Callable, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from glm_jax.checkpoint import directory as layout
from glm_jax.checkpoint import store
from glm_jax.errors import CheckpointError, one_line

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
        target shardings), or None when there is none.

        A checkpoint whose parameters have other shapes than ``abstract_state``'s was saved
        by another model: CheckpointError, nothing touched. A checkpoint that cannot be
        read is damaged: one warning line, and it is moved to ``checkpoints/damaged/``
        (kept for inspection, out of retention's count), then the one before is tried.
        """
        _quiet_aborted_reads()
        for step in reversed(self.steps()):
            try:
                self._check_params(step, abstract_state)
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(**{layout.STATE: ocp.args.StandardRestore(abstract_state),
                                               layout.META: ocp.args.JsonRestore()}),
                )
            except CheckpointError:
                raise
            except Exception as e:  # a damaged checkpoint: set it aside, fall back to the previous one
                where = self._set_aside(step)
                warn(f"checkpoint {step} in {self.directory} cannot be read ({one_line(e)}); moved it to {where} "
                     "and trying the one before")
                continue
            meta = dict(out[layout.META])
            return Restored(out[layout.STATE], step, meta.get("data_rows"))
        return None

    def _check_params(self, step: int, abstract_state: Any) -> None:
        """CheckpointError if the saved parameters' tree or shapes differ from the target's."""
        if "://" in self.directory:
            return  # remote: orbax's own restore reports a mismatch
        want = {path: tuple(x.shape) for path, x in _flat(abstract_state.params, layout.STATE_PARAMS_PREFIX)}
        reader = store.CheckpointReader(os.path.join(self.directory, str(step), layout.STATE))
        got = {p for p in reader.leaves if p[: len(layout.STATE_PARAMS_PREFIX)] == layout.STATE_PARAMS_PREFIX}
        for path in sorted(set(want) | got):
            if path not in got or path not in want:
                what = "lacks" if path not in got else "has a parameter this model lacks:"
                raise CheckpointError(
                    f"checkpoint {step} in {self.directory} was saved by a different model (it {what} "
                    f"{'/'.join(path[1:])}); train this model in a new workdir="
                )
            shape = tuple(reader.open(path).shape)
            if shape != want[path]:
                raise CheckpointError(
                    f"checkpoint {step} in {self.directory} was saved by a different model ({'/'.join(path[1:])} is "
                    f"{list(shape)}, this model's is {list(want[path])}); train this model in a new workdir="
                )

    def _set_aside(self, step: int) -> str:
        """Move a damaged step to ``checkpoints/damaged/<step>`` (process 0; every process waits)."""
        damaged = os.path.join(self.directory, layout.DAMAGED)
        target = os.path.join(damaged, str(step))
        if jax.process_index() == 0 and "://" not in self.directory:
            os.makedirs(damaged, exist_ok=True)
            n = 1
            while os.path.exists(target):
                n += 1
                target = os.path.join(damaged, f"{step}.{n}")
            os.rename(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"glm_jax damaged checkpoint {step}")
        self.manager.reload()
        return target

    def save(self, step: int, state: Any, data_rows: int, *, force: bool = False, wait: bool = False) -> bool:
        """Save at ``step`` if it is a checkpoint step (or ``force``), asynchronously unless
        ``wait``; ``data_rows``: global rows of data consumed so far."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        if step in self.manager.all_steps():
            return False
        meta = {"step": step, "data_rows": data_rows}
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


def _flat(tree: Any, prefix: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(prefix + tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path), x) for path, x in leaves]


_hook_installed = False
# What orbax's reads still in flight report after a failed restore: the failure itself,
# again per array, and the event loop they can no longer reach.
_ABORTED_READ = ("Encountered error while reading array index", "Event loop is closed")


def _aborted_read(e: Optional[BaseException]) -> bool:
    return e is not None and str(e).startswith(_ABORTED_READ)


class _DropAbortedReads(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        e = record.exc_info[1] if record.exc_info else None
        future = getattr(record, "msg", None)
        return not (_aborted_read(e) or ("exception was never retrieved" in str(future) and any(
            m in record.getMessage() for m in _ABORTED_READ)))


def _quiet_aborted_reads() -> None:
    """When a restore fails, orbax's reads still in flight fail one by one and each reports
    it (sys.unraisablehook, asyncio's "exception was never retrieved"): dozens of
    tracebacks about a failure already reported in one line. Drop exactly those; anything
    else goes where it went."""
    global _hook_installed
    if _hook_installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _aborted_read(unraisable.exc_value):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_DropAbortedReads())
    _hook_installed = True
