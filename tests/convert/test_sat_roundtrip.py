"""from-sat / to-sat: merging and splitting at any tensor-parallel degree is exact, both
layouts (GLM-130B's SAT and the original GLM's) and pre-quantized INT8/INT4 checkpoints
round-trip bit for bit, and converted checkpoints give the logits of the numpy
restatement of the authors' forward pass (tests/reference_glm.py)."""

import os

import numpy as np
import pytest
import torch

import sat_fixtures as sf
from glm_jax.convert import sat_layout
from glm_jax.checkpoint import directory, store
from glm_jax.convert.__main__ import main
from glm_jax.inference.loading import load
from reference_glm import authors_mask, forward


def run(*args) -> None:
    assert main([*args, "--quiet"]) == 0


def from_sat(src, dst, layout, *extra) -> str:
    run("from-sat", "--src", str(src), "--dst", str(dst), *sf.config_args(layout), *extra)
    return str(dst)


def to_sat(src, dst, tp, *extra) -> str:
    run("to-sat", "--src", str(src), "--dst", str(dst), "--tp", str(tp), *extra)
    return str(dst)


def assert_same_ranks(want: list[dict], directory: str) -> None:
    """Same rank files, keys in the same order, and every tensor's dtype, shape and bytes."""
    got, _ = sf.load(directory)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert list(g) == list(w)
        for k in w:
            assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape, k
            assert torch.equal(g[k].contiguous().view(torch.uint8), w[k].contiguous().view(torch.uint8)), k


def params(path: str) -> dict:
    """Every stored parameter leaf (and kept quantized tensor) as numpy, by path."""
    out = {}
    for sub in (directory.PARAMS, directory.QUANTIZED):
        if os.path.isdir(os.path.join(path, sub)):
            reader = store.CheckpointReader(os.path.join(path, sub))
            out.update({(sub,) + p: reader.read(p) for p in reader.leaves})
    return out


def assert_same_params(a: str, b: str) -> None:
    pa, pb = params(a), params(b)
    assert set(pa) == set(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and pa[k].shape == pb[k].shape, k
        assert pa[k].tobytes() == pb[k].tobytes(), k


def check_logits(model_dir: str, full: dict, layout: str, atol: float) -> None:
    """A [gMASK] prompt and a [MASK] blank, against the reference on the merged weights."""
    model = load(model_dir)
    cfg = model.config
    ref = sf.reference_state_dict(full, layout, cfg)
    g, m, sop = cfg.gmask_token_id, cfg.mask_token_id, cfg.sop_token_id
    for row in ([5, 6, 7, 8, 9, g, sop, 11, 12, 13], [20, 21, m, 22, 23, sop, 24, 25]):
        ctx = row.index(sop)
        mask_pos = row.index(g) if g in row else row.index(m)
        pos = np.arange(len(row))
        if layout == "glm":  # 2D: positions from <sop> on at the mask, block positions 1, 2, ... (MODEL.md §3.2)
            pos[ctx:] = mask_pos
            pos = np.stack([pos, np.concatenate([np.zeros(ctx, int), np.arange(1, len(row) - ctx + 1)])])
        elif g not in row:  # GLM-130B, 1D: [gMASK] keeps arange, [MASK] moves Part B to the mask (MODEL.md §1.6)
            pos[ctx:] = mask_pos
        want = forward(ref, cfg, np.asarray([row]), pos[None], authors_mask(len(row), ctx))[0]
        got = model.logits(np.asarray([row]))[0]
        assert np.abs(want).max() > 1.0  # real signal
        np.testing.assert_allclose(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize("layout", sat_layout.LAYOUTS)
def test_degrees_round_trip_and_logits(tmp_path, layout):
    """from-sat(tp=4) -> to-sat(tp=2) is the authors' own TP-2 split; from-sat of that gives
    the same parameters bit for bit, and to-sat(tp=4) gives back the source files."""
    cfg = sf.model_config(layout)
    full = sf.full_state_dict(cfg, layout)
    ranks4 = sf.split(full, 4, layout)
    meta = {"iteration": 3, "mp_world_size": 4}
    src = sf.save(str(tmp_path / "sat4"), ranks4, metadata=meta)
    jax4 = from_sat(src, tmp_path / "jax4", layout)
    sat2 = to_sat(jax4, tmp_path / "sat2", 2)
    assert_same_ranks(sf.split(full, 2, layout), sat2)
    assert sf.load(sat2)[1] == [{"iteration": 3, "mp_world_size": 2}] * 2
    jax2 = from_sat(sat2, tmp_path / "jax2", layout)
    assert_same_params(jax4, jax2)
    back = to_sat(jax2, tmp_path / "back4", 4)
    assert_same_ranks(ranks4, back)
    assert sf.load(back)[1] == [meta] * 4
    assert sorted(os.listdir(back)) == ["3", "latest"] and open(os.path.join(back, "latest")).read() == "3"
    check_logits(jax4, full, layout, 1e-4)


@pytest.mark.parametrize("layout", sat_layout.LAYOUTS)
def test_fp16_checkpoint_logits(tmp_path, layout):
    """A release-style fp16 checkpoint (every tensor fp16) converts, keeps fp16, and gives
    the reference's logits on the same fp16 weights."""
    cfg = sf.model_config(layout)
    full = sf.full_state_dict(cfg, layout, dtype=torch.float16, seed=1)
    src = sf.save(str(tmp_path / "sat"), sf.split(full, 2, layout), trackers=("latest_checkpointed_iteration.txt",))
    jax = from_sat(src, tmp_path / "jax", layout, "--no-scan-layers")
    model = load(jax)
    assert model.config.param_dtype == "float16" and not model.config.scan_layers
    check_logits(jax, full, layout, 1e-3)
    back = to_sat(jax, tmp_path / "back", 1)
    assert_same_ranks([full], back)
    assert sorted(os.listdir(back)) == ["3", "latest_checkpointed_iteration.txt"]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoints(tmp_path, bits):
    """INT8/INT4 ranks (quantized per shard as convert_tp.py does) are read as the authors'
    runtime dequantizes them and written back bit for bit, at their own degree and at a
    multiple of it and back; other degrees need --quantize; a dense checkpoint quantized on
    the way out is exactly convert_tp.py's quantization of each shard."""
    layout = "glm-130b"
    cfg = sf.model_config(layout)
    full = sf.full_state_dict(cfg, layout, dtype=torch.float16, seed=2)
    full["transformer.layers.0.mlp.dense_4h_to_h.weight"][:8] *= 1e-3  # subnormal fp16 scales: requantizing changes them
    q2, deq2 = sf.quantize_ranks(sf.split(full, 2, layout), bits)
    src = sf.save(str(tmp_path / "q2"), q2)
    jq = from_sat(src, tmp_path / "jq", layout)
    assert_same_ranks(q2, to_sat(jq, tmp_path / "back2", 2))

    jq4 = from_sat(to_sat(jq, tmp_path / "q4", 4), tmp_path / "jq4", layout)
    p2, p4 = params(jq), params(jq4)
    assert all(p2[k].tobytes() == p4[k].tobytes() for k in p2 if k[0] == directory.PARAMS)  # the same weights
    assert_same_ranks(q2, to_sat(jq4, tmp_path / "back2b", 2))

    # The dequantized weights are the runtime's: the fp16 shards the ranks dequantize to.
    assert_same_ranks(deq2, to_sat(jq, tmp_path / "dense2", 2, "--quantize", "0"))

    # One rank cannot hold two ranks' row-parallel scales without requantizing.
    assert main(["to-sat", "--src", jq, "--dst", str(tmp_path / "q1"), "--tp", "1", "--quiet"]) == 2
    assert not os.path.exists(tmp_path / "q1")
    q1 = to_sat(jq, tmp_path / "q1", 1, "--quantize", str(bits))
    requantized = sf.quantize_ranks([sf.merge(deq2, layout)], bits)[0][0]
    column_parallel = [{k: v for k, v in r.items() if ".query_key_value.weight" in k or ".dense_h_to_4h.weight" in k} for r in q2]
    want = {**requantized, **sf.merge(column_parallel, layout)}  # column-parallel: the source's own tensors are kept
    assert_same_ranks([{k: want[k] for k in requantized}], q1)

    # A dense checkpoint written quantized: convert_tp.py --target-tp 2 --quantization-bit-width.
    jd = from_sat(sf.save(str(tmp_path / "d4"), sf.split(full, 4, layout)), tmp_path / "jd", layout)
    assert_same_ranks(sf.quantize_ranks(sf.split(full, 2, layout), bits)[0], to_sat(jd, tmp_path / "dq2", 2, "--quantize", str(bits)))


@pytest.mark.parametrize("stride,unit", [(1, 1), (2, 1), (3, 1), (1, 6), (3, 2)])
@pytest.mark.parametrize("tp", [1, 2, 3])
def test_row_pieces_follow_the_authors_rules(stride, unit, tp):
    """Split.row_pieces agrees with the authors' chunk-and-concatenate rules for every run of rows."""
    rows = stride * tp * unit * 2
    merged = torch.arange(rows)
    chunks = torch.chunk(merged, stride * tp)
    ranks = [torch.cat([chunks[j * tp + r] for j in range(stride)]) for r in range(tp)]
    split = sat_layout.Split("rows", stride=stride, unit=unit)
    assert split.why_not((rows,), tp) is None
    for a in range(rows):
        for b in range(a + 1, rows + 1):
            got = torch.cat([ranks[r][lo:hi] for r, lo, hi in split.row_pieces(rows, tp, a, b)])
            assert torch.equal(got, merged[a:b])
    assert split.why_not((rows + stride * unit,), 2 * tp) is not None
