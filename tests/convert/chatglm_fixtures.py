"""Small random ChatGLM-6B-format Hugging Face checkpoints, written with torch as the
authors' code saves them: their key names and order, ``[out, in]`` weights, per-head
interleaved QKV rows, fp16 weights with fp32 LayerNorms (or all fp32), and the rotary
``inv_freq`` buffers computed their way.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from glm_jax.config import ModelConfig


def hf_config(vocab_size=160, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=96,
              base_id=140, **extra) -> dict:
    """A config.json like the release's, at test size; special ids start at ``base_id``."""
    cfg = {
        "_name_or_path": "THUDM/chatglm-6b",
        "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
        "bos_token_id": base_id + 4,
        "eos_token_id": base_id + 5,
        "mask_token_id": base_id,
        "gmask_token_id": base_id + 1,
        "pad_token_id": 3,
        "hidden_size": hidden_size,
        "inner_hidden_size": inner_hidden_size,
        "layernorm_epsilon": 1e-05,
        "max_sequence_length": 64,
        "model_type": "chatglm",
        "num_attention_heads": num_attention_heads,
        "num_layers": num_layers,
        "position_encoding_2d": True,
        "torch_dtype": "float16",
        "transformers_version": "4.27.1",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    cfg.update(extra)
    return cfg


def expected_model_config(hf: dict) -> ModelConfig:
    """What glm_jax should make of ``hf``, stated independently of glm_jax.convert."""
    return ModelConfig(
        name="chatglm-6b", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_layers"],
        num_heads=hf["num_attention_heads"], mlp_dim=hf["inner_hidden_size"], max_seq_len=hf["max_sequence_length"],
        norm_order="post", residual_alpha=56 ** 0.5, layernorm_epsilon=hf["layernorm_epsilon"], mlp_type="gelu",
        gelu_approximate=True, use_bias=True, tie_embeddings=False,
        position_encoding="rotary_2d" if hf["position_encoding_2d"] else "rotary_1d",
        mask_token_id=hf["mask_token_id"], gmask_token_id=hf["gmask_token_id"], smask_token_id=hf["mask_token_id"] + 2,
        eod_token_id=hf["eos_token_id"], sop_token_id=hf["bos_token_id"], eop_token_id=hf["eos_token_id"],
        eos_token_id=hf["eos_token_id"], pad_token_id=hf["pad_token_id"],
    )


def _inv_freq(hf: dict) -> torch.Tensor:
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    dim = head_dim // 2 if hf["position_encoding_2d"] else head_dim
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    return inv_freq.half()


def state_dict(hf: dict, *, dtype=torch.float16, seed: int = 0, inv_freq: bool = True) -> dict[str, torch.Tensor]:
    """Random weights in the authors' layout; LayerNorms fp32 (as released), the rest ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    h, f, v = hf["hidden_size"], hf["inner_hidden_size"], hf["vocab_size"]

    def n(*shape, scale=1.0, mean=0.0):
        return (mean + scale * torch.randn(*shape, generator=g)).to(dtype)

    def ln(shape, mean):
        return mean + 0.1 * torch.randn(shape, generator=g)  # float32

    sd = {"transformer.word_embeddings.weight": n(v, h, scale=0.5)}
    for i in range(hf["num_layers"]):
        p = f"transformer.layers.{i}."
        sd[p + "input_layernorm.weight"] = ln(h, 1.0)
        sd[p + "input_layernorm.bias"] = ln(h, 0.0)
        if inv_freq:
            sd[p + "attention.rotary_emb.inv_freq"] = _inv_freq(hf).to(torch.float16 if dtype == torch.float16 else dtype)
        sd[p + "attention.query_key_value.weight"] = n(3 * h, h, scale=0.1)
        sd[p + "attention.query_key_value.bias"] = n(3 * h, scale=0.1)
        sd[p + "attention.dense.weight"] = n(h, h, scale=0.1)
        sd[p + "attention.dense.bias"] = n(h, scale=0.1)
        sd[p + "post_attention_layernorm.weight"] = ln(h, 1.0)
        sd[p + "post_attention_layernorm.bias"] = ln(h, 0.0)
        sd[p + "mlp.dense_h_to_4h.weight"] = n(f, h, scale=0.1)
        sd[p + "mlp.dense_h_to_4h.bias"] = n(f, scale=0.1)
        sd[p + "mlp.dense_4h_to_h.weight"] = n(h, f, scale=0.1)
        sd[p + "mlp.dense_4h_to_h.bias"] = n(h, scale=0.1)
    sd["transformer.final_layernorm.weight"] = ln(h, 1.0)
    sd["transformer.final_layernorm.bias"] = ln(h, 0.0)
    sd["lm_head.weight"] = n(v, h, scale=0.5)
    return sd


def save(directory: str, hf: dict, sd: dict, *, fmt: str = "bin", shards: int = 1, index: bool = True) -> str:
    """Write config.json and the weights (``shards`` files; with an index when ``index``)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(hf, fh, indent=2)
    keys = list(sd)
    parts = [keys[i::shards] for i in range(shards)] if shards > 1 else [keys]
    # keep each shard's keys in state-dict order, as save_pretrained does
    parts = [[k for k in keys if k in set(p)] for p in parts]
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    names = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    for name, part in zip(names, parts, strict=True):
        tensors = {k: sd[k].contiguous() for k in part}
        if fmt == "bin":
            torch.save(tensors, os.path.join(directory, name))
        else:
            from safetensors.torch import save_file

            save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
    if shards > 1 and index:
        weight_map = {k: name for name, part in zip(names, parts, strict=True) for k in part}
        total = sum(t.numel() * t.element_size() for t in sd.values())
        idx = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
        with open(os.path.join(directory, idx), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    return directory


QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def authors_quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantization.py's QuantizedLinear.__init__ on an fp16 weight, with the INT4
    compression kernel's packing (even column -> high nibble) written out in torch."""
    scale = (w.abs().max(dim=-1).values / ((2 ** (bits - 1)) - 1)).half()
    q = torch.round(w / scale[:, None]).to(torch.int8)
    if bits == 4:
        q = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)).to(torch.int8)
    return q, scale


def authors_dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 4:
        hi, lo = q >> 4, (q << 4) >> 4
        q = torch.stack([hi, lo], -1).reshape(q.shape[0], -1)
    return q.half() * scale[:, None]


def quantized_state_dict(sd: dict, bits: int) -> tuple[dict, dict]:
    """(the INT8/INT4 checkpoint's tensors, the same model with the weights dequantized)."""
    qsd, dense = {}, {}
    for k, v in sd.items():
        if any(k.endswith(f".{n}.weight") for n in QUANTIZED_LINEARS):
            q, s = authors_quantize(v.half(), bits)
            qsd[k], qsd[k + "_scale"] = q, s
            dense[k] = authors_dequantize(q, s, bits)
        else:
            qsd[k] = dense[k] = v
    return qsd, dense


def load_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory (any format), for comparisons."""
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".bin"):
            out.update(torch.load(path, weights_only=True))
        elif name.endswith(".safetensors"):
            from safetensors.torch import load_file

            out.update(load_file(path))
    return out


def to_numpy_fp32(sd: dict) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in sd.items() if not k.endswith("inv_freq")}


def authors_positions_1d(row: list[int], gmask: int, mask: int, sop: int) -> np.ndarray:
    """ChatGLM-6B's get_position_ids without position_encoding_2d, restated for one row."""
    pos = np.arange(len(row))
    if gmask not in row:
        pos[row.index(sop):] = row.index(mask)
    return pos


def authors_positions_2d(row: list[int], gmask: int, mask: int, sop: int) -> np.ndarray:
    """ChatGLM-6B's get_position_ids at HEAD, restated for one unpadded row."""
    mask_tok = gmask if gmask in row else mask
    ctx = row.index(sop)
    pos = np.arange(len(row))
    pos[ctx:] = row.index(mask_tok)
    block = np.concatenate([np.zeros(ctx, int), np.arange(1, len(row) - ctx + 1)])
    return np.stack([pos, block])
