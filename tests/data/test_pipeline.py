"""The seqio pipeline end to end: determinism, resume, packing, sources and bad input."""

import itertools
import json
import os

import jax
import numpy as np
import pytest

from glm_jax.config import ConfigError, load_config
from glm_jax.data import infilling as inf
from glm_jax.data import pipeline, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cfg_with(*overrides):
    return load_config(os.path.join(ROOT, "configs/glm-tiny.yaml"), ["train.seq_len=64", "train.batch_size=4", *overrides])


def take(cfg, n, **kw):
    gen = pipeline.batches(cfg, **kw)
    out = list(itertools.islice(gen, n))
    gen.close()
    return out


def test_same_seed_same_batches_and_resume_matches_uninterrupted_run():
    cfg = cfg_with()
    full = take(cfg, 6)
    again = take(cfg, 6)
    resumed = take(cfg, 2, start_step=4)
    for a, b in list(zip(full, again)) + list(zip(full[4:], resumed)):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    other = take(cfg_with("train.seed=1"), 1)[0]
    assert not np.array_equal(other.tokens, full[0].tokens)


def _segments(row):
    seg = row.segment_ids if row.segment_ids is not None else np.ones(len(row.tokens), np.int32)
    for s in sorted(set(seg.tolist()) - {0}):
        idx = np.flatnonzero(seg == s)
        yield s, idx


def test_rows_follow_the_glm_layout_packed_and_padded():
    ids = None
    for pack in ("false", "true"):
        cfg = cfg_with(f"data.pack={pack}", "data.samples_per_row=4", "data.mixture=glm-original", "model.position_encoding=rotary_2d")
        ids = inf.SpecialIds.from_model(cfg.model)
        for batch in take(cfg, 3):
            for r in range(batch.size):
                row = batch.row(r)
                tokens, weights, pos, blk = row.tokens, row.loss_weights, row.positions[0], row.positions[1]
                if pack == "false":
                    n_a = int(row.prefix_len)
                    real = weights > 0
                    segments = [(1, np.arange(n_a + int(real.sum())))]
                else:
                    segments = list(_segments(row))
                for s, idx in segments:
                    n_a = int(row.prefix_len[s - 1]) if pack == "true" else int(row.prefix_len)
                    a, b = idx[:n_a], idx[n_a:]
                    assert (blk[a] == 0).all() and (weights[a] == 0).all() and (weights[b] == 1).all()
                    assert (blk[b] > 0).all() and tokens[b[0]] == ids.sop
                    np.testing.assert_array_equal(pos[a], np.arange(n_a))  # positions restart per segment
                    assert sum(t in (ids.mask, ids.smask, ids.gmask) for t in tokens[a]) == int((blk[b] == 1).sum())
                if pack == "true":
                    assert (row.tokens[row.segment_ids == 0] == cfg.model.pad_token_id).all()


def test_one_dimensional_models_get_the_130b_positions():
    cfg = cfg_with("data.mixture=gmask", "data.pack=false")
    b = take(cfg, 1)[0]
    assert b.positions.ndim == 2
    np.testing.assert_array_equal(b.positions[0][: int(b.prefix_len[0]) + 3], np.arange(int(b.prefix_len[0]) + 3))


def test_text_and_jsonl_sources_skip_and_count_bad_documents(tmp_path):
    text = tmp_path / "a.txt"
    text.write_bytes(b"first document here.\n\n   \nsecond \xff\xfe bytes doc.\n" + b"third document, quite long. " * 20 + b"\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "a json document."}\nnot json\n{"other": 1}\n{"text": ""}\n')
    tasks.reset_stats()
    docs = list(tasks.read_lines([str(text)], fmt="text", fields=("text",), split="train", split_by_hash=False))
    assert [d[0][:5] for d in docs] == ["first", "secon", "third"]
    assert tasks.STATS["empty_documents"] == 2 and tasks.STATS["invalid_utf8_documents"] == 1
    docs = list(tasks.read_lines([str(jsonl)], fmt="jsonl", fields=("text",), split="train", split_by_hash=False))
    assert docs == [("a json document.",)]
    assert tasks.STATS["unreadable_documents"] == 2 and tasks.STATS["empty_documents"] == 3
    # A user corpus trains end to end.
    b = take(cfg_with(f"data.corpus=text:{tmp_path}/*.txt", "data.mixture=mask", "data.pack=false"), 1)[0]
    assert b.tokens.shape == (4, 64) and b.loss_weights.sum() > 0


def test_missing_files_and_unprepared_tfds_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=f"no file matches {tmp_path}/nothing-\\*.txt"):
        take(cfg_with(f"data.corpus=text:{tmp_path}/nothing-*.txt", "data.mixture=mask"), 1)
    with pytest.raises(ConfigError, match="TFDS dataset c4/en:3.1.0 is not prepared"):
        take(cfg_with("data.corpus=tfds:c4/en:3.1.0", f"data.tfds_data_dir={tmp_path}", "data.mixture=gmask"), 1)
    with pytest.raises(ConfigError, match="data.corpus='ftp:x' is not valid"):
        cfg_with("data.corpus=ftp:x")


def test_instruction_pairs_become_gmask_examples(tmp_path):
    path = tmp_path / "inst.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."}) for i in range(50)))
    cfg = cfg_with("data.mixture=instructions", f"data.instructions=jsonl:{path}", "data.pack=false")
    ids = inf.SpecialIds.from_model(cfg.model)
    b = take(cfg, 1)[0]
    for r in range(4):
        n_a = int(b.prefix_len[r])
        assert b.tokens[r][n_a - 1] == ids.gmask and b.tokens[r][n_a] == ids.sop


def test_inspect_and_bench_commands(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, "-m", "glm_jax.data.inspect", "--mixture", "glm130b", "--n", "2", "train.seq_len=128"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "row 1:" in r.stdout and "A │" in r.stdout and "B │ <sop>" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "glm_jax.bench", "data", "--json", "--batches", "5", "--steps", "2", "train.seq_len=64"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["pipeline_tokens_per_s"] > 0 and result["train_step_tokens_per_s"] > 0 and result["ratio"] > 0


def test_each_process_reads_its_own_shard():
    cfg = cfg_with("data.mixture=gmask", "data.pack=false")
    halves = [take(cfg, 1, process_index=i, process_count=2)[0] for i in range(2)]
    assert halves[0].tokens.shape == (2, 64)  # half the global batch each
    assert not np.array_equal(halves[0].tokens, halves[1].tokens)
