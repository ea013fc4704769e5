"""Train-step options that must not change the maths: vocabulary-chunked loss, gradient
accumulation, ZeRO-1 and FSDP. Each is compared with the plain step on the same data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.config import Config, ConfigError, MeshConfig, TrainConfig, load_config
from glm_jax.data.synthetic import copy_batch
from glm_jax.model import GLM
from glm_jax.parallel.mesh import make_mesh
from glm_jax.training.loss import chunked_cross_entropy, masked_cross_entropy
from glm_jax.training.state import loss_and_grads
from glm_jax.training.trainer import Trainer
from helpers import variant


def test_chunked_cross_entropy_equals_full_logits_loss_and_gradients():
    k = jax.random.split(jax.random.key(0), 4)
    b, length, d, vocab = 2, 6, 16, 96
    hidden = jax.random.normal(k[0], (b, length, d))
    head = jax.random.normal(k[1], (vocab, d))
    targets = jax.random.randint(k[2], (b, length), 0, vocab)
    weights = (jax.random.uniform(k[3], (b, length)) > 0.3).astype(jnp.float32)

    def full(h, w):
        return masked_cross_entropy(jnp.einsum("bld,vd->blv", h, w), targets, weights)[0]

    ref, ref_grads = jax.value_and_grad(full, argnums=(0, 1))(hidden, head)
    for chunks in (1, 3, 8):
        fn = lambda h, w: chunked_cross_entropy(h, w, targets, weights, chunks)[0]  # noqa: E731
        val, grads = jax.value_and_grad(fn, argnums=(0, 1))(hidden, head)
        assert float(val) == pytest.approx(float(ref), rel=1e-6)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not divisible into 5 chunks"):
        chunked_cross_entropy(hidden, head, targets, weights, 5)


def test_chunked_loss_never_builds_full_vocabulary_logits():
    """No float32 array of shape [b, L, vocab] appears in the compiled loss and its gradient."""
    b, length, d, vocab, chunks = 2, 8, 16, 512, 8
    hidden = jnp.ones((b, length, d))
    head = jnp.ones((vocab, d))
    targets = jnp.zeros((b, length), jnp.int32)
    weights = jnp.ones((b, length))
    fn = jax.grad(lambda h, w: chunked_cross_entropy(h, w, targets, weights, chunks)[0], argnums=(0, 1))
    hlo = jax.jit(fn).lower(hidden, head).compile().as_text()
    assert f"f32[{b},{length},{vocab}]" not in hlo
    assert f"f32[{b},{length},{vocab // chunks}]" in hlo


def _config(mesh: MeshConfig, **train) -> Config:
    model = variant("glm-130b", hidden_size=64, num_heads=8, mlp_dim=96, num_layers=2)
    return Config(model=model, mesh=mesh, train=TrainConfig(steps=3, batch_size=8, seq_len=32, warmup_steps=0, **train))


def _run(cfg: Config, steps: int = 2):
    mesh = make_mesh(cfg.mesh, jax.devices()[: cfg.mesh.data * cfg.mesh.model])
    trainer = Trainer.build(cfg, mesh)
    state, step = trainer.init_state(seed=0), trainer.train_step
    losses = []
    for i in range(steps):
        state, m = step(state, copy_batch(cfg.model, cfg.train.batch_size, cfg.train.seq_len, 0, i))
        losses.append(float(m["loss"]))
    return losses, state


@pytest.fixture(scope="module")
def plain_run():
    return _run(_config(MeshConfig(data=8)))


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize(
    "mesh,train",
    [
        (MeshConfig(data=4, model=2, param_sharding="zero1"), {}),
        (MeshConfig(data=4, model=2, param_sharding="fsdp"), {}),
        (MeshConfig(data=2, model=1, param_sharding="fsdp"), {"microbatches": 4, "loss_vocab_chunks": 4}),
    ],
    ids=["zero1", "fsdp", "fsdp+accumulation+chunked-loss"],
)
def test_sharding_and_memory_options_train_like_the_plain_step(plain_run, mesh, train):
    losses, state = _run(_config(mesh, **train))
    plain_losses, plain_state = plain_run
    np.testing.assert_allclose(losses, plain_losses, atol=1e-5)
    assert _max_diff(state.params, plain_state.params) < 1e-5
    # Where the arrays live: the embed dimension is split over data for AdamW (zero1, fsdp)
    # and for the parameters (fsdp only).
    emb = state.params["word_embeddings"]
    mu = state.opt_state[1][0].mu["word_embeddings"]
    vocab, d = emb.shape
    per_data = d // mesh.data
    assert mu.addressable_shards[0].data.shape == (vocab // mesh.model, per_data)
    expected = per_data if mesh.param_sharding == "fsdp" else d
    assert emb.addressable_shards[0].data.shape == (vocab // mesh.model, expected)


def test_gradient_accumulation_gives_the_full_batch_gradients():
    cfg = _config(MeshConfig(data=1))
    model = GLM(cfg.model)
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    params = Trainer.build(cfg, mesh).init_state(seed=0).params
    batch = jax.tree.map(jnp.asarray, copy_batch(cfg.model, 8, 32, 0, 0))
    batch = batch.replace(loss_weights=batch.loss_weights.at[:3].set(0.0))  # uneven target counts per microbatch
    loss, weight, grads = jax.jit(lambda p: loss_and_grads(model, p, batch))(params)
    for n in (2, 4, 8):
        l_n, w_n, g_n = jax.jit(lambda p: loss_and_grads(model, p, batch, microbatches=n))(params)
        assert float(w_n) == float(weight)
        assert float(l_n) == pytest.approx(float(loss), rel=1e-6)
        assert _max_diff(g_n, grads) < 1e-6 * max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))


def test_step_options_are_validated_with_the_key_named():
    with pytest.raises(ConfigError, match=r"train.batch_size \(8\) must be divisible by train.microbatches \(3\)"):
        load_config("configs/glm-tiny.yaml", ["train.microbatches=3"])
    with pytest.raises(ConfigError, match=r"train.loss_vocab_chunks=3 must divide model.vocab_size \(1024\); valid values up to 64: 1, 2, 4, 8, 16, 32, 64"):
        load_config("configs/glm-tiny.yaml", ["train.loss_vocab_chunks=3"])
    with pytest.raises(ConfigError, match="mesh.param_sharding='zero3' is not valid; valid values: replicated, zero1, fsdp"):
        load_config("configs/glm-tiny.yaml", ["mesh.param_sharding=zero3"])
