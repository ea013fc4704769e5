"""LoRA training: only the adapters train; the base comes out bit-identical and the
optimizer holds state for the adapters alone."""

import jax
import numpy as np
from flax import traverse_util

from glm_jax.config import load_config
from glm_jax.data.synthetic import copy_batch
from glm_jax.model import lora
from glm_jax.parallel.mesh import make_mesh
from glm_jax.training.trainer import Trainer


def test_only_the_adapters_train_and_the_base_stays_bit_identical(pretrained):
    path, base = pretrained
    cfg = load_config("glm-tiny", ["data.mixture=synthetic", "train.batch_size=8", "mesh.data=4", "mesh.model=2",
                                   "model.lora_rank=4", "model.lora_targets=qkv,dense,mlp_in,mlp_out", "model.lora_dropout=0.1",
                                   "finetune.method=lora", "train.learning_rate=0.01", "train.warmup_steps=0",
                                   f"train.init_from={path}"])
    trainer = Trainer.build(cfg, make_mesh(cfg.mesh, jax.devices()))
    state = trainer.init_state_from(path)
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(state.params).items()}
    adapters = {k: v for k, v in flat.items() if lora.is_adapter(k[-1])}
    assert len(adapters) == 8 and all(not v.any() for k, v in adapters.items() if k[-1].endswith("_lora_b"))
    for i in range(2):
        state, m = trainer.train_step(state, copy_batch(cfg.model, 8, cfg.train.seq_len, seed=0, step=i))
        assert np.isfinite(float(m["loss"]))
    after = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(state.params).items()}
    for k, v in traverse_util.flatten_dict(base).items():
        np.testing.assert_array_equal(after[k], np.asarray(v), err_msg="/".join(k))
    assert all(np.abs(after[k] - v).max() > 0 for k, v in adapters.items())
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.nbytes for x in moments) == 2 * sum(v.nbytes for v in adapters.values())


def test_a_lora_run_leaves_a_peft_adapter_that_generates_like_the_run(pretrained, tmp_path, capsys):
    """train -> WORKDIR/lora (PEFT's adapter) -> generate --lora-adapter on the base, as the run itself generates."""
    import json
    import os

    from glm_jax import generate, train

    path, _ = pretrained
    work = tmp_path / "run"
    assert train.main(["model.lora_rank=4", "model.lora_targets=qkv,mlp_out", "finetune.method=lora",
                       "train.learning_rate=0.05", f"train.init_from={path}", "data.mixture=chat", "data.chat=stdlib",
                       "train.steps=2", "train.seq_len=64", "train.eval_batches=1", f"workdir={work}"]) == 0
    out, _ = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["lora_adapter"] == f"{work}/lora"
    assert sorted(os.listdir(work / "lora")) == ["adapter_config.json", "adapter_model.safetensors"]
    answers = []
    for args in (["--checkpoint", path, "--lora-adapter", result["lora_adapter"]], ["--checkpoint", str(work)]):
        assert generate.main([*args, "--prompt", "What does json.dumps do?", "--max-new-tokens", "6", "--json"]) == 0
        answers.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ids"])
    assert answers[0] == answers[1] and len(answers[0]) >= 1
