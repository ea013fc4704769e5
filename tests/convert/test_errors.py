"""Bad input is one clear line on stderr and exit code 2, and nothing is left behind."""

import json
import os
import subprocess
import sys

import pytest
import torch

import chatglm_fixtures as fx
from glm_jax.checkpoint import store
from glm_jax.convert.__main__ import main


def run(capsys, *args) -> str:
    code = main([*args, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture
def hf_dir(tmp_path):
    hf = fx.hf_config()
    return fx.save(str(tmp_path / "hf"), hf, fx.state_dict(hf, dtype=torch.float32), shards=2)


def _rewrite_shard(directory, mutate):
    """Apply ``mutate`` to the tensors of the first shard and save it back."""
    name = "pytorch_model-00001-of-00002.bin"
    sd = torch.load(os.path.join(directory, name), weights_only=True)
    mutate(sd)
    torch.save(sd, os.path.join(directory, name))
    return sd


def _edit_config(directory, **change):
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(change)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_missing_config_json(capsys, hf_dir, tmp_path):
    os.remove(os.path.join(hf_dir, "config.json"))
    assert "no config.json" in run(capsys, "from-hf", "--src", hf_dir, "--dst", str(tmp_path / "out"))


def test_no_weight_files(capsys, tmp_path):
    os.makedirs(tmp_path / "hf")
    with open(tmp_path / "hf" / "config.json", "w") as f:
        json.dump(fx.hf_config(), f)
    assert "no weight files" in run(capsys, "from-hf", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "out"))


def test_key_missing_from_shards(capsys, hf_dir, tmp_path):
    _rewrite_shard(hf_dir, lambda sd: sd.pop("transformer.word_embeddings.weight"))
    err = run(capsys, "from-hf", "--src", hf_dir, "--dst", str(tmp_path / "out"))
    assert "tensor transformer.word_embeddings.weight is missing" in err


def test_shape_disagrees_with_config(capsys, hf_dir, tmp_path):
    _edit_config(hf_dir, inner_hidden_size=128)
    err = run(capsys, "from-hf", "--src", hf_dir, "--dst", str(tmp_path / "out"))
    assert "has shape [96, 64], but config.json implies [128, 64]" in err


def test_tensor_config_does_not_explain(capsys, hf_dir, tmp_path):
    _edit_config(hf_dir, num_layers=1)
    assert "unexpected tensor transformer.layers.1." in run(capsys, "from-hf", "--src", hf_dir, "--dst", str(tmp_path / "out"))


def test_index_names_a_missing_shard(capsys, hf_dir, tmp_path):
    os.remove(os.path.join(hf_dir, "pytorch_model-00002-of-00002.bin"))
    assert "lists pytorch_model-00002-of-00002.bin" in run(capsys, "from-hf", "--src", hf_dir, "--dst", str(tmp_path / "out"))


def test_unreadable_shard(capsys, hf_dir, tmp_path):
    with open(os.path.join(hf_dir, "pytorch_model-00001-of-00002.bin"), "wb") as f:
        f.write(b"not a torch file")
    assert "cannot be read by torch.load" in run(capsys, "from-hf", "--src", hf_dir, "--dst", str(tmp_path / "out"))


def test_quantized_checkpoint(capsys, hf_dir, tmp_path):
    _edit_config(hf_dir, quantization_bit=8)
    err = run(capsys, "from-hf", "--src", hf_dir, "--dst", str(tmp_path / "out"))
    assert "query_key_value.weight has dtype float32; expected int8" in err


def test_existing_destination_and_to_hf_source(capsys, hf_dir, tmp_path):
    os.makedirs(tmp_path / "out")
    assert "already exists" in run(capsys, "from-hf", "--src", hf_dir, "--dst", str(tmp_path / "out"))
    assert "no config.yaml" in run(capsys, "to-hf", "--src", hf_dir, "--dst", str(tmp_path / "back"))


def test_failure_midway_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    calls = []

    def failing_write(self, array, region, value):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return original(self, array, region, value)

    original = store.CheckpointWriter.write
    monkeypatch.setattr(store.CheckpointWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        main(["from-hf", "--src", hf_dir, "--dst", str(tmp_path / "out"), "--quiet"])
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_command_line_exit_code_and_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-m", "glm_jax.convert", "from-hf", "--src", str(tmp_path / "nope"), "--dst",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
