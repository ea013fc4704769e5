"""P-tuning v2's prefix against the authors' arithmetic (PrefixEncoder, get_prompt, the
prefix keys in front of the sequence's without rotary, visible to every token)."""

import jax
import numpy as np
import pytest

from glm_jax.model import GLM, prepare_inputs
from helpers import glm_row, init_params, randomize, variant
from reference_glm import authors_mask, authors_state_dict, forward


@pytest.mark.parametrize("projection", [False, True], ids=["embedding", "projection"])
def test_prefix_logits_match_the_authors(projection):
    cfg = variant("chatglm-6b", pre_seq_len=3, prefix_projection=projection)
    params = randomize(init_params(cfg))
    rng = np.random.default_rng(1)
    rows = [glm_row(cfg, list(rng.integers(10, 90, size=n)), cfg.gmask_token_id, rng.integers(10, 90, size=3))
            for n in (6, 6)]
    tokens = np.asarray(rows)
    sop = rows[0].index(cfg.sop_token_id)
    inputs = prepare_inputs(tokens, cfg)
    want = forward(authors_state_dict(params, cfg), cfg, tokens, np.asarray(inputs["positions"]),
                   authors_mask(tokens.shape[1], sop))
    got = np.asarray(jax.jit(GLM(cfg).apply)({"params": params}, tokens, inputs["positions"], inputs["prefix_len"]))
    without = forward(authors_state_dict(params, variant("chatglm-6b")), variant("chatglm-6b"), tokens,
                      np.asarray(inputs["positions"]), authors_mask(tokens.shape[1], sop))
    assert np.abs(want - without).max() > 0.1  # the prefix changes the logits
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("projection", [False, True], ids=["embedding", "projection"])
def test_the_prefix_encoder_has_the_authors_names_and_shapes(projection):
    from glm_jax.checkpoint import authors_layout
    from glm_jax.model import parameters

    cfg = variant("chatglm-6b", pre_seq_len=3, prefix_projection=projection)
    assert authors_layout.leaf_shapes(cfg) == parameters.leaf_shapes(cfg)
    params = randomize(init_params(cfg))
    sd = authors_layout.to_authors(params, cfg)
    kv = cfg.num_layers * 2 * cfg.hidden_size
    prefix = {k: v.shape for k, v in sd.items() if k.startswith("transformer.prefix_encoder.")}
    want = ({"transformer.prefix_encoder.embedding.weight": (3, kv)} if not projection else {
        "transformer.prefix_encoder.embedding.weight": (3, cfg.hidden_size),
        "transformer.prefix_encoder.trans.0.weight": (cfg.hidden_size, cfg.hidden_size),
        "transformer.prefix_encoder.trans.0.bias": (cfg.hidden_size,),
        "transformer.prefix_encoder.trans.2.weight": (kv, cfg.hidden_size),
        "transformer.prefix_encoder.trans.2.bias": (kv,)})
    assert prefix == want
    back = authors_layout.from_authors(sd, cfg)
    for k, v in jax.tree_util.tree_leaves_with_path(params):
        np.testing.assert_array_equal(v, _get(back, [p.key for p in k]))


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree
