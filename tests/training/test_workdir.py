"""A workdir belongs to one run: changed configs and concurrent runs are refused in one
line, damaged checkpoints are set aside with one warning, and nothing a run saved is
deleted by another (issue: nothing lost, no raw tracebacks)."""

import json
import os
import shutil

import pytest

from glm_jax import cli, train
from glm_jax.checkpoint import directory
from glm_jax.checkpoint.lock import WorkdirLock
from glm_jax.convert.__main__ import main as convert
from glm_jax.inference.loading import load

TINY = ("data.mixture=synthetic", "train.seq_len=32", "train.log_every=1", "train.eval_batches=1",
        "train.warmup_steps=0", "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.tensorboard=false")


def run(capsys, *overrides):
    """(exit code, stdout, stderr) of ``python -m glm_jax.train`` run in this process."""
    with pytest.raises(SystemExit) as e:
        cli.run_main(train.main, list(TINY + overrides))
    out, err = capsys.readouterr()
    return e.value.code or 0, out, err


def refused(capsys, *overrides) -> str:
    code, out, err = run(capsys, *overrides)
    assert code == 2 and out == "", err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def snapshot(workdir) -> dict:
    """Every file of the workdir's checkpoints and config, with its bytes."""
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            path = os.path.join(root, f)
            if f != directory.CONFIG and directory.CHECKPOINTS not in path:
                continue
            with open(path, "rb") as fh:
                out[os.path.relpath(path, workdir)] = fh.read()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained for 3 steps (checkpoints 2 and 3 kept), reused read-only via copies."""
    workdir = tmp_path_factory.mktemp("trained") / "w"
    assert train.main(list(TINY + (f"workdir={workdir}", "train.steps=3"))) == 0
    return workdir


def copy(trained, tmp_path):
    dst = tmp_path / "w"
    shutil.copytree(trained, dst)
    return dst


def test_another_model_or_data_is_refused_and_nothing_is_deleted(trained, tmp_path, capsys):
    w = copy(trained, tmp_path)
    before = snapshot(w)
    line = refused(capsys, f"workdir={w}", "train.steps=6", "model.hidden_size=128")
    assert "holds checkpoints of another configuration (model.hidden_size: 64 -> 128)" in line
    assert "train.allow_config_change=true" in line
    line = refused(capsys, f"workdir={w}", "train.steps=6", "data.mixture=gmask", "model.num_layers=3")
    assert "model.num_layers: 2 -> 3; data.mixture: 'synthetic' -> 'gmask'" in line
    # Saying the change is intended does not let another model's checkpoints be overwritten.
    line = refused(capsys, f"workdir={w}", "train.steps=6", "model.hidden_size=128", "train.allow_config_change=true")
    assert "was saved by a different model" in line and "new workdir=" in line
    assert snapshot(w) == before  # config.yaml and every checkpoint untouched
    # What cannot change the arithmetic (kernel choice, rematerialisation) resumes freely.
    code, out, err = run(capsys, f"workdir={w}", "train.steps=4", "model.remat_policy=full")
    assert code == 0 and json.loads(out.splitlines()[-1])["resumed_from"] == 3


def test_unusable_workdirs_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert refused(capsys, f"workdir={tmp_path / 'file'}") == f"error: workdir={tmp_path / 'file'} is a file, not a directory"
    line = refused(capsys, f"workdir={tmp_path / 'file' / 'run'}")
    assert line.startswith(f"error: workdir={tmp_path / 'file' / 'run'} cannot be created")


def test_a_second_run_on_a_locked_workdir_is_refused_and_a_stale_lock_taken_over(trained, tmp_path, capsys):
    w = copy(trained, tmp_path)
    holder = WorkdirLock(str(w)).acquire()  # another run, alive, holds the workdir
    try:
        line = refused(capsys, f"workdir={w}", "train.steps=4")
        assert f"is in use by another training run (pid {os.getpid()} on" in line
    finally:
        holder.release()
    # A run killed while holding the lock leaves the file behind with its record, but the
    # operating system has dropped the lock itself: the next run takes over.
    (w / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then"}))
    code, out, err = run(capsys, f"workdir={w}", "train.steps=4")
    assert code == 0 and "taking over" in err and "pid 999999 on gone" in err


def _newest_data_files(w, step):
    state = os.path.join(directory.step_dir(str(w), step), directory.STATE)
    return sorted((os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs if "/d/" in os.path.join(r, f)),
                  key=os.path.getsize)


def _truncate(w, step):
    with open(_newest_data_files(w, step)[-1], "r+b") as f:
        f.truncate(100)


def _remove(w, step):
    os.remove(_newest_data_files(w, step)[-1])


def _bad_metadata(w, step):
    with open(os.path.join(directory.step_dir(str(w), step), directory.STATE, "_METADATA"), "w") as f:
        f.write("{not json")


@pytest.mark.parametrize("damage", [_truncate, _remove, _bad_metadata], ids=["truncated", "missing-file", "bad-metadata"])
def test_damaged_newest_checkpoint_is_set_aside_with_one_warning(trained, tmp_path, capsys, damage):
    w = copy(trained, tmp_path)
    damage(w, 3)
    code, out, err = run(capsys, f"workdir={w}", "train.steps=4")
    assert code == 0 and "Traceback" not in err and "Exception ignored" not in err, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint 3" in warnings[0] and "damaged/3" in warnings[0]
    assert "resuming from step 2" in err
    assert os.path.isdir(w / directory.CHECKPOINTS / directory.DAMAGED / "3")  # kept for inspection
    assert directory.workdir_steps(str(w)) == [3, 4]  # retention counted only readable checkpoints


def _truncate_all(w, step):
    """Every data file of the step, so the parameters cannot be read whichever file holds them."""
    for path in _newest_data_files(w, step):
        with open(path, "r+b") as f:
            f.truncate(10)


def test_readers_fall_back_past_a_damaged_newest_checkpoint(trained, tmp_path, capsys):
    w = copy(trained, tmp_path)
    _truncate_all(w, 3)
    seen = []
    model = load(str(w), warn=seen.append)
    assert len(seen) == 1 and "(step 3) cannot be read" in seen[0] and "loading step 2 instead" in seen[0]
    assert model.logits([[5, 6, model.config.gmask_token_id, model.config.sop_token_id]]).shape[-1] == 1024
    # Asking for the damaged step by name is one line naming it, from the library and the CLI.
    with pytest.raises(Exception, match=r"\(step 3\) cannot be read"):
        load(str(w), step=3)
    assert convert(["export", "--src", str(w), "--dst", str(tmp_path / "e"), "--step", "3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "cannot be read" in err
    assert not os.path.exists(tmp_path / "e")


def test_a_checkpoint_torn_by_a_crash_is_never_restored(trained, tmp_path, capsys):
    """A save killed midway leaves orbax's temporary directory; the resumed run ignores it
    and ends with the parameters the same resume gives without it."""
    import numpy as np
    import orbax.checkpoint as ocp

    w = copy(trained, tmp_path)
    torn = w / directory.CHECKPOINTS / "4.orbax-checkpoint-tmp-1234567"
    shutil.copytree(w / directory.CHECKPOINTS / "3", torn)
    for f in _newest_data_files(w, 3)[-2:]:  # half-written arrays in the torn copy
        rel = os.path.relpath(f, w / directory.CHECKPOINTS / "3")
        with open(torn / rel, "r+b") as fh:
            fh.truncate(10)
    code, out, err = run(capsys, f"workdir={w}", "train.steps=4")
    assert code == 0 and "warning" not in err and json.loads(out.splitlines()[-1])["resumed_from"] == 3
    clean = tmp_path / "clean"
    shutil.copytree(trained, clean)
    code, out, err = run(capsys, f"workdir={clean}", "train.steps=4")
    assert code == 0

    def params(workdir):
        state = os.path.join(directory.step_dir(str(workdir), 4), directory.STATE)
        return ocp.StandardCheckpointer().restore(state)["params"]

    a, b = params(w), params(clean)
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
