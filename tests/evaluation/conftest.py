"""One small GLM-130B-style training workdir with its own vocabulary, shared by the
evaluation tests (built once per session)."""

import json

import jax
import numpy as np
import pytest

from eval_fixtures import QUESTIONS, TEXT
from helpers import init_params, randomize, training_workdir, variant


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """A small GLM-130B-style training workdir with its own vocabulary, a task file and its data."""
    d = tmp_path_factory.mktemp("eval")
    cfg = variant("glm-130b", max_seq_len=64)
    (d / "text.txt").write_text(TEXT)
    params = jax.tree.map(np.asarray, randomize(init_params(cfg), seed=2, scale=2.0))
    training_workdir(d / "run", cfg, params, d / "text.txt")
    for group, lines in {"a": QUESTIONS, "b": QUESTIONS[::-1] * 2}.items():
        (d / "data" / "toy" / group).mkdir(parents=True)
        (d / "data" / "toy" / group / "x.jsonl").write_text("\n".join(
            json.dumps({"inputs_pretokenized": q, "choices_pretokenized": c, "label": y}) for q, c, y in lines))
    (d / "toy.yaml").write_text('name: "toy"\ntype: "mul"\npath: "toy"\nfile-pattern:\n  a: "a/*.jsonl"\n  b: "b/*.jsonl"\n'
                                "max_seq_length: 64\n")
    return d


