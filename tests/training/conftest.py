"""Shared by the training tests: a small pretrained workdir to fine-tune from."""

import jax
import numpy as np
import pytest

from glm_jax.config import dump_config, load_config
from glm_jax.parallel.mesh import make_mesh
from glm_jax.training.trainer import Trainer

BASE = ["data.mixture=synthetic", "train.batch_size=8"]


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A workdir whose step-7 checkpoint holds parameters saved from an 8-way data mesh."""
    cfg = load_config("glm-tiny", [*BASE, "mesh.data=8"])
    trainer = Trainer.build(cfg, make_mesh(cfg.mesh, jax.devices()))
    state = trainer.init_state(seed=5)
    workdir = tmp_path_factory.mktemp("pretrained")
    (workdir / "config.yaml").write_text(dump_config(cfg))
    ckpt = trainer.checkpointer(str(workdir))
    ckpt.save(7, state, data_rows=56, force=True, wait=True)
    ckpt.close()
    return str(workdir), jax.tree.map(np.asarray, state.params)


