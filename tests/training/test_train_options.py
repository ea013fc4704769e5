"""``python -m glm_jax.train`` options, run in-process on the synthetic task: spike
recovery by rollback, batch-size ramp-up, TensorBoard scalars, batch-size checks."""

import json

import numpy as np
import pytest

from glm_jax import train
from glm_jax.config import ConfigError, TrainConfig
from glm_jax.training.batch_rampup import batch_size_at, batch_sizes
from glm_jax.training.stability import SpikeMonitor
from helpers import tensorboard_scalars

TINY = ("data.mixture=synthetic", "train.seq_len=32", "train.log_every=1", "train.eval_batches=1", "train.warmup_steps=0")


def run(capsys, *overrides):
    assert train.main(list(TINY + overrides)) == 0
    out, err = capsys.readouterr()
    return json.loads(out.strip().splitlines()[-1]), err


def test_bad_steps_roll_back_to_the_last_checkpoint_and_skip_their_data(tmp_path, capsys, monkeypatch):
    from glm_jax.training import state as state_module

    make = state_module.make_train_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        step = make(*args, **kwargs)

        def run_step(state, batch):
            calls["n"] += 1
            if calls["n"] in (3, 4):  # the 3rd and 4th batches give a NaN loss
                batch = batch.replace(loss_weights=np.full_like(batch.loss_weights, np.nan))
            return step(state, batch)

        return run_step

    monkeypatch.setattr(state_module, "make_train_step", poisoned)
    result, err = run(capsys, f"workdir={tmp_path}", "train.steps=6", "train.checkpoint_every=2", "train.rollback_after=2")
    assert "too many bad steps in a row; rolled back to the checkpoint of step 2, data continues at row 32" in err
    assert result["rollbacks"] == 1 and result["skipped_steps"] == 2 and result["step"] == 6
    assert calls["n"] == 8  # steps 1-4, back to 2, then 3-6 again on new batches
    assert np.isfinite(result["train_loss"])
    # TensorBoard got the progress scalars (the last value of each step wins) and the eval loss.
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert set(scalars["train/loss"]) == {1, 2, 3, 4, 5, 6}
    assert scalars["train/loss"][6] == pytest.approx(result["train_loss"])
    assert scalars["eval/loss"][6] == pytest.approx(result["eval_loss"])
    assert {"train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/mfu"} <= set(scalars)


def test_spike_monitor_counts_non_finite_and_spiking_steps():
    m = SpikeMonitor(rollback_after=2, spike_factor=2.0)
    assert not m.observe(4.0, skipped=False)
    assert not m.observe(9.0, skipped=False)  # 9 > 2 x 4: a spike, streak 1
    assert m.bad_streak == 1
    assert not m.observe(3.9, skipped=False) and m.bad_streak == 0  # a good step ends the streak
    assert not m.observe(float("nan"), skipped=True)
    assert m.observe(100.0, skipped=False)  # second bad step in a row: roll back
    assert m.bad_streak == 0
    off = SpikeMonitor(rollback_after=0)
    assert not any(off.observe(float("nan"), skipped=True) for _ in range(5))


def test_batch_size_ramp_up_schedule():
    # GLM-130B: 192 -> 4224 over the first 2.5% of ~400B tokens / 2048 = 4.88M samples.
    cfg = TrainConfig(batch_size=4224, batch_size_start=192, batch_size_increment=192, rampup_samples=4_882_812)
    sizes = [batch_size_at(cfg, s) for s in range(0, 5_000_000, 50_000)]
    assert sizes[0] == 192 and sizes[-1] == 4224
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert set(sizes) <= set(batch_sizes(cfg)) and len(batch_sizes(cfg)) == 22
    assert batch_size_at(cfg, 4_882_812) == 4224
    assert batch_size_at(TrainConfig(batch_size=8), 0) == 8  # no ramp-up


def test_ramp_up_runs_and_resumes_by_rows(tmp_path, capsys):
    ramp = ("mesh.data=2", "mesh.model=4", "train.batch_size=8", "train.batch_size_start=4", "train.batch_size_increment=2", "train.rampup_samples=12")
    result, err = run(capsys, f"workdir={tmp_path}", "train.steps=5", *ramp)
    # rows 0, 4 -> batch 4; rows 8 -> 6 (12 / 2 increments = 6 rows each); from 14 on: 8.
    assert [line.split("batch ")[1].split()[0] for line in err.splitlines() if line.startswith("step ") and "batch " in line] == [
        "4", "4", "6", "8", "8"
    ]
    assert result["step"] == 5
    more, err = run(capsys, f"workdir={tmp_path}", "train.steps=6", *ramp)
    assert "resuming from step 5" in err and more["step"] == 6


def test_batch_sizes_must_split_over_data_and_microbatches(capsys):
    with pytest.raises(ConfigError, match=r"train.batch_size gives a batch of 12, which must be divisible by mesh.data \(8\) x train.microbatches \(1\) = 8"):
        train.main(list(TINY) + ["train.batch_size=12", "mesh.data=8"])
    with pytest.raises(ConfigError, match=r"the ramp-up .* gives a batch of 4, which must be divisible by mesh.data \(8\)"):
        train.main(list(TINY) + ["train.batch_size=8", "train.batch_size_start=4", "train.batch_size_increment=4",
                                 "train.rampup_samples=8", "mesh.data=8"])
