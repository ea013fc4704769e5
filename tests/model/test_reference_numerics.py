"""glm_jax's forward against an independent numpy statement of the authors' arithmetic."""

import jax
import numpy as np
import pytest

from glm_jax.model import GLM, prepare_inputs
from helpers import glm_row, init_params, randomize, variant
from reference_glm import authors_mask, authors_state_dict, forward


def _positions_authors_1d(row, cfg):
    """GLM-130B generate.py rule, restated: arange; [MASK]/[sMASK] -> positions from <sop> on = mask index."""
    pos = np.arange(len(row))
    sop = row.index(cfg.sop_token_id)
    for tok in (cfg.mask_token_id, cfg.smask_token_id):
        if tok in row:
            pos[sop:] = row.index(tok)
            break
    return pos


def _positions_authors_2d(row, cfg):
    """ChatGLM-6B get_position_ids at HEAD, restated."""
    mask_tok = cfg.gmask_token_id if cfg.gmask_token_id in row else cfg.mask_token_id
    sop = row.index(cfg.sop_token_id)
    pos = np.arange(len(row))
    pos[sop:] = row.index(mask_tok)
    block = np.concatenate([np.zeros(sop, int), np.arange(1, len(row) - sop + 1)])
    return np.stack([pos, block])


@pytest.mark.parametrize("name", ["glm-130b", "chatglm-6b", "glm-original"])
@pytest.mark.parametrize("mask_kind", ["gmask", "mask"])
def test_logits_match_authors_arithmetic(name, mask_kind):
    cfg = variant(name)
    params = randomize(init_params(cfg))
    rng = np.random.default_rng(0)
    text = list(rng.integers(10, 90, size=7))
    mask_tok = cfg.gmask_token_id if mask_kind == "gmask" else cfg.mask_token_id
    if mask_kind == "mask":
        row = text[:3] + [mask_tok] + text[3:] + [cfg.sop_token_id] + list(rng.integers(10, 90, size=4))
    else:
        row = glm_row(cfg, text, mask_tok, rng.integers(10, 90, size=4))
    tokens = np.asarray([row])

    # The authors' inputs, built their way.
    sop = row.index(cfg.sop_token_id)
    mask = authors_mask(len(row), sop)
    if cfg.position_encoding == "rotary_1d":
        pos = _positions_authors_1d(row, cfg)[None]
    else:
        pos = _positions_authors_2d(row, cfg)[None]
    want = forward(authors_state_dict(params, cfg), cfg, tokens, pos, mask)

    # Ours, built by prepare_inputs.
    inputs = prepare_inputs(tokens, cfg)
    np.testing.assert_array_equal(inputs["positions"], pos)
    got = jax.jit(GLM(cfg).apply)({"params": params}, tokens, inputs["positions"], inputs["prefix_len"], inputs["segment_ids"])
    got = np.asarray(got)
    assert np.abs(want).max() > 1.0  # the check sees real signal
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)


def test_chatglm_alpha_does_not_follow_depth():
    # A 3-layer ChatGLM-format model still uses sqrt(56) (MODEL.md §2.2); GLM-130B uses its own depth.
    assert variant("chatglm-6b").alpha == pytest.approx(56 ** 0.5)
    assert variant("glm-130b", num_layers=70).alpha == pytest.approx(140 ** 0.5)
    assert variant("glm-original").alpha == 1.0
