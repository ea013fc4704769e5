"""Chat fine-tuning data: the authors' prompt text, their truncation and row layout
(ChatGLM-6B ``ptuning/main.py``), and the pipeline's handling of bad lines."""

import itertools
import json
import os

import numpy as np
import pytest

from glm_jax.config import ConfigError, load_config
from glm_jax.data import chat, pipeline, tasks
from glm_jax.data import infilling as inf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def authors_row(a_ids, b_ids, max_source, max_target, ids):
    """ChatGLM-6B's preprocess_function_train for one pair, then the model's one-token label
    shift: (input_ids, {position: label predicted there}), and its 2D positions."""
    a_ids, b_ids = a_ids[: max_source - 1], b_ids[: max_target - 2]
    input_ids = a_ids + [ids.gmask, ids.sop] + b_ids + [ids.eop]
    context_length = input_ids.index(ids.sop)
    mask_position = context_length - 1
    labels = [-100] * context_length + input_ids[mask_position + 1:]
    predicted = {t: labels[t + 1] for t in range(len(labels) - 1) if labels[t + 1] != -100}
    positions = list(range(context_length)) + [mask_position] * (len(input_ids) - context_length)
    blocks = [0] * context_length + list(range(1, len(input_ids) - context_length + 1))
    return input_ids, predicted, positions, blocks


def test_rows_are_the_authors_rows_with_the_same_loss():
    cfg = load_config("glm-tiny")
    ids = inf.SpecialIds.from_model(cfg.model)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(10, 900, n)) for n in (3, 12, 0, 7, 5)]
    responses = [list(rng.integers(10, 900, n)) for n in (4, 9, 2, 0, 20)]
    flat = lambda xs: (np.concatenate([np.asarray(x, np.int32) for x in xs]),  # noqa: E731
                       np.concatenate([[0], np.cumsum([len(x) for x in xs])]))
    block, counts = inf.chat_block(*flat(prompts), *flat(responses), ids, max_source=8, max_target=10)
    assert counts == {"chat_examples": 5, "cut_prompts": 1, "cut_responses": 2, "empty_documents": 1}
    for i, (a, b) in enumerate(zip(prompts, responses)):
        s = block.sample(i)
        if not b:
            assert len(s.tokens) == 0  # nothing to learn: dropped by the converter
            continue
        input_ids, predicted, positions, blocks = authors_row(a, b, 8, 10, ids)
        # The authors' last input token, <eop>, predicts nothing and, being last under the
        # causal mask, changes nothing: here it is a target only.
        assert s.tokens.tolist() == input_ids[:-1]
        positions, blocks = positions[:-1], blocks[:-1]
        assert s.prefix_len == input_ids.index(ids.sop)  # Part A: bidirectional up to <sop>
        assert np.flatnonzero(s.loss_weights).tolist() == sorted(predicted)
        assert [int(s.targets[t]) for t in sorted(predicted)] == [predicted[t] for t in sorted(predicted)]
        assert s.positions.tolist() == positions and s.block_positions.tolist() == blocks


def test_prompt_text_follows_the_authors_training_and_chat_formats():
    history = [["你好", "你好！"], ["1+1?", "2"]]
    assert chat.training_prompt("再见", history) == "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：1+1?\n答：2\n[Round 2]\n问：再见\n答："
    assert chat.training_prompt("再见", []) == "[Round 0]\n问：再见\n答："  # a history field, even empty
    assert chat.training_prompt("再见", None) == "再见"  # no history field at all
    assert chat.chat_prompt([], "再见") == "再见"  # chat() at inference: a first round is the query
    parse = lambda obj: chat.read_example(obj, "q", "a", "h")  # noqa: E731
    assert parse({"q": "x", "a": "y"}) == ("x", "y")
    assert parse({"q": "x", "a": "y", "h": [["p", "r"]]})[0].startswith("[Round 0]\n问：p\n答：r\n[Round 1]")
    assert parse({"q": "x", "a": ""}) == "empty_documents"
    for bad in ([1], {"q": "x"}, {"q": "x", "a": 3}, {"q": "x", "a": "y", "h": [["only one"]]}, {"q": "x", "a": "y", "h": "s"}):
        assert parse(bad) == "unreadable_documents"


def _cfg(*overrides):
    return load_config("glm-tiny", ["train.seq_len=64", "train.batch_size=4", "data.mixture=chat", "data.pack=false",
                                    *overrides])


def test_chat_files_train_with_history_and_skip_bad_lines(tmp_path):
    good = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}.", "history": [["Hi", "Hello"]] * (i % 3)}
            for i in range(40)]
    lines = [json.dumps(x) for x in good] + ["not json", json.dumps({"prompt": "x"}), json.dumps({"prompt": "", "response": "y"})]
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(x) for x in good[:8]))
    cfg = _cfg(f"data.chat=jsonl:{tmp_path}/train.jsonl", f"data.chat_validation=jsonl:{tmp_path}/dev.jsonl",
               "data.max_source_len=24", "data.max_target_len=16")
    tasks.check_sources(cfg.data)
    tasks.reset_stats()
    gen = pipeline.batches(cfg)
    batches = list(itertools.islice(gen, 3))
    gen.close()
    ids = inf.SpecialIds.from_model(cfg.model)
    for b in batches:
        for r in range(4):
            n_a = int(b.prefix_len[r])
            assert b.tokens[r][n_a - 1] == ids.gmask and b.tokens[r][n_a] == ids.sop
            assert b.loss_weights[r][n_a - 1] == 1 and b.targets[r][n_a - 1] == ids.sop
            assert (b.tokens[r] == ids.eop).sum() == 0 and ids.eop in b.targets[r]
    skipped = tasks.skipped_input()
    assert skipped["unreadable_documents"] == 2 and skipped["empty_documents"] == 1
    assert tasks.STATS["chat_examples"] > 0 and skipped.get("cut_prompts", 0) > 0  # 2 rounds of history exceed 23 ids


@pytest.mark.parametrize("content, message", [
    ("", "no usable conversation in 1 file(s) (they are empty)"),
    ("oops\n" + json.dumps({"prompt": "x"}) + "\n" + json.dumps({"prompt": "", "response": "y"}),
     "no usable conversation in 1 file(s) (1 lines that are not JSON, 1 unreadable lines, 1 empty lines)"),
], ids=["empty", "all-bad"])
def test_a_chat_file_without_usable_lines_is_one_clear_error(tmp_path, content, message):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tasks.check_sources(_cfg(f"data.chat=jsonl:{tmp_path}/c.jsonl").data)


def test_chat_config_errors():
    with pytest.raises(ConfigError, match="data.mixture=chat needs data.chat=jsonl:GLOB"):
        tasks.check_sources(load_config("glm-tiny", ["data.mixture=chat"]).data)
    with pytest.raises(ConfigError, match=r"data.max_source_len \(40\) \+ data.max_target_len \(40\) exceed train.seq_len \(64\)"):
        _cfg("data.chat=stdlib", "data.max_source_len=40", "data.max_target_len=40")


def test_replay_mixes_pretraining_rows_into_chat_rows():
    cfg = _cfg("data.chat=stdlib", "data.replay_rate=0.5", "data.replay_mixture=mask")
    tasks.check_sources(cfg.data)
    gen = pipeline.batches(cfg)
    rows = [b.tokens[r] for b in itertools.islice(gen, 4) for r in range(b.tokens.shape[0])]
    gen.close()
    replayed = sum(bool((row == cfg.model.mask_token_id).any()) for row in rows)  # [MASK] never occurs in a chat row
    assert 0 < replayed < len(rows), (replayed, len(rows))
    with pytest.raises(ConfigError, match="data.replay_rate=0.2 mixes pretraining rows .* needs data.mixture=chat, not gmask"):
        load_config("glm-tiny", ["data.mixture=gmask", "data.replay_rate=0.2"])
    with pytest.raises(ConfigError, match=r"data.replay_rate must be in \[0, 1\), got 1.0"):
        _cfg("data.chat=stdlib", "data.replay_rate=1.0")
    with pytest.raises(ConfigError, match="replays pretraining rows from data.corpus, which is none"):
        tasks.check_sources(_cfg("data.chat=stdlib", "data.replay_rate=0.1", "data.corpus=none").data)
