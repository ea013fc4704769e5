"""Multi-process runs: when to start JAX's distributed runtime, and global batches.

One Python process runs per host (TPU VM worker, GPU node) or per GPU. ``initialize()``
must run before anything else touches JAX (``jax.devices()``, a jit, a device_put). It
calls ``jax.distributed.initialize`` only when the environment says this is one process
of several; a single-process run never starts the coordinator or touches the network.

How the environment is read (first match wins):

===================  ===========================================================  =========
method               condition                                                    call
===================  ===========================================================  =========
``disabled``         ``GLM_JAX_DISTRIBUTED=0``                                    none
``forced``           ``GLM_JAX_DISTRIBUTED=1``                                    jax's own auto-detection
``env``              ``JAX_NUM_PROCESSES`` > 1, with ``JAX_COORDINATOR_ADDRESS``  explicit arguments
                     (host:port of process 0) and ``JAX_PROCESS_ID``
``ompi``             ``OMPI_COMM_WORLD_SIZE`` > 1 (``mpirun``)                    jax's Open MPI detection
``slurm``            ``SLURM_NTASKS`` > 1 inside an ``srun`` step                 jax's SLURM detection
``tpu``              ``TPU_WORKER_HOSTNAMES``/``TPU_PROCESS_ADDRESSES`` with more  jax's Cloud TPU detection
                     than one host, ``MEGASCALE_NUM_SLICES`` > 1, or Cloud TPU
                     chips on this machine (the slice layout is then read from
                     the VM's metadata server by jax)
``single``           anything else                                                none
===================  ===========================================================  =========

``JAX_COORDINATOR_ADDRESS`` and ``JAX_COORDINATOR_PORT`` also override the address or
port that jax derives under SLURM / Open MPI / TPU, and ``JAX_LOCAL_DEVICE_IDS`` (read by
jax) chooses which local GPUs a process drives; ``GLM_JAX_INIT_TIMEOUT`` (seconds,
default 300) bounds the wait for the other processes. Only the ``JAX_`` spellings are
read: jax itself reads ``JAX_COORDINATOR_ADDRESS``, and one name per setting avoids two
disagreeing values.

After ``initialize()``: ``data_shard(mesh)`` says which part of each global batch this
process reads, ``global_batch(rows, mesh)`` assembles the processes' rows into global
arrays, ``is_main_process()`` picks the one process that writes logs and metadata,
``any_process(flag)`` makes a per-process flag (SIGTERM seen) a common decision, and
``multislice_mesh(cfg.mesh)`` lays the mesh over several TPU slices.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh

from glm_jax.config import ConfigError, MeshConfig
from glm_jax.parallel import rules

T = TypeVar("T")

_SWITCH = "GLM_JAX_DISTRIBUTED"
_TIMEOUT = "GLM_JAX_INIT_TIMEOUT"
_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# The variables jax's SLURM detection needs; SLURM_STEP_NODELIST exists only inside srun.
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Detection:
    """What the environment says about this run (no JAX calls made to find out)."""

    method: str  # disabled | forced | env | ompi | slurm | tpu | single
    kwargs: dict  # arguments for jax.distributed.initialize; None when single-process
    env: tuple[str, ...] = ()  # the variables the decision was read from, for messages
    note: str = ""

    @property
    def multi_process(self) -> bool:
        return self.kwargs is not None


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """This process's place in the run, for the startup log line."""

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    method: str  # Detection.method
    coordinator: str | None = None  # host:port of process 0, where known
    note: str = ""

    def describe(self) -> str:
        where = f" via {self.method}" + (f" (coordinator {self.coordinator})" if self.coordinator else "")
        return (
            f"process {self.process_index} of {self.process_count}{where}, "
            f"{self.local_device_count} local of {self.device_count} devices" + (f"; {self.note}" if self.note else "")
        )


class DistributedInitError(RuntimeError):
    pass


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DistributedInitError(f"{name}={env[name]!r} is not an integer") from None


def _cloud_tpu_chips() -> bool:
    """Whether Cloud TPU chips sit on this machine's PCI bus (a sysfs read, no network)."""
    try:
        from jax._src import hardware_utils  # private, and absent in some jax builds: only here, guarded

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError, OSError):  # private module moved, sysfs unreadable: env only
        return False


def detect(environ: Mapping[str, str] | None = None, tpu_chips: bool | None = None) -> Detection:
    """Decide from the environment whether (and how) to call jax.distributed.initialize.

    ``tpu_chips`` overrides the local Cloud TPU hardware check (for tests).
    """
    env = os.environ if environ is None else environ
    timeout = _int(env, _TIMEOUT) if _TIMEOUT in env else 300
    auto = {"initialization_timeout": timeout}

    switch = env.get(_SWITCH, "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return Detection("disabled", None, (_SWITCH,))
    if switch in ("1", "true", "yes", "on"):
        return Detection("forced", auto, (_SWITCH,))
    if switch not in ("", "auto"):
        raise DistributedInitError(f"{_SWITCH}={env[_SWITCH]!r}: use 1 (always), 0 (never) or leave it unset (detect)")

    present = [n for n in _EXPLICIT if n in env]
    if "JAX_NUM_PROCESSES" in env or "JAX_PROCESS_ID" in env:
        count = _int(env, "JAX_NUM_PROCESSES") if "JAX_NUM_PROCESSES" in env else None
        if count == 1:
            return Detection("single", None, tuple(present), "JAX_NUM_PROCESSES=1")
        missing = [n for n in _EXPLICIT if n not in env]
        if missing:
            raise DistributedInitError(
                f"{', '.join(present)} set but {', '.join(missing)} missing: a multi-process run needs all of "
                + ", ".join(_EXPLICIT)
            )
        pid = _int(env, "JAX_PROCESS_ID")
        if not (count and count > 1 and 0 <= pid < count):
            raise DistributedInitError(f"JAX_PROCESS_ID={pid} must lie in [0, JAX_NUM_PROCESSES={count})")
        kwargs = dict(auto, coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=count, process_id=pid)
        return Detection("env", kwargs, _EXPLICIT)

    if "OMPI_COMM_WORLD_SIZE" in env and _int(env, "OMPI_COMM_WORLD_SIZE") > 1:
        used = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")
        if "OMPI_MCA_orte_hnp_uri" in env:
            return Detection("ompi", auto, used + ("OMPI_MCA_orte_hnp_uri",))
        if "JAX_COORDINATOR_ADDRESS" in env:  # Open MPI 5 (PMIx) has no orte URI to find process 0 from
            kwargs = dict(auto, coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                          num_processes=_int(env, "OMPI_COMM_WORLD_SIZE"), process_id=_int(env, "OMPI_COMM_WORLD_RANK"))
            return Detection("ompi", kwargs, used + ("JAX_COORDINATOR_ADDRESS",))
        raise DistributedInitError(
            "Open MPI run (OMPI_COMM_WORLD_SIZE > 1) without OMPI_MCA_orte_hnp_uri (Open MPI 5 / PMIx): "
            "set JAX_COORDINATOR_ADDRESS=<host of rank 0>:<free port> for every rank"
        )

    if "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
        if all(n in env for n in _SLURM):
            return Detection("slurm", auto, _SLURM)
        note = "SLURM_NTASKS > 1 outside an srun step: running as one process (launch with srun)"
        return Detection("single", None, ("SLURM_NTASKS",), note)

    if "MEGASCALE_NUM_SLICES" in env and _int(env, "MEGASCALE_NUM_SLICES") > 1:
        return Detection("tpu", auto, ("MEGASCALE_NUM_SLICES",))
    hosts = env.get("TPU_PROCESS_ADDRESSES", env.get("TPU_WORKER_HOSTNAMES"))
    if hosts is not None:  # GKE / JobSet: the slice's hosts are in the environment
        if len([h for h in hosts.split(",") if h.strip()]) > 1:
            return Detection("tpu", auto, ("TPU_PROCESS_ADDRESSES" if "TPU_PROCESS_ADDRESSES" in env else "TPU_WORKER_HOSTNAMES",))
    elif _cloud_tpu_chips() if tpu_chips is None else tpu_chips:
        # A Cloud TPU VM keeps its slice layout in instance metadata, not the environment:
        # jax asks the VM's metadata server (a one-host slice comes back as one process).
        return Detection("tpu", auto, (), "Cloud TPU VM: jax reads the slice layout from the metadata server")
    return Detection("single", None)


_info: DistributedInfo | None = None


def _wait_for_coordinator(address: str, timeout_s: float, what: str) -> None:
    """Wait until process 0's coordinator port accepts connections, or fail with a clear message.

    jax's own client aborts the whole process (a C++ fatal error, no Python exception)
    when the coordinator stays unreachable, so non-zero processes look first.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)):
                return
        except (OSError, ValueError) as e:
            if time.monotonic() >= deadline or isinstance(e, ValueError):
                raise DistributedInitError(
                    f"{what}: the coordinator {address} (process 0) did not accept connections within "
                    f"{timeout_s:g}s ({type(e).__name__}: {e}). Check that process 0 is running, that the address "
                    f"names its host (not localhost, across hosts), and that the port is open between hosts."
                ) from None
            time.sleep(0.5)


def initialize(environ: Mapping[str, str] | None = None, log=None) -> DistributedInfo:
    """Start JAX's distributed runtime if this is a multi-process run; safe to call twice.

    Call before any other JAX use. Returns where this process stands, for logging.
    ``log`` (default: a line on stderr) hears what is about to be tried, so that the last
    line before a failure names the coordinator and the variables it came from.
    """
    global _info
    if _info is not None:
        return _info
    env = os.environ if environ is None else environ
    found = detect(env)
    coordinator = None
    if found.multi_process and not jax.distributed.is_initialized():
        kwargs = found.kwargs
        coordinator = kwargs.get("coordinator_address") or env.get("JAX_COORDINATOR_ADDRESS")
        args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        what = f"{found.method} run, from {', '.join(found.env) or 'jax auto-detection'}"
        (log or _stderr)(f"glm_jax.distributed: jax.distributed.initialize({args}) [{what}]")
        if coordinator and kwargs.get("process_id"):
            _wait_for_coordinator(coordinator, kwargs["initialization_timeout"], what)
        try:
            jax.distributed.initialize(**kwargs)
        except Exception as e:
            raise DistributedInitError(
                f"jax.distributed.initialize({args}) failed [{what}]: {type(e).__name__}: {e}. "
                f"Check that every process was started, that process 0's host and port "
                f"({coordinator or 'auto-detected'}) are reachable from all hosts, and that nothing used JAX "
                f"before initialize()."
            ) from e
    _info = DistributedInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        device_count=jax.device_count(),
        method=found.method,
        coordinator=coordinator,
        note=found.note,
    )
    return _info


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def is_main_process() -> bool:
    """Process 0 writes logs, checkpoint metadata and TensorBoard summaries."""
    return (_info.process_index if _info is not None else jax.process_index()) == 0


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process, answered identically on all of them.

    For decisions every process must take at the same step, such as stopping after a
    SIGTERM (which reaches hosts at different moments): a process that stopped alone
    would leave the others waiting in the next step's collectives. One tiny all-gather.
    """
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag), np.int32))))


def data_shard(mesh: Mesh) -> tuple[int, int]:
    """``(index, count)`` of the slice of each global batch this process must feed.

    Processes whose devices hold the same batch rows (the model axis spanning hosts) get
    the same index and must read the same data; otherwise this is
    ``(jax.process_index(), jax.process_count())``. Pass it to
    ``batches(..., process_index=index, process_count=count)``.
    """
    sharding = rules.batch_sharding(mesh, 1)
    entry = sharding.spec[0] if len(sharding.spec) else None
    names = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    shards = int(np.prod([mesh.shape[n] for n in names]))
    rows: dict[int, set] = {}
    for device, index in sharding.devices_indices_map((shards,)).items():
        rows.setdefault(device.process_index, set()).add(index[0].indices(shards)[:2])
    slices = sorted({tuple(sorted(r)) for r in rows.values()})
    if len({len(s) for s in slices}) != 1 or len(slices) * len(slices[0]) != shards:
        raise ValueError(f"processes hold uneven or overlapping parts of the batch axis: {slices}")
    return slices.index(tuple(sorted(rows[jax.process_index()]))), len(slices)


def slice_count(devices: Sequence | None = None) -> int:
    """How many TPU slices (joined by DCN) the devices span; 1 where devices have no slices."""
    devices = jax.devices() if devices is None else devices
    return len({getattr(d, "slice_index", 0) for d in devices})


def multislice_mesh(cfg: MeshConfig, devices: Sequence | None = None, *, process_is_granule: bool = False) -> Mesh:
    """The mesh across several slices: ``data`` spans the slices (and ``pipe`` spans
    ``mesh.dcn_pipe`` of them); ``model`` stays inside one.

    ``jax.make_mesh`` refuses devices from more than one slice. Here each slice gets the
    mesh ``jax`` would build for its share of the axes (ICI), and the slices are stacked
    along ``data`` and ``pipe`` (DCN carries the gradient all-reduce, and between stages
    only the activations of one microbatch). ``process_is_granule`` treats each process as
    a slice (GPU clusters, CPU tests).
    """
    devices = list(jax.devices() if devices is None else devices)
    key = "process_index" if process_is_granule else "slice_index"
    granules = len({getattr(d, key, 0) for d in devices})
    sizes = cfg.axis_sizes(len(devices))
    if granules % cfg.dcn_pipe or sizes["pipe"] % cfg.dcn_pipe:
        raise ConfigError(
            f"mesh: mesh.dcn_pipe={cfg.dcn_pipe} must divide both the {granules} slices and mesh.pipe ({sizes['pipe']})"
        )
    over_data = granules // cfg.dcn_pipe
    if sizes["data"] % over_data:
        raise ConfigError(
            f"mesh: mesh.data={sizes['data']} must be a multiple of the {over_data} slices it spans; only the data and "
            "pipe axes may span slices (DCN), so give mesh.model a size that fits inside one slice"
        )
    dcn = {"data": over_data, "pipe": cfg.dcn_pipe, "model": 1}
    ici = [sizes[a] // dcn[a] for a in rules.MESH_AXES]
    grid = mesh_utils.create_hybrid_device_mesh(
        ici, [dcn[a] for a in rules.MESH_AXES], devices, process_is_granule=process_is_granule,
        allow_split_physical_axes=True,
    )
    return Mesh(grid, rules.MESH_AXES, axis_types=(AxisType.Auto,) * len(rules.MESH_AXES))


def global_batch(local_batch: T, mesh: Mesh) -> T:
    """This process's rows of a batch (any pytree of ``[rows, ...]`` arrays, e.g. a
    ``glm_jax.model.Batch``) -> the same structure of global arrays sharded over the
    batch axis.

    Every process calls it with its own rows (from ``batches`` with ``data_shard(mesh)``);
    with one process it is ``jax.device_put(batch, batch_sharding)``.
    """

    def place(value):
        value = np.asarray(value)
        return jax.make_array_from_process_local_data(rules.batch_sharding(mesh, value.ndim), value)

    return jax.tree.map(place, local_batch)


__all__ = [
    "Detection",
    "DistributedInfo",
    "DistributedInitError",
    "any_process",
    "data_shard",
    "detect",
    "global_batch",
    "initialize",
    "is_main_process",
    "multislice_mesh",
    "slice_count",
]
