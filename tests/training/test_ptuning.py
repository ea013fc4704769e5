"""P-tuning v2 training: only the prefix encoder trains; the base it starts from comes out
bit-identical, the optimizer holds state for the prefix alone, the prefix's dropout masks
depend only on each row's index in the step (so accumulation draws the whole batch's), and
a run leaves its prefix in the authors' layout for generation."""

import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from glm_jax.config import ConfigError, load_config
from glm_jax.data.synthetic import copy_batch
from glm_jax.parallel.mesh import make_mesh
from glm_jax.training.trainer import Trainer

PTUNING = ["data.mixture=synthetic", "train.batch_size=8", "model.pre_seq_len=4", "finetune.method=ptuning",
           "train.learning_rate=0.02", "train.warmup_steps=0"]


def _trainer(path, *more):
    cfg = load_config("glm-tiny", [*PTUNING, f"train.init_from={path}", *more])
    return Trainer.build(cfg, make_mesh(cfg.mesh, jax.devices()))


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_only_the_prefix_trains_and_the_base_stays_bit_identical(pretrained):
    path, base = pretrained
    trainer = _trainer(path, "mesh.data=2", "mesh.model=4")
    state = trainer.init_state_from(path)
    prefix_before = _flat(state.params["prefix_encoder"])
    losses = []
    for i in range(3):
        state, m = trainer.train_step(state, copy_batch(trainer.cfg.model, 8, trainer.cfg.train.seq_len, seed=0, step=i))
        losses.append(float(m["loss"]))
    params = _flat(state.params)
    for k, v in _flat(base).items():
        np.testing.assert_array_equal(params[k], v, err_msg="/".join(k))  # bit for bit
    assert all(np.abs(params[("prefix_encoder",) + k] - v).max() > 0 for k, v in prefix_before.items())
    assert np.isfinite(losses).all()
    # The optimizer's moments cover the prefix encoder and nothing else.
    prefix_bytes = sum(v.nbytes for v in prefix_before.values())
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.nbytes for x in moments) == 2 * prefix_bytes
    assert int(state.step) == 3


def test_ptuning_config_errors():
    with pytest.raises(ConfigError, match="finetune.method=ptuning needs model.pre_seq_len > 0"):
        load_config("glm-tiny", ["finetune.method=ptuning"])
    with pytest.raises(ConfigError, match="model.attention_impl=pallas has no prefix keys"):
        load_config("glm-tiny", ["model.pre_seq_len=4", "model.attention_impl=pallas"])


def test_prefix_dropout_masks_each_row_by_its_index_in_the_step():
    """A slice of the batch (rows offset, offset + stride, ...) draws exactly the whole
    batch's masks for those rows; about 10% of the prefix is dropped, differently per row."""
    import jax.numpy as jnp

    from glm_jax.model import prefix
    from glm_jax.model.dropout import DropoutRows

    cfg = load_config("glm-tiny", ["model.pre_seq_len=4"]).model
    encoded = jnp.ones((4, cfg.num_layers * 2 * cfg.hidden_size))
    whole = prefix.key_values(encoded, cfg, 8, DropoutRows(jax.random.key(3), jnp.int32(0), 1))
    assert whole.shape == (cfg.num_layers, 8, 4, 2, cfg.num_heads, cfg.head_dim)
    dropped = float(jnp.mean(whole == 0))
    assert 0.07 < dropped < 0.13 and bool(jnp.any(whole[:, 0] != whole[:, 1]))
    odd = prefix.key_values(encoded, cfg, 4, DropoutRows(jax.random.key(3), jnp.int32(1), 2))
    np.testing.assert_array_equal(np.asarray(odd), np.asarray(whole[:, 1::2]))
    assert prefix.key_values(encoded, cfg, 8, None).shape[1] == 1  # no dropout: one prefix for every row


def test_a_ptuning_run_leaves_the_authors_layout_and_generates_with_it(pretrained, tmp_path, capsys):
    """train -> WORKDIR/ptuning (config.json + pytorch_model.bin) -> generate --ptuning-checkpoint."""
    import json

    from glm_jax import generate, train

    path, _ = pretrained
    work = tmp_path / "run"
    assert train.main(["model.pre_seq_len=4", "finetune.method=ptuning", f"train.init_from={path}", "data.mixture=chat",
                       "data.chat=stdlib", "train.steps=2", "train.seq_len=64", "train.eval_batches=1",
                       f"workdir={work}"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert "parameters from" in err and result["ptuning_checkpoint"] == f"{work}/ptuning"
    assert sorted(os.listdir(work / "ptuning")) == ["config.json", "pytorch_model.bin"]
    assert generate.main(["--checkpoint", path, "--ptuning-checkpoint", result["ptuning_checkpoint"], "--prompt",
                          "What does json.dumps do?", "--max-new-tokens", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(answer["ids"]) >= 1
