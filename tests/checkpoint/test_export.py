"""What a training run writes reaches every format: to-sat / to-hf straight from the
workdir, and ``convert export`` to a standalone params directory (issue: export of what
you train). Each round trip must give the workdir's own logits bit for bit."""

import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from glm_jax.checkpoint import directory, store
from glm_jax.convert.__main__ import main as convert
from glm_jax.errors import CheckpointError
from glm_jax.inference.loading import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ("data.mixture=synthetic", "train.steps=3", "train.checkpoint_every=1", "train.eval_every=0",
          "train.eval_batches=1", "train.seq_len=32", "train.batch_size=4", "train.tensorboard=false")
# ChatGLM-6B's architecture (2D rotary, tanh-GELU 4h MLP, untied head, fixed alpha) at toy size.
CHATGLM_TINY = ("--config", "configs/chatglm-6b.yaml", "model.vocab_size=1024", "model.hidden_size=64",
                "model.num_layers=2", "model.num_heads=4", "model.mlp_dim=256", "model.max_seq_len=128",
                "model.dtype=float32", "model.remat_policy=none", "model.mask_token_id=1000",
                "model.gmask_token_id=1001", "model.smask_token_id=1002", "model.eod_token_id=1003",
                "model.sop_token_id=1004", "model.eop_token_id=1005", "model.eos_token_id=1005",
                "model.pad_token_id=3")


def train(workdir, *args):
    cmd = [sys.executable, "-m", "glm_jax.train", *args, *COMMON, f"workdir={workdir}"]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return str(workdir)


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    return train(tmp_path_factory.mktemp("glm-tiny") / "run")


@pytest.fixture(scope="module")
def chatglm_workdir(tmp_path_factory):
    return train(tmp_path_factory.mktemp("chatglm") / "run", *CHATGLM_TINY)


def ids(cfg):
    """Two left-padded [gMASK] prompts (ordinary ids below the special tokens)."""
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(10, 900, n)) + [cfg.gmask_token_id, cfg.sop_token_id] + list(rng.integers(10, 900, 3))
            for n in (5, 9)]
    width = max(map(len, rows))
    return np.array([[cfg.pad_token_id] * (width - len(r)) + r for r in rows], np.int64)


def same_logits(a, b, *, a_step=None, b_step=None):
    ma, mb = load(a, step=a_step), load(b, step=b_step)
    tokens = ids(ma.config)
    la, lb = ma.logits(tokens), mb.logits(tokens)
    assert la.dtype == lb.dtype == np.float32
    np.testing.assert_array_equal(la, lb)


def run(*args):
    assert convert([*args, "--quiet"]) == 0


def test_to_sat_from_a_workdir_and_back_is_bit_exact(tiny_workdir, tmp_path):
    run("to-sat", "--src", tiny_workdir, "--dst", str(tmp_path / "sat"), "--tp", "2")
    assert sorted(os.listdir(tmp_path / "sat" / "1")) == ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    run("from-sat", "--src", str(tmp_path / "sat"), "--dst", str(tmp_path / "back"), "--config",
        os.path.join(tiny_workdir, directory.CONFIG))
    same_logits(tiny_workdir, str(tmp_path / "back"))


def test_to_hf_from_a_chatglm_workdir_and_back_is_bit_exact(chatglm_workdir, tmp_path):
    run("to-hf", "--src", chatglm_workdir, "--dst", str(tmp_path / "hf"))
    run("from-hf", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "back"))
    same_logits(chatglm_workdir, str(tmp_path / "back"))


def test_export_writes_one_step_without_optimizer_state(tiny_workdir, tmp_path):
    assert directory.workdir_steps(tiny_workdir) == [1, 2, 3]
    run("export", "--src", tiny_workdir, "--dst", str(tmp_path / "e1"), "--step", "1")
    assert sorted(os.listdir(tmp_path / "e1")) == [directory.CONFIG, directory.PARAMS]
    exported = store.CheckpointReader(str(tmp_path / "e1" / directory.PARAMS))
    state = ocp.StandardCheckpointer().restore(os.path.join(directory.step_dir(tiny_workdir, 1), directory.STATE))
    assert all(p[0] != "opt_state" for p in exported.leaves)
    for path in exported.leaves:
        want = state["params"]
        for p in path:
            want = want[p]
        got = exported.read(path)
        assert got.dtype == want.dtype and got.tobytes() == np.asarray(want).tobytes(), path
    same_logits(str(tmp_path / "e1"), tiny_workdir, b_step=1)
    with pytest.raises(AssertionError):  # step 1 is not the newest step
        same_logits(str(tmp_path / "e1"), tiny_workdir)
    # The exported directory is a params directory like any other: it converts onwards.
    run("to-sat", "--src", str(tmp_path / "e1"), "--dst", str(tmp_path / "sat"), "--tp", "2")


def test_bad_sources_are_one_line(tiny_workdir, tmp_path, capsys):
    def fails(*args):
        assert convert([*args, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
        return err

    assert "no finished checkpoint of step 7; saved steps: 1, 2, 3" in fails(
        "export", "--src", tiny_workdir, "--dst", str(tmp_path / "x"), "--step", "7")
    assert "no such directory" in fails("to-hf", "--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "y"))
    os.makedirs(tmp_path / "empty" / directory.CHECKPOINTS)
    (tmp_path / "empty" / directory.CONFIG).write_text("model: {}\n")
    assert "no finished checkpoint in checkpoints/" in fails("export", "--src", str(tmp_path / "empty"), "--dst", str(tmp_path / "z"))
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "z")
    run("export", "--src", tiny_workdir, "--dst", str(tmp_path / "e"))
    assert "already exists (pass --overwrite to replace it)" in fails(
        "export", "--src", tiny_workdir, "--dst", str(tmp_path / "e"))
    with pytest.raises(CheckpointError, match="--step applies to training workdirs"):
        directory.resolve(str(tmp_path / "e"), 1)
