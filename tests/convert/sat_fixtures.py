"""Small random tensor-parallel SAT checkpoints, written with torch as the authors' tools
write them, and the authors' split and merge rules restated here independently of
glm_jax.convert (MODEL.md §4.1):

- GLM-130B (``tools/convert_tp.py``): LayerNorms, row-parallel biases and ``inv_freq``
  replicated; ``attention.dense`` / ``dense_4h_to_h`` weights chunked on dim 1;
  ``dense_h_to_4h`` weight and bias chunked into 2t pieces, rank r taking pieces r and
  t + r; everything else chunked on dim 0. Quantized checkpoints quantize each rank's
  shard after splitting, ``weight_scale`` stored right after its ``weight``.
- The original GLM (``change_mp.py``): tables with 'position' in the name replicated;
  QKV weight and bias stride-3 (rank r takes the r-th piece of each third); word
  embeddings and ``dense_h_to_4h`` on dim 0; other matrices on dim 1; other vectors
  replicated.
"""

from __future__ import annotations

import os

import numpy as np
import torch

import chatglm_fixtures as fx
from glm_jax.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (config file, overrides) of the two test architectures: GLM-130B's at toy size, and the
# original GLM-Large's shrunk to the same size.
CONFIGS = {
    "glm-130b": (os.path.join(REPO, "configs", "glm-tiny.yaml"), []),
    "glm": (os.path.join(REPO, "configs", "glm-large.yaml"), [
        "model.vocab_size=160", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.mlp_dim=256",
        "model.max_seq_len=32", "train.seq_len=32", "model.mask_token_id=150", "model.gmask_token_id=151", "model.smask_token_id=152",
        "model.sop_token_id=153", "model.eop_token_id=154",
    ]),
}


def model_config(layout: str, *extra: str):
    path, overrides = CONFIGS[layout]
    return load_config(path, [*overrides, *extra]).model


def config_args(layout: str, *extra: str) -> list[str]:
    path, overrides = CONFIGS[layout]
    return ["--config", path, *overrides, *extra]


def full_state_dict(cfg, layout: str, *, dtype=torch.float32, seed: int = 0, inv_freq: bool = True) -> dict:
    """Random weights in the authors' TP=1 layout and key order (SAT fp16 models hold
    LayerNorms in the weights' dtype too)."""
    g = torch.Generator().manual_seed(seed)
    h, f, v, hd = cfg.hidden_size, cfg.mlp_dim, cfg.vocab_size, cfg.head_dim

    def n(*shape, scale=0.1, mean=0.0):
        return (mean + scale * torch.randn(*shape, generator=g)).to(dtype)

    glu = layout == "glm-130b"
    sd = {}
    if layout == "glm":
        sd["word_embeddings.weight"] = n(v, h, scale=0.5)
        sd["transformer.position_embeddings.weight"] = n(cfg.max_seq_len + 1, h, scale=0.3)
        sd["transformer.block_position_embeddings.weight"] = n(cfg.max_seq_len + 1, h, scale=0.3)
    else:
        sd["transformer.word_embeddings.weight"] = n(v, h, scale=0.5)
    for i in range(cfg.num_layers):
        p = f"transformer.layers.{i}."
        sd[p + "input_layernorm.weight"] = n(h, mean=1.0)
        sd[p + "input_layernorm.bias"] = n(h)
        if inv_freq and glu:
            sd[p + "attention.rotary_emb.inv_freq"] = (1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))).half()
        sd[p + "attention.query_key_value.weight"] = n(3 * h, h)
        sd[p + "attention.query_key_value.bias"] = n(3 * h)
        sd[p + "attention.dense.weight"] = n(h, h)
        sd[p + "attention.dense.bias"] = n(h)
        sd[p + "post_attention_layernorm.weight"] = n(h, mean=1.0)
        sd[p + "post_attention_layernorm.bias"] = n(h)
        sd[p + "mlp.dense_h_to_4h.weight"] = n(2 * f if glu else f, h)
        sd[p + "mlp.dense_h_to_4h.bias"] = n(2 * f if glu else f)
        sd[p + "mlp.dense_4h_to_h.weight"] = n(h, f)
        sd[p + "mlp.dense_4h_to_h.bias"] = n(h)
    sd["transformer.final_layernorm.weight"] = n(h, mean=1.0)
    sd["transformer.final_layernorm.bias"] = n(h)
    return sd


def _name(key: str) -> str:
    return ".".join(key.split(".")[3 if key.startswith("transformer.layers") else 1:])


def _rule(key: str, t, layout: str) -> str:
    """replicate | rows | cols | glu | qkv3 for one tensor, as the authors' scripts decide."""
    if layout == "glm-130b":
        name = _name(key).removesuffix("_scale")  # a column-parallel linear's scales split like its rows
        if name in ("input_layernorm.weight", "input_layernorm.bias", "attention.dense.bias", "post_attention_layernorm.weight",
                    "post_attention_layernorm.bias", "mlp.dense_4h_to_h.bias", "attention.rotary_emb.inv_freq",
                    "final_layernorm.weight", "final_layernorm.bias"):
            return "replicate"
        if name in ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias"):
            return "glu"
        return "cols" if name in ("attention.dense.weight", "mlp.dense_4h_to_h.weight") else "rows"
    if t.dim() == 2 and "position" not in key:
        if "query" in key:
            return "qkv3"
        return "rows" if ("word" in key or "h_to_4h" in key) else "cols"
    if t.dim() == 1 and "query_key_value" in key:
        return "qkv3"
    if t.dim() == 1 and "dense_h_to_4h" in key:
        return "rows"
    return "replicate"


def split(sd: dict, tp: int, layout: str) -> list[dict]:
    ranks = [{} for _ in range(tp)]
    for k, t in sd.items():
        rule = _rule(k, t, layout)
        for r in range(tp):
            if rule == "replicate":
                piece = t
            elif rule == "cols":
                piece = torch.chunk(t, tp, dim=1)[r]
            elif rule == "rows":
                piece = torch.chunk(t, tp, dim=0)[r]
            elif rule == "glu":
                parts = torch.chunk(t, 2 * tp, dim=0)
                piece = torch.cat([parts[r], parts[tp + r]])
            else:
                parts = torch.chunk(t, 3 * tp, dim=0)
                piece = torch.cat([parts[r], parts[tp + r], parts[2 * tp + r]])
            ranks[r][k] = piece.clone()
    return ranks


def merge(ranks: list[dict], layout: str) -> dict:
    tp, out = len(ranks), {}
    for k, t in ranks[0].items():
        rule = _rule(k, t, layout)
        parts = [r[k] for r in ranks]
        if rule == "replicate":
            out[k] = t
        elif rule in ("rows", "cols"):
            out[k] = torch.cat(parts, dim=0 if rule == "rows" else 1)
        else:
            k_parts = 2 if rule == "glu" else 3
            pieces = [torch.chunk(p, k_parts) for p in parts]
            out[k] = torch.cat([pieces[r][j] for j in range(k_parts) for r in range(tp)])
    return out


def quantize_ranks(ranks: list[dict], bits: int) -> tuple[list[dict], list[dict]]:
    """Each rank's shard of the four linears quantized as convert_tp.py does after splitting,
    and what the authors' runtime dequantizes each rank's shard to."""
    pairs = [fx.quantized_state_dict(sd, bits) for sd in ranks]
    return [q for q, _ in pairs], [d for _, d in pairs]


def save(directory: str, ranks: list[dict], *, iteration: str = "3", trackers=("latest",), metadata=None) -> str:
    step = os.path.join(directory, iteration)
    os.makedirs(step, exist_ok=True)
    for name in trackers:
        with open(os.path.join(directory, name), "w") as f:
            f.write(iteration)
    for r, sd in enumerate(ranks):
        obj = {"module": {k: v.contiguous() for k, v in sd.items()}, **(metadata or {})}
        torch.save(obj, os.path.join(step, f"mp_rank_{r:02d}_model_states.pt"))
    return directory


def load(directory: str) -> tuple[list[dict], list[dict]]:
    """(each rank's state dict, each rank's other top-level entries) of a SAT directory."""
    tracker = "latest" if os.path.exists(os.path.join(directory, "latest")) else "latest_checkpointed_iteration.txt"
    with open(os.path.join(directory, tracker)) as f:
        step = os.path.join(directory, f.read().strip())
    names = sorted(n for n in os.listdir(step) if n.startswith("mp_rank_"))
    objs = [torch.load(os.path.join(step, n), weights_only=True) for n in names]
    return [o["module"] for o in objs], [{k: v for k, v in o.items() if k != "module"} for o in objs]


def reference_state_dict(sd: dict, layout: str, cfg) -> dict[str, np.ndarray]:
    """The full state dict in tests/reference_glm.py's convention (float32, ``transformer.``
    keys, QKV rows interleaved per head): the original GLM's blocked [Q; K; V] rows are
    re-ordered head by head here."""
    out = {}
    nh, hd, h = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    for k, v in sd.items():
        if k.endswith("inv_freq"):
            continue
        a = v.float().numpy()
        if layout == "glm" and "query_key_value" in k:
            a = a.reshape((3, nh, hd) + a.shape[1:]).swapaxes(0, 1).reshape((3 * h,) + a.shape[1:])
        out[k if k.startswith("transformer.") else "transformer." + k] = a
    return out
