"""Parameters laid out for generation (glm_jax.inference.weights: layers unrolled, matrices
cast once, compact weights streamed on a CPU) compute what the model computes, and the
compiled decoding step never materialises a weight."""

import dataclasses

import jax
import numpy as np
import pytest

from glm_jax.inference import quantize as qz
from glm_jax.inference.decode import Generator
from glm_jax.inference.weights import for_generation
from glm_jax.model import GLM, prepare_inputs
from glm_jax.model.linear import Bf16Bits
from helpers import variant
from inference_fixtures import VARIANTS, prompts, random_params


@pytest.mark.parametrize("name", VARIANTS)
def test_generation_layout_gives_the_models_logits(models, name):
    """float32 and bfloat16 (bits streamed: linears, embeddings, the tied or untied head)
    against the scanned model on the same parameters (streamed INT8/INT4:
    test_linear.py, test_quantized_sat.py)."""
    cfg, params = models[name]
    tokens = np.asarray([prompts(cfg)[0] + [31, 32]])
    inputs = prepare_inputs(tokens, cfg)
    head = "word_embeddings" if cfg.tie_embeddings else "lm_head"
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 3e-2)):
        c = dataclasses.replace(cfg, dtype=dtype)
        want = np.asarray(jax.jit(GLM(c).apply)({"params": params}, tokens, inputs["positions"], inputs["prefix_len"]), np.float32)
        gen_cfg, gen_params = for_generation(c, params)
        assert not gen_cfg.scan_layers and "layers_2" in gen_params
        if dtype == "bfloat16":
            assert isinstance(gen_params[head], Bf16Bits) and isinstance(gen_params["layers_0"]["mlp"]["wo_kernel"], Bf16Bits)
        got = np.asarray(jax.jit(GLM(gen_cfg).apply)({"params": gen_params}, tokens, inputs["positions"], inputs["prefix_len"]), np.float32)
        np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=0, err_msg=dtype)


def test_decoding_step_materialises_no_weight():
    """The compiled step's temporary memory is a small fraction of the weights: no layer's
    weights are copied out of a stack, no bfloat16 or int8 weight is widened whole (each
    streamed matmul has one widened block of at most 4 MiB; XLA gives every loop its own)."""
    cfg = variant("chatglm-6b", hidden_size=1024, num_heads=8, mlp_dim=4096, num_layers=2)
    params = random_params(cfg, scale=0.1)
    float32_bytes = 4 * sum(np.size(x) for x in jax.tree.leaves(params))
    rows = [[11, 12, 13, cfg.gmask_token_id, cfg.sop_token_id]]
    for dtype, bits in (("bfloat16", 0), ("bfloat16", 8)):
        c = dataclasses.replace(cfg, dtype=dtype)
        gen = Generator(c, qz.quantize(params, c, bits) if bits else params)
        _, decode = gen.compiled(rows, 4)
        temp = decode.memory_analysis().temp_size_in_bytes
        assert temp < float32_bytes / 4, (dtype, bits, temp, float32_bytes)
