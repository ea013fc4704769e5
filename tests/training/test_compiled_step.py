"""``train.compiled_step``: a step compiled ahead of time and saved
(``glm_jax.compile --save``) runs in place of the compile, computes what the compiled
step computes, and is refused, with the reasons, when the run is not the one it was
compiled for."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from glm_jax.checkpoint import compiled_step
from glm_jax.config import load_config
from glm_jax.data.synthetic import copy_batch
from glm_jax.parallel.mesh import make_mesh
from glm_jax.training.aot import compile_step
from glm_jax.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The ramp-up runs two 4-row steps before the 8-row batches the step is compiled for.
OVERRIDES = ["mesh.data=2", "mesh.model=4", "data.mixture=synthetic", "train.steps=3", "train.batch_size=8",
             "train.batch_size_start=4", "train.batch_size_increment=4", "train.rampup_samples=8"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = load_config("glm-tiny", OVERRIDES)
    step = compile_step(cfg, make_mesh(cfg.mesh, jax.devices()))
    path = tmp_path_factory.mktemp("aot") / "step"
    assert step.save(str(path), {"topology": "cpu-8"}) > 0
    return str(path), step.trainer


def _config(path, *more):
    return load_config("glm-tiny", [*OVERRIDES, f"train.compiled_step={path}", *more])


def test_the_loaded_step_computes_what_the_jitted_step_computes(saved):
    path, plain = saved
    loaded = Trainer.build(_config(path), plain.mesh)
    assert loaded.precompiled is not None
    assert loaded.precompiled.manifest["compiled_for"] == {"topology": "cpu-8"}
    batch = copy_batch(plain.cfg.model, 8, plain.cfg.train.seq_len, seed=0, step=0)
    assert loaded.precompiled.accepts(batch)
    a, ma = plain.train_step(plain.init_state(), batch)
    b, mb = loaded.train_step(loaded.init_state(), batch)
    assert float(ma["loss"]) == float(mb["loss"]) and int(b.step) == 1
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Another batch shape (a ramp-up batch) is not the saved program's: the jitted step runs
    # it (the CLI test below sees that compile).
    assert not loaded.precompiled.accepts(copy_batch(plain.cfg.model, 4, plain.cfg.train.seq_len, seed=0, step=0))


def test_train_loads_the_saved_step_instead_of_compiling_it(saved, tmp_path):
    path, _ = saved
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-m", "glm_jax.train", *OVERRIDES, f"train.compiled_step={path}",
                        f"workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"train step loaded from {path}" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 3
    # Only the 4-row ramp-up batch compiled a train step; the 8-row steps ran the saved one.
    assert r.stderr.count("Compiling jit(train_step)") == 1, r.stderr[-3000:]


def test_a_step_compiled_for_another_run_is_refused_with_the_reasons(saved, tmp_path):
    path, plain = saved
    mesh = plain.mesh
    # Keys that do not enter the step may differ.
    Trainer.build(_config(path, "train.log_every=7", "train.checkpoint_every=5", "data.corpus=stdlib"), mesh)
    with pytest.raises(compiled_step.CompiledStepError, match=r"config train\.learning_rate: 0\.003 -> 0\.5"):
        Trainer.build(_config(path, "train.learning_rate=0.5"), mesh)
    with pytest.raises(compiled_step.CompiledStepError, match=r"config train\.steps: 3 -> 4"):  # the schedule
        Trainer.build(_config(path, "train.steps=4"), mesh)
    other = _config(path, "mesh.data=4", "mesh.model=2")
    with pytest.raises(compiled_step.CompiledStepError, match=r"mesh \{'data': 2, 'pipe': 1, 'model': 4\} -> "):
        Trainer.build(other, make_mesh(other.mesh, jax.devices()))
    with pytest.raises(compiled_step.CompiledStepError, match="compiled for a batch of other shapes or layout"):
        Trainer.build(_config(path, "data.mixture=glm130b"), mesh)  # glm-tiny packs its real data
    reordered = make_mesh(plain.cfg.mesh, jax.devices()[::-1])
    with pytest.raises(compiled_step.CompiledStepError, match="orders its devices differently"):
        Trainer.build(_config(path), reordered)

    # Another jax, another backend build, other glm_jax code: each named.
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in (compiled_step.EXECUTABLE, compiled_step.TREES):
        (tampered / name).write_bytes(open(os.path.join(path, name), "rb").read())
    manifest = json.loads(open(os.path.join(path, compiled_step.MANIFEST)).read())
    manifest["runtime"]["jax"] = "0.0.1"
    manifest["runtime"]["platform_version"] = "TFRT TPU v4"
    manifest["glm_jax_source"] = "0" * 64
    (tampered / compiled_step.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(compiled_step.CompiledStepError) as e:
        Trainer.build(_config(tampered), mesh)
    message = str(e.value)
    assert "jax '0.0.1' -> " in message and "platform_version 'TFRT TPU v4' -> 'cpu'" in message
    assert "glm_jax's code differs" in message and "\n" not in message

    # A torn copy and a path with nothing saved.
    (tampered / compiled_step.MANIFEST).write_text(open(os.path.join(path, compiled_step.MANIFEST)).read())
    (tampered / compiled_step.EXECUTABLE).write_bytes(b"torn")
    with pytest.raises(compiled_step.CompiledStepError, match="cannot be loaded"):
        Trainer.build(_config(tampered), mesh)
    with pytest.raises(compiled_step.CompiledStepError, match="no manifest.json there"):
        Trainer.build(_config(tmp_path / "nothing"), mesh)
