"""from-hf -> to-hf gives back the same tensors bit for bit, and the converted checkpoint's
logits (``glm_jax.inference.loading.load(...).logits``) match the numpy restatement of the authors'
forward pass run on the original torch weights."""

import json
import os

import jax
import numpy as np
import pytest
import torch

import chatglm_fixtures as fx
from glm_jax.config import load_config
from glm_jax.checkpoint import quantized
from glm_jax.convert.__main__ import main
from glm_jax.inference.loading import load
from reference_glm import authors_mask, forward


def convert(*args) -> None:
    assert main([*args, "--quiet"]) == 0


def assert_same_tensors(want: dict, got: dict, *, ordered: bool) -> None:
    if ordered:
        assert list(got) == list(want)
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, k
        assert torch.equal(g.contiguous().view(torch.uint8), w.contiguous().view(torch.uint8)), k


def rows(hf: dict) -> list[list[int]]:
    """A [gMASK] prompt and a [MASK] blank, the second one shorter and so left-padded."""
    g, m, sop, eop = hf["gmask_token_id"], hf["mask_token_id"], hf["bos_token_id"], hf["eos_token_id"]
    return [[5, 6, 7, 8, 9, 10, g, sop, 11, 12, 13], [20, 21, m, 22, 23, sop, 24, 25, eop]]


def reference_logits(sd: dict, hf: dict, row: list[int]) -> np.ndarray:
    cfg = fx.expected_model_config(hf)
    rule = fx.authors_positions_2d if hf["position_encoding_2d"] else fx.authors_positions_1d
    pos = rule(row, hf["gmask_token_id"], hf["mask_token_id"], hf["bos_token_id"])[None]
    mask = authors_mask(len(row), row.index(hf["bos_token_id"]))
    return forward(fx.to_numpy_fp32(sd), cfg, np.asarray([row]), pos, mask)[0]


def check_logits(model_dir: str, sd: dict, hf: dict, atol: float) -> None:
    batch = rows(hf)
    width = max(len(r) for r in batch)
    ids = np.asarray([[hf["pad_token_id"]] * (width - len(r)) + r for r in batch])
    got = load(model_dir).logits(ids)
    assert got.shape == (2, width, hf["vocab_size"]) and got.dtype == np.float32
    for i, row in enumerate(batch):
        want = reference_logits(sd, hf, row)
        assert np.abs(want).max() > 1.0  # real signal
        np.testing.assert_allclose(got[i, width - len(row):], want, atol=atol, rtol=0)


CASES = {
    # name: (weights dtype, format, shards, index, logits tolerance or None)
    "fp32-bin": (torch.float32, "bin", 1, True, 1e-4),
    "fp32-bin-1d-positions": (torch.float32, "bin", 1, True, 1e-4),
    "fp16-bin-sharded": (torch.float16, "bin", 3, True, 1e-3),
    "fp16-bin-sharded-no-index": (torch.float16, "bin", 2, False, None),
    "fp16-safetensors": (torch.float16, "safetensors", 1, True, 1e-3),
    "fp32-safetensors-sharded": (torch.float32, "safetensors", 2, True, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_and_logits(tmp_path, case):
    dtype, fmt, shards, index, atol = CASES[case]
    hf = fx.hf_config(torch_dtype=str(dtype).removeprefix("torch."), position_encoding_2d="1d" not in case)
    sd = fx.state_dict(hf, dtype=dtype)
    src = fx.save(str(tmp_path / "hf"), hf, sd, fmt=fmt, shards=shards, index=index)
    convert("from-hf", "--src", src, "--dst", str(tmp_path / "jax"))
    assert sorted(os.listdir(tmp_path)) == ["hf", "jax"]  # nothing left behind
    convert("to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "back"))
    assert_same_tensors(sd, fx.load_tensors(str(tmp_path / "back")), ordered=True)
    with open(tmp_path / "back" / "config.json") as f:
        assert json.load(f) == hf
    cfg = load_config(str(tmp_path / "jax" / "config.yaml")).model
    assert cfg.param_dtype == str(dtype).removeprefix("torch.")
    if atol is not None:
        check_logits(str(tmp_path / "jax"), sd, hf, atol)


def test_unscanned_float32_and_cast_back(tmp_path):
    """--no-scan-layers and --dtype float32 give the same logits; to-hf --dtype float16
    restores the release's dtypes (fp16, LayerNorms fp32) and bits."""
    hf = fx.hf_config()
    sd = fx.state_dict(hf, dtype=torch.float16)
    src = fx.save(str(tmp_path / "hf"), hf, sd)
    convert("from-hf", "--src", src, "--dst", str(tmp_path / "jax"), "--no-scan-layers", "--dtype", "float32")
    model = load(str(tmp_path / "jax"))
    assert not model.config.scan_layers and "layers_1" in model.params
    assert all(str(x.dtype) == "float32" for x in jax.tree.leaves(model.params))
    check_logits(str(tmp_path / "jax"), sd, hf, 1e-4)  # fp16 values exactly upcast: fp32 tolerance
    convert("to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "back"), "--dtype", "float16",
            "--format", "safetensors", "--max-shard-size", "100KB")
    names = sorted(os.listdir(tmp_path / "back"))
    assert "model.safetensors.index.json" in names and len([n for n in names if n.endswith(".safetensors")]) > 1
    assert_same_tensors(sd, fx.load_tensors(str(tmp_path / "back")), ordered=False)


@pytest.mark.parametrize("vocab,yaml", [(130528, "configs/chatglm-6b.yaml"), (150528, "configs/chatglm-6b-legacy.yaml")])
def test_released_vocabularies(tmp_path, vocab, yaml):
    """The real vocabulary sizes and special ids (one layer, hidden 64)."""
    want = load_config(yaml).model
    hf = fx.hf_config(vocab_size=vocab, num_layers=1, base_id=want.mask_token_id, pad_token_id=want.pad_token_id)
    sd = fx.state_dict(hf, dtype=torch.float16)
    src = fx.save(str(tmp_path / "hf"), hf, sd, shards=2)
    convert("from-hf", "--src", src, "--dst", str(tmp_path / "jax"))
    got = load_config(str(tmp_path / "jax" / "config.yaml")).model
    for f in ("vocab_size", "mask_token_id", "gmask_token_id", "sop_token_id", "eop_token_id", "pad_token_id"):
        assert getattr(got, f) == getattr(want, f), f
    convert("to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "back"))
    assert_same_tensors(sd, fx.load_tensors(str(tmp_path / "back")), ordered=True)
    if vocab == 150528:
        check_logits(str(tmp_path / "jax"), sd, hf, 1e-3)


def test_bfloat16(tmp_path):
    """--dtype bfloat16 casts every tensor as torch does; to-hf keeps what is stored."""
    hf = fx.hf_config(torch_dtype="float32")
    sd = fx.state_dict(hf, dtype=torch.float32)
    src = fx.save(str(tmp_path / "hf"), hf, sd)
    convert("from-hf", "--src", src, "--dst", str(tmp_path / "jax"), "--dtype", "bfloat16")
    convert("to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "back"))
    want = {k: v if k.endswith("inv_freq") else v.to(torch.bfloat16) for k, v in sd.items()}
    assert_same_tensors(want, fx.load_tensors(str(tmp_path / "back")), ordered=True)
    got = load(str(tmp_path / "jax")).logits(np.asarray([rows(hf)[0]]))
    want_logits = reference_logits(sd, hf, rows(hf)[0])
    assert np.abs(got[0] - want_logits).max() < 0.05 * np.abs(want_logits).max()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoints(tmp_path, bits):
    """INT8/INT4 ``weight`` + ``weight_scale`` checkpoints: read (dequantized as the authors'
    runtime does), written back bit for bit, densified, and quantized from dense weights."""
    hf = fx.hf_config(quantization_bit=bits)
    dense_sd = fx.state_dict(hf, dtype=torch.float16)
    k = "transformer.layers.0.mlp.dense_h_to_4h.weight"
    dense_sd[k][:16] *= 1e-3  # rows whose fp16 scale is subnormal: requantizing them changes some scales
    qsd, deq = fx.quantized_state_dict(dense_sd, bits)
    src = fx.save(str(tmp_path / "hf"), hf, qsd, shards=2)
    convert("from-hf", "--src", src, "--dst", str(tmp_path / "jax"))
    check_logits(str(tmp_path / "jax"), deq, hf, 1e-3)

    convert("to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "back"))
    assert_same_tensors(qsd, fx.load_tensors(str(tmp_path / "back")), ordered=True)
    with open(tmp_path / "back" / "config.json") as f:
        assert json.load(f) == hf
    if bits == 8:  # requantizing would not have been enough: the kept tensors were needed
        requantized = quantized.quantize(deq[k].numpy(), 8)[1]
        assert not np.array_equal(requantized.view(np.uint16), qsd[k + "_scale"].numpy().view(np.uint16))

    convert("to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "dense"), "--quantize", "0")
    assert_same_tensors(deq, fx.load_tensors(str(tmp_path / "dense")), ordered=True)

    # A dense checkpoint quantized on the way out: exactly the authors' quantization of it.
    hf0 = fx.hf_config()
    src0 = fx.save(str(tmp_path / "hf0"), hf0, dense_sd)
    convert("from-hf", "--src", src0, "--dst", str(tmp_path / "jax0"))
    convert("to-hf", "--src", str(tmp_path / "jax0"), "--dst", str(tmp_path / "q0"), "--quantize", str(bits))
    assert_same_tensors(fx.quantized_state_dict(dense_sd, bits)[0], fx.load_tensors(str(tmp_path / "q0")), ordered=True)
