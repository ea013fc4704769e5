"""A train step compiled ahead of time, on disk: what ``python -m glm_jax.compile --save
PATH`` writes and ``python -m glm_jax.train train.compiled_step=PATH`` loads instead of
compiling (minutes for a large model on a pod)::

    PATH/manifest.json   what the step was compiled for, readable: the config, jax, jaxlib
                         and libtpu versions, the backend (platform, its version string,
                         device kind), a digest of glm_jax's source, the mesh (axis sizes
                         and device ids in mesh order), and what the compile reported
    PATH/executable.bin  the executable as XLA serializes it (jax.experimental.serialize_executable)
    PATH/trees.pkl       the pytree structures of its arguments and results

An executable is a frozen program: it runs what was compiled, whatever the run's config
says. So :func:`load` compares every manifest field with the run and refuses, naming
each difference, when the config (apart from ``STEP_NEUTRAL_KEYS``: logging, checkpoint
cadence, data sources), the versions, the backend, glm_jax's code or the mesh differ.

Loading unpickles the tree structures and loads machine code: load only files written
by your own jobs, as with any pickle.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import pickle
import socket
from typing import Any, Callable, Optional

import jax
import jaxlib
from etils import epath
from jax.experimental import serialize_executable
from jax.sharding import Mesh

from glm_jax.config import STEP_NEUTRAL_KEYS, Config, ConfigError, config_from_dict, differences
from glm_jax.errors import CheckpointError

FORMAT = 1
MANIFEST, EXECUTABLE, TREES = "manifest.json", "executable.bin", "trees.pkl"
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CompiledStepError(CheckpointError):
    """A saved step that is missing, unreadable, or compiled for another run."""


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over glm_jax's Python source (paths and contents): the code that builds the
    step. Any edit changes it; where the package is installed does not."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(_PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, _PACKAGE).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()


def _libtpu_version() -> Optional[str]:
    for dist in ("libtpu", "libtpu-nightly"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def runtime(mesh: Mesh) -> dict:
    """The software and hardware a program compiled for ``mesh`` depends on."""
    device = mesh.devices.flat[0]
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "libtpu": _libtpu_version() if device.platform == "tpu" else None,
        "platform": device.platform,
        "platform_version": device.client.platform_version,
        "device_kind": device.device_kind,
    }


def mesh_record(mesh: Mesh) -> dict:
    return {"axes": dict(mesh.shape), "device_ids": [int(d.id) for d in mesh.devices.flat]}


def _signature(tree) -> tuple:
    """Structure, shapes and dtypes of arrays / ShapeDtypeStructs / jax ArgInfos."""
    def leaf(x):
        aval = getattr(x, "_aval", x)
        return tuple(aval.shape), str(aval.dtype)

    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaf(x) for x in leaves)


def save(path: str, compiled, cfg: Config, mesh: Mesh, compiled_for: Optional[dict] = None) -> int:
    """Write the compiled step ``compiled`` (a ``jax.stages.Compiled`` of the trainer's
    step for ``cfg`` on ``mesh``) to the directory ``path`` (local or gs://), replacing a
    step saved there before. ``compiled_for``: what to record about the compile
    (topology, bytes per chip). Returns the bytes of the executable."""
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    manifest = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "runtime": runtime(mesh),
        "glm_jax_source": source_digest(),
        "mesh": mesh_record(mesh),
        "compiled_for": compiled_for or {},
        "config": cfg.to_dict(),
    }
    # The manifest goes last and a reader needs it, so a save cut short (or one that
    # replaces an older step) never looks finished. No directory rename: gs:// has none.
    dest = epath.Path(path)
    dest.mkdir(parents=True, exist_ok=True)
    if (dest / MANIFEST).exists():
        (dest / MANIFEST).unlink()
    (dest / EXECUTABLE).write_bytes(payload)
    (dest / TREES).write_bytes(pickle.dumps((in_tree, out_tree)))
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return len(payload)


@dataclasses.dataclass
class LoadedStep:
    """A deserialized step, callable like the trainer's ``(state, batch) -> (state, metrics)``
    for batches of the shape it was compiled for."""

    path: str
    manifest: dict
    compiled: Any  # jax.stages.Compiled

    def _parts(self):
        args, _ = self.compiled.args_info
        return args  # (state, batch)

    @functools.cached_property
    def _batch_signature(self) -> tuple:
        return _signature(self._parts()[1])

    def accepts(self, batch) -> bool:
        return _signature(batch) == self._batch_signature

    def check_arguments(self, abstract_state, abstract_batch) -> None:
        """Refuse when this run's train state or full-size batch has other shapes, dtypes or
        structure than the step was compiled for."""
        state, batch = self._parts()
        for what, ours, theirs in (("train state", abstract_state, state), ("batch", abstract_batch, batch)):
            if _signature(ours) != _signature(theirs):
                raise CompiledStepError(
                    f"train.compiled_step={self.path} was compiled for a {what} of other shapes or layout than this "
                    "run's; compile it again for this run (python -m glm_jax.compile ... --save)"
                )

    def __call__(self, state, batch):
        return self.compiled(state, batch)

    def dispatch(self, fallback: Callable) -> Callable:
        """A step that runs this executable for the batches it was compiled for and
        ``fallback`` (the jitted step, which compiles) for any other (batch ramp-up)."""

        def step(state, batch):
            return self(state, batch) if self.accepts(batch) else fallback(state, batch)

        step.lower = fallback.lower
        return step

    def describe(self) -> str:
        m = self.manifest
        where = m["compiled_for"].get("topology") or m["runtime"]["device_kind"]
        return f"compiled {m['created']} on {m['host']} for {where}"


def _mismatches(manifest: dict, cfg: Config, mesh: Mesh) -> list[str]:
    reasons = []
    try:
        saved = config_from_dict(manifest["config"])
    except ConfigError as e:
        reasons.append(f"its config does not load in this glm_jax ({e})")
    else:
        changed = differences(saved, cfg, sections=("model", "mesh", "train", "data", "finetune"),
                              neutral=STEP_NEUTRAL_KEYS)
        reasons += [f"config {c}" for c in changed]
    here = runtime(mesh)
    saved_runtime = manifest["runtime"]
    # On TPU the libtpu version names the compiler; the backend's version string is left
    # out there, in case a compile-only client words it differently from the pod's.
    by_libtpu = saved_runtime.get("platform") == here["platform"] == "tpu" and saved_runtime.get("libtpu")
    for key, there in saved_runtime.items():
        if key == "platform_version" and by_libtpu:
            continue
        if there != here.get(key):
            reasons.append(f"{key} {there!r} -> {here.get(key)!r}".replace("\n", " "))
    if manifest["glm_jax_source"] != source_digest():
        reasons.append(f"glm_jax's code differs from the code that compiled it (source digest "
                       f"{manifest['glm_jax_source'][:12]} -> {source_digest()[:12]})")
    ours = mesh_record(mesh)
    if manifest["mesh"]["axes"] != ours["axes"]:
        reasons.append(f"mesh {manifest['mesh']['axes']} -> {ours['axes']}")
    elif manifest["mesh"]["device_ids"] != ours["device_ids"]:
        reasons.append("the mesh orders its devices differently (device ids in mesh order differ)")
    return reasons


def load(path: str, cfg: Config, mesh: Mesh) -> LoadedStep:
    """The step saved at ``path``, loaded onto ``mesh``'s devices, after checking that it
    was compiled for this config, these versions, this code and this mesh
    (:class:`CompiledStepError` naming every difference otherwise)."""
    where = epath.Path(path)
    name = f"train.compiled_step={path}"
    if not (where / MANIFEST).exists():
        raise CompiledStepError(f"{name}: no {MANIFEST} there; write one with python -m glm_jax.compile ... --save {path}")
    try:
        manifest = json.loads((where / MANIFEST).read_text())
        fmt = manifest.get("format")
    except (ValueError, AttributeError) as e:
        raise CompiledStepError(f"{name}: {MANIFEST} is not readable JSON ({e})") from None
    if fmt != FORMAT:
        raise CompiledStepError(f"{name}: format {fmt!r}, this glm_jax reads format {FORMAT}; compile it again")
    reasons = _mismatches(manifest, cfg, mesh)
    if reasons:
        more = f"; and {len(reasons) - 4} more" if len(reasons) > 4 else ""
        raise CompiledStepError(
            f"{name} was compiled for another run ({'; '.join(reasons[:4])}{more}); "
            "compile it again for this one (python -m glm_jax.compile ... --save)"
        )
    try:
        in_tree, out_tree = pickle.loads((where / TREES).read_bytes())
        compiled = serialize_executable.deserialize_and_load(
            (where / EXECUTABLE).read_bytes(), in_tree, out_tree, backend=mesh.devices.flat[0].client)
    except Exception as e:  # a torn copy, or an executable this runtime rejects
        raise CompiledStepError(f"{name} cannot be loaded: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return LoadedStep(str(path), manifest, compiled)
