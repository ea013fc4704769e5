"""Weight-only INT8/INT4: the authors' tensors bit for bit, the float model's numbers on the
dequantized weights, the memory it saves, pre-quantized releases, and sharded decoding."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from convert import chatglm_fixtures as fx
from inference_fixtures import VARIANTS, prompts, random_params
from glm_jax.config import load_config
from glm_jax.checkpoint import authors_layout, quantized
from glm_jax.convert.__main__ import main as convert_main
from glm_jax.inference import quantize as qz
from glm_jax.inference.beam_search import BeamSearch
from glm_jax.inference.decode import Generator
from glm_jax.inference.loading import load
from glm_jax.model import GLM, prepare_inputs
from glm_jax.model.linear import QuantizedWeight


def _authors(params, cfg) -> dict:
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in authors_layout.to_authors(jax.tree.map(np.asarray, params), cfg).items()}


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_is_the_authors_quantization(models, name, bits):
    """The packed bytes and scales are the authors' (torch restatement of quantization.py),
    and the quantized model's logits are the float model's on the weights q * scale (exact
    products; the authors' runtime rounds them to fp16, see glm_jax.model.linear)."""
    cfg, params = models[name]
    qparams = qz.quantize(params, cfg, bits)
    sd = _authors(params, cfg)
    want_q, deq = fx.quantized_state_dict({k: v.half() for k, v in sd.items()}, bits)
    got = {k: (w, s) for k, w, s in qz.to_authors(qparams, cfg)}
    assert set(got) == {k for k in sd if quantized.is_quantized_linear(k)}
    for k, (w, s) in got.items():
        np.testing.assert_array_equal(w, want_q[k].numpy())
        np.testing.assert_array_equal(s.view(np.uint16), want_q[k + "_scale"].numpy().view(np.uint16))

    exact = {k: _exact(want_q[k].numpy(), want_q[k + "_scale"].numpy(), bits) if k in got else v.float().numpy()
             for k, v in deq.items()}
    dense = _with_linears(params, authors_layout.from_authors(exact, cfg), cfg)
    tokens = np.asarray([prompts(cfg)[0] + [31, 32]])
    inputs = prepare_inputs(tokens, cfg)
    run = jax.jit(GLM(cfg).apply)
    a = run({"params": qparams}, tokens, inputs["positions"], inputs["prefix_len"])
    b = run({"params": dense}, tokens, inputs["positions"], inputs["prefix_len"])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=0)  # f32 summation order; fp16-rounded weights are ~1e-2 off


def _exact(weight, scale, bits) -> np.ndarray:
    q = quantized.unpack_int4(weight) if bits == 4 else weight
    return q.astype(np.float32) * scale.astype(np.float32)[:, None]


def _with_linears(params, dense, cfg):
    """``params`` with only the four quantized linears taken from ``dense``."""
    out = jax.tree.map(np.asarray, params)
    for e in authors_layout.entries(cfg):
        if quantized.is_quantized_linear(e.key):
            node_o, node_d = out, dense
            for p in e.path[:-1]:
                node_o, node_d = node_o[p], node_d[p]
            node_o[e.path[-1]] = node_d[e.path[-1]]
    return out


def test_quantized_linears_take_a_quarter_or_half_of_bf16_on_device():
    cfg = load_config("configs/glm-tiny.yaml").model
    params = jax.device_put(random_params(cfg, scale=1.0))
    for bits, limit in ((8, 0.55), (4, 0.3)):
        qparams = jax.device_put(qz.quantize(params, cfg, bits))
        leaves = [w for w in jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, QuantizedWeight)) if isinstance(w, QuantizedWeight)]
        assert len(leaves) == 4 and all(isinstance(w.q, jax.Array) and w.q.dtype == np.int8 for w in leaves)
        got = sum(w.q.nbytes + w.scale.nbytes for w in leaves)  # what the device holds
        bf16 = sum(2 * np.prod(np.shape(x)) for x in _float_linears(params, cfg))
        assert got == qz.linear_bytes(qparams)["quantized_bytes"] and bf16 == qz.linear_bytes(qparams)["bf16_bytes"]
        assert got <= limit * bf16, (bits, got / bf16)


def _float_linears(params, cfg):
    paths = {e.path for e in authors_layout.entries(cfg) if quantized.is_quantized_linear(e.key)}
    for path in paths:
        node = params
        for p in path:
            node = node[p]
        yield node


def test_prequantized_release_keeps_its_own_tensors(tmp_path):
    """An INT4 release converted with from-hf loads quantized, with the release's bytes and
    scales (rows with subnormal fp16 scales included, which requantizing would change)."""
    hf = fx.hf_config(quantization_bit=4)
    dense_sd = fx.state_dict(hf, dtype=torch.float16)
    k = "transformer.layers.0.mlp.dense_h_to_4h.weight"
    dense_sd[k][:16] *= 1e-3
    qsd, _ = fx.quantized_state_dict(dense_sd, 4)
    src = fx.save(str(tmp_path / "hf"), hf, qsd)
    assert convert_main(["from-hf", "--src", src, "--dst", str(tmp_path / "jax"), "--quiet"]) == 0
    model = load(str(tmp_path / "jax"))
    assert qz.is_quantized(model.params) == 4
    got = {key: (w, s) for key, w, s in qz.to_authors(model.params, model.config)}
    for key, (w, s) in got.items():
        np.testing.assert_array_equal(w, qsd[key].numpy())
        np.testing.assert_array_equal(s.view(np.uint16), qsd[key + "_scale"].numpy().view(np.uint16))
    assert qz.is_quantized(load(str(tmp_path / "jax"), quantize="none").params) is None


def test_sharded_generation_matches_one_device(models, generators):
    """On a data=2 x model=4 mesh (heads and MLP split four ways), float and INT4 greedy
    decoding and beam search give the single-device tokens."""
    from glm_jax.config import MeshConfig
    from glm_jax.parallel.mesh import make_mesh

    cfg, params = models["chatglm-6b"]
    mesh = make_mesh(MeshConfig(data=2, model=4))
    rows = prompts(cfg)
    want = generators["chatglm-6b"].generate(rows, 8)
    sharded = Generator(cfg, params, mesh=mesh)
    np.testing.assert_array_equal(sharded.generate(rows, 8), want)
    beams = BeamSearch(num_beams=4)  # 2 prompts x 4 beams over data=2: the cache rows reordered across shards
    got, one = sharded.beam_search(rows, 6, beams), generators["chatglm-6b"].beam_search(rows, 6, beams)
    assert [[h.tokens for h in hs] for hs in got] == [[h.tokens for h in hs] for hs in one]
    np.testing.assert_allclose([h.score for hs in got for h in hs], [h.score for hs in one for h in hs], rtol=1e-5)

    q4 = qz.quantize(params, cfg, 4)
    sharded4 = Generator(cfg, q4, mesh=mesh)
    qkv = sharded4.params["layers_0"]["attention"]["qkv_kernel"]  # laid out for generation: one leaf per layer
    assert qkv.q.sharding.shard_shape(qkv.q.shape)[2] == cfg.num_heads // 4  # heads split over `model`
    np.testing.assert_array_equal(sharded4.generate(rows, 8), Generator(cfg, q4).generate(rows, 8))
