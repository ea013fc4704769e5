"""``python -m glm_jax.compile``: the trainer's step compiled for TPU pods from this CPU,
FITS / DOES NOT FIT with exit 0 / 1, estimates for GPU clusters, bad input exit 2."""

import json
import os
import subprocess
import sys

import jax
import pytest

from glm_jax import compile as compile_cli
from glm_jax.checkpoint import compiled_step
from glm_jax.config import ConfigError, load_config
from glm_jax.parallel import topology
from glm_jax.parallel.mesh import make_mesh
from glm_jax.training.aot import compile_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# glm-large's widths, two layers, a short batch: compiles in seconds for a v5e-8.
SMALL = ["mesh.data=4", "mesh.model=2", "model.num_layers=2", "model.attention_impl=xla", "train.batch_size=8",
         "train.seq_len=128", "train.loss_vocab_chunks=4"]


def run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "glm_jax.compile", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_small_config_fits_a_v5e_8_and_its_state_bytes_are_the_cpu_compiles(capsys, tmp_path):
    saved = str(tmp_path / "v5e-8-step")
    assert compile_cli.main(["--config", "glm-large", "--topology", "v5e-8", "--json", "--save", saved, *SMALL]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["fits"] and r["chips"] == 8 and r["mesh"] == {"data": 4, "pipe": 1, "model": 2} and not r["estimate"]
    b = r["per_chip_bytes"]
    assert b["total"] == b["arguments"] + b["outputs"] - b["aliased"] + b["temporaries"] + b["generated_code"]
    assert r["margin_bytes"] == 16 * 2**30 - b["total"] and r["compile_s"] > 0
    assert b["aliased"] > 0.9 * b["outputs"]  # the donated train state is updated in place
    # The same step compiled for 8 simulated CPU devices of the same mesh shape holds the
    # same sharded state: argument and output bytes agree (temporaries are the backend
    # compiler's own choice, and differ).
    cfg = load_config("glm-large", SMALL)
    cpu_mesh = make_mesh(cfg.mesh, jax.devices()[:8])
    cpu = compile_step(cfg, cpu_mesh).memory
    assert b["arguments"] == pytest.approx(cpu.arguments, rel=0.01)
    assert b["outputs"] == pytest.approx(cpu.outputs, rel=0.01)

    # --save wrote the TPU executable for the pod, with what it was compiled for.
    assert r["saved"]["path"] == saved and r["saved"]["executable_bytes"] > 0
    assert r["train_command"] == "python -m glm_jax.train --config glm-large " + " ".join(SMALL) + f" train.compiled_step={saved}"
    manifest = json.load(open(os.path.join(saved, compiled_step.MANIFEST)))
    assert manifest["runtime"]["platform"] == "tpu" and "v5" in manifest["runtime"]["device_kind"].lower()
    assert manifest["runtime"]["libtpu"] and manifest["mesh"]["axes"] == r["mesh"]
    assert manifest["compiled_for"]["topology"] == "v5e-8" and manifest["compiled_for"]["per_chip_bytes"] == b["total"]
    with pytest.raises(compiled_step.CompiledStepError, match="platform 'tpu' -> 'cpu'"):  # this host is no v5e
        compiled_step.load(saved, cfg, cpu_mesh)


def test_a_config_that_cannot_fit_does_not_fit_with_exit_1(capsys):
    r = run("--config", "glm-10b", "--topology", "v5e-1", "mesh.data=1", "mesh.model=1", "train.batch_size=8", "--json")
    assert r.returncode == 1, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["fits"] is False and out["chips"] == 1
    compile_cli._print(out)  # what the command prints without --json
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_gpu_clusters_get_the_labelled_estimate():
    r = run("--config", "glm-130b", "--topology", "a100-40g:8", "mesh.data=1", "--json")
    assert r.returncode == 1  # 130B on 8 GPUs does not fit, even by the estimate
    out = json.loads(r.stdout)
    assert out["estimate"] is True and "an estimate" in out["note"] and out["chips"] == 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--topology", "v9-8"], "error: --topology 'v9-8' is not valid; valid: v4-N, v5p-N"),
        (["--topology", "v5e-8", "mesh.data=3"], "error: mesh: mesh.data=3 x mesh.pipe=1 x mesh.model=1 = 3 devices, but 8 are available"),
        (["--topology", "v5e-8", "model.num_layers=0"], "error: model.num_layers must be > 0, got 0"),
        (["--topology", "v4-3"], "error: --topology v4-3: v4 names count TensorCores, 2 per chip"),
        (["--topology", "h100:8", "--save", "x"], "error: --save needs a TPU topology"),
        (["--topology", "v5e-8", "train.compiled_step=x"], "error: train.compiled_step names a step to load when training"),
    ],
    ids=["unknown-topology", "mesh-does-not-match-the-chips", "config-error", "odd-core-count", "save-for-gpus",
         "compiled-step-given-to-compile"],
)
def test_bad_input_is_one_line(args, message):
    r = run("--config", "glm-large", *args)
    assert r.returncode == 2 and r.stderr.strip().startswith(message), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_pod_names():
    assert (topology.parse("v4-1024").chips, topology.parse("v4-1024").shape) == (512, (8, 8, 8))
    assert topology.parse("v5p-512").shape == (4, 8, 8) and topology.parse("v5e-8").shape == (2, 4)
    assert topology.parse("v4-8").shape == (2, 2, 1) and topology.parse("v6e-64").chips == 64
    assert topology.parse("v5e-256", slices=2).chips == 512
    with pytest.raises(ConfigError, match="chip count \\(12\\) must be a power of two"):
        topology.parse("v5e-12")


@pytest.mark.slow
def test_search_compiles_the_fastest_estimates_until_one_fits():
    """glm-large at batch 64 on a v5e-8 without remat or accumulation needs 19 GiB per
    chip; the search finds that two accumulation steps fit and prints the train command."""
    r = run("--config", "glm-large", "--topology", "v5e-8", "mesh.data=8", "model.attention_impl=xla", "train.batch_size=64",
            "--search", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    tried = out["tried"]
    assert [t["fits"] for t in tried] == [False, True]
    assert tried[0]["overrides"] == ["model.remat_policy=none", "train.microbatches=1", "mesh.param_sharding=zero1"]
    assert "train.microbatches=2" in tried[1]["overrides"] and tried[1]["total_bytes"] < 16 * 2**30 < tried[0]["total_bytes"]
    assert out["untried"] > 0
    assert out["train_command"] == ("python -m glm_jax.train --config glm-large mesh.data=8 model.attention_impl=xla "
                                    "train.batch_size=64 " + " ".join(tried[1]["overrides"]))
