"""The two directories glm_jax keeps parameters in, and writing either all-or-nothing.

A **params directory** (written by ``python -m glm_jax.convert`` from the authors'
formats, or by ``convert export`` from a training run) holds::

    config.yaml      the glm_jax config (glm_jax.config.dump_config); model.* describes the weights
    params/          an orbax checkpoint of the parameter tree (restorable by StandardCheckpointer)
    hf_source.json   (from-hf only) the source's config.json and what to-hf needs to write it back
    sat_source.json  (from-sat only) the SAT source's layout, iteration, key order and metadata
    quantized/       (from an INT8/INT4 checkpoint) the source's own quantized tensors

A **training workdir** (``python -m glm_jax.train workdir=DIR``) holds::

    config.yaml                  the run's config
    checkpoints/<step>/state/    orbax checkpoint of the train state; parameters under ``params``
    checkpoints/<step>/meta/     JSON metadata: the step and the data position in global rows
    checkpoints/damaged/<step>/  checkpoints that could not be read, set aside (never restored or counted)
    .lock                        held by the training run using the workdir (checkpoint/lock.py)
    tensorboard/, compile_cache/

A step directory counts only once orbax has committed it (``state/_METADATA`` exists), so
a save torn by a crash is never read. :func:`resolve` turns either kind of directory (and
a step) into a :class:`Source`: where the config and the parameter tree are.

Writers stage into a temporary sibling of the destination and rename it into place only
when everything is written, so an interrupted run never leaves something that looks like
a finished checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import socket
import sys
import tempfile
from typing import Iterator, Optional

from glm_jax.errors import CheckpointError

PARAMS = "params"
CONFIG = "config.yaml"
HF_SOURCE = "hf_source.json"
SAT_SOURCE = "sat_source.json"
QUANTIZED = "quantized"

CHECKPOINTS = "checkpoints"
STATE = "state"
META = "meta"
DAMAGED = "damaged"  # checkpoints/damaged/<step>: checkpoints that could not be read, set aside
TENSORBOARD = "tensorboard"
COMPILE_CACHE = "compile_cache"
# Where the parameters sit inside a train state checkpoint (TrainState.params).
STATE_PARAMS_PREFIX = ("params",)


@dataclasses.dataclass(frozen=True)
class Source:
    """Parameters to read: a params directory, or one step of a training workdir.

    root: the directory the user named; params_dir: the orbax checkpoint that holds the
    parameter tree, under ``prefix`` inside it; step: the training step (None for a
    params directory).
    """

    root: str
    config_path: str
    params_dir: str
    prefix: tuple[str, ...] = ()
    step: Optional[int] = None

    @property
    def is_workdir(self) -> bool:
        return self.step is not None

    @property
    def quantized_dir(self) -> Optional[str]:
        """A quantized release's own tensors (``quantized/``), if this source has them."""
        path = os.path.join(self.root, QUANTIZED)
        return path if not self.is_workdir and os.path.isdir(path) else None

    def record(self, name: str) -> dict:
        """A converter's source record (``hf_source.json`` / ``sat_source.json``), or {}."""
        path = os.path.join(self.root, name)
        if self.is_workdir or not os.path.isfile(path):
            return {}
        try:
            with open(path) as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from None

    def describe(self) -> str:
        return f"{self.root} (step {self.step})" if self.is_workdir else self.root


def step_dir(workdir: str, step: int) -> str:
    return os.path.join(workdir, CHECKPOINTS, str(step))


def workdir_steps(workdir: str) -> list[int]:
    """The committed checkpoint steps of a training workdir, oldest first."""
    ckpts = os.path.join(workdir, CHECKPOINTS)
    if not os.path.isdir(ckpts):
        return []
    return sorted(
        int(name) for name in os.listdir(ckpts)
        if name.isdigit() and os.path.exists(os.path.join(ckpts, name, STATE, "_METADATA"))
    )


def resolve(path: str, step: Optional[int] = None) -> Source:
    """Where the config and parameters of ``path`` are: a params directory, or a training
    workdir at ``step`` (default: its newest committed checkpoint)."""
    root = os.path.abspath(path)
    if not os.path.isdir(root):
        raise CheckpointError(f"{path}: no such directory")
    cfg_path = os.path.join(root, CONFIG)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(
            f"{path}: no {CONFIG}; expected a glm_jax checkpoint directory (from python -m glm_jax.convert) "
            "or a training workdir"
        )
    params = os.path.join(root, PARAMS)
    if os.path.isdir(params):
        if step is not None:
            raise CheckpointError(f"{path} is a params directory with one set of parameters; --step applies to training workdirs")
        return Source(root, cfg_path, params)
    if not os.path.isdir(os.path.join(root, CHECKPOINTS)):
        raise CheckpointError(f"{path}: neither {PARAMS}/ nor {CHECKPOINTS}/ to load parameters from")
    steps = workdir_steps(root)
    if not steps:
        raise CheckpointError(f"{path}: no finished checkpoint in {CHECKPOINTS}/ (training saves every train.checkpoint_every steps)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{path}: no finished checkpoint of step {step}; saved steps: {', '.join(map(str, steps))}")
    return Source(root, cfg_path, os.path.join(step_dir(root, step), STATE), STATE_PARAMS_PREFIX, step)


def candidates(path: str, step: Optional[int] = None) -> list[Source]:
    """What to try reading, best first: the one source ``path`` and ``step`` name, or, for
    a training workdir without a step, every committed checkpoint from the newest down
    (a reader falls back past a damaged newest one)."""
    first = resolve(path, step)
    if not first.is_workdir or step is not None:
        return [first]
    return [first] + [resolve(path, s) for s in reversed(workdir_steps(first.root)) if s != first.step]


WRITER = ".writer"  # in a staging directory: the pid and host writing it


def remove_stale_partials(dst: str, log=None) -> list[str]:
    """Delete the staging directories of earlier writes to ``dst`` whose writer is gone (a
    conversion killed before it could clean up); returns what was removed."""
    removed = []
    for path in sorted(glob.glob(glob.escape(dst) + ".partial-*")):
        try:
            with open(os.path.join(path, WRITER)) as f:
                writer = json.load(f)
        except (OSError, ValueError):
            writer = {}
        if writer.get("host") == socket.gethostname() and _alive(int(writer.get("pid", 0))):
            continue  # another process is writing it now
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        if log:
            log(f"removed {path}, the unfinished output of an earlier run that was stopped")
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staged_output(dst: str, *, overwrite: bool = False, log=None) -> Iterator[str]:
    """Yield a temporary directory that becomes ``dst`` when the block finishes without error.

    Staging directories left by killed writers are removed first; the finished directory
    gets the permissions of a directory made by the user (the umask applies), not the
    owner-only mode of a temporary one."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"{dst} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(dst, log or (lambda m: print(f"note: {m}", file=sys.stderr)))
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".partial-", dir=parent)
    with open(os.path.join(tmp, WRITER), "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
    try:
        yield tmp
        os.remove(os.path.join(tmp, WRITER))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".old-", dir=parent)
        os.rename(dst, os.path.join(old, "x"))
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
