"""``python -m glm_jax.train`` with ``mesh.pipe`` > 1: 20 steps follow the unpipelined
run, and a checkpoint written at ``pipe=1`` resumes at ``pipe=4 mesh.model=2`` with the
continuation of the uninterrupted run (the checkpoint is the same at every pipe size)."""

import json
import shutil

import pytest

from glm_jax import train
from helpers import tensorboard_scalars

TINY = ("data.mixture=synthetic", "train.seq_len=32", "train.log_every=1", "train.eval_batches=1",
        "train.warmup_steps=0", "model.num_layers=4", "train.batch_size=8", "train.checkpoint_every=10")


def run(capsys, workdir, *overrides):
    assert train.main([*TINY, f"workdir={workdir}", *overrides]) == 0
    out, err = capsys.readouterr()
    return json.loads(out.strip().splitlines()[-1]), err


def losses(workdir) -> dict[int, float]:
    return tensorboard_scalars(workdir / "tensorboard")["train/loss"]


def test_pipelined_runs_follow_the_plain_run_and_resume_across_pipe_sizes(tmp_path, capsys):
    plain, _ = run(capsys, tmp_path / "plain", "train.steps=20", "mesh.data=8")
    piped, err = run(capsys, tmp_path / "piped", "train.steps=20", "mesh.pipe=4", "mesh.data=2")
    assert piped["mesh"] == {"data": 2, "pipe": 4, "model": 1}
    assert "pipeline of 4 stages x 1 layer group(s), 1 layer slot(s) each, 4 microbatches; bubble 42.9%" in err
    want = losses(tmp_path / "plain")
    got = losses(tmp_path / "piped")
    assert sorted(got) == list(range(1, 21))
    for step in range(1, 21):
        assert got[step] == pytest.approx(want[step], rel=1e-4), step

    # The plain run's step-10 checkpoint (as a preempted run leaves it) goes on with four
    # stages and tensor parallelism.
    (tmp_path / "switch" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "plain" / "checkpoints" / "10", tmp_path / "switch" / "checkpoints" / "10")
    shutil.copy(tmp_path / "plain" / "config.yaml", tmp_path / "switch" / "config.yaml")
    resumed, err = run(capsys, tmp_path / "switch", "train.steps=20", "mesh.data=1", "mesh.pipe=4", "mesh.model=2")
    assert "resuming from step 10" in err and resumed["mesh"] == {"data": 1, "pipe": 4, "model": 2}
    continued = losses(tmp_path / "switch")
    for step in range(11, 21):
        assert continued[step] == pytest.approx(want[step], rel=1e-5), step
    assert resumed["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
