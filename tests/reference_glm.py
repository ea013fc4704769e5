"""An independent numpy re-statement of the authors' GLM forward pass, written from
docs/MODEL.md (not from glm_jax's model code), for numerical checks.

It works the way the authors' PyTorch code does: torch-layout ``[out, in]`` weights with
the per-head interleaved QKV rows, a dense boolean mask (True = masked) built with their
``tril`` + visible-context-columns rule, the -10000 fill, the c = layer+1 scaling of the
fp32 softmax, rotary tables computed from fp16-rounded inv_freq and gathered by position.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from glm_jax.config import ModelConfig


# ---------------------------------------------------------------------------
# Mapping glm_jax parameters to the authors' state-dict layout.


def _layer(params: dict, cfg: ModelConfig, i: int) -> dict:
    if cfg.scan_layers:
        stacked = params["layers"]["block"]
        import jax

        return jax.tree.map(lambda x: np.asarray(x)[i], stacked)
    return params[f"layers_{i}"]


def authors_state_dict(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """glm_jax params -> authors' key names and ``[out, in]`` layouts (float32 numpy)."""
    h, nh, hd, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    a = lambda x: np.asarray(x, np.float32)  # noqa: E731
    sd = {"transformer.word_embeddings.weight": a(params["word_embeddings"])}
    if cfg.position_encoding == "learned_2d":
        sd["transformer.position_embeddings.weight"] = a(params["position_embeddings"])
        sd["transformer.block_position_embeddings.weight"] = a(params["block_position_embeddings"])
    for i in range(cfg.num_layers):
        p = _layer(params, cfg, i)
        pre = f"transformer.layers.{i}."
        sd[pre + "input_layernorm.weight"] = a(p["input_layernorm"]["scale"])
        sd[pre + "input_layernorm.bias"] = a(p["input_layernorm"]["bias"])
        sd[pre + "post_attention_layernorm.weight"] = a(p["post_attention_layernorm"]["scale"])
        sd[pre + "post_attention_layernorm.bias"] = a(p["post_attention_layernorm"]["bias"])
        at, mlp = p["attention"], p["mlp"]
        # [h, 3, nh, hd] -> rows ordered (head, q|k|v, dim): [nh, 3, hd, h] -> [3h, h]
        sd[pre + "attention.query_key_value.weight"] = a(at["qkv_kernel"]).transpose(2, 1, 3, 0).reshape(3 * h, h)
        sd[pre + "attention.query_key_value.bias"] = a(at["qkv_bias"]).transpose(1, 0, 2).reshape(3 * h)
        sd[pre + "attention.dense.weight"] = a(at["out_kernel"]).reshape(nh * hd, h).T
        sd[pre + "attention.dense.bias"] = a(at["out_bias"])
        if cfg.mlp_type == "geglu":
            sd[pre + "mlp.dense_h_to_4h.weight"] = a(mlp["wi_kernel"]).transpose(1, 2, 0).reshape(2 * f, h)
            sd[pre + "mlp.dense_h_to_4h.bias"] = a(mlp["wi_bias"]).reshape(2 * f)
        else:
            sd[pre + "mlp.dense_h_to_4h.weight"] = a(mlp["wi_kernel"]).T
            sd[pre + "mlp.dense_h_to_4h.bias"] = a(mlp["wi_bias"])
        sd[pre + "mlp.dense_4h_to_h.weight"] = a(mlp["wo_kernel"]).T
        sd[pre + "mlp.dense_4h_to_h.bias"] = a(mlp["wo_bias"])
    sd["transformer.final_layernorm.weight"] = a(params["final_layernorm"]["scale"])
    sd["transformer.final_layernorm.bias"] = a(params["final_layernorm"]["bias"])
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = a(params["lm_head"]).T
    if cfg.pre_seq_len:
        enc, pre = params["prefix_encoder"], "transformer.prefix_encoder."
        sd[pre + "embedding.weight"] = a(enc["embedding"])
        if cfg.prefix_projection:
            for n in ("0", "2"):
                sd[pre + f"trans.{n}.weight"] = a(enc[f"trans_{n}_kernel"]).T
                sd[pre + f"trans.{n}.bias"] = a(enc[f"trans_{n}_bias"])
    return sd


def prompt_key_values(sd: dict, cfg: ModelConfig, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """ChatGLM-6B's get_prompt (dropout off): PrefixEncoder(arange(P)) viewed as
    ``[b, P, 2 * layers, heads, head_dim]``, permuted to ``[2 * layers, P, b, heads,
    head_dim]`` and split in pairs: one (key, value) per layer, here as ``[b, P, heads, head_dim]``."""
    pre = "transformer.prefix_encoder."
    out = sd[pre + "embedding.weight"][np.arange(cfg.pre_seq_len)]
    if cfg.prefix_projection:
        out = np.tanh(out @ sd[pre + "trans.0.weight"].T + sd[pre + "trans.0.bias"])
        out = out @ sd[pre + "trans.2.weight"].T + sd[pre + "trans.2.bias"]
    out = np.broadcast_to(out[None], (batch, *out.shape))
    kv = out.reshape(batch, cfg.pre_seq_len, 2 * cfg.num_layers, cfg.num_heads, cfg.head_dim).transpose(2, 1, 0, 3, 4)
    return [(kv[2 * i].transpose(1, 0, 2, 3), kv[2 * i + 1].transpose(1, 0, 2, 3)) for i in range(cfg.num_layers)]


# ---------------------------------------------------------------------------
# The authors' masks (True = masked), built their way.


def authors_mask(seq_len: int, context_length: int) -> np.ndarray:
    """ones -> tril -> columns [:context_length] visible -> (< 0.5). ``[1, 1, L, L]``."""
    m = np.tril(np.ones((seq_len, seq_len), np.float32))
    m[:, :context_length] = 1
    return (m < 0.5)[None, None]


# ---------------------------------------------------------------------------
# Forward.


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_erf(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def _rotary_tables(dim: int, max_pos: int, base: float):
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    inv_freq = inv_freq.astype(np.float16).astype(np.float32)  # the authors' .half()
    t = np.arange(max_pos, dtype=np.float32)
    freqs = np.einsum("i,j->ij", t, inv_freq)
    emb = np.concatenate([freqs, freqs], -1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], -1)


def _apply_rotary(x, cos, sin, pos):
    # x: [b, L, nh, d]; pos: [b, L]
    c = cos[pos][:, :, None, :]
    s = sin[pos][:, :, None, :]
    return x * c + _rotate_half(x) * s


def forward(sd: dict, cfg: ModelConfig, tokens: np.ndarray, position_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """tokens ``[b, L]``; position_ids ``[b, L]`` or ``[b, 2, L]``; mask ``[b|1, 1, L, L]`` True = masked."""
    h, nh, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    n_layers, eps = cfg.num_layers, cfg.layernorm_epsilon
    alpha = cfg.alpha
    x = sd["transformer.word_embeddings.weight"][tokens]
    if cfg.position_encoding == "learned_2d":
        x = x + sd["transformer.position_embeddings.weight"][position_ids[:, 0]]
        x = x + sd["transformer.block_position_embeddings.weight"][position_ids[:, 1]]
    b, L = tokens.shape
    max_pos = int(position_ids.max()) + 1
    past = prompt_key_values(sd, cfg, b) if cfg.pre_seq_len else None
    if past is not None:  # the prefix columns: visible to every token
        mask = np.concatenate([np.zeros((*mask.shape[:3], cfg.pre_seq_len), bool), np.broadcast_to(mask, (*mask.shape[:3], L))], -1)
    for i in range(n_layers):
        p = lambda n: sd[f"transformer.layers.{i}.{n}"]  # noqa: E731

        def attention(hidden):
            mixed = hidden @ p("attention.query_key_value.weight").T + p("attention.query_key_value.bias")
            mixed = mixed.reshape(b, L, nh, 3 * hd)
            q, k, v = np.split(mixed, 3, axis=-1)
            if cfg.position_encoding == "rotary_1d":
                cos, sin = _rotary_tables(hd, max_pos, cfg.rotary_base)
                q, k = _apply_rotary(q, cos, sin, position_ids), _apply_rotary(k, cos, sin, position_ids)
            elif cfg.position_encoding == "rotary_2d":
                cos, sin = _rotary_tables(hd // 2, max_pos, cfg.rotary_base)
                pos, blk = position_ids[:, 0], position_ids[:, 1]
                q1, q2 = np.split(q, 2, axis=-1)
                k1, k2 = np.split(k, 2, axis=-1)
                q = np.concatenate([_apply_rotary(q1, cos, sin, pos), _apply_rotary(q2, cos, sin, blk)], -1)
                k = np.concatenate([_apply_rotary(k1, cos, sin, pos), _apply_rotary(k2, cos, sin, blk)], -1)
            if past is not None:  # the layer's past keys and values go in front, with no rotary
                k, v = np.concatenate([past[i][0], k], 1), np.concatenate([past[i][1], v], 1)
            coeff = float(i + 1) if cfg.attention_layer_scaling else 1.0
            q = q / (math.sqrt(hd) * coeff)
            scores = np.einsum("bqhd,bkhd->bhqk", q, k)
            scores = np.where(mask, np.float32(-10000.0), scores)
            scores = scores.astype(np.float32) * coeff
            scores = scores - scores.max(-1, keepdims=True)
            probs = np.exp(scores)
            probs = probs / probs.sum(-1, keepdims=True)
            ctx = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, L, h)
            return ctx @ p("attention.dense.weight").T + p("attention.dense.bias")

        def mlp(hidden):
            u = hidden @ p("mlp.dense_h_to_4h.weight").T + p("mlp.dense_h_to_4h.bias")
            if cfg.mlp_type == "geglu":
                x1, x2 = np.split(u, 2, axis=-1)
                act = x1 * _gelu_erf(x2)
            else:
                act = _gelu_tanh(u) if cfg.gelu_approximate else _gelu_erf(u)
            return act @ p("mlp.dense_4h_to_h.weight").T + p("mlp.dense_4h_to_h.bias")

        ln_in = lambda t: _layer_norm(t, p("input_layernorm.weight"), p("input_layernorm.bias"), eps)  # noqa: E731
        ln_post = lambda t: _layer_norm(t, p("post_attention_layernorm.weight"), p("post_attention_layernorm.bias"), eps)  # noqa: E731
        if cfg.norm_order == "post":
            a = ln_in(x)
            y = a * alpha + attention(a)
            bb = ln_post(y)
            x = bb * alpha + mlp(bb)
        else:
            y = x + attention(ln_in(x))
            x = y + mlp(ln_post(y))
    x = _layer_norm(x, sd["transformer.final_layernorm.weight"], sd["transformer.final_layernorm.bias"], eps)
    if cfg.tie_embeddings:
        return x @ sd["transformer.word_embeddings.weight"].T
    return x @ sd["lm_head.weight"].T
