"""Sharded forward+backward on a simulated 8-device mesh equals the single-device result."""


import jax
import pytest

from glm_jax.config import Config, ConfigError, MeshConfig, TrainConfig
from glm_jax.data.synthetic import copy_batch
from glm_jax.parallel import rules
from glm_jax.parallel.mesh import make_mesh
from glm_jax.training.trainer import Trainer
from helpers import variant


def _config(name, mesh):
    model = variant(name, hidden_size=64, num_heads=8, mlp_dim=96, num_layers=2)
    return Config(model=model, mesh=mesh, train=TrainConfig(steps=2, batch_size=4, seq_len=32))


@pytest.mark.parametrize("name", ["glm-130b", "chatglm-6b"])
def test_data2_model4_step_matches_single_device(name):
    assert jax.device_count() == 8, "conftest sets 8 simulated devices"
    results = {}
    for label, mesh_cfg, devices in [
        ("single", MeshConfig(data=1, model=1), jax.devices()[:1]),
        ("sharded", MeshConfig(data=2, model=4), jax.devices()),
    ]:
        cfg = _config(name, mesh_cfg)
        mesh = make_mesh(cfg.mesh, devices)
        trainer = Trainer.build(cfg, mesh)
        state, step = trainer.init_state(seed=0), trainer.train_step
        batch = copy_batch(cfg.model, cfg.train.batch_size, cfg.train.seq_len, seed=0, step=0)
        qkv = state.params["layers"]["block"]["attention"]["qkv_kernel"]
        state, m1 = step(state, batch)
        state, m2 = step(state, copy_batch(cfg.model, cfg.train.batch_size, cfg.train.seq_len, seed=0, step=1))
        results[label] = (float(m1["loss"]), float(m1["grad_norm"]), float(m2["loss"]), qkv.sharding, state)
    single, sharded = results["single"], results["sharded"]
    assert sharded[0] == pytest.approx(single[0], abs=1e-5)  # forward
    assert sharded[1] == pytest.approx(single[1], rel=1e-4)  # backward
    assert sharded[2] == pytest.approx(single[2], abs=1e-5)  # after one sharded update
    # The heads axis of the QKV kernel really is split over the 4-way model axis.
    qkv_sharding = sharded[3]
    assert qkv_sharding.spec == rules.logical_to_mesh_spec(jax.sharding.PartitionSpec("layers", "embed", "qkv", "heads", "head_dim"))
    full = single[4].params["layers"]["block"]["attention"]["qkv_kernel"].shape
    assert qkv_sharding.shard_shape(full)[3] == full[3] // 4


def test_mesh_product_must_match_device_count():
    with pytest.raises(ConfigError, match=r"mesh.data=3 x mesh.pipe=1 x mesh.model=4 = 12 devices, but 8 are available"):
        make_mesh(MeshConfig(data=3, model=4))
    with pytest.raises(ConfigError, match="cannot be split"):
        make_mesh(MeshConfig(data=-1, model=3))
    assert dict(make_mesh(MeshConfig(data=-1, model=4)).shape) == {"data": 2, "pipe": 1, "model": 4}


def test_rules_table_is_the_only_place_naming_mesh_axes():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / "glm_jax" / "model"
    for path in root.glob("*.py"):
        text = path.read_text()
        for axis in ('"data"', '"model"', '"pipe"', "'data'", "'model'", "'pipe'"):
            assert axis not in text, f"{path.name} names mesh axis {axis}"
