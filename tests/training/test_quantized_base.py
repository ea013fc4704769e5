"""Fine-tuning on a quantized frozen base (finetune.quantize_base, QLoRA-style): the base's
linears stay INT8/INT4 bytes quantized exactly as the authors quantize, come out of
training bit-identical, checkpoint and restore, and the adapters export from the run."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from glm_jax.config import load_config
from glm_jax.data.synthetic import copy_batch
from glm_jax.inference import quantize as qz
from glm_jax.model import linear
from glm_jax.parallel.mesh import make_mesh
from glm_jax.training.finetune import is_trainable
from glm_jax.training.trainer import Trainer
from helpers import init_params, randomize, variant


@pytest.mark.parametrize("name", ["chatglm-6b", "glm-130b"])
def test_the_device_quantizer_is_the_authors_arithmetic_bit_for_bit(name):
    cfg = variant(name)
    params = jax.tree.map(np.asarray, randomize(init_params(cfg)))
    for bits in (8, 4):
        want = traverse_util.flatten_dict(qz.quantize(params, cfg, bits))  # numpy, through the authors' [out, in] rows
        for path, w in traverse_util.flatten_dict(params).items():
            if path[-1] not in linear.QUANTIZED_KERNELS:
                continue
            got = jax.jit(linear.quantize_kernel, static_argnums=(1, 2, 3))(
                w, bits, linear.QUANTIZED_KERNELS[path[-1]], path[0] == "layers")
            np.testing.assert_array_equal(np.asarray(got.q), np.asarray(want[path].q), err_msg=f"{bits} {path}")
            np.testing.assert_array_equal(np.asarray(got.scale).view(np.uint16), np.asarray(want[path].scale).view(np.uint16))


@pytest.mark.parametrize("method,bits", [("lora", "int4"), ("ptuning", "int8")])
def test_a_quantized_base_trains_its_adapters_and_stays_bit_identical(pretrained, method, bits, tmp_path):
    path, base = pretrained
    extra = (["model.lora_rank=4", "model.lora_targets=qkv,dense,mlp_in,mlp_out"] if method == "lora"
             else ["model.pre_seq_len=4"])
    cfg = load_config("glm-tiny", ["data.mixture=synthetic", "train.batch_size=8", "mesh.data=4", "mesh.model=2",
                                   *extra, f"finetune.method={method}", f"finetune.quantize_base={bits}",
                                   "train.learning_rate=0.01", "train.warmup_steps=0", f"train.init_from={path}"])
    trainer = Trainer.build(cfg, make_mesh(cfg.mesh, jax.devices()))
    state = trainer.init_state_from(path)
    n = {"int8": 8, "int4": 4}[bits]
    want = traverse_util.flatten_dict(qz.quantize(base, cfg.model, n))  # the base quantized on the host, as for inference
    flat = traverse_util.flatten_dict(state.params)
    quantized = {k: v for k, v in flat.items() if isinstance(v, linear.QuantizedWeight)}
    assert len(quantized) == 4 and all(v.bits == n for v in quantized.values())
    for k, v in quantized.items():
        np.testing.assert_array_equal(np.asarray(v.q), np.asarray(want[k].q))
        np.testing.assert_array_equal(np.asarray(v.scale).view(np.uint16), np.asarray(want[k].scale).view(np.uint16))
    trainable = {k: np.asarray(v) for k, v in flat.items() if is_trainable(k, method)}
    frozen = {k: jax.tree.map(np.asarray, v) for k, v in flat.items() if not is_trainable(k, method)}

    for i in range(2):
        state, m = trainer.train_step(state, copy_batch(cfg.model, 8, cfg.train.seq_len, seed=0, step=i))
        assert np.isfinite(float(m["loss"]))
    after = traverse_util.flatten_dict(state.params)
    for k, v in frozen.items():
        for a, b in zip(jax.tree.leaves(after[k]), jax.tree.leaves(v)):
            np.testing.assert_array_equal(np.asarray(a), b, err_msg="/".join(k))
    assert all(np.abs(np.asarray(after[k]) - v).max() > 0 for k, v in trainable.items())
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.nbytes for x in moments) == 2 * sum(v.nbytes for v in trainable.values())
    float_linears = sum(np.asarray(base_leaf).nbytes for k, base_leaf in traverse_util.flatten_dict(base).items() if k in quantized)
    stored = sum(x.nbytes for v in frozen.values() if isinstance(v, linear.QuantizedWeight) for x in (v.q, v.scale))
    assert stored < float_linears / (6 if n == 4 else 3.5), (stored, float_linears)  # float32 -> int4/int8, + fp16 scales

    # The run checkpoints and restores with its quantized base, and its trained part exports.
    workdir = tmp_path / "run"
    workdir.mkdir()
    from glm_jax.config import dump_config

    (workdir / "config.yaml").write_text(dump_config(cfg))
    ckpt = trainer.checkpointer(str(workdir))
    ckpt.save(2, state, data_rows=16, force=True, wait=True)
    restored = trainer.restore(ckpt, warn=print)
    ckpt.close()
    for a, b in zip(jax.tree.leaves(restored.state.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if method == "lora":
        from glm_jax.convert import lora_adapter

        got_cfg, leaves = lora_adapter.read(str(workdir), cfg.model)
        for k, v in leaves.items():
            np.testing.assert_array_equal(v, np.asarray(after[k]))
