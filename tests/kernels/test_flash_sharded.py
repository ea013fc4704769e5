"""End to end: ``python -m glm_jax.train --config configs/glm-tiny.yaml train.steps=2`` on a
data=2 x model=4 mesh gives the same loss with model.attention_impl=pallas (the kernels
inside shard_map over batch and heads, interpret mode) as with the XLA reference."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax import train
from glm_jax.config import ConfigError, load_config
from glm_jax.kernels import flash_attention as fa
from glm_jax.kernels import reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = (
    "--config", os.path.join(ROOT, "configs/glm-tiny.yaml"), "train.steps=2", "mesh.data=2", "mesh.model=4",
    "data.mixture=synthetic", "data.pack=true", "train.seq_len=32", "train.eval_batches=1", "train.tensorboard=false",
)
BLOCKS = ("model.attention_block_q=16", "model.attention_block_kv=16", "model.attention_block_q_bwd=16",
          "model.attention_block_kv_bwd=8")


def _run(capsys, *overrides):
    assert train.main([*ARGS, *overrides]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_pallas_training_matches_xla_on_a_data_by_model_mesh(capsys, monkeypatch):
    shards = []
    local = fa._local

    def spy(q, *args, **kwargs):
        shards.append((q.shape, kwargs["batch_axes"], kwargs["head_axes"]))
        return local(q, *args, **kwargs)

    monkeypatch.setattr(fa, "_local", spy)
    xla = _run(capsys, "model.attention_impl=xla")
    assert not shards
    pallas = _run(capsys, "model.attention_impl=pallas", *BLOCKS)
    # Train and eval steps: each shard holds its batch rows (8 / data=2) and its head
    # (4 / model=4); no call sees the whole batch (initialisation runs on one example).
    assert ((4, 32, 1, 16), ("data",), ("model",)) in shards
    assert all(shape[0] < 8 for shape, _, _ in shards)
    assert pallas["train_loss"] == pytest.approx(xla["train_loss"], abs=1e-4)
    assert pallas["eval_loss"] == pytest.approx(xla["eval_loss"], abs=1e-4)
    assert pallas["skipped_steps"] == 0


def test_block_size_knobs_are_validated():
    with pytest.raises(ConfigError, match=r"model.attention_block_kv=48 must be 0 \(the backend's default\) or a power of two >= 8"):
        load_config(None, ["model.attention_block_kv=48"])


def test_sharded_dropout_drops_what_the_unsharded_reference_drops():
    """Each shard offsets its dropout counter by its global batch row and head."""
    b, n, h, d = 4, 24, 8, 16
    q, k, v = (jax.random.normal(x, (b, n, h, d)) for x in jax.random.split(jax.random.key(0), 3))
    part_a_end = jnp.asarray(np.random.default_rng(0).integers(0, n + 1, (b, 1)).repeat(n, 1), jnp.int32)
    rng = jax.random.key(7)
    kwargs = dict(layer_scale=jnp.float32(2.0), dropout_rate=0.3, dropout_rng=rng)
    shards = []
    local = fa._local

    def spy(q, *args, **kw):
        shards.append(q.shape)
        return local(q, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fa, "_local", spy)
        with jax.set_mesh(jax.make_mesh((2, 4), ("data", "model"))):
            got = jax.jit(lambda q, k, v: fa.attention(q, k, v, part_a_end, None, block_sizes=fa.BlockSizes(8, 8, 8, 8), **kwargs))(q, k, v)
    assert shards == [(2, n, 2, d)]
    want = reference.attention(q, k, v, part_a_end, None, **kwargs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
