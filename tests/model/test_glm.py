"""Behaviour users rely on: mask invariants, packing, precision, gradient shrink, layer stacking, init."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.model import GLM, prepare_inputs
from helpers import glm_row, init_params, randomize, variant


def _logits(cfg, params, tokens):
    tokens = np.asarray(tokens)
    inp = prepare_inputs(tokens, cfg)
    out = jax.jit(GLM(cfg).apply)({"params": params}, tokens, inp["positions"], inp["prefix_len"], inp["segment_ids"])
    return np.asarray(out)


@pytest.mark.parametrize("name", ["glm-130b", "chatglm-6b", "glm-original"])
def test_part_b_token_changes_only_later_logits(name):
    cfg = variant(name)
    params = randomize(init_params(cfg))
    row = glm_row(cfg, [11, 12, 13, 14, 15], cfg.gmask_token_id, [21, 22, 23, 24, 25])
    base = _logits(cfg, params, [row])
    j = row.index(cfg.sop_token_id) + 3  # a Part B position
    changed = list(row)
    changed[j] = 77
    out = _logits(cfg, params, [changed])
    np.testing.assert_array_equal(out[0, :j], base[0, :j])  # earlier logits untouched, bit for bit
    assert np.abs(out[0, j:] - base[0, j:]).max(axis=-1).min() > 1e-4  # later ones all move


@pytest.mark.parametrize("name", ["glm-130b", "chatglm-6b", "glm-original"])
def test_part_a_token_changes_every_logit(name):
    cfg = variant(name)
    params = randomize(init_params(cfg))
    row = glm_row(cfg, [11, 12, 13, 14, 15], cfg.gmask_token_id, [21, 22, 23, 24])
    base = _logits(cfg, params, [row])
    changed = list(row)
    changed[4] = 77  # the last text token of Part A: earlier Part A positions see it too
    out = _logits(cfg, params, [changed])
    assert np.abs(out[0] - base[0]).max(axis=-1).min() > 1e-4


@pytest.mark.parametrize("name", ["glm-130b", "chatglm-6b", "glm-original"])
def test_packed_segments_equal_separate_examples(name):
    cfg = variant(name)
    params = randomize(init_params(cfg))
    a = glm_row(cfg, [11, 12, 13, 14], cfg.gmask_token_id, [21, 22, 23])
    b = [31, 32, cfg.mask_token_id, 33, 34, 35, cfg.sop_token_id, 41, 42]
    alone_a = _logits(cfg, params, [a])[0]
    alone_b = _logits(cfg, params, [b])[0]

    pa, pb = prepare_inputs(np.asarray([a]), cfg), prepare_inputs(np.asarray([b]), cfg)
    pad = 3
    tokens = np.asarray([a + b + [cfg.pad_token_id] * pad])
    segment_ids = np.asarray([[1] * len(a) + [2] * len(b) + [0] * pad])
    pos_axis = -1
    positions = np.concatenate(
        [pa["positions"], pb["positions"], np.zeros(pa["positions"].shape[:-1] + (pad,), np.int32)], axis=pos_axis
    )
    prefix_len = np.asarray([[pa["prefix_len"][0], pb["prefix_len"][0]]])
    packed = np.asarray(jax.jit(GLM(cfg).apply)({"params": params}, tokens, positions, prefix_len, segment_ids))[0]
    np.testing.assert_allclose(packed[: len(a)], alone_a, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[len(a) : len(a) + len(b)], alone_b, atol=1e-5, rtol=1e-5)


def test_left_padding_does_not_change_real_tokens():
    cfg = variant("chatglm-6b")
    params = randomize(init_params(cfg))
    row = glm_row(cfg, [11, 12, 13, 14], cfg.gmask_token_id, [21, 22])
    alone = _logits(cfg, params, [row])[0]
    padded = _logits(cfg, params, [[cfg.pad_token_id] * 3 + row])[0]
    np.testing.assert_allclose(padded[3:], alone, atol=1e-5, rtol=1e-5)


def test_bfloat16_forward_runs_softmax_in_float32():
    cfg = variant("glm-130b", dtype="bfloat16")
    params = init_params(cfg)
    tokens = np.asarray([glm_row(cfg, [11, 12, 13], cfg.gmask_token_id, [21, 22, 23])])
    inp = prepare_inputs(tokens, cfg)
    fn = jax.jit(lambda p: GLM(cfg).apply({"params": p}, tokens, inp["positions"], inp["prefix_len"]))
    hlo = fn.lower(params).compile().as_text()
    b, L, nh = 1, tokens.shape[1], cfg.num_heads
    # Every exponential over attention scores [b, heads, L, L] is float32; none is bf16.
    shape = f"{b},{nh},{L},{L}"
    exps = re.findall(r"= (\w+)\[([\d,]+)\][^\n]*? exponential\(", hlo)
    attn_exps = [dt for dt, dims in exps if dims == shape]
    assert attn_exps and set(attn_exps) == {"f32"}, exps
    assert not any(dt == "bf16" for dt, _ in exps)
    out = fn(params)
    assert out.dtype == jnp.float32  # logits accumulate and leave the head in float32


def test_embedding_grad_shrink_scales_gradient_exactly():
    from glm_jax.data.synthetic import copy_batch
    from glm_jax.training.state import loss_and_grads

    base = variant("glm-130b")
    shrunk = dataclasses.replace(base, embedding_grad_shrink=0.1)
    params = randomize(init_params(base))
    batch = copy_batch(base, 2, 16, seed=0, step=0)
    l_full, _, g_full = jax.jit(lambda p: loss_and_grads(GLM(base), p, batch))(params)
    l_shr, _, g_shr = jax.jit(lambda p: loss_and_grads(GLM(shrunk), p, batch))(params)
    assert float(l_full) == float(l_shr)  # forward identical
    ge_full, ge_shr = np.asarray(g_full["word_embeddings"]), np.asarray(g_shr["word_embeddings"])
    assert np.abs(ge_full).max() > 0
    np.testing.assert_array_equal(ge_shr, ge_full * np.float32(0.1))
    # Every other gradient is untouched.
    for path in (("final_layernorm", "scale"), ("layers", "block", "mlp", "wo_kernel")):
        a, b = g_full, g_shr
        for k in path:
            a, b = a[k], b[k]
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_and_unrolled_stacks_agree(remat):
    cfg_scan = variant("glm-130b", scan_layers=True, remat_policy=remat)
    cfg_loop = variant("glm-130b", scan_layers=False, remat_policy=remat)
    p_scan = randomize(init_params(cfg_scan))
    stacked = p_scan["layers"]["block"]
    p_loop = {k: v for k, v in p_scan.items() if k != "layers"}
    for i in range(cfg_scan.num_layers):
        p_loop[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
    assert set(init_params(cfg_loop)) == set(p_loop)
    tokens = np.asarray([glm_row(cfg_scan, [11, 12, 13, 14], cfg_scan.gmask_token_id, [21, 22, 23])])
    inp = prepare_inputs(tokens, cfg_scan)

    def loss(cfg, p):
        return GLM(cfg).apply({"params": p}, tokens, inp["positions"], inp["prefix_len"]).sum()

    out_scan, g_scan = jax.jit(jax.value_and_grad(lambda p: loss(cfg_scan, p)))(p_scan)
    out_loop, g_loop = jax.jit(jax.value_and_grad(lambda p: loss(cfg_loop, p)))(p_loop)
    np.testing.assert_allclose(out_scan, out_loop, rtol=1e-6)
    for i in range(cfg_scan.num_layers):
        want = np.asarray(g_loop[f"layers_{i}"]["attention"]["qkv_kernel"])
        got = np.asarray(g_scan["layers"]["block"]["attention"]["qkv_kernel"][i])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_deepnorm_initialisation_gains():
    cfg = variant("glm-130b", hidden_size=256, num_heads=4, mlp_dim=512, num_layers=4)
    params = init_params(cfg)
    blk = params["layers"]["block"]
    h, f, beta = cfg.hidden_size, cfg.mlp_dim, (2 * cfg.num_layers) ** -0.5
    qkv = np.asarray(blk["attention"]["qkv_kernel"])  # [N, h, 3, heads, hd]
    xavier = lambda fi, fo, g: g * math.sqrt(2.0 / (fi + fo))  # noqa: E731
    checks = [
        (qkv[:, :, 0], xavier(h, 3 * h, 1.0)),  # Q
        (qkv[:, :, 1], xavier(h, 3 * h, 1.0)),  # K
        (qkv[:, :, 2], xavier(h, 3 * h, beta)),  # V
        (blk["attention"]["out_kernel"], xavier(h, h, beta)),
        (np.asarray(blk["mlp"]["wi_kernel"])[:, :, 0], xavier(h, f, beta)),  # linear half
        (np.asarray(blk["mlp"]["wi_kernel"])[:, :, 1], xavier(h, f, beta)),  # gelu half
        (blk["mlp"]["wo_kernel"], xavier(f, h, beta)),
        (params["word_embeddings"], cfg.init_std),
    ]
    for arr, std in checks:
        assert np.std(np.asarray(arr)) == pytest.approx(std, rel=0.03)
    assert np.all(np.asarray(blk["attention"]["qkv_bias"]) == 0)
    assert np.all(np.asarray(blk["input_layernorm"]["scale"]) == 1)


def test_rotary_inv_freq_is_fp16_rounded():
    from glm_jax.model.rotary import inv_freq

    f32 = 1.0 / (10000 ** (np.arange(0, 128, 2, dtype=np.float64) / 128))
    got = inv_freq(128, 10000.0, fp16_round=True)
    np.testing.assert_array_equal(got, f32.astype(np.float16).astype(np.float32))
    assert not np.array_equal(inv_freq(128, 10000.0, fp16_round=False), got)
