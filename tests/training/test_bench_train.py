"""``python -m glm_jax.bench train`` runs each preset's real step and reports coherent numbers."""

import json
import os
import subprocess
import sys

import pytest

from glm_jax.bench.train import preset_config
from glm_jax.config import ConfigError
from glm_jax.training.metrics import flops_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_presets_have_the_published_shapes():
    anchor = preset_config("small-anchor")
    m = anchor.model
    assert (m.hidden_size, m.num_layers, m.num_heads, m.head_dim, m.mlp_dim, m.vocab_size) == (256, 4, 4, 64, 1024, 32000)
    assert (anchor.train.seq_len, anchor.train.batch_size, m.dtype, m.param_dtype) == (256, 4, "bfloat16", "float32")
    assert m.mlp_type == "geglu" and m.norm_order == "post"
    big = preset_config("100m")
    assert big.train.seq_len == 512
    with pytest.raises(ConfigError, match="--preset 'huge' is not valid; valid values: glm-tiny, small-anchor, 100m, all"):
        preset_config("huge")


def test_bench_train_json():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run(
        [sys.executable, "-m", "glm_jax.bench", "train", "--json", "--preset", "glm-tiny", "--steps", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["preset"] == "glm-tiny" and r["parameters"] == 167872 and r["backend"] == "cpu"
    cfg = preset_config("glm-tiny")
    # MFU is model FLOP/s over the best measured matmul rate, all from this one run.
    flops = r["tokens_per_s"] * flops_per_token(cfg.model, cfg.train.seq_len)
    assert r["mfu"] == pytest.approx(flops / 1e12 / max(r["peak_tflops_per_s"].values()), rel=0.02)
    assert r["mfu_median_step"] <= r["mfu"]
    assert 0 < r["mfu"] < 1


def test_bench_train_pipe_compares_with_the_unpipelined_step():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run(
        [sys.executable, "-m", "glm_jax.bench", "train", "--pipe", "2", "--json", "--steps", "1", "model.num_layers=4",
         "train.seq_len=64"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert (r["bench"], r["stages"], r["repeats"], r["devices"], r["layers"]) == ("train-pipeline", 2, 1, 8, 4)
    m = r["microbatches"]
    assert m == 2  # 8 rows over 4 data shards: only 2 microbatches keep their rows split over data
    assert r["bubble_predicted"] == round(1 / (m + 1), 4)
    assert r["step_s_pipelined"] > 0 and r["step_s_unpipelined"] > 0
    # A measured share: from the timed iteration (which noise on a shared host can push below 0).
    assert r["bubble_observed"] == pytest.approx(r["iteration_s"] / r["step_s_pipelined"], rel=0.01, abs=1e-3)
    assert r["tokens_per_s_pipelined"] == pytest.approx(8 * 64 / r["step_s_pipelined"], rel=0.01)
    assert "overhead, not its speed-up" in r["note"]
    assert "bubble" in out.stderr


def test_bench_train_pipe_refuses_one_stage():
    out = subprocess.run([sys.executable, "-m", "glm_jax.bench", "train", "--pipe", "1"], cwd=ROOT,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and out.stderr.strip() == "error: --pipe 1: a pipeline needs at least 2 stages"
