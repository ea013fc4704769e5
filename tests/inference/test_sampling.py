"""Logit processing as transformers 4.27 does it for ChatGLM-6B (restated in numpy here)."""

import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.config import ConfigError
from glm_jax.inference.sampling import Sampling, penalize, warp


def hf_warp(scores, temperature, top_k, top_p):
    """TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, in that order."""
    scores = scores / temperature
    if top_k:
        kth = np.sort(scores, axis=-1)[:, -top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        out = scores.copy()
        for b in range(scores.shape[0]):
            order = np.argsort(scores[b], kind="stable")  # ascending
            s = scores[b][order]
            p = np.exp(s - s.max())
            p /= p.sum()
            remove = np.cumsum(p) <= 1 - top_p
            remove[-1] = False  # min_tokens_to_keep
            out[b, order[remove]] = -np.inf
        scores = out
    return scores


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (20, 0.9), (3, 0.01)])
def test_warp_keeps_the_tokens_transformers_keeps(top_k, top_p):
    logits = np.random.default_rng(top_k).standard_normal((3, 64)).astype(np.float32) * 3
    got = np.asarray(warp(jnp.asarray(logits), Sampling(greedy=False, temperature=0.7, top_k=top_k, top_p=top_p)))
    want = hf_warp(logits, 0.7, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)
    assert (~np.isinf(got)).sum(axis=-1).min() >= 1


def test_repetition_penalty_is_ctrl_s():
    logits = jnp.asarray([[2.0, -2.0, 1.0, -1.0]])
    seen = jnp.asarray([[True, True, False, False]])
    np.testing.assert_allclose(np.asarray(penalize(logits, seen, 1.25)), [[1.6, -2.5, 1.0, -1.0]])


def test_bad_sampling_values_name_the_field():
    for kw, msg in ((dict(temperature=0.0), "temperature must be > 0"), (dict(top_p=1.5), "top_p must be in"),
                    (dict(top_k=-1), "top_k must be >= 0"), (dict(repetition_penalty=0), "repetition_penalty must be > 0")):
        with pytest.raises(ConfigError, match=msg):
            Sampling(**kw).validate()
