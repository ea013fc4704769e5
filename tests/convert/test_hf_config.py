"""config.json <-> ModelConfig, including the released configs' real ids."""

import math

import pytest

from chatglm_fixtures import expected_model_config, hf_config
from glm_jax.config import load_config
from glm_jax.convert import hf_config as hfc
from glm_jax.convert.errors import ConvertError

# config.json of THUDM/chatglm-6b at HEAD (MODEL.md §2.1), and before the 2023-04-06 "slim"
# vocabulary, when it had no mask ids (the code's defaults applied) and pad 20003.
RELEASE = {
    "_name_or_path": "THUDM/chatglm-6b", "architectures": ["ChatGLMModel"], "bos_token_id": 130004, "eos_token_id": 130005,
    "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3, "hidden_size": 4096, "inner_hidden_size": 16384,
    "layernorm_epsilon": 1e-05, "max_sequence_length": 2048, "model_type": "chatglm", "num_attention_heads": 32,
    "num_layers": 28, "position_encoding_2d": True, "torch_dtype": "float16", "transformers_version": "4.23.1",
    "use_cache": True, "vocab_size": 130528,
}
LEGACY = {k: v for k, v in RELEASE.items() if k not in ("mask_token_id", "gmask_token_id")}
LEGACY.update(bos_token_id=150004, eos_token_id=150005, pad_token_id=20003, vocab_size=150528)

FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "max_seq_len", "norm_order", "layernorm_epsilon",
          "mlp_type", "gelu_approximate", "use_bias", "tie_embeddings", "position_encoding", "rotary_base",
          "rotary_inv_freq_fp16", "attention_layer_scaling", "mask_token_id", "gmask_token_id", "smask_token_id",
          "eod_token_id", "sop_token_id", "eop_token_id", "eos_token_id", "pad_token_id")


def test_small_config():
    hf = hf_config()
    assert hfc.model_config(hf) == expected_model_config(hf)


@pytest.mark.parametrize("hf,yaml", [(RELEASE, "configs/chatglm-6b.yaml"), (LEGACY, "configs/chatglm-6b-legacy.yaml")])
def test_released_configs_match_ours(hf, yaml):
    got, want = hfc.model_config(hf), load_config(yaml).model
    for f in FIELDS:
        assert getattr(got, f) == getattr(want, f), f
    assert math.isclose(got.alpha, want.alpha)


@pytest.mark.parametrize("hf", [RELEASE, hf_config(), hf_config(position_encoding_2d=False)])
def test_config_json_round_trip(hf):
    assert hfc.hf_config(hfc.model_config(hf), hf["torch_dtype"], base=hf) == hf


def test_quantization_bits():
    assert hfc.quantization_bits(hf_config()) == 0
    assert hfc.quantization_bits(hf_config(quantization_bit=4)) == 4
    for bad, match in (({"quantization_bit": 3}, "quantization_bit=3"), ({"quantization_bit": 8, "quantization_embeddings": True}, "embeddings")):
        with pytest.raises(ConvertError, match=match):
            hfc.quantization_bits(hf_config(**bad))


@pytest.mark.parametrize("change,match", [
    ({"pre_seq_len": 128}, "P-tuning"),
    ({"model_type": "glm"}, "model_type='glm'"),
    ({"mask_token_id": 500}, "mask_token_id=500 is outside the vocabulary"),
    ({"num_attention_heads": 5}, "not divisible"),
    ({"num_layers": "two"}, "num_layers='two' must be an integer"),
])
def test_bad_config_json(change, match):
    with pytest.raises(ConvertError, match=match):
        hfc.model_config(hf_config(**change))
