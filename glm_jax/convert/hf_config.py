"""ChatGLM-6B's Hugging Face ``config.json`` <-> glm_jax's ModelConfig (MODEL.md §2.1, §2.2).

``config.json`` gives the sizes and the special-token ids; everything else about the
ChatGLM-6B architecture is fixed by the authors' code rather than the config (post-LN
DeepNorm with alpha = sqrt(56) whatever the depth, tanh-GELU 4h MLP, untied
``lm_head``, fp16-rounded rotary ``inv_freq``), so it is set here, not read.

Fields the authors' ``ChatGLMConfig`` defaults when absent are defaulted the same way;
the defaults depend on the vocabulary (the ids moved by 20000 with the April-2023
"slim" vocabulary), and an id that falls outside the vocabulary is an error.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from glm_jax.config import ModelConfig
from glm_jax.convert.errors import ConvertError

CHATGLM_ALPHA = math.sqrt(2 * 28)  # GLMBlock's num_layers default, never overridden (MODEL.md §2.2)
LEGACY_VOCAB = 150528

# ChatGLMConfig defaults at HEAD, and before the slim vocabulary (MODEL.md §2.1).
_DEFAULTS = {
    "hidden_size": 4096,
    "num_layers": 28,
    "num_attention_heads": 32,
    "layernorm_epsilon": 1e-5,
    "max_sequence_length": 2048,
    "inner_hidden_size": 16384,
    "position_encoding_2d": True,
}
_IDS_HEAD = {"bos_token_id": 130004, "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3}
_IDS_LEGACY = {"bos_token_id": 150004, "eos_token_id": 150005, "mask_token_id": 150000, "gmask_token_id": 150001, "pad_token_id": 0}


def read_config_json(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConvertError(f"{directory}: no config.json (expected a Hugging Face ChatGLM-6B checkpoint directory)")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path} must hold a JSON object")
    return data


def _int(hf: dict, key: str, default: Any, where: str) -> int:
    v = hf.get(key, default)
    if v is None:
        v = default
    if isinstance(v, list) and len(v) == 1:  # newer HF configs may list one id
        v = v[0]
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConvertError(f"{where}: {key}={v!r} must be an integer")
    return v


def model_config(hf: dict, where: str = "config.json", *, name: Optional[str] = None) -> ModelConfig:
    """ModelConfig for a ChatGLM-6B-format checkpoint described by ``hf`` (config.json)."""
    if hf.get("model_type", "chatglm") != "chatglm":
        raise ConvertError(f"{where}: model_type={hf.get('model_type')!r}; from-hf reads ChatGLM-6B checkpoints (model_type 'chatglm')")
    if hf.get("pre_seq_len"):
        raise ConvertError(f"{where}: pre_seq_len={hf['pre_seq_len']}; P-tuning prefix encoders are not supported")
    vocab = _int(hf, "vocab_size", LEGACY_VOCAB, where)
    ids = _IDS_LEGACY if vocab == LEGACY_VOCAB else _IDS_HEAD
    get = {k: _int(hf, k, v, where) for k, v in ids.items()}
    sizes = {k: hf.get(k, v) for k, v in _DEFAULTS.items()}
    hidden = _int(hf, "hidden_size", sizes["hidden_size"], where)
    heads = _int(hf, "num_attention_heads", sizes["num_attention_heads"], where)
    layers = _int(hf, "num_layers", hf.get("num_hidden_layers", sizes["num_layers"]), where)
    inner = _int(hf, "inner_hidden_size", sizes["inner_hidden_size"], where)
    eps = hf.get("layernorm_epsilon", sizes["layernorm_epsilon"])
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise ConvertError(f"{where}: layernorm_epsilon={eps!r} must be a number")
    two_d = hf.get("position_encoding_2d", True)
    if not isinstance(two_d, bool):
        raise ConvertError(f"{where}: position_encoding_2d={two_d!r} must be true or false")
    mask, gmask, sop, eop = get["mask_token_id"], get["gmask_token_id"], get["bos_token_id"], get["eos_token_id"]
    smask = mask + 2  # tokenizer order: [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> (MODEL.md §2.1)
    for key, v in (("mask_token_id", mask), ("gmask_token_id", gmask), ("bos_token_id", sop), ("eos_token_id", eop), ("pad_token_id", get["pad_token_id"])):
        if not 0 <= v < vocab:
            raise ConvertError(f"{where}: {key}={v} is outside the vocabulary [0, {vocab}); set it in config.json")
    if not smask < vocab:
        smask = mask
    if hidden % heads:
        raise ConvertError(f"{where}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    return ModelConfig(
        name=name or hf.get("_name_or_path", "chatglm-6b").rstrip("/").split("/")[-1] or "chatglm-6b",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        mlp_dim=inner,
        max_seq_len=_int(hf, "max_sequence_length", sizes["max_sequence_length"], where),
        norm_order="post",
        residual_alpha=CHATGLM_ALPHA,
        layernorm_epsilon=float(eps),
        mlp_type="gelu",
        gelu_approximate=True,
        use_bias=True,
        tie_embeddings=False,
        position_encoding="rotary_2d" if two_d else "rotary_1d",
        rotary_base=10000.0,
        rotary_inv_freq_fp16=True,
        attention_layer_scaling=True,
        mask_token_id=mask,
        gmask_token_id=gmask,
        smask_token_id=smask,
        eod_token_id=eop,
        sop_token_id=sop,
        eop_token_id=eop,
        eos_token_id=eop,
        pad_token_id=get["pad_token_id"],
    )


def quantization_bits(hf: dict, where: str = "config.json") -> int:
    """0 for an fp16/fp32 checkpoint, else 4 or 8 (weight-only INT4/INT8 linears, MODEL.md §2.5)."""
    bits = hf.get("quantization_bit") or 0
    if bits not in (0, 4, 8):
        raise ConvertError(f"{where}: quantization_bit={bits!r}; expected 0, 4 or 8")
    if bits and hf.get("quantization_embeddings"):
        raise ConvertError(f"{where}: quantization_embeddings=true (quantized embeddings) is not supported")
    return bits


def check_representable(cfg: ModelConfig) -> None:
    """ChatGLM-6B's code can only express its own architecture; say which field is off."""
    want = {
        "norm_order": "post",
        "mlp_type": "gelu",
        "gelu_approximate": True,
        "use_bias": True,
        "tie_embeddings": False,
        "rotary_base": 10000.0,
        "rotary_inv_freq_fp16": True,
        "attention_layer_scaling": True,
    }
    for key, v in want.items():
        if getattr(cfg, key) != v:
            raise ConvertError(f"to-hf writes the ChatGLM-6B layout, which needs model.{key}={v}; this model has {getattr(cfg, key)!r}")
    if cfg.position_encoding not in ("rotary_1d", "rotary_2d"):
        raise ConvertError(f"to-hf writes the ChatGLM-6B layout (rotary positions); this model has model.position_encoding={cfg.position_encoding}")
    if not math.isclose(cfg.alpha, CHATGLM_ALPHA, rel_tol=1e-12):
        raise ConvertError(f"to-hf writes the ChatGLM-6B layout, whose residual alpha is sqrt(56); this model has {cfg.alpha}")


def hf_config(cfg: ModelConfig, torch_dtype: str, base: Optional[dict] = None, quantization_bit: int = 0) -> dict:
    """config.json for ``cfg``: the fields ChatGLMConfig reads, over ``base`` (the source's own
    config.json when known, so fields glm_jax does not model -- auto_map, versions -- survive)."""
    out = dict(base) if base else {
        "_name_or_path": "THUDM/chatglm-6b",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "model_type": "chatglm",
        "use_cache": True,
    }
    out.update({
        "bos_token_id": cfg.sop_token_id,
        "eos_token_id": cfg.eop_token_id,
        "mask_token_id": cfg.mask_token_id,
        "gmask_token_id": cfg.gmask_token_id,
        "pad_token_id": cfg.pad_token_id,
        "hidden_size": cfg.hidden_size,
        "inner_hidden_size": cfg.mlp_dim,
        "layernorm_epsilon": cfg.layernorm_epsilon,
        "max_sequence_length": cfg.max_seq_len,
        "num_attention_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "position_encoding_2d": cfg.position_encoding == "rotary_2d",
        "torch_dtype": torch_dtype,
        "vocab_size": cfg.vocab_size,
    })
    if quantization_bit or "quantization_bit" in out:
        out["quantization_bit"] = quantization_bit
    return out
