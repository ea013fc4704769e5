"""A GLM-130B SAT checkpoint quantized per tensor-parallel rank (INT8/INT4) loads quantized
with one scale per rank for the row-parallel linears, and computes what the authors'
runtime computes: every rank's column block dequantized with its own scales."""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "convert"))
import sat_fixtures as sf  # noqa: E402
from glm_jax.checkpoint import quantized  # noqa: E402
from glm_jax.convert.__main__ import main as convert_main  # noqa: E402
from glm_jax.inference import quantize as qz  # noqa: E402
from glm_jax.inference.loading import load  # noqa: E402
from reference_glm import authors_mask, forward  # noqa: E402

LAYOUT = "glm-130b"


def _exact_ranks(ranks: list[dict], bits: int) -> list[dict]:
    """Each rank's tensors with the quantized linears as the exact products q * scale
    (float32; glm_jax's numerics) and everything else as stored."""
    out = []
    for sd in ranks:
        dense = {}
        for k, v in sd.items():
            if k.endswith("_scale"):
                continue
            if quantized.is_quantized_linear(k):
                q = quantized.unpack_int4(v.numpy()) if bits == 4 else v.numpy()
                v = torch.from_numpy(q.astype(np.float32) * sd[k + "_scale"].float().numpy()[:, None])
            dense[k] = v.float()
        out.append(dense)
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_sat_checkpoint_generates_with_per_rank_scales(tmp_path, bits):
    cfg = sf.model_config(LAYOUT)
    full = sf.full_state_dict(cfg, LAYOUT, dtype=torch.float16, seed=4)
    ranks, runtime = sf.quantize_ranks(sf.split(full, 2, LAYOUT), bits)
    src = sf.save(str(tmp_path / "sat"), ranks)
    dst = str(tmp_path / "jax")
    assert convert_main(["from-sat", "--src", src, "--dst", dst, *sf.config_args(LAYOUT), "--quiet"]) == 0

    model = load(dst)
    assert qz.is_quantized(model.params) == bits
    layer = model.params["layers_0"]
    assert layer["attention"]["out_kernel"].groups == 2 and layer["mlp"]["wo_kernel"].groups == 2  # row-parallel: per rank
    assert layer["attention"]["qkv_kernel"].groups == 1 and layer["mlp"]["wi_kernel"].groups == 1
    # The release's own bytes and per-rank scales come back out.
    merged = sf.merge([{k: v for k, v in r.items() if quantized.is_quantized_linear(k)} for r in ranks], LAYOUT)
    for key, w, s in qz.to_authors(model.params, model.config):
        np.testing.assert_array_equal(w, merged[key].numpy())
        scales = [{key + "_scale": r[key + "_scale"]} for r in ranks]
        want_scale = np.stack([r[key + "_scale"].numpy() for r in ranks]) if s.ndim == 2 else sf.merge(scales, LAYOUT)[key + "_scale"].numpy()
        np.testing.assert_array_equal(s.view(np.uint16), want_scale.view(np.uint16))

    g, sop = cfg.gmask_token_id, cfg.sop_token_id
    row = [5, 6, 7, 8, 9, g, sop, 11, 12]
    ctx = row.index(sop)
    exact = sf.reference_state_dict(sf.merge(_exact_ranks(ranks, bits), LAYOUT), LAYOUT, cfg)
    authors = sf.reference_state_dict(sf.merge(runtime, LAYOUT), LAYOUT, cfg)  # fp16(q * scale) per rank
    args = (cfg, np.asarray([row]), np.arange(len(row))[None], authors_mask(len(row), ctx))
    want, runtime_logits = forward(exact, *args)[0], forward(authors, *args)[0]
    got = model.logits(np.asarray([row]))[0]
    assert np.abs(want).max() > 1.0  # real signal
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got, runtime_logits, atol=2e-2, rtol=0)  # the fp16 rounding of each dequantized weight

    # Generation (the cached loop, streaming matmuls on a CPU) runs on the same weights.
    out = model.generator.generate([row[: ctx + 1]], 1, stop_tokens=[])
    assert out[0, -1] == int(np.argmax(want[ctx]))
