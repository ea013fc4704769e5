"""One small GLM-130B-style training workdir with its own vocabulary, shared by the
evaluation tests (built once per session)."""

import dataclasses
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from eval_fixtures import QUESTIONS, TEXT
from glm_jax.config import Config, TrainConfig, dump_config
from glm_jax.data import build_vocab
from helpers import init_params, randomize, variant


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """A small GLM-130B-style training workdir with its own vocabulary, a task file and its data."""
    d = tmp_path_factory.mktemp("eval")
    cfg = variant("glm-130b", max_seq_len=64)
    (d / "text.txt").write_text(TEXT)
    vocab = build_vocab.train([str(d / "text.txt")], 90, str(d / "sp.model"))
    full = dataclasses.replace(Config(model=cfg, train=TrainConfig(seq_len=32)), data=dataclasses.replace(Config().data, vocab=vocab))
    (d / "run").mkdir()
    (d / "run" / "config.yaml").write_text(dump_config(full))
    mngr = ocp.CheckpointManager(str(d / "run" / "checkpoints"))
    params = jax.tree.map(np.asarray, randomize(init_params(cfg), seed=2, scale=2.0))
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params, "step": np.int32(3)})))
    mngr.wait_until_finished()
    mngr.close()
    for group, lines in {"a": QUESTIONS, "b": QUESTIONS[::-1] * 2}.items():
        (d / "data" / "toy" / group).mkdir(parents=True)
        (d / "data" / "toy" / group / "x.jsonl").write_text("\n".join(
            json.dumps({"inputs_pretokenized": q, "choices_pretokenized": c, "label": y}) for q, c, y in lines))
    (d / "toy.yaml").write_text('name: "toy"\ntype: "mul"\npath: "toy"\nfile-pattern:\n  a: "a/*.jsonl"\n  b: "b/*.jsonl"\n'
                                "max_seq_length: 64\n")
    return d


