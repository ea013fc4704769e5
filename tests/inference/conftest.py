"""Shared small models for the inference tests: one per position scheme, built once."""

import pytest

from glm_jax.inference.decode import Generator
from helpers import init_params, randomize, variant

VARIANTS = ("glm-130b", "chatglm-6b")  # 1D positions, 2D positions


@pytest.fixture(scope="session")
def models():
    """name -> (config, parameters with real signal)."""
    out = {}
    for name in VARIANTS:
        cfg = variant(name)
        out[name] = (cfg, randomize(init_params(cfg), seed=2, scale=2.0))  # greedy output depends on the prompt
    return out


@pytest.fixture(scope="session")
def generators(models):
    return {name: Generator(cfg, params) for name, (cfg, params) in models.items()}


def prompts(cfg):
    """A [gMASK] prompt and a shorter [MASK] blank prompt (so the batch is left-padded)."""
    return [
        [11, 12, 13, 14, 15, 16, 17, cfg.gmask_token_id, cfg.sop_token_id],
        [21, 22, cfg.mask_token_id, 23, 24, cfg.eos_token_id, cfg.sop_token_id],
    ]
