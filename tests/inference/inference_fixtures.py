"""Small models and prompts shared by the inference tests."""

import numpy as np

from glm_jax.checkpoint import authors_layout
from helpers import randomize

VARIANTS = ("glm-130b", "chatglm-6b")  # 1D positions, 2D positions


def random_params(cfg, seed: int = 2, scale: float = 2.0):
    """Parameters with real signal, built from the layout's shapes (no model.init compile).
    At this scale greedy output depends on the prompt."""
    tree: dict = {}
    for path, shape in authors_layout.leaf_shapes(cfg).items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.zeros(shape, np.float32)
    return randomize(tree, seed=seed, scale=scale)


def prompts(cfg):
    """A [gMASK] prompt and a shorter [MASK] blank prompt (so the batch is left-padded)."""
    return [
        [11, 12, 13, 14, 15, 16, 17, cfg.gmask_token_id, cfg.sop_token_id],
        [21, 22, cfg.mask_token_id, 23, 24, cfg.eos_token_id, cfg.sop_token_id],
    ]
