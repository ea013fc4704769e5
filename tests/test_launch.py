"""The launch scripts: bash syntax, --dry-run listings, and real runs against fake gcloud/srun."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["common.sh", "tpu_vm.sh", "multislice.sh", "slurm.sbatch"]


def _run(args: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "GLM_JAX_"))}
    full_env.update(env or {})
    p = subprocess.run(["bash", *args], check=False, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def _remote(line: str) -> str:
    """The --command string of a printed `gcloud ... ssh ... --command CMD` line."""
    argv = shlex.split(line)
    return argv[argv.index("--command") + 1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    _run(["-n", os.path.join(LAUNCH, script)])


def test_tpu_vm_dry_run():
    out = _run([
        "launch/tpu_vm.sh", "--dry-run", "--name", "glm-pod", "--zone", "us-east5-a", "--accelerator-type", "v5p-32",
        "--project", "proj", "--spot", "--config", "configs/glm-tiny.yaml", "--workdir", "gs://bucket/runs/a",
        "--env", "LIBTPU_INIT_ARGS=--xla_enable_async_all_gather=true", "--", "train.steps=100", "data.corpus=it's mine",
    ]).stdout
    lines = _lines(out)
    create = shlex.split(lines[0])
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "glm-pod"]
    for flag, value in [("--zone", "us-east5-a"), ("--accelerator-type", "v5p-32"), ("--project", "proj"),
                        ("--version", "tpu-ubuntu2204-base")]:
        assert create[create.index(flag) + 1] == value
    assert "--spot" in create
    assert any("tpu-vm scp" in line and "--worker=all" in line for line in lines)
    ssh = [line for line in lines if "tpu-vm ssh glm-pod" in line]
    assert ssh and all("--worker=all" in line for line in ssh)
    setup = _remote(ssh[-2])
    assert "requirements.txt" in setup and "jax[tpu]==" in setup and "python 3.11" in setup
    train = shlex.split(_remote(ssh[-1]))
    assert train[train.index("-m") + 1] == "glm_jax.train"
    assert "GLM_JAX_DISTRIBUTED=1" in train and "LIBTPU_INIT_ARGS=--xla_enable_async_all_gather=true" in train
    assert train[-4:] == ["configs/glm-tiny.yaml", "workdir=gs://bucket/runs/a", "train.steps=100", "data.corpus=it's mine"]
    for line in ssh:
        subprocess.run(["bash", "-n", "-c", _remote(line)], check=True)


def test_tpu_vm_git_and_detach():
    out = _run(["launch/tpu_vm.sh", "--dry-run", "--name", "v", "--zone", "z", "--skip-create", "--detach",
                "--git-url", "https://example.com/glm_jax.git", "--git-ref", "v1.0", "train.steps=3"]).stdout
    assert "tpu-vm create" not in out and "scp" not in out
    assert "git clone --quiet https://example.com/glm_jax.git" in out and "checkout --quiet --detach v1.0" in out
    train = _remote(_lines(out)[-1])
    assert train.startswith("cd ~/glm_jax && nohup env GLM_JAX_DISTRIBUTED=1") and train.endswith("&")
    assert "~/glm_jax_train.log" in train and "train.steps=3" in train
    assert "no --workdir" in out


@pytest.mark.parametrize("args, message", [
    (["--zone", "z"], "--name and --zone are required"),
    (["--name", "n", "--zone", "z"], "--accelerator-type is required"),
    (["--name", "n", "--zone"], "--zone needs a value"),
    (["--name", "n", "--zone", "z", "--frobnicate"], "unknown argument --frobnicate"),
])
def test_tpu_vm_usage_errors(args, message):
    p = _run(["launch/tpu_vm.sh", "--dry-run", *args], check=False)
    assert p.returncode == 2 and message in p.stderr


def test_multislice_dry_run():
    out = _run(["launch/multislice.sh", "--dry-run", "--name", "ms", "--zone", "us-east5-a", "--accelerator-type",
                "v5p-64", "--num-slices", "3", "--workdir", "gs://b/ms", "--", "mesh.data=-1", "mesh.model=4"]).stdout
    lines = _lines(out)
    create = shlex.split(lines[0])
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "ms"]
    for flag, value in [("--node-count", "3"), ("--node-prefix", "ms"), ("--accelerator-type", "v5p-64"),
                        ("--runtime-version", "tpu-ubuntu2204-base")]:
        assert create[create.index(flag) + 1] == value
    assert "value(state.state)" in lines[1]
    assert sum("tar -C" in line for line in lines) == 1  # the code is packed once
    for node in ("ms-0", "ms-1", "ms-2"):
        runs = [line for line in lines if f"tpu-vm ssh {node} " in line and "glm_jax.train" in line]
        assert len(runs) == 1 and "--worker=all" in runs[0]
        train = shlex.split(_remote(runs[0]))
        assert train[-3:] == ["workdir=gs://b/ms", "mesh.data=-1", "mesh.model=4"]
    assert _run(["launch/multislice.sh", "--dry-run", "--name", "a", "--zone", "z", "--num-slices", "1"],
                check=False).returncode == 2


def test_slurm_dry_run():
    out = _run(["launch/slurm.sbatch", "--dry-run", "--config", "configs/glm-tiny.yaml", "--workdir", "/shared/run",
                "--", "train.steps=5"]).stdout
    argv = shlex.split(_lines(out)[-1])
    assert argv[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert argv[argv.index("-m") + 1] == "glm_jax.train"
    assert argv[-4:] == ["--config", "configs/glm-tiny.yaml", "workdir=/shared/run", "train.steps=5"]
    with open(os.path.join(LAUNCH, "slurm.sbatch")) as f:
        header = f.read()
    for directive in ("#SBATCH --ntasks-per-node=1", "#SBATCH --signal=TERM@", "#SBATCH --requeue"):
        assert directive in header


# --- real runs, with gcloud and srun replaced by recorders --------------------------


def _fake(bin_dir, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


# One os.write per call on an O_APPEND file: the slices of a multislice launch record at the
# same time, and a line written in pieces could interleave with another.
RECORD = (
    'python3 -c \'import json, os, sys; os.write(1, (json.dumps({"argv": sys.argv[1:], '
    '"JAX_LOCAL_DEVICE_IDS": os.environ.get("JAX_LOCAL_DEVICE_IDS")}) + "\\n").encode())\' "$@" >> "$CALLS"\n'
)


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.jsonl"
    # describe: the TPU VM / queued resource does not exist until created, then it is ACTIVE.
    _fake(bin_dir, "gcloud", RECORD + (
        'case "$*" in\n'
        '  *" create "*) touch "$STATE" ;;\n'
        '  *" describe "*) [ -e "$STATE" ] || exit 1; echo ACTIVE ;;\n'
        "esac\n"
    ))
    _fake(bin_dir, "srun", RECORD)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "STATE": str(tmp_path / "state"),
           "TMPDIR": str(tmp_path)}

    def read():
        return [json.loads(line) for line in calls.read_text().splitlines()]

    return env, read


def test_tpu_vm_runs_gcloud(fakes, tmp_path):
    env, calls = fakes
    _run(["launch/tpu_vm.sh", "--name", "n", "--zone", "z", "--accelerator-type", "v4-16", "--", "train.steps=2"], env)
    argvs = [c["argv"] for c in calls()]
    assert argvs[0][:4] == ["compute", "tpus", "tpu-vm", "describe"]
    assert argvs[1][:4] == ["compute", "tpus", "tpu-vm", "create"]
    scp = argvs[2]
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert not os.path.exists(scp[4])  # the code tarball is removed at exit
    assert [a[:4] for a in argvs[3:]] == [["compute", "tpus", "tpu-vm", "ssh"]] * 3
    train = shlex.split(argvs[-1][argvs[-1].index("--command") + 1])
    assert train[-1] == "train.steps=2" and "GLM_JAX_DISTRIBUTED=1" in train
    # A second launch reuses the VM.
    _run(["launch/tpu_vm.sh", "--name", "n", "--zone", "z", "--skip-setup"], env)
    assert [c["argv"][3] for c in calls()[len(argvs):]] == ["describe", "ssh"]


def test_tpu_vm_packs_the_checkout(fakes, tmp_path):
    env, _ = fakes
    env = dict(env)
    # Keep the tarball: a gcloud that copies it aside on scp.
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "gcloud", RECORD + 'case "$*" in *" scp "*) cp "$5" "$TMPDIR/kept.tgz" ;; esac\n')
    _run(["launch/tpu_vm.sh", "--name", "n", "--zone", "z", "--skip-create"], env)
    names = subprocess.run(["tar", "-tzf", str(tmp_path / "kept.tgz")], capture_output=True, text=True,
                           check=True).stdout.split()
    for path in ("glm_jax/parallel/distributed.py", "launch/tpu_vm.sh", "requirements.txt"):
        assert path in names


def test_multislice_runs_every_slice(fakes):
    env, calls = fakes
    _run(["launch/multislice.sh", "--name", "ms", "--zone", "z", "--accelerator-type", "v5p-64", "--num-slices", "2",
          "--skip-setup", "train.steps=2"], env)
    argvs = [c["argv"] for c in calls()]
    assert argvs[0][2:4] == ["queued-resources", "describe"]
    assert argvs[1][2:4] == ["queued-resources", "create"]
    assert argvs[2][2:4] == ["queued-resources", "describe"]  # polled: ACTIVE
    ssh_nodes = sorted(a[4] for a in argvs if a[2:4] == ["tpu-vm", "ssh"])
    assert ssh_nodes == ["ms-0", "ms-1"]


@pytest.mark.parametrize("tasks, expected_ids", [("1", "0,1,2,3"), ("4", None)])
def test_slurm_runs_srun(fakes, tasks, expected_ids):
    env, calls = fakes
    slurm = {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": tasks,
             "SLURM_GPUS_ON_NODE": "4", "GLM_JAX_PYTHON": "/opt/venv/bin/python"}
    _run(["launch/slurm.sbatch", "--workdir", "runs/x", "train.steps=2"], {**env, **slurm})
    (call,) = calls()
    assert call["argv"][:3] == ["--kill-on-bad-exit=1", "--cpu-bind=none", "--label"]
    assert call["argv"][3:] == ["/opt/venv/bin/python", "-m", "glm_jax.train", f"workdir={ROOT}/runs/x", "train.steps=2"]
    assert call["JAX_LOCAL_DEVICE_IDS"] == expected_ids
