"""LoRA adapters in PEFT's format: a glm_jax LoRA run exports to an adapter that PEFT itself
loads and merges into the authors' weights as glm_jax merges them; an adapter PEFT saved
reads into glm_jax; export -> import is bit-exact; merged weights give the unmerged
logits; bad adapters are one clear line."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import chatglm_fixtures as fx
import glm_jax
from glm_jax.checkpoint import authors_layout, params, store
from glm_jax.cli import run_main
from glm_jax.config import Config, FinetuneConfig, TrainConfig
from glm_jax.convert import from_hf, lora_adapter
from glm_jax.convert.__main__ import main as convert_main
from glm_jax.convert.errors import ConvertError
from glm_jax.model import GLM, prepare_inputs

peft = pytest.importorskip("peft")

R, ALPHA, ALL = 4, 16.0, "qkv,dense,mlp_in,mlp_out"


def _write_params(dst, tree, run_config):
    os.makedirs(dst)
    writer = store.CheckpointWriter(os.path.join(dst, "params"))
    for path, value in traverse_util.flatten_dict(tree).items():
        value = np.asarray(value)
        writer.write(writer.create(path, value.shape, value.dtype, value.shape), (), value)
    writer.finish()
    params.write_config(dst, run_config.model, run_config)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A converted float32 ChatGLM-6B-format base, the authors' state dict, and a LoRA run
    over that base (all four targets, random A and B) as a params directory."""
    hf = fx.hf_config()
    sd = fx.state_dict(hf, dtype=torch.float32)
    root = tmp_path_factory.mktemp("lora")
    base = str(root / "base")
    from_hf.convert(fx.save(str(root / "hf"), hf, sd), base, progress=False)
    stored = params.open_params(params.directory.resolve(base))
    cfg = dataclasses.replace(stored.config, lora_rank=R, lora_alpha=ALPHA, lora_targets=ALL)
    rng = np.random.default_rng(5)
    flat = traverse_util.flatten_dict(stored.tree())
    for path, shape in authors_layout.leaf_shapes(cfg).items():
        if "_lora_" in path[-1]:
            flat[path] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    run = str(root / "run")
    run_cfg = Config(model=cfg, train=TrainConfig(seq_len=32, init_from=base), finetune=FinetuneConfig("lora"))
    _write_params(run, traverse_util.unflatten_dict(flat), run_cfg)
    return dict(hf=hf, sd={k: v.numpy() for k, v in sd.items()}, base=base, run=run, cfg=cfg, flat=flat, root=root)


def _authors_modules(hf, sd):
    """A torch module tree with the authors' linear names and weights, for PEFT to adapt."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            h, f = hf["hidden_size"], hf["inner_hidden_size"]
            self.attention, self.mlp = nn.Module(), nn.Module()
            self.attention.query_key_value, self.attention.dense = nn.Linear(h, 3 * h), nn.Linear(h, h)
            self.mlp.dense_h_to_4h, self.mlp.dense_4h_to_h = nn.Linear(h, f), nn.Linear(f, h)

    class CausalLM(nn.Module):  # PEFT's CAUSAL_LM wrapper looks this method up (ChatGLM's model has it); merging never calls it
        def prepare_inputs_for_generation(self, input_ids, **kwargs):
            return {"input_ids": input_ids, **kwargs}

    model = CausalLM()
    model.transformer = nn.Module()
    model.transformer.layers = nn.ModuleList([Block() for _ in range(hf["num_layers"])])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items() if k.startswith("transformer.layers.")
                           and any(m in k for m in fx.QUANTIZED_LINEARS)})
    return model


def _linears(state):
    return {k: np.asarray(v) for k, v in state.items() if any(m + ".weight" in k for m in fx.QUANTIZED_LINEARS)}


def test_an_exported_adapter_is_what_peft_loads_and_merges(setup, tmp_path):
    adapter = str(tmp_path / "adapter")
    assert convert_main(["export-lora", "--src", setup["run"], "--dst", adapter]) == 0
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", R, ALPHA)
    assert config["target_modules"] == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    assert config["base_model_name_or_path"] == setup["base"]
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    h, f = setup["hf"]["hidden_size"], setup["hf"]["inner_hidden_size"]
    assert tensors["base_model.model.transformer.layers.1.attention.query_key_value.lora_B.weight"].shape == (3 * h, R)
    assert tensors["base_model.model.transformer.layers.0.mlp.dense_4h_to_h.lora_A.weight"].shape == (R, f)
    assert len(tensors) == 2 * 4 * setup["hf"]["num_layers"] and all(t.dtype == np.float32 for t in tensors.values())

    # PEFT's own loader and merge, on the authors' linears ...
    merged_by_peft = peft.PeftModel.from_pretrained(_authors_modules(setup["hf"], setup["sd"]), adapter).merge_and_unload()
    want = _linears(merged_by_peft.state_dict())
    # ... against glm_jax's merge written in the authors' layout, through to-hf --merge-lora.
    assert convert_main(["to-hf", "--src", setup["run"], "--dst", str(tmp_path / "hf"), "--merge-lora", "--quiet"]) == 0
    from glm_jax.convert.hf_read import HFSource
    from glm_jax.convert.tensors import to_numpy

    source = HFSource(str(tmp_path / "hf"))
    got = {}
    for key in want:
        with source.open(source.infos[key].file) as fh, fh.block(key, 0, source.infos[key].shape[0]) as rows:
            got[key] = to_numpy(rows)
    assert not any("lora" in k for k in source.infos)
    for key, w in want.items():
        assert np.abs(w - setup["sd"][key]).max() > 1e-3  # the adapters changed every adapted weight
        np.testing.assert_allclose(got[key], w, rtol=0, atol=1e-6)

    # export -> import, from the PEFT directory or from the run itself, is bit-exact.
    for src in (adapter, setup["run"]):
        cfg, leaves = lora_adapter.read(src, params.open_params(params.directory.resolve(setup["base"])).config)
        assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) == (R, ALPHA, ALL)
        assert set(leaves) == {p for p in setup["flat"] if "_lora_" in p[-1]}
        for p, v in leaves.items():
            np.testing.assert_array_equal(v, setup["flat"][p])


def test_an_adapter_peft_saved_reads_in_and_merged_logits_equal_unmerged(setup, tmp_path):
    torch.manual_seed(0)
    modules = _authors_modules(setup["hf"], setup["sd"])
    model = peft.get_peft_model(modules, peft.LoraConfig(r=2, lora_alpha=6, target_modules=["query_key_value", "dense_4h_to_h"],
                                                         init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "peft"))
    want = _linears(model.merge_and_unload().state_dict())

    loaded = glm_jax.load(setup["base"], lora_adapter=str(tmp_path / "peft"))
    assert loaded.config.lora_rank == 0  # merged on load
    got = authors_layout.to_authors(jax.tree_util.tree_map(np.asarray, loaded.params), loaded.config)
    for key, w in want.items():
        np.testing.assert_allclose(got[key], w, rtol=0, atol=1e-6)

    # merge-lora (base + --adapter) gives the logits of the unmerged adapters to 1e-5.
    assert convert_main(["merge-lora", "--src", setup["base"], "--adapter", str(tmp_path / "peft"),
                         "--dst", str(tmp_path / "merged"), "--quiet"]) == 0
    base_cfg = params.open_params(params.directory.resolve(setup["base"])).config
    cfg, leaves = lora_adapter.read(str(tmp_path / "peft"), base_cfg)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) == (2, 6.0, "qkv,mlp_out")
    flat = traverse_util.flatten_dict(params.open_params(params.directory.resolve(setup["base"])).tree())
    unmerged = traverse_util.unflatten_dict({**flat, **leaves})
    row = [11, 12, 13, 14, cfg.gmask_token_id, cfg.sop_token_id, 21, 22]
    tokens = np.asarray([row])
    inputs = prepare_inputs(tokens, cfg)
    x = (tokens, inputs["positions"], inputs["prefix_len"])
    want_logits = np.asarray(GLM(cfg).apply({"params": unmerged}, *x))
    merged = glm_jax.load(str(tmp_path / "merged"))
    assert merged.config.lora_rank == 0 and not (tmp_path / "merged" / "params" / "layers.block.attention.qkv_lora_a").exists()
    np.testing.assert_allclose(merged.logits(tokens), want_logits, rtol=0, atol=1e-5 * np.abs(want_logits).max())
    plain = glm_jax.load(setup["base"]).logits(tokens)
    assert np.abs(plain - want_logits).max() > 1e-2
    # A LoRA run loads with its own adapters merged.
    want_run = np.asarray(GLM(setup["cfg"]).apply({"params": traverse_util.unflatten_dict(setup["flat"])}, *x))
    got_run = glm_jax.load(setup["run"]).logits(tokens)
    np.testing.assert_allclose(got_run, want_run, rtol=0, atol=1e-5 * np.abs(want_run).max())


def _bad_adapter(tmp_path, name, edit_config=None, edit_tensors=None):
    src = str(tmp_path / "good")
    if not os.path.isdir(src):
        raise AssertionError("export the good adapter first")
    dst = str(tmp_path / name)
    os.makedirs(dst)
    config = json.load(open(os.path.join(src, "adapter_config.json")))
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    if edit_config:
        edit_config(config)
    if edit_tensors:
        edit_tensors(tensors)
    json.dump(config, open(os.path.join(dst, "adapter_config.json"), "w"))
    save_file(tensors, os.path.join(dst, "adapter_model.safetensors"))
    return dst


def test_bad_adapters_and_lora_runs_are_one_clear_line(setup, tmp_path, capsys):
    assert convert_main(["export-lora", "--src", setup["run"], "--dst", str(tmp_path / "good"), "--quiet"]) == 0
    key = "base_model.model.transformer.layers.0.attention.query_key_value."

    def other_rank(t):
        for k in list(t):
            t[k] = t[k][:2] if ".lora_A." in k else t[k][:, :2]

    cases = {
        "rank": (_bad_adapter(tmp_path, "rank", edit_tensors=other_rank), r"r=4, but .*has rank 2 .*another rank"),
        "layers": (_bad_adapter(tmp_path, "layers", edit_tensors=lambda t: t.update(
            {k.replace("layers.1.", "layers.5."): v for k, v in t.items()})), "layers.5.* has no place .* another architecture"),
        "width": (_bad_adapter(tmp_path, "width", edit_tensors=lambda t: t.update(
            {key + "lora_A.weight": np.zeros((R, 32), np.float32)})), r"has shape \[4, 32\].* another architecture"),
        "module": (_bad_adapter(tmp_path, "module", edit_config=lambda c: c.update(target_modules=["q_proj", "v_proj"])),
                   "target_modules names q_proj, v_proj, which this model does not have"),
        "dora": (_bad_adapter(tmp_path, "dora", edit_config=lambda c: c.update(use_dora=True)), "use_dora=True is not supported"),
    }
    base = setup["base"]
    for name, (adapter, message) in cases.items():
        with pytest.raises(ConvertError, match=message):
            glm_jax.load(base, lora_adapter=adapter)
        dst = tmp_path / f"out-{name}"
        assert convert_main(["merge-lora", "--src", base, "--adapter", adapter, "--dst", str(dst), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and not dst.exists(), (name, err)
    from glm_jax import generate

    with pytest.raises(SystemExit) as e:
        run_main(generate.main, ["--checkpoint", base, "--lora-adapter", cases["rank"][0], "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "another rank" in err

    # A LoRA run has no place in the authors' layout without merging, and cannot take a second adapter.
    assert convert_main(["to-hf", "--src", setup["run"], "--dst", str(tmp_path / "hf"), "--quiet"]) == 2
    assert "pass --merge-lora" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    assert convert_main(["merge-lora", "--src", setup["run"], "--adapter", str(tmp_path / "good"),
                         "--dst", str(tmp_path / "twice"), "--quiet"]) == 2
    assert "already has LoRA adapters" in capsys.readouterr().err
    assert convert_main(["export-lora", "--src", base, "--dst", str(tmp_path / "none"), "--quiet"]) == 2
    assert "not a LoRA run" in capsys.readouterr().err and not (tmp_path / "none").exists()
