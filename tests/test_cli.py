"""The entry points as a user runs them."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, devices=1, session_cache=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if not session_cache:  # as a user runs it, without the test session's compilation cache
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_info_glm130b_parameter_count():
    r = run("glm_jax.info", "--config", "configs/glm-130b.yaml", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["parameters"] == 128_697_794_560
    assert info["mesh"] == {"data": 1, "pipe": 1, "model": 8}
    # fp32 params + two AdamW moments; the heads/mlp/vocab axes split 8 ways, LayerNorms and biases of
    # the embed axis replicated: a little over 1/8 of 12 bytes per parameter.
    per_param = info["per_device_bytes"]["total"] / info["parameters"]
    assert 12 / 8 < per_param < 12 / 8 * 1.01


def test_info_chatglm_parameter_count_and_device_sizing():
    r = run("glm_jax.info", "--config", "configs/chatglm-6b.yaml", "mesh.model=4", "--devices", "16", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["parameters"] == 6_707_929_088
    assert info["mesh"] == {"data": 4, "pipe": 1, "model": 4}


def test_train_runs_a_real_step_and_reports_json(tmp_path):
    r = run("glm_jax.train", "train.steps=3", "train.log_every=1", f"workdir={tmp_path}", "mesh.data=2", "mesh.model=4",
            devices=8, session_cache=False)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["step"] == 3 and result["mesh"] == {"data": 2, "pipe": 1, "model": 4}
    assert 0 < result["train_loss"] < 10 and 0 < result["eval_loss"] < 10
    assert (tmp_path / "checkpoints" / "3").is_dir()  # the final state is saved
    assert "step 3/3" in r.stderr and " mfu " in r.stderr
    assert 0 < result["mfu"] < 1
    assert (tmp_path / "config.yaml").exists()
    assert len(os.listdir(tmp_path / "compile_cache")) > 0  # a restart loads these instead of compiling


@pytest.mark.parametrize(
    "args, message",
    [
        (["glm_jax.train", "model.hiden_size=3"], "error: unknown config key 'model.hiden_size'"),
        (["glm_jax.train", "model.hidden_size=63"], "error: model.hidden_size (63) must be divisible by model.num_heads (4)"),
        (["glm_jax.train", "mesh.data=3"], "error: mesh: mesh.data=3 x mesh.pipe=1 x mesh.model=1 = 3 devices, but 1 are available"),
        (["glm_jax.info", "--config", "configs/glm-130b.yaml", "model.num_layers=-1"], "error: model.num_layers must be > 0, got -1"),
    ],
)
def test_bad_input_is_one_line_not_a_traceback(args, message):
    r = run(*args)
    assert r.returncode == 2
    assert r.stderr.strip() == message or r.stderr.strip().startswith(message), r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mesh.pipe=3"], "error: mesh: 8 devices cannot be split with mesh.data=-1 mesh.pipe=3 mesh.model=1"),
        (["mesh.pipe=2", "train.pipeline_microbatches=3"],
         "error: train.pipeline_microbatches=3 does not divide the batch of 8 rows per step; valid values: 1, 2, 4, 8"),
        (["mesh.pipe=2", "train.pipeline_repeats=2"],
         "error: train.pipeline_repeats=2 does not fit: mesh.pipe=2 stages x 2 repeats need at least 4 layers, "
         "model.num_layers is 2; valid values: 1"),
    ],
    ids=["pipe-does-not-divide-the-devices", "microbatches-do-not-divide-the-batch", "repeats-do-not-fit-the-layers"],
)
def test_bad_pipeline_input_is_one_line(overrides, message):
    r = run("glm_jax.train", "data.mixture=synthetic", *overrides, devices=8)
    assert r.returncode == 2 and r.stderr.strip() == message, r.stderr


def test_info_honours_param_sharding():
    """ZeRO-1 splits the AdamW moments over data, FSDP the parameters too."""
    from glm_jax.config import load_config
    from glm_jax.info import report

    sizes = {m: report(load_config("glm-130b", ["mesh.data=4", "mesh.model=8", f"mesh.param_sharding={m}"]))["per_device_bytes"]
             for m in ("replicated", "zero1", "fsdp")}
    assert sizes["zero1"]["params"] == sizes["replicated"]["params"]
    assert sizes["zero1"]["adamw_state"] < 0.3 * sizes["replicated"]["adamw_state"]
    assert sizes["fsdp"]["params"] < 0.3 * sizes["replicated"]["params"]
    assert sizes["fsdp"]["adamw_state"] == sizes["zero1"]["adamw_state"]


def test_info_reports_the_pipeline_of_glm130b():
    """70 layers on 8 stages: nine slots per stage, the bubble, and every device keeping
    1/8 of the layer stack although 8 does not divide 70 (its embed axis is split instead)."""
    from glm_jax.config import load_config
    from glm_jax.info import report

    flat = report(load_config("glm-130b", ["mesh.data=24", "mesh.model=4", "train.batch_size=192"]))
    piped = report(load_config("glm-130b", ["mesh.data=24", "mesh.model=4", "mesh.pipe=8", "train.batch_size=192"]))
    p = piped["pipeline"]
    assert p["layers_per_stage"] == [9, 9, 9, 9, 9, 9, 8, 8] and p["microbatches"] == 8
    assert p["bubble"] == round(7 / 15, 4) and p["layer_weights_split_over_pipe"] > 0.999  # all but the qkv biases
    ratio = piped["per_device_bytes"]["params"] / flat["per_device_bytes"]["params"]
    assert 1 / 8 < ratio < 1 / 8 * 1.15  # the word embeddings (1.4% of the parameters) are on every stage
    assert "pipeline" not in flat
