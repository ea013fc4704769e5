"""The pipelined train step (mesh.pipe > 1) computes the plain step's loss and gradients:
every stage count, beside data and model parallelism, GPipe and circular, 1x/2x/4x
microbatches, uneven layer counts, ZeRO-1 and FSDP; and a whole step (optimizer
included) lands on the same parameters."""

import dataclasses
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from glm_jax.config import Config, ConfigError, MeshConfig, TrainConfig
from glm_jax.data.synthetic import copy_batch
from glm_jax.parallel import rules
from glm_jax.parallel.mesh import make_mesh
from glm_jax.training import pipeline_plan
from glm_jax.training.state import loss_and_grads
from glm_jax.training.trainer import Trainer
from helpers import variant

BATCH, LENGTH = 8, 16
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(layers, data=8, pipe=1, model=1, mode="replicated", batch=BATCH, **train) -> Config:
    return Config(
        model=variant("glm-130b", hidden_size=64, num_heads=8, mlp_dim=96, num_layers=layers),
        mesh=MeshConfig(data=data, pipe=pipe, model=model, param_sharding=mode),
        train=TrainConfig(batch_size=batch, seq_len=LENGTH, warmup_steps=0, **train),
    )


def _trainer(cfg: Config) -> Trainer:
    devices = jax.devices()[: cfg.mesh.data * cfg.mesh.pipe * cfg.mesh.model]
    return Trainer.build(cfg, make_mesh(cfg.mesh, devices))


def _packed(batch):
    """Each row as two packed segments, the second with a Part A of 3 tokens."""
    b, length = batch.tokens.shape
    segments = np.repeat(np.asarray([[1] * (length // 2) + [2] * (length - length // 2)]), b, axis=0).astype(np.int32)
    prefix = np.stack([np.asarray(batch.prefix_len).reshape(b), np.full((b,), 3)], axis=1).astype(np.int32)
    return batch.replace(segment_ids=segments, prefix_len=prefix)


def _loss_and_grads(cfg: Config, dropout_seed=None, packed=False):
    trainer = _trainer(cfg)
    params = trainer.init_state(seed=0).params  # the same values on every mesh
    batch = copy_batch(cfg.model, cfg.train.batch_size, LENGTH, 0, 0)
    batch = _packed(batch) if packed else batch
    rng = None if dropout_seed is None else jax.random.key(dropout_seed)
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(rules.logical_axis_rules()):
        step = jax.jit(lambda p, b: loss_and_grads(trainer.model, p, b, rng, microbatches=cfg.train.microbatches))
        loss, _, grads = step(params, batch)
    return trainer.pipelining, float(loss), jax.device_get(grads)


_REFERENCES = {}


def _reference(layers, batch):
    if (layers, batch) not in _REFERENCES:
        _REFERENCES[layers, batch] = _loss_and_grads(_config(layers, batch=batch))
    return _REFERENCES[layers, batch]


def _assert_close(got, want):
    assert got[1] == pytest.approx(want[1], rel=1e-5)
    for path, g in jax.tree_util.tree_flatten_with_path(got[2])[0]:
        w = want[2]
        for k in path:
            w = w[k.key]
        scale = float(np.abs(w).max())
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


# (layers, mesh data x pipe x model, param sharding, repeats, microbatches per stage, batch, accumulation)
CASES = {
    "pipe2-model2-data2-gpipe-1x": (4, (2, 2, 2), "replicated", 1, 1, BATCH, 1),
    "pipe4-data2-circular-2x-zero1": (8, (2, 4, 1), "zero1", 2, 2, BATCH, 1),
    "pipe8-gpipe-1x": (8, (1, 8, 1), "replicated", 1, 1, BATCH, 1),
    "6-layers-on-pipe4-data2-2x-accumulate2": (6, (2, 4, 1), "replicated", 1, 2, 2 * BATCH, 2),
    "6-layers-on-pipe2-model2-data2-circular-4x-fsdp": (6, (2, 2, 2), "fsdp", 2, 4, BATCH, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipelined_loss_and_gradients_equal_the_plain_step(case):
    layers, (data, pipe, model), mode, repeats, per_stage, batch, accumulation = CASES[case]
    cfg = _config(layers, data, pipe, model, mode, batch, pipeline_repeats=repeats,
                  pipeline_microbatches=per_stage * pipe, microbatches=accumulation)
    got = _loss_and_grads(cfg)
    assert got[0].stages == pipe and got[0].repeats == repeats and got[0].microbatches == per_stage * pipe
    _assert_close(got, _reference(layers, batch))


def test_packed_segments_and_2d_positions_travel_with_their_microbatch():
    """ChatGLM-6B's [b, 2, L] positions, per-segment Part A lengths and segment ids."""
    def chatglm(cfg):
        return dataclasses.replace(cfg, model=variant("chatglm-6b", hidden_size=64, num_heads=8, mlp_dim=96, num_layers=4))

    want = _loss_and_grads(chatglm(_config(4)), packed=True)
    got = _loss_and_grads(chatglm(_config(4, 2, 4, 1, pipeline_microbatches=4)), packed=True)
    _assert_close(got, want)


def test_a_whole_pipelined_step_lands_on_the_plain_steps_parameters():
    def one_step(cfg):
        trainer = _trainer(cfg)
        state, metrics = trainer.train_step(trainer.init_state(seed=0), copy_batch(cfg.model, BATCH, LENGTH, 0, 0))
        return float(metrics["loss"]), jax.device_get(state.params), trainer

    plain_loss, plain, _ = one_step(_config(4))
    piped_loss, piped, trainer = one_step(_config(4, data=2, pipe=4, mode="zero1"))
    assert piped_loss == pytest.approx(plain_loss, rel=1e-5)
    for a, b in zip(jax.tree.leaves(piped), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Each stage keeps only its own layers' weights: the layer axis is split over pipe.
    stacked = trainer.shardings.params["layers"]["block"]["mlp"]["wi_kernel"]
    assert stacked.spec[0] == "pipe"
    # A non-finite step is skipped, pipelined as not.
    state = trainer.init_state(seed=0)
    bad = copy_batch(trainer.cfg.model, BATCH, LENGTH, 0, 0)
    bad = bad.replace(loss_weights=np.full_like(bad.loss_weights, np.nan))
    after, metrics = trainer.train_step(state, bad)
    assert bool(metrics["skipped"]) and int(after.skipped) == 1
    for a, b in zip(jax.tree.leaves(jax.device_get(after.params)), jax.tree.leaves(jax.device_get(trainer.init_state(seed=0).params))):
        np.testing.assert_array_equal(a, b)


def test_the_plan_defaults_and_refusals():
    sizes = {"data": 2, "pipe": 4, "model": 1}
    assert pipeline_plan.plan(_config(8, batch=32), sizes).microbatches == 16  # 4 x stages, rows still split over data
    assert pipeline_plan.plan(_config(8, batch=16), sizes).microbatches == 8  # 16 rows: 2 x stages keeps 2 per microbatch
    assert not pipeline_plan.plan(_config(8), {"data": 8, "pipe": 1, "model": 1}).active
    assert pipeline_plan.plan(_config(70, batch=16), {"data": 1, "pipe": 8, "model": 1}).schedule(70).per_group == 9
    with pytest.raises(ConfigError, match=r"train.pipeline_microbatches=3 does not divide the batch of 8 rows per step; valid values: 1, 2, 4, 8"):
        pipeline_plan.plan(_config(8, pipeline_microbatches=3), sizes)
    with pytest.raises(ConfigError, match=r"train.pipeline_repeats=3 does not fit: mesh.pipe=4 stages x 3 repeats need at least 12 layers"):
        pipeline_plan.plan(_config(8, pipeline_repeats=3), sizes)
    with pytest.raises(ConfigError, match=r"no multiple of mesh.pipe=4 \(16, 8, 4\) divides the batch of 6 rows"):
        pipeline_plan.plan(_config(8, batch=6), sizes)
    with pytest.raises(ConfigError, match=r"needs train.pipeline_microbatches >= mesh.pipe \(4\), got 2"):
        pipeline_plan.plan(_config(8, pipeline_repeats=2, pipeline_microbatches=2), sizes)
    # Every batch size of a ramp-up must cut into the microbatches (each size compiles once).
    ramp = dict(batch=32, batch_size_start=8, batch_size_increment=8, rampup_samples=64)
    assert pipeline_plan.plan(_config(8, **ramp), sizes).microbatches == 4  # 8 rows: 4 microbatches of 2
    with pytest.raises(ConfigError, match=r"pipeline_microbatches=16 does not divide the batch of 8 rows"):
        pipeline_plan.plan(_config(8, pipeline_microbatches=16, **ramp), sizes)
    with pytest.raises(ConfigError, match=r"train.pipeline_gather=layer .* needs mesh.param_sharding=fsdp \(got replicated\)"):
        pipeline_plan.plan(_config(8, pipeline_gather="layer"), sizes)
    with pytest.raises(ConfigError, match=r"mesh.pipe=4 needs model.scan_layers=true"):
        pipeline_plan.plan(_with(_config(8), scan_layers=False), sizes)


LOWER_GLM130B = """
import jax, jax.numpy as jnp
from glm_jax.config import load_config
from glm_jax.model import Batch
from glm_jax.parallel.mesh import make_mesh
from glm_jax.training.trainer import Trainer
cfg = load_config("glm-130b", ["mesh.model=4", "mesh.pipe=8", "mesh.data=1", "train.batch_size=16", "train.seq_len=2048"])
trainer = Trainer.build(cfg, make_mesh(cfg.mesh))
b, L = 16, 2048
i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
batch = Batch(tokens=i32(b, L), positions=i32(b, L), prefix_len=i32(b), targets=i32(b, L),
              loss_weights=jax.ShapeDtypeStruct((b, L), jnp.float32))
text = trainer.train_step.lower(trainer.abstract_state(), batch).as_text()
p = trainer.pipelining
print(p.stages, p.repeats, p.microbatches, p.schedule(cfg.model.num_layers).per_group, len(text) > 0)
"""


def test_the_glm130b_step_lowers_on_model4_pipe8():
    """The full-size step (70 layers on 8 stages, 9 slots each) lowers for 32 devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=32")
    r = subprocess.run([sys.executable, "-c", LOWER_GLM130B], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["8", "1", "16", "9", "True"]


def _with(cfg: Config, **model) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


DROPOUT = dict(attention_dropout=0.1, hidden_dropout=0.1)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_dropout_draws_the_same_masks_pipelined_accumulated_or_whole(impl):
    """Each row's dropout masks depend on its index in the step's batch only: the pipeline's
    microbatches (circular, 6 layers on 2 stages) and gradient accumulation draw the whole
    batch's masks, so loss and gradients are the unpipelined step's, dropout on. With
    ``pallas`` this is also the fused kernel's shard_map tracing under the stage vmap."""
    whole = _loss_and_grads(_with(_config(6, batch=16), attention_impl=impl, **DROPOUT), dropout_seed=3)
    plain = _reference(6, 16)
    moved = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(jax.tree.leaves(whole[2]), jax.tree.leaves(plain[2])))
    assert moved > 0.01  # dropout is on: the gradients are not those without it
    piped = _with(_config(6, 2, 2, 2, batch=16, pipeline_repeats=2, pipeline_microbatches=4, microbatches=2),
                  attention_impl=impl, **DROPOUT)
    _assert_close(_loss_and_grads(piped, dropout_seed=3), whole)


def test_the_pipelined_step_compiles_for_a_tpu_pod_with_the_mosaic_kernels():
    """data 2 x pipe 2 x model 2 on a v5e 2x4 slice, FSDP, remat and dropout: libtpu
    compiles the whole step ahead of time with the fused attention kernels inside the
    stage vmap, and the stages hand activations on by collective permutes."""
    import re

    from jax.experimental import topologies

    from glm_jax.model import Batch

    topology = topologies.get_topology_desc("v5e:2x4", "tpu")
    mesh = topologies.make_mesh(topology, (2, 2, 2), rules.MESH_AXES)
    cfg = _with(_config(4, data=2, pipe=2, model=2, mode="fsdp", batch=8), hidden_size=256, num_heads=2, mlp_dim=512,
                max_seq_len=512, dtype="bfloat16", attention_impl="pallas", remat_policy="full", **DROPOUT)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=512))
    trainer = Trainer.build(cfg, mesh)
    tokens = jax.ShapeDtypeStruct((8, 512), np.int32)
    batch = Batch(tokens=tokens, positions=tokens, prefix_len=jax.ShapeDtypeStruct((8,), np.int32), targets=tokens,
                  loss_weights=jax.ShapeDtypeStruct((8, 512), np.float32))
    hlo = trainer.train_step.lower(trainer.abstract_state(), batch).compile().as_text()
    assert sorted(set(re.findall(r"glm_flash_(?:fwd|dq|dkv)", hlo))) == ["glm_flash_dkv", "glm_flash_dq", "glm_flash_fwd"]
    assert "collective-permute" in hlo


def _while_body_lines(hlo: str) -> list[str]:
    """Instructions of the compiled program that run inside a loop (while bodies and what
    they call)."""
    comps, current = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = comps.setdefault(header.group(1), [])
        elif current is not None:
            current.append(line)
    inside, todo = set(), [b for lines in comps.values() for line in lines for b in re.findall(r"body=%?([\w.\-]+)", line)]
    while todo:
        name = todo.pop()
        if name in inside or name not in comps:
            continue
        inside.add(name)
        for line in comps[name]:
            todo += re.findall(r"(?:to_apply|calls|body|condition)=%?([\w.\-]+)", line)
    return [line for name in inside for line in comps[name]]


@pytest.mark.parametrize("gather", ["step", "layer"])
def test_fsdp_weights_are_gathered_once_per_step_or_by_each_layer(gather):
    """train.pipeline_gather=step gathers before the pipeline's loops; =layer inside them
    (a layer's weights at a time); the loss and gradients are the plain step's either way."""
    cfg = _config(6, 2, 2, 2, mode="fsdp", pipeline_microbatches=4, pipeline_gather=gather)
    trainer = _trainer(cfg)
    hlo = trainer.train_step.lower(trainer.abstract_state(), copy_batch(cfg.model, BATCH, LENGTH, 0, 0)).compile().as_text()
    assert "all-gather(" in hlo
    looped = [line for line in _while_body_lines(hlo) if "all-gather(" in line]
    assert bool(looped) == (gather == "layer")
    if gather == "layer":
        _assert_close(_loss_and_grads(cfg), _reference(6, BATCH))
