"""Vocabulary: self-trained models, ChatGLM-style special pieces with an id offset, the CLI."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from glm_jax.config import ConfigError, load_config
from glm_jax.data.vocab import GLMVocabulary, load_vocabulary

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = load_config(os.path.join(ROOT, "configs/glm-tiny.yaml")).model


def _text(tmp_path):
    path = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "return", "value", "the", "list", "of", "items", "."]
    path.write_text("\n".join(" ".join(rng.choice(words, size=12)) for _ in range(400)))
    return path


def test_default_vocabulary_round_trips_and_places_specials():
    v = load_vocabulary(TINY)
    text = "Return the sum of two numbers. It is fast!"
    assert v.decode(v.encode(text)) == text
    assert v.text_size == 1000 and v.encode(text).max() < 1000
    assert v.decode([TINY.gmask_token_id, TINY.sop_token_id]) == "[gMASK]<sop>"
    assert v.sentence_end_table()[v.encode(".")[-1]]


def test_build_vocab_cli(tmp_path):
    out = tmp_path / "v.model"
    r = subprocess.run(
        [sys.executable, "-m", "glm_jax.data.build_vocab", "--input", str(_text(tmp_path)), "--vocab-size", "30", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    cfg = dataclasses.replace(TINY, vocab_size=64, mask_token_id=50, gmask_token_id=51, smask_token_id=52, eod_token_id=53, sop_token_id=54, eop_token_id=55, eos_token_id=56)
    v = GLMVocabulary(str(out), cfg)
    assert v.text_size == 30 and v.decode(v.encode("alpha beta.")) == "alpha beta."
    for args, message in [
        (["--input", str(tmp_path / "none*.txt"), "--vocab-size", "30"], f"error: no file matches {tmp_path}/none*.txt"),
        (["--input", str(tmp_path / "corpus.txt"), "--vocab-size", "5000"], "error: sentencepiece: "),
    ]:
        r = subprocess.run([sys.executable, "-m", "glm_jax.data.build_vocab", *args, "--output", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(message), r.stderr


def test_chatglm_style_special_pieces_with_an_offset(tmp_path):
    """Like ice_text.model: the specials are pieces of the model and image tokens sit in
    front of the text, so model id = piece id - offset (20000 for ChatGLM-6B)."""
    import sentencepiece as spm

    specials = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<eod>"]
    prefix = str(tmp_path / "ice")
    spm.SentencePieceTrainer.train(
        input=str(_text(tmp_path)), model_prefix=prefix, vocab_size=40, unk_id=0, pad_id=-1, eos_id=-1, bos_id=-1,
        user_defined_symbols=["<image_0>", "<image_1>"] + specials, minloglevel=2,
    )
    offset = 3  # <unk>, <image_0>, <image_1> precede the model's ids
    cfg = dataclasses.replace(
        TINY, vocab_size=40, mask_token_id=0, gmask_token_id=1, smask_token_id=2, pad_token_id=3,
        sop_token_id=4, eop_token_id=5, eos_token_id=5, eod_token_id=6,
    )
    v = GLMVocabulary(prefix + ".model", cfg, id_offset=offset)
    assert v.decode([cfg.gmask_token_id, cfg.sop_token_id]) == "[gMASK]<sop>"
    ids = v.encode("alpha beta")
    assert (ids >= 7).all() and v.decode(ids) == "alpha beta"
    wrong = dataclasses.replace(cfg, gmask_token_id=2, smask_token_id=1)
    with pytest.raises(ConfigError, match=r"\[gMASK\] is model id 1 \(piece 4 - offset 3\) but model.gmask_token_id=2"):
        GLMVocabulary(prefix + ".model", wrong, id_offset=offset)


def test_special_ids_may_not_fall_on_ordinary_pieces():
    path = load_vocabulary(TINY).path
    with pytest.raises(ConfigError, match="model.sop_token_id=5 falls on the ordinary piece"):
        GLMVocabulary(path, dataclasses.replace(TINY, sop_token_id=5))
