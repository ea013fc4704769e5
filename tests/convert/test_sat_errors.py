"""Bad SAT input is one clear line naming the file and the tensor, exit code 2, and no
output directory, partial or otherwise."""

import os
import shutil

import pytest
import torch

import sat_fixtures as sf
from glm_jax.convert import hf_write
from glm_jax.convert.__main__ import main

LAYOUT = "glm-130b"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A 4-rank fp32 checkpoint of the tiny GLM-130B-style model, and its conversion."""
    base = tmp_path_factory.mktemp("sat")
    cfg = sf.model_config(LAYOUT)
    src = sf.save(str(base / "sat"), sf.split(sf.full_state_dict(cfg, LAYOUT), 4, LAYOUT))
    assert main(["from-sat", "--src", src, "--dst", str(base / "jax"), *sf.config_args(LAYOUT), "--quiet"]) == 0
    return src, str(base / "jax")


@pytest.fixture
def sat_dir(converted, tmp_path):
    return shutil.copytree(converted[0], tmp_path / "sat")


def fails(capsys, tmp_path, *args) -> str:
    """Run the CLI expecting exit code 2 with one ``error:`` line, and no output left behind."""
    code = main([*args, "--dst", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")]
    return err


def from_sat(capsys, tmp_path, src, *extra) -> str:
    return fails(capsys, tmp_path, "from-sat", "--src", str(src), *sf.config_args(LAYOUT), *extra)


def rank_path(directory, rank: int) -> str:
    return os.path.join(directory, "3", f"mp_rank_{rank:02d}_model_states.pt")


def rewrite(directory, rank: int, mutate) -> None:
    obj = torch.load(rank_path(directory, rank), weights_only=True)
    mutate(obj["module"])
    torch.save(obj, rank_path(directory, rank))


def test_missing_latest(capsys, tmp_path, sat_dir):
    os.remove(os.path.join(sat_dir, "latest"))
    assert "no 'latest' file" in from_sat(capsys, tmp_path, sat_dir)


def test_missing_rank_file(capsys, tmp_path, sat_dir):
    os.remove(rank_path(sat_dir, 1))
    err = from_sat(capsys, tmp_path, sat_dir)
    assert "mp_rank_01_model_states.pt is missing (found ranks 00, 02, 03)" in err


def test_missing_last_rank_file(capsys, tmp_path, sat_dir):
    os.remove(rank_path(sat_dir, 3))
    err = from_sat(capsys, tmp_path, sat_dir)
    assert "transformer.word_embeddings.weight has shape [256, 64] on each of 3 ranks, [768, 64] merged" in err
    assert "4 ranks would match it: is mp_rank_03_model_states.pt missing?" in err


def test_ranks_disagree_on_shape(capsys, tmp_path, sat_dir):
    key = "transformer.layers.1.attention.query_key_value.weight"
    rewrite(sat_dir, 2, lambda sd: sd.__setitem__(key, sd[key][:24].clone()))
    err = from_sat(capsys, tmp_path, sat_dir)
    assert rank_path(sat_dir, 2) in err and f"{key} is float32[24, 64]" in err and "(ranks disagree)" in err


def test_truncated_rank_file(capsys, tmp_path, sat_dir):
    path = rank_path(sat_dir, 1)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    err = from_sat(capsys, tmp_path, sat_dir)
    assert path in err and "cannot be read by torch.load" in err


def test_unknown_key(capsys, tmp_path, sat_dir):
    for r in range(4):
        rewrite(sat_dir, r, lambda sd: sd.__setitem__("transformer.layers.0.attention.extra.weight", torch.zeros(2)))
    err = from_sat(capsys, tmp_path, sat_dir)
    assert rank_path(sat_dir, 0) in err and "unexpected tensor transformer.layers.0.attention.extra.weight" in err


def test_shape_disagrees_with_config(capsys, tmp_path, sat_dir):
    err = from_sat(capsys, tmp_path, sat_dir, "model.mlp_dim=88")
    assert "transformer.layers.0.mlp.dense_h_to_4h.weight has shape [88, 64] on each of 4 ranks, [352, 64] merged" in err
    assert "implies [176, 64]; the checkpoint's shapes say model.mlp_dim=176" in err


def test_replicated_tensor_differs_between_ranks(capsys, tmp_path, sat_dir):
    key = "transformer.final_layernorm.weight"
    rewrite(sat_dir, 3, lambda sd: sd[key].add_(1.0))
    err = from_sat(capsys, tmp_path, sat_dir)
    assert rank_path(sat_dir, 3) in err and f"{key} differs from" in err


def test_config_of_another_layout(capsys, tmp_path, sat_dir):
    err = fails(capsys, tmp_path, "from-sat", "--src", str(sat_dir), *sf.config_args("glm"))
    assert "GLM-130B's SAT layout" in err and "model.norm_order=post" in err


def test_degree_that_does_not_divide(capsys, tmp_path, converted):
    err = fails(capsys, tmp_path, "to-sat", "--src", converted[1], "--tp", "3")
    assert "to-sat --tp 3: transformer.word_embeddings.weight [1024, 64] cannot be split 3 ways" in err
    err = fails(capsys, tmp_path, "to-sat", "--src", converted[1], "--tp", "8")
    assert "query_key_value.weight [192, 64] cannot be split 8 ways" in err and "whole runs of 48 (one head)" in err


def test_int4_splits_on_byte_boundaries(capsys, tmp_path):
    """dense_4h_to_h has 44 input columns: 4 ranks of 11 cannot share INT4 bytes (two columns each)."""
    cfg = sf.model_config(LAYOUT, "model.mlp_dim=44")
    src = sf.save(str(tmp_path / "sat"), [sf.full_state_dict(cfg, LAYOUT, dtype=torch.float16)])
    assert main(["from-sat", "--src", src, "--dst", str(tmp_path / "jax"), *sf.config_args(LAYOUT, "model.mlp_dim=44"), "--quiet"]) == 0
    err = fails(capsys, tmp_path, "to-sat", "--src", str(tmp_path / "jax"), "--tp", "4", "--quantize", "4")
    assert "mlp.dense_4h_to_h.weight [64, 44] cannot be split 4 ways: INT4 packs two input columns per byte" in err
    assert main(["to-sat", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "q2"), "--tp", "2", "--quantize", "4", "--quiet"]) == 0


def test_failure_midway_leaves_nothing(tmp_path, converted, monkeypatch):
    calls = []
    original = hf_write.BinWriter.write

    def failing_write(self, key, value):
        calls.append(key)
        if len(calls) == 20:
            raise OSError("disk full")
        return original(self, key, value)

    monkeypatch.setattr(hf_write.BinWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        main(["to-sat", "--src", converted[1], "--dst", str(tmp_path / "out"), "--tp", "2", "--quiet"])
    assert os.listdir(tmp_path) == []


def test_original_glm_needs_a_config_of_its_size(capsys, tmp_path):
    """Without --config an original-GLM checkpoint takes the shipped config of its width and
    depth; a checkpoint of another size is told to pass one."""
    cfg = sf.model_config("glm")
    src = sf.save(str(tmp_path / "sat"), [sf.full_state_dict(cfg, "glm")])
    err = fails(capsys, tmp_path, "from-sat", "--src", src)
    assert "hidden size 64 and 2 layers, which no shipped config (glm-large.yaml, glm-10b.yaml) has: pass --config" in err
