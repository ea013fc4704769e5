"""``python -m glm_jax.generate`` and ``python -m glm_jax.chat`` as a user runs them, on a
small training workdir with its own SentencePiece vocabulary; bad input is one line, exit 2."""

import dataclasses
import io
import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from inference_fixtures import random_params
from glm_jax import chat, generate
from glm_jax.cli import run_main
from glm_jax.config import Config, TrainConfig, dump_config
from glm_jax.data import build_vocab
from glm_jax.data.vocab import GLMVocabulary
from glm_jax.inference.text import PromptText
from glm_jax.inference.loading import load
from helpers import variant

TEXT = "\n".join(f"the quick brown fox {i} jumps over the lazy dog number {i * 7}. hello world!" for i in range(300))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What `python -m glm_jax.train workdir=DIR` leaves: config.yaml and orbax checkpoints."""
    d = tmp_path_factory.mktemp("run")
    cfg = variant("chatglm-6b", max_seq_len=48)
    with open(d / "text.txt", "w") as f:
        f.write(TEXT)
    vocab = build_vocab.train([str(d / "text.txt")], 90, str(d / "sp.model"))
    full = dataclasses.replace(Config(model=cfg, train=TrainConfig(seq_len=32)), data=dataclasses.replace(Config().data, vocab=vocab))
    (d / "config.yaml").write_text(dump_config(full))
    mngr = ocp.CheckpointManager(str(d / "checkpoints"))
    state = {"params": random_params(cfg), "step": np.int32(3)}
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    mngr.wait_until_finished()
    mngr.close()
    return str(d)


def test_generate_continues_blank_fills_and_streams(workdir, capsys):
    assert generate.main(["--checkpoint", workdir, "--prompt", "the quick brown", "--prompt", "hello", "--max-new-tokens", "6", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == ["the quick brown", "hello"]
    model = load(workdir)  # the training workdir's newest step
    cfg = model.config
    text = PromptText(GLMVocabulary(os.path.join(workdir, "sp.model"), cfg))
    want = model.generate([text.prompt_ids("the quick brown"), text.prompt_ids("hello")], 6)[:, -6:]
    for r, row in zip(lines, want):
        stop = [i for i, t in enumerate(row) if t in (cfg.eop_token_id, cfg.eos_token_id)]
        assert r["ids"] == row[: stop[0] if stop else 6].tolist()
        assert r["answer"] == text.decode(r["ids"])

    beams = ["--num-beams", "3", "--no-repeat-ngram-size", "2", "--json"]
    assert generate.main(["--checkpoint", workdir, "--prompt", "the quick brown", "--max-new-tokens", "6", *beams]) == 0
    r = json.loads(capsys.readouterr().out)
    best = model.beam_search([text.prompt_ids("the quick brown")], 6, num_beams=3, no_repeat_ngram_size=2)[0][0]
    assert r["ids"] == list(best.tokens) and r["answer"] == text.decode(r["ids"])

    assert generate.main(["--checkpoint", workdir, "--prompt", "the quick [MASK] fox [MASK] over", "--max-new-tokens", "3", "--json", "--quantize", "int8"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["blanks"]) == 2 and r["answer"].startswith("the quick")

    assert generate.main(["--checkpoint", workdir, "--prompt", "the quick brown", "--max-new-tokens", "6", "--stream"]) == 0
    assert capsys.readouterr().out == lines[0]["answer"] + "\n"


def test_chat_streams_answers_with_history(workdir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nthe fox\nclear\nhello\n"))
    assert chat.main(["--checkpoint", workdir, "--greedy", "--max-new-tokens", "5", "--quiet"]) == 0
    answers = capsys.readouterr().out.splitlines()
    assert len(answers) == 3 and answers[0] == answers[2]  # after clear, the same first round again


@pytest.mark.parametrize("args,message", [
    (["--prompt", "  "], "error: --prompt 1 is empty"),
    (["--prompt", "the quick brown fox " * 20], "error: a prompt of .* tokens is longer than the model's maximum of 48"),
    (["--prompt", "x", "--vocab", "/nonexistent.model"], "error: --vocab /nonexistent.model: no such file"),
    (["--prompt", "x", "--temperature", "0"], "error: temperature must be > 0"),
    (["--prompt", "x", "--num-beams", "0"], "error: --num-beams must be >= 1, got 0"),
    (["--prompt", "x", "--length-penalty", "2"], "error: --length-penalty is a beam search option: add --num-beams N"),
    (["--prompt", "x", "--num-beams", "2", "--sample"], "error: beam search is deterministic: drop --sample"),
    (["--prompt", "x", "--num-beams", "2", "--stream"], "error: --stream shows tokens as they are chosen"),
    (["--prompt", "x", "--vocab", "config.yaml"], "error: config.yaml is not a SentencePiece model \\(.*\\)"),
    (["--prompt", "x", "--model-parallel", "3"],
     "error: --model-parallel 3 does not divide the model's 4 attention heads and 48 MLP units; valid values: 1, 2, 4"),
])
def test_bad_input_is_one_line_and_exit_2(workdir, capsys, monkeypatch, args, message):
    import re

    monkeypatch.chdir(workdir)  # relative paths name the workdir's files
    with pytest.raises(SystemExit) as e:
        run_main(generate.main, ["--checkpoint", workdir, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(message + ".*", err[-1]) and "Traceback" not in "\n".join(err)


def test_vocabulary_that_does_not_fit_the_checkpoint(workdir, tmp_path, capsys):
    big = build_vocab.train([os.path.join(workdir, "text.txt")], 110, str(tmp_path / "big.model"))
    with pytest.raises(SystemExit) as e:
        run_main(generate.main, ["--checkpoint", workdir, "--prompt", "x", "--vocab", big])
    assert e.value.code == 2
    assert "falls on the ordinary piece" in capsys.readouterr().err
