"""LoRA adapters: an untrained adapter (B = 0) changes nothing, merged adapters give the
unmerged logits, and the adapters carry PEFT's names and shapes for ChatGLM-6B."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util

from glm_jax.checkpoint import authors_layout
from glm_jax.model import GLM, lora, parameters, prepare_inputs
from helpers import glm_row, init_params, randomize, variant

ALL = "qkv,dense,mlp_in,mlp_out"


def _inputs(cfg):
    rng = np.random.default_rng(0)
    rows = [glm_row(cfg, list(rng.integers(10, 90, size=6)), cfg.gmask_token_id, rng.integers(10, 90, size=3))] * 2
    tokens = np.asarray(rows)
    inputs = prepare_inputs(tokens, cfg)
    return tokens, inputs["positions"], inputs["prefix_len"]


@pytest.mark.parametrize("name", ["chatglm-6b", "glm-130b"])  # 4h GELU MLP with 2D positions; GeGLU with 1D
def test_an_untrained_adapter_changes_nothing_and_merging_keeps_the_logits(name):
    base_cfg = variant(name)
    cfg = dataclasses.replace(base_cfg, lora_rank=4, lora_alpha=16.0, lora_targets=ALL)
    params = randomize(init_params(cfg))
    flat = traverse_util.flatten_dict(params)
    fresh = init_params(cfg)  # B starts at zero
    for k, v in traverse_util.flatten_dict(fresh).items():
        if k[-1].endswith("_lora_b"):
            assert not np.asarray(v).any()
    untrained = traverse_util.unflatten_dict({k: (traverse_util.flatten_dict(fresh)[k] if lora.is_adapter(k[-1]) else v)
                                              for k, v in flat.items()})
    base = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not lora.is_adapter(k[-1])})
    x = _inputs(cfg)
    want = np.asarray(jax.jit(GLM(base_cfg).apply)({"params": base}, *x))
    np.testing.assert_array_equal(np.asarray(jax.jit(GLM(cfg).apply)({"params": untrained}, *x)), want)  # exactly

    adapted = np.asarray(jax.jit(GLM(cfg).apply)({"params": params}, *x))
    assert np.abs(adapted - want).max() > 1e-2  # trained adapters (random B) change the logits
    merged, merged_cfg = lora.merge(params, cfg)
    assert merged_cfg.lora_rank == 0 and not any(lora.is_adapter(k[-1]) for k in traverse_util.flatten_dict(merged))
    got = np.asarray(jax.jit(GLM(merged_cfg).apply)({"params": merged}, *x))
    np.testing.assert_allclose(got, adapted, atol=1e-5 * np.abs(adapted).max(), rtol=0)


def test_adapters_have_peft_names_and_shapes_and_round_trip():
    cfg = variant("chatglm-6b", lora_rank=4, lora_targets=ALL)
    h, f, r = cfg.hidden_size, cfg.mlp_dim, 4
    assert authors_layout.leaf_shapes(cfg) == parameters.leaf_shapes(cfg)
    params = randomize(init_params(cfg))
    sd = authors_layout.to_authors(params, cfg)
    layer0 = {k[len("transformer.layers.0."):]: v.shape for k, v in sd.items()
              if k.startswith("transformer.layers.0.") and "lora" in k}
    assert layer0 == {
        "attention.query_key_value.lora_A.weight": (r, h), "attention.query_key_value.lora_B.weight": (3 * h, r),
        "attention.dense.lora_A.weight": (r, h), "attention.dense.lora_B.weight": (h, r),
        "mlp.dense_h_to_4h.lora_A.weight": (r, h), "mlp.dense_h_to_4h.lora_B.weight": (f, r),
        "mlp.dense_4h_to_h.lora_A.weight": (r, f), "mlp.dense_4h_to_h.lora_B.weight": (h, r),
    }
    # B @ A in the authors' orientation is the update of their [out, in] weight, rows in its order.
    i = 1
    w = sd[f"transformer.layers.{i}.attention.query_key_value.weight"]
    merged, merged_cfg = lora.merge(params, cfg)
    w_merged = authors_layout.to_authors(merged, merged_cfg)[f"transformer.layers.{i}.attention.query_key_value.weight"]
    b, a = (sd[f"transformer.layers.{i}.attention.query_key_value.lora_{n}.weight"] for n in "BA")
    np.testing.assert_allclose(w_merged, w + b @ a * (cfg.lora_alpha / r), rtol=1e-5, atol=1e-6)
    back = traverse_util.flatten_dict(authors_layout.from_authors(sd, cfg))
    for k, v in traverse_util.flatten_dict(params).items():
        np.testing.assert_array_equal(back[k], np.asarray(v))
