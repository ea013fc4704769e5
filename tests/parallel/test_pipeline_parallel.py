"""The pipeline core (parallel/pipeline.py) equals the plain layer loop: outputs and
gradients, GPipe and circular, uneven layer counts, on a pipe-sharded mesh, and bubbles
that cannot leak."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.config import ConfigError
from glm_jax.parallel import rules
from glm_jax.parallel.pipeline import Schedule, pipeline

D = 8


def layer(p, x, extra, i):
    """A layer that depends on its parameters, its index and its microbatch's extra input."""
    return jnp.tanh(x @ p["w"] + p["b"]) * (1.0 + 0.1 * i) + extra[:, None] * 0.01


def params(n, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w": jax.random.normal(k1, (n, D, D)) / np.sqrt(D), "b": jax.random.normal(k2, (n, D)) * 0.1}


def sequential(p, xs, extras):
    n = p["w"].shape[0]
    out = []
    for m in range(xs.shape[0]):
        x = xs[m]
        for i in range(n):
            x = layer(jax.tree.map(lambda a: a[i], p), x, extras[m], i)
        out.append(x)
    return jnp.stack(out)


def loss(fn, p, xs, extras):
    return jnp.sum(fn(p, xs, extras) ** 2)


@pytest.mark.parametrize("layers,stages,repeats,microbatches", [
    (4, 2, 1, 2), (8, 4, 1, 4), (8, 4, 2, 4), (6, 4, 1, 8), (8, 8, 1, 8), (12, 2, 3, 4), (7, 2, 2, 3),
], ids=["gpipe-2", "gpipe-4", "circular-4x2", "uneven-6-on-4", "gpipe-8", "circular-2x3", "uneven-circular"])
def test_pipeline_equals_the_layer_loop_in_outputs_and_gradients(layers, stages, repeats, microbatches):
    p = params(layers)
    xs = jax.random.normal(jax.random.key(1), (microbatches, 3, D))
    extras = jnp.arange(microbatches * 3, dtype=jnp.float32).reshape(microbatches, 3)
    piped = jax.jit(lambda p, xs, e: pipeline(layer, p, xs, e, stages=stages, repeats=repeats))
    np.testing.assert_allclose(piped(p, xs, extras), sequential(p, xs, extras), rtol=1e-5, atol=1e-6)
    g_pipe = jax.jit(jax.grad(lambda p: loss(lambda p, x, e: pipeline(layer, p, x, e, stages=stages, repeats=repeats),
                                             p, xs, extras)))(p)
    g_seq = jax.jit(jax.grad(lambda p: loss(sequential, p, xs, extras)))(p)
    for a, b in zip(jax.tree.leaves(g_pipe), jax.tree.leaves(g_seq)):  # 1e-5 of the gradient's scale
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_every_layer_runs_exactly_once_per_microbatch():
    n, M = 6, 8
    counting = lambda p, x, extra, i: x + jax.nn.one_hot(i, n)  # noqa: E731  (adds 1 at its own index)
    out = pipeline(counting, {"w": jnp.zeros((n, 1))}, jnp.zeros((M, 2, n)), stages=4, repeats=1)
    np.testing.assert_array_equal(out, np.ones((M, 2, n)))
    out = pipeline(counting, {"w": jnp.zeros((n, 1))}, jnp.zeros((M, 2, n)), stages=2, repeats=2)  # 8 slots, 2 pads
    np.testing.assert_array_equal(out, np.ones((M, 2, n)))


def test_bubbles_cannot_leak():
    p = params(8)
    xs = jax.random.normal(jax.random.key(2), (4, 3, D))
    extras = jnp.zeros((4, 3))

    def grads(fill):
        f = lambda p: loss(lambda p, x, e: pipeline(layer, p, x, e, stages=4, repeats=2, bubble_fill=fill), p, xs, extras)  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(p)

    (l0, g0), (ln, gn) = grads(None), grads(float("nan"))
    assert np.isfinite(float(ln)) and float(ln) == float(l0)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(gn)):
        assert np.all(np.isfinite(b))
        np.testing.assert_array_equal(a, b)


def test_on_a_pipe_sharded_mesh():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4, 1), rules.MESH_AXES)  # data 2, pipe 4
    p = params(8)
    xs = jax.random.normal(jax.random.key(3), (8, 4, D))
    extras = jnp.ones((8, 4))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules.logical_axis_rules()):
        out = jax.jit(lambda p, xs, e: pipeline(layer, p, xs, e, stages=4, repeats=2))(p, xs, extras)
        text = jax.jit(lambda p, xs, e: pipeline(layer, p, xs, e, stages=4, repeats=2)).lower(p, xs, extras).as_text()
    np.testing.assert_allclose(out, sequential(p, xs, extras), rtol=1e-5, atol=1e-6)
    assert "pipe" in text  # the stage axis is placed on the pipe mesh axis


def test_schedule_arithmetic_and_bad_input():
    s = Schedule(layers=70, stages=8, repeats=1, microbatches=16)
    assert (s.per_group, s.padded_layers, s.iterations) == (9, 72, 23)  # GLM-130B: 70 layers on 8 stages
    assert s.bubble == pytest.approx(7 / 23)
    assert Schedule(layers=28, stages=8, repeats=2, microbatches=16).bubble == pytest.approx(7 / 39)
    chatglm = Schedule(28, 8, 1, 8)  # ChatGLM-6B on 8 stages: padding spread, no idle stage
    assert [len(chatglm.group_layers(0, s)) for s in range(8)] == [4, 4, 4, 4, 3, 3, 3, 3]
    assert sum((chatglm.group_layers(0, s) for s in range(8)), []) == list(range(28))
    glm130b = Schedule(70, 8, 1, 8)
    assert [len(glm130b.group_layers(0, s)) for s in range(8)] == [9, 9, 9, 9, 9, 9, 8, 8]
    with pytest.raises(ConfigError, match="need at least 16 layers, the model has 6"):
        Schedule(6, 4, 4, 8)
    with pytest.raises(ConfigError, match="needs at least as many microbatches as stages \\(4\\), got 2"):
        Schedule(8, 4, 2, 2)
