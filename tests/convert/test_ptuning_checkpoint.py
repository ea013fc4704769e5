"""P-tuning v2 checkpoints in the authors' layout: a prefix saved as their trainer saves it
(config.json with pre_seq_len + pytorch_model.bin of transformer.prefix_encoder.*) applied
to a converted base gives the authors' arithmetic; glm_jax's own P-tuning runs export to
that layout and read back bit for bit; disagreements are one line."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch

import chatglm_fixtures as fx
import glm_jax
from glm_jax.cli import run_main
from glm_jax.convert import from_hf, ptuning
from glm_jax.convert.errors import ConvertError
from glm_jax.model import prepare_inputs
from reference_glm import authors_mask, forward

P = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A converted float32 ChatGLM-6B-format base, and the authors' state dict it came from."""
    hf = fx.hf_config()
    sd = fx.state_dict(hf, dtype=torch.float32)
    root = tmp_path_factory.mktemp("ptuning")
    from_hf.convert(fx.save(str(root / "hf"), hf, sd), str(root / "base"), progress=False)
    return str(root / "base"), hf, {k: v.numpy() for k, v in sd.items()}, root


def authors_prefix(directory, hf, projection, *, rows=P, **config):
    """A prefix directory as the authors' trainer writes it (float32 prefix encoder only)."""
    g = torch.Generator().manual_seed(7)
    h, kv = hf["hidden_size"], hf["num_layers"] * 2 * hf["hidden_size"]
    key = "transformer.prefix_encoder."
    if projection:
        tensors = {key + "embedding.weight": torch.randn(rows, h, generator=g),
                   key + "trans.0.weight": 0.3 * torch.randn(h, h, generator=g), key + "trans.0.bias": 0.1 * torch.randn(h, generator=g),
                   key + "trans.2.weight": 0.3 * torch.randn(kv, h, generator=g), key + "trans.2.bias": 0.1 * torch.randn(kv, generator=g)}
    else:
        tensors = {key + "embedding.weight": torch.randn(rows, kv, generator=g)}
    os.makedirs(directory, exist_ok=True)
    torch.save(tensors, os.path.join(directory, "pytorch_model.bin"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**hf, "pre_seq_len": P, "prefix_projection": projection, **config}, f)
    return {k: v.numpy() for k, v in tensors.items()}


@pytest.mark.parametrize("projection", [False, True], ids=["embedding", "projection"])
def test_the_authors_prefix_on_a_converted_base_gives_the_authors_logits(base, projection, tmp_path):
    base_dir, hf, sd, _ = base
    prefix = authors_prefix(str(tmp_path / "pt"), hf, projection)
    model = glm_jax.load(base_dir, ptuning_checkpoint=str(tmp_path / "pt"))
    assert model.config.pre_seq_len == P
    cfg = model.config
    row = [11, 12, 13, 14, 15, cfg.gmask_token_id, cfg.sop_token_id, 21, 22]
    tokens = np.asarray([row])
    positions = np.asarray(prepare_inputs(tokens, cfg)["positions"])
    want_cfg = dataclasses.replace(fx.expected_model_config(hf), pre_seq_len=P, prefix_projection=projection)
    want = forward({**sd, **prefix}, want_cfg, tokens, positions, authors_mask(len(row), row.index(cfg.sop_token_id)))
    got = model.logits(tokens)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
    plain = glm_jax.load(base_dir).logits(tokens)
    assert np.abs(plain - got).max() > 1e-2  # the prefix matters


def test_a_glm_jax_ptuning_run_exports_to_the_authors_layout_and_reads_back(base, tmp_path):
    from glm_jax.config import Config, MeshConfig, TrainConfig, FinetuneConfig, dump_config
    from glm_jax.parallel.mesh import make_mesh
    from glm_jax.training.trainer import Trainer

    _, hf, _, _ = base
    base_cfg = fx.expected_model_config(hf)
    cfg = Config(model=dataclasses.replace(base_cfg, pre_seq_len=P, prefix_projection=True),
                 mesh=MeshConfig(data=1), train=TrainConfig(batch_size=1, seq_len=16), finetune=FinetuneConfig("ptuning"))
    trainer = Trainer.build(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state = trainer.init_state(seed=3)
    work = tmp_path / "run"
    work.mkdir()
    (work / "config.yaml").write_text(dump_config(cfg))
    ckpt = trainer.checkpointer(str(work))
    ckpt.save(5, state, data_rows=5, force=True, wait=True)
    ckpt.close()

    from glm_jax.convert.__main__ import main

    assert main(["export-ptuning", "--src", str(work), "--dst", str(tmp_path / "authors")]) == 0
    saved = torch.load(str(tmp_path / "authors" / "pytorch_model.bin"), weights_only=True)
    assert sorted(saved) == sorted(f"transformer.prefix_encoder.{k}" for k in (
        "embedding.weight", "trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias"))
    assert all(t.dtype == torch.float32 for t in saved.values())
    config = json.load(open(tmp_path / "authors" / "config.json"))
    assert config["pre_seq_len"] == P and config["prefix_projection"] is True and config["num_layers"] == hf["num_layers"]
    for src in (str(tmp_path / "authors"), str(work)):  # the authors' layout, or the run itself
        got_cfg, tree = ptuning.read(src, base_cfg)
        assert (got_cfg.pre_seq_len, got_cfg.prefix_projection) == (P, True)
        for k, v in state.params["prefix_encoder"].items():
            np.testing.assert_array_equal(tree[k], np.asarray(v))
    with pytest.raises(ConvertError, match="exists; pass --overwrite"):
        ptuning.export(str(work), str(tmp_path / "authors"))


def test_a_prefix_that_disagrees_is_one_clear_line(base, tmp_path, capsys):
    base_dir, hf, _, root = base
    wrong_len = str(tmp_path / "len")
    authors_prefix(wrong_len, hf, False, rows=P + 2)  # config.json says P, the tensor holds P + 2 rows
    with pytest.raises(ConvertError, match=rf"pre_seq_len={P}, but transformer.prefix_encoder.embedding.weight holds "
                                           rf"{P + 2} prefix positions"):
        glm_jax.load(base_dir, ptuning_checkpoint=wrong_len)
    other = str(tmp_path / "other")
    authors_prefix(other, fx.hf_config(num_layers=3), False, num_layers=3)
    with pytest.raises(ConvertError, match="num_layers=3, but the base model has 2 .* a prefix for another architecture"):
        glm_jax.load(base_dir, ptuning_checkpoint=other)
    from glm_jax import generate

    with pytest.raises(SystemExit) as e:
        run_main(generate.main, ["--checkpoint", base_dir, "--ptuning-checkpoint", other, "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "a prefix for another architecture" in err
