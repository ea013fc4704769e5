"""Checkpoints, preemption and resume, as a user runs ``python -m glm_jax.train``."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(devices):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def train(workdir, *overrides, devices=1, sigterm_after=None, sigkill_after=None):
    cmd = [sys.executable, "-m", "glm_jax.train", "train.log_every=1", "train.seq_len=64", f"workdir={workdir}", *overrides]
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines = []
    if sigterm_after is not None or sigkill_after is not None:
        at, sig = (sigterm_after, signal.SIGTERM) if sigterm_after is not None else (sigkill_after, signal.SIGKILL)
        for line in p.stderr:
            err_lines.append(line)
            if line.startswith(f"step {at}/"):
                p.send_signal(sig)
                break
    out, err = p.communicate(timeout=600)
    err = "".join(err_lines) + err
    if sigkill_after is not None:
        assert p.returncode == -signal.SIGKILL, err[-3000:]
        return None, err
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def final_params(workdir):
    """The parameters of the newest checkpoint in ``workdir``, as numpy arrays."""
    import orbax.checkpoint as ocp

    ckpts = os.path.join(workdir, "checkpoints")
    newest = max(int(p) for p in os.listdir(ckpts) if p.isdigit())
    return newest, ocp.StandardCheckpointer().restore(os.path.join(ckpts, str(newest), "state"))["params"]


# One uninterrupted run on a 2-way data mesh is the reference for every interruption: a
# crash, a preemption, and a damaged checkpoint resumed on another mesh.
SYNTHETIC = ("data.mixture=synthetic", "train.checkpoint_every=2", "train.steps=8", "train.eval_every=4")
DATA2 = ("mesh.data=2",)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result, _ = train(workdir, *SYNTHETIC, *DATA2, devices=2)
    return workdir, result


def test_sigkilled_run_restarts_to_bit_identical_parameters(uninterrupted, tmp_path):
    """A crash (SIGKILL: no handler, possibly mid-save) loses nothing: the restarted run
    ends with exactly the parameters of an uninterrupted one."""
    reference, _ = uninterrupted
    _, err = train(tmp_path / "b", *SYNTHETIC, *DATA2, devices=2, sigkill_after=5)
    resumed, err = train(tmp_path / "b", *SYNTHETIC, *DATA2, devices=2)
    assert resumed["resumed_from"] in (2, 4) and resumed["step"] == 8
    (step_a, a), (step_b, b) = final_params(reference), final_params(tmp_path / "b")
    assert step_a == step_b == 8
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_preempted_run_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path):
    """SIGTERM stops at a step boundary with a checkpoint; the resumed run replays the data
    and the state exactly (the real corpus pipeline's replay is tests/data/test_pipeline.py's)."""
    _, full = uninterrupted
    cut, err = train(tmp_path / "b", *SYNTHETIC, *DATA2, devices=2, sigterm_after=2)
    assert cut["preempted"] and cut["step"] < 8 and "SIGTERM received" in err
    resumed, err = train(tmp_path / "b", *SYNTHETIC, *DATA2, devices=2)
    assert f"resuming from step {cut['step']}" in err and resumed["resumed_from"] == cut["step"]
    assert resumed["train_loss"] == full["train_loss"]
    assert resumed["eval_loss"] == full["eval_loss"]


def test_resume_onto_a_different_mesh_and_past_a_damaged_checkpoint(uninterrupted, tmp_path):
    _, full = uninterrupted
    train(tmp_path / "b", *SYNTHETIC, *DATA2, devices=2, sigterm_after=6)
    ckpts = tmp_path / "b" / "checkpoints"
    steps = sorted(int(p) for p in os.listdir(ckpts) if p.isdigit())
    latest, previous = steps[-1], steps[-2]
    # Damage the newest checkpoint: its parameters are gone.
    shutil.rmtree(ckpts / str(latest) / "state")
    resumed, err = train(tmp_path / "b", *SYNTHETIC, "mesh.data=1", "mesh.model=2", devices=2)
    assert f"checkpoint {latest} in" in err and "cannot be read" in err and "Traceback" not in err
    assert (ckpts / "damaged" / str(latest)).is_dir()  # set aside, not deleted
    assert resumed["resumed_from"] == previous and resumed["mesh"] == {"data": 1, "pipe": 1, "model": 2}
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], abs=1e-5)


def test_non_finite_step_leaves_the_state_unchanged():
    from glm_jax.config import Config, MeshConfig, TrainConfig
    from glm_jax.data.synthetic import copy_batch
    from glm_jax.parallel.mesh import make_mesh
    from glm_jax.training.trainer import Trainer
    from helpers import variant

    cfg = Config(model=variant("glm-130b"), mesh=MeshConfig(data=1), train=TrainConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=0))
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    trainer = Trainer.build(cfg, mesh)
    state, step = trainer.init_state(seed=0), trainer.train_step
    before = jax.tree.map(np.asarray, state.params)
    bad = copy_batch(cfg.model, 2, 16, 0, 0)
    bad = bad.replace(loss_weights=bad.loss_weights * np.float32("nan"))
    state, m = step(state, bad)
    assert bool(m["skipped"]) and int(state.skipped) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
    state, m = step(state, copy_batch(cfg.model, 2, 16, 0, 1))
    assert not bool(m["skipped"]) and int(state.skipped) == 1
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, before)
    assert any(jax.tree.leaves(changed))


def test_model_flops_count_matches_the_parameter_count():
    from glm_jax.config import load_config
    from glm_jax.info import report
    from glm_jax.training.metrics import flops_per_token, matmul_params

    cfg = load_config(os.path.join(ROOT, "configs/glm-130b.yaml"))
    m = cfg.model
    # Matmul parameters = all parameters minus biases and LayerNorms (the tied table is the head).
    biases_and_norms = m.num_layers * (3 * m.hidden_size + m.hidden_size + 2 * m.mlp_dim + m.hidden_size + 4 * m.hidden_size) + 2 * m.hidden_size
    assert matmul_params(m) == report(cfg)["parameters"] - biases_and_norms
    # GLM-130B at 2048 tokens: 6N plus attention, as in the training-log arithmetic of MODEL.md §5.
    assert flops_per_token(m, 2048) == pytest.approx(6 * matmul_params(m) + 12 * 70 * 12288 * 2048)
