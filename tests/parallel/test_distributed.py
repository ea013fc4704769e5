"""Multi-process runs: environment detection, global batches, and a real 2-process CPU run.

The 2-process test starts two OS processes with 4 CPU devices each, joined through
jax.distributed (gloo collectives on CPU), and checks that they train exactly like one
process with 8 devices.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import NamedTuple

import jax
import numpy as np
import pytest

from glm_jax.config import ConfigError, MeshConfig
from glm_jax.parallel import distributed, rules
from glm_jax.parallel.mesh import make_mesh

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "distributed_worker.py")


# --- detection (no JAX calls) ------------------------------------------------------


def _detect(env: dict, tpu_chips: bool = False) -> distributed.Detection:
    return distributed.detect(env, tpu_chips=tpu_chips)


def test_single_process_by_default():
    found = _detect({"HOME": "/root", "PATH": "/usr/bin"})
    assert (found.method, found.multi_process) == ("single", False)
    assert _detect({"JAX_NUM_PROCESSES": "1"}).method == "single"
    assert _detect({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}).method == "single"  # an address alone says nothing


def test_explicit_env():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    found = _detect(env)
    assert found.method == "env"
    assert found.kwargs == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
                            "initialization_timeout": 300}
    found = _detect({**env, "GLM_JAX_INIT_TIMEOUT": "20", "SLURM_NTASKS": "8"})  # explicit wins over SLURM
    assert (found.method, found.kwargs["initialization_timeout"]) == ("env", 20)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS missing"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID missing"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "1"}, "JAX_NUM_PROCESSES missing"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"must lie in \[0, "),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "not an integer"),
        ({"GLM_JAX_DISTRIBUTED": "maybe"}, "use 1"),
        ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, "set JAX_COORDINATOR_ADDRESS"),
    ],
)
def test_incomplete_env_is_an_error(env, message):
    with pytest.raises(distributed.DistributedInitError, match=message):
        _detect(env)


def test_switch():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0"}
    assert _detect({**slurm, "GLM_JAX_DISTRIBUTED": "0"}).method == "disabled"
    forced = _detect({"GLM_JAX_DISTRIBUTED": "1"})
    assert forced.method == "forced" and forced.kwargs == {"initialization_timeout": 300}


def test_slurm():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0"}
    found = _detect(slurm)
    assert found.method == "slurm" and found.kwargs == {"initialization_timeout": 300}  # jax reads the rest
    assert _detect({**slurm, "SLURM_NTASKS": "1"}).method == "single"
    batch_step = {k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}  # python run without srun
    found = _detect(batch_step)
    assert found.method == "single" and "srun" in found.note


def test_open_mpi():
    ompi = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert _detect({**ompi, "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911"}).method == "ompi"
    found = _detect({**ompi, "JAX_COORDINATOR_ADDRESS": "10.0.0.1:5000"})  # Open MPI 5: no orte URI
    assert found.kwargs["num_processes"] == 4 and found.kwargs["process_id"] == 2
    assert _detect({**ompi, "OMPI_COMM_WORLD_SIZE": "1"}).method == "single"


def test_cloud_tpu():
    assert _detect({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3", "TPU_WORKER_ID": "1"}).method == "tpu"  # GKE
    assert _detect({"TPU_PROCESS_ADDRESSES": "a:1,b:1"}).method == "tpu"
    assert _detect({"TPU_WORKER_HOSTNAMES": "w0"}, tpu_chips=True).method == "single"  # one-host GKE slice
    assert _detect({"MEGASCALE_NUM_SLICES": "2", "TPU_WORKER_HOSTNAMES": "w0"}).method == "tpu"  # multislice
    vm = _detect({}, tpu_chips=True)  # a Cloud TPU VM: jax asks the metadata server
    assert vm.method == "tpu" and vm.kwargs == {"initialization_timeout": 300}
    assert _detect({}, tpu_chips=False).method == "single"


# --- initialize() with jax.distributed.initialize mocked ---------------------------


@pytest.fixture
def fresh(monkeypatch):
    """initialize() as if never called, with jax.distributed.initialize recorded."""
    calls = []
    monkeypatch.setattr(distributed, "_info", None)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


def test_initialize_single_process_calls_nothing(fresh):
    info = distributed.initialize({})
    assert fresh == []
    assert (info.process_index, info.process_count, info.method) == (0, 1, "single")
    assert info.local_device_count == jax.local_device_count() and info.device_count == jax.device_count()
    assert distributed.is_main_process()
    assert "process 0 of 1 via single" in info.describe()


def test_initialize_calls_jax_once(fresh):
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    lines = []
    info = distributed.initialize(env, log=lines.append)
    assert fresh == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 0,
                      "initialization_timeout": 300}]
    assert (info.method, info.coordinator) == ("env", "10.0.0.1:1234")
    assert "coordinator_address=10.0.0.1:1234" in lines[0] and "JAX_PROCESS_ID" in lines[0]
    assert distributed.initialize(env) is info and len(fresh) == 1  # idempotent


def test_initialize_failure_names_coordinator_and_env(fresh, monkeypatch):
    def refuse(**kw):
        raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out")

    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    env = {"JAX_COORDINATOR_ADDRESS": "10.9.9.9:4321", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    with pytest.raises(distributed.DistributedInitError) as err:
        distributed.initialize(env, log=lambda m: None)
    text = str(err.value)
    for part in ("10.9.9.9:4321", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "process_id=0", "DEADLINE_EXCEEDED"):
        assert part in text
    assert distributed._info is None  # a later call may retry


def test_unreachable_coordinator_is_a_clear_error(fresh):
    # jax's client would abort the process; other processes first wait for the port themselves.
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
           "GLM_JAX_INIT_TIMEOUT": "1"}
    with pytest.raises(distributed.DistributedInitError, match=r"did not accept connections within 1s"):
        distributed.initialize(env, log=lambda m: None)
    assert fresh == []


# --- global batches and data shards in one process ---------------------------------


def test_global_batch_single_process_is_device_put():
    mesh = make_mesh(MeshConfig(data=4, model=2))
    local = {"tokens": np.arange(8 * 6, dtype=np.int32).reshape(8, 6),
             "positions": np.arange(8 * 2 * 6, dtype=np.int32).reshape(8, 2, 6),
             "prefix_len": np.arange(8, dtype=np.int32)}
    out = distributed.global_batch(local, mesh)
    for name, value in local.items():
        expected = jax.device_put(value, rules.batch_sharding(mesh, value.ndim))
        assert out[name].sharding == expected.sharding
        assert out[name].shape == value.shape
        np.testing.assert_array_equal(np.asarray(out[name]), value)
    assert distributed.data_shard(mesh) == (0, 1)


class _FakeDevice(NamedTuple):
    id: int
    process_index: int


@dataclasses.dataclass(frozen=True)
class _SliceDevice:  # not a tuple: numpy would unpack it
    id: int
    slice_index: int
    process_index: int
    device_kind: str = "cpu"
    platform: str = "cpu"


def test_multislice_mesh_single_process():
    mesh = distributed.multislice_mesh(MeshConfig(data=-1, model=2), process_is_granule=True)
    assert dict(mesh.shape) == {"data": 4, "pipe": 1, "model": 2}
    assert distributed.slice_count() == 1


def test_multislice_mesh_splits_only_the_data_axis():
    devices = [SimpleNamespace(id=i, slice_index=i // 4, process_index=i // 4, device_kind="cpu", platform="cpu")
               for i in range(8)]
    with pytest.raises(ConfigError, match="must be a multiple of the 2 slices"):
        distributed.multislice_mesh(MeshConfig(data=1, model=8), devices)
    assert distributed.slice_count(devices) == 2


def _fake_sharding(process_of_row_block: list[list[int]]):
    """A batch sharding whose i-th row block lives on one device of each listed process."""
    devices = {}
    for block, processes in enumerate(process_of_row_block):
        for p in processes:
            devices[_FakeDevice(len(devices), p)] = (slice(block, block + 1),)
    return SimpleNamespace(spec=("data",), devices_indices_map=lambda shape: devices)


@pytest.mark.parametrize(
    "layout, expected",
    [
        ([[0], [0], [0], [1]], None),  # uneven: an error
        ([[0], [0, 1], [1], [1]], None),  # overlapping: an error
        ([[0], [0], [1], [1]], {0: (0, 2), 1: (1, 2)}),  # model axis inside each host
        ([[0, 1], [0, 1], [2, 3], [2, 3]], {0: (0, 2), 1: (0, 2), 2: (1, 2), 3: (1, 2)}),  # model axis spans hosts
        ([[1], [1], [0], [0]], {0: (1, 2), 1: (0, 2)}),  # shard follows the rows, not the process id
        ([[0], [1], [0], [1]], {0: (0, 2), 1: (1, 2)}),  # interleaved rows
    ],
)
def test_data_shard(monkeypatch, layout, expected):
    mesh = SimpleNamespace(shape={"data": len(layout)})
    monkeypatch.setattr(rules, "batch_sharding", lambda m, ndim: _fake_sharding(layout))
    processes = sorted({p for ps in layout for p in ps})
    for p in processes:
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        if expected is None:
            with pytest.raises(ValueError, match="uneven"):
                distributed.data_shard(mesh)
        else:
            assert distributed.data_shard(mesh) == expected[p]


# --- a real 2-process run on CPU ----------------------------------------------------

STEPS = 2
OVERRIDES = ["mesh.data=4", "mesh.model=2", "train.seq_len=64"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(devices: int, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "GLM_JAX_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    # Optimisation level 0 roughly halves XLA's CPU compile time; the losses still match to 1e-5.
    flags += [f"--xla_force_host_platform_device_count={devices}", "--xla_backend_optimization_level=0"]
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **extra)
    return env


def _reference() -> dict:
    """The same training in this process (8 devices from conftest), with no distributed runtime."""
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    return worker.train(STEPS, OVERRIDES)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    assert jax.device_count() == 8, "conftest sets 8 simulated devices"
    port, procs, logs = _free_port(), [], []
    t0 = time.perf_counter()
    try:
        for i in range(2):
            env = _child_env(4, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                 "JAX_PROCESS_ID": str(i), "GLM_JAX_INIT_TIMEOUT": "60"})
            out, err = tmp_path / f"p{i}.out", tmp_path / f"p{i}.err"
            logs.append((out, err))
            with open(out, "w") as fo, open(err, "w") as fe:
                procs.append(subprocess.Popen([sys.executable, WORKER, str(STEPS), *OVERRIDES], env=env, cwd=ROOT,
                                              stdout=fo, stderr=fe, start_new_session=True))
        reference = _reference()  # overlaps with the children's start-up
        deadline = time.monotonic() + 150
        # Until both are done, or one failed (its peer would wait for it until a timeout).
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            if time.monotonic() > deadline:
                pytest.fail("2-process run timed out:\n" + "\n".join(e.read_text()[-2000:] for _, e in logs))
            time.sleep(0.2)
    finally:
        for p in procs:  # never leave a child behind (it would wait for its peer forever)
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    if any(p.returncode for p in procs):
        pytest.fail("\n".join(f"process {i}: rc {p.returncode}\n{err.read_text()[-3000:]}"
                               for i, (p, (_, err)) in enumerate(zip(procs, logs))))
    results = [json.loads(out.read_text().strip().splitlines()[-1]) for out, _ in logs]
    elapsed = time.perf_counter() - t0

    assert reference["losses"][1] != reference["losses"][0]  # the second loss saw one update
    for i, r in enumerate(results):
        assert (r["process_index"], r["process_count"], r["method"]) == (i, 2, "env")
        assert (r["local_device_count"], r["device_count"]) == (4, 8)
        assert r["main"] == (i == 0)
        # On the config's mesh, and with the data axis split across processes as across slices:
        for run in (r, r["multislice"]):
            assert run["data_shard"] == [i, 2]  # each process fed its own half of every batch
            assert run["global_batch_shape"] == reference["global_batch_shape"] == [8, 64]
            assert run["mesh"] == reference["mesh"] == {"data": 4, "pipe": 1, "model": 2}
            assert run["row_sums"] == reference["row_sums"]  # the same global batch, row for row
            assert run["stops"] == reference["stops"] == [True, False]  # one process's flag reaches all
            np.testing.assert_allclose(run["losses"], reference["losses"], rtol=0, atol=1e-5)
            np.testing.assert_allclose(run["grad_norms"], reference["grad_norms"], rtol=1e-4)
    print(f"2-process run {elapsed:.1f}s; losses {results[0]['losses']} vs {reference['losses']}")


def test_the_pipe_axis_may_span_slices():
    """mesh.dcn_pipe=2 on two 4-device slices: stage 0 lives on one slice, stage 1 on the
    other, and each slice keeps data x model to itself."""
    fake = [_SliceDevice(i, i // 4, i // 4) for i in range(8)]  # two 4-device "slices"
    mesh = distributed.multislice_mesh(MeshConfig(data=2, pipe=2, model=2, dcn_pipe=2), fake, process_is_granule=True)
    assert dict(mesh.shape) == {"data": 2, "pipe": 2, "model": 2}
    for stage in range(2):
        assert {d.process_index for d in mesh.devices[:, stage, :].flat} == {stage}
    flat = distributed.multislice_mesh(MeshConfig(data=2, pipe=2, model=2), fake, process_is_granule=True)
    for stage in range(2):  # the default: data spans the slices, each slice holds both stages
        assert {d.process_index for d in flat.devices[:, stage, :].flat} == {0, 1}
    with pytest.raises(ConfigError, match=r"mesh.dcn_pipe=2 must divide both the 2 slices and mesh.pipe \(1\)"):
        distributed.multislice_mesh(MeshConfig(data=4, pipe=1, model=2, dcn_pipe=2), fake, process_is_granule=True)
