"""``train.init_from``: fine-tuning starts from another run's (or a converted) parameters
on any mesh, with a fresh optimizer, and refuses a checkpoint of another model."""

import jax
import numpy as np
import pytest

from glm_jax.config import load_config
from glm_jax.errors import CheckpointError
from glm_jax.parallel.mesh import make_mesh
from glm_jax.training.trainer import Trainer

BASE = ["data.mixture=synthetic", "train.batch_size=8"]  # as the pretrained fixture (conftest.py)


def test_parameters_come_from_the_checkpoint_on_another_mesh_with_a_fresh_optimizer(pretrained):
    path, params = pretrained
    cfg = load_config("glm-tiny", [*BASE, "mesh.data=2", "mesh.model=4", "mesh.param_sharding=fsdp",
                                   "model.param_dtype=bfloat16", "model.hidden_dropout=0.1", f"train.init_from={path}"])
    trainer = Trainer.build(cfg, make_mesh(cfg.mesh, jax.devices()))
    state = trainer.init_state_from(path)
    assert int(state.step) == 0 and int(state.skipped) == 0
    for got, want, sharding in zip(jax.tree.leaves(state.params), jax.tree.leaves(params),
                                   jax.tree.leaves(trainer.shardings.params)):
        assert got.dtype == jax.numpy.bfloat16 and got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), want.astype(jax.numpy.bfloat16))
    adam = state.opt_state[1][0]
    assert int(adam.count) == 0 and all(not np.asarray(m).any() for m in jax.tree.leaves(adam.mu))
    # (test_ptuning trains from such a state)


def test_a_checkpoint_of_another_model_is_refused_with_the_differences(pretrained, tmp_path):
    path, _ = pretrained
    cfg = load_config("glm-tiny", [*BASE, "mesh.data=8", "model.num_layers=3", "model.rotary_base=500"])
    trainer = Trainer.build(cfg, make_mesh(cfg.mesh, jax.devices()))
    with pytest.raises(CheckpointError, match=r"its model differs from this run's \(model.num_layers: 2 -> 3; "
                                              r"model.rotary_base: 10000.0 -> 500.0\)"):
        trainer.init_state_from(path)
    with pytest.raises(CheckpointError, match="no such directory"):
        trainer.init_state_from(str(tmp_path / "missing"))
