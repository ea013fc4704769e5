"""Small shared helpers for the tests: variant configs and randomised parameters."""

from __future__ import annotations

import dataclasses
import glob

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.config import ModelConfig
from glm_jax.model import parameters

BASE = dict(
    vocab_size=128,
    hidden_size=32,
    num_layers=3,
    num_heads=4,
    mlp_dim=48,
    max_seq_len=64,
    mask_token_id=100,
    gmask_token_id=101,
    smask_token_id=102,
    eod_token_id=103,
    sop_token_id=104,
    eop_token_id=105,
    eos_token_id=106,
    pad_token_id=0,
)

# The variants of MODEL.md §8, at test size.
VARIANTS = {
    "glm-130b": ModelConfig(
        name="glm-130b-small", norm_order="post", mlp_type="geglu", gelu_approximate=False,
        position_encoding="rotary_1d", tie_embeddings=True, **BASE,
    ),
    "chatglm-6b": ModelConfig(
        name="chatglm-small", norm_order="post", residual_alpha=56 ** 0.5, mlp_type="gelu", gelu_approximate=True,
        position_encoding="rotary_2d", tie_embeddings=False, **BASE,
    ),
    "glm-original": ModelConfig(
        name="glm-small", norm_order="pre", mlp_type="gelu", gelu_approximate=True, position_encoding="learned_2d",
        tie_embeddings=True, attention_layer_scaling=False, init="normal", init_std=0.02, **BASE,
    ),
}


def variant(name: str, **overrides) -> ModelConfig:
    return dataclasses.replace(VARIANTS[name], **overrides)


def init_params(cfg: ModelConfig, seed: int = 0):
    return nn_unbox(parameters.init_params(cfg, jax.random.key(seed)))


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def randomize(params, seed: int = 1, scale: float = 1.0):
    """Replace every parameter with well-scaled noise so numerical checks see real signal
    (init alone leaves biases at zero and LayerNorms at identity)."""
    leaves, treedef = jax.tree.flatten_with_path(params)
    rng = np.random.default_rng(seed)
    out = []
    for path, x in leaves:
        name = jax.tree_util.keystr(path)
        shape = x.shape
        if "scale" in name:
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "bias" in name:
            v = 0.1 * rng.standard_normal(shape)
        elif "embeddings" in name or "lm_head" in name:
            v = 0.5 * rng.standard_normal(shape)
        else:
            v = scale * 0.15 * rng.standard_normal(shape)
        out.append(jnp.asarray(v, x.dtype))
    return jax.tree.unflatten(treedef, out)


def glm_row(cfg: ModelConfig, text, mask_token: int, target=()) -> list[int]:
    """``text [MASK] <sop> target`` as a token list."""
    return list(text) + [mask_token, cfg.sop_token_id] + list(target)


def tensorboard_scalars(directory) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of the scalars a run wrote to ``directory``."""
    import tensorflow as tf

    scalars: dict[str, dict[int, float]] = {}
    for path in glob.glob(f"{directory}/events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for v in event.summary.value:
                scalars.setdefault(v.tag, {})[event.step] = float(tf.make_ndarray(v.tensor))
    return scalars


def training_workdir(run_dir, cfg: ModelConfig, params, corpus_file, vocab_size: int = 90) -> str:
    """What ``python -m glm_jax.train workdir=RUN`` leaves, built directly: ``config.yaml``
    naming a SentencePiece vocabulary trained on ``corpus_file`` (written next to RUN as
    ``sp.model``) and one orbax checkpoint (step 3) of ``params``."""
    import os

    import orbax.checkpoint as ocp

    from glm_jax.config import Config, TrainConfig, dump_config
    from glm_jax.data import build_vocab

    run_dir = str(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    vocab = build_vocab.train([str(corpus_file)], vocab_size, os.path.join(os.path.dirname(run_dir), "sp.model"))
    full = dataclasses.replace(Config(model=cfg, train=TrainConfig(seq_len=32)),
                               data=dataclasses.replace(Config().data, vocab=vocab))
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(dump_config(full))
    mngr = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"))
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params, "step": np.int32(3)})))
    mngr.wait_until_finished()
    mngr.close()
    return run_dir
