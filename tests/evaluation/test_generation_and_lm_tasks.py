"""Generation and language-modelling tasks in GLM-130B's format: prompts and windows are
the authors' (their dataset code, restated), LAMBADA's answer rule, and
``python -m glm_jax.eval`` on gen, beam-search, LAMBADA and lm tasks against the model's
own generation and logits."""

import json
import math
import os
import string

import numpy as np
import pytest

from glm_jax import eval as eval_cli
from glm_jax.cli import run_main
from glm_jax.evaluation import generation, language_model, metrics
from glm_jax.evaluation.samples import Document, GenerationSample
from glm_jax.evaluation.task_config import TaskConfig
from glm_jax.inference.beam_search import BeamSearch
from glm_jax.inference.decode import layout_batch
from glm_jax.inference.loading import load
from helpers import variant


def authors_generation_sample(text, cfg, max_gen_length, use_task_mask, unidirectional):
    """GLM-130B's GenerationTaskDataset.build_generation_sample, restated:
    (tokens, position ids of the context and of the generated tokens, Part A length)."""
    mask_id = cfg.gmask_token_id if use_task_mask else cfg.mask_token_id
    token = list(text)
    if mask_id in text:
        mask_position = text.index(mask_id)
        token = token + [cfg.sop_token_id]
    else:
        mask_position = len(token)
        token = [mask_id, cfg.sop_token_id] + token if unidirectional else token + [mask_id, cfg.sop_token_id]
    n = len(token)
    position_id = list(range(n))
    target = list(range(n, n + max_gen_length))
    if not use_task_mask:
        position_id[n - 1:] = [mask_position]
        target = [mask_position] * max_gen_length
    # tril, with the context (all but <sop>) bidirectional unless unidirectional: Part A.
    return token, position_id + target, (1 if unidirectional else n - 1)


@pytest.mark.parametrize("use_task_mask, unidirectional, context", [
    (False, False, [11, 12, 13]), (True, False, [11, 12, 13]), (True, True, [11, 12, 13]),
    (False, False, [11, "MASK", 13]),
], ids=["mask", "gmask", "unidirectional", "blank"])
def test_generation_prompts_are_the_authors(use_task_mask, unidirectional, context):
    cfg = variant("glm-130b")
    context = [cfg.mask_token_id if t == "MASK" else t for t in context]
    task = TaskConfig(name="t", type="gen", path="t", use_task_mask=use_task_mask, unidirectional=unidirectional,
                      max_gen_length=4)
    ids = generation.prompt(GenerationSample(tuple(context), ((1,),)), cfg, task)
    tokens, positions, part_a = authors_generation_sample(context, cfg, 4, use_task_mask, unidirectional)
    assert ids == tokens
    batch = layout_batch([ids], cfg, 4)  # what the generator feeds the model
    assert batch.positions[0].tolist() == positions and int(batch.prefix_len[0]) == part_a


def authors_lm_windows(tokens, cfg, max_seq_length, generation_length, use_task_mask, unidirectional):
    """GLM-130B's LanguageModelTaskDataset, restated: per window (tokens, targets, loss mask,
    Part A length)."""
    n = max(math.ceil(max(len(tokens) - (max_seq_length - 1), 0) / generation_length) + 1, 1)
    mask_id = cfg.gmask_token_id if use_task_mask else cfg.mask_token_id
    out = []
    for idx in range(n):
        window = tokens[idx * generation_length: idx * generation_length + max_seq_length - 1]
        if idx == 0 or unidirectional:
            prompt, text = [], window
        else:
            k = max_seq_length - 1 - generation_length
            prompt, text = window[:k], window[k:]
        out.append((prompt + [mask_id, cfg.sop_token_id] + text[:-1], prompt + [mask_id] + text,
                    [0] * (len(prompt) + 1) + [1] * len(text), len(prompt) + 1))
    return out


@pytest.mark.parametrize("unidirectional", [False, True])
def test_lm_windows_are_the_authors(unidirectional):
    cfg = variant("glm-130b")
    doc = Document(tuple(range(1, 51)), words=40)
    rows = language_model.window_rows(doc, cfg, max_seq_length=16, generation_length=5, use_task_mask=True,
                                      unidirectional=unidirectional)
    want = authors_lm_windows(list(doc.tokens), cfg, 16, 5, True, unidirectional)
    assert len(rows) == len(want) == language_model.window_count(50, 16, 5) == 8
    scored = []
    for row, (tokens, targets, loss_mask, part_a) in zip(rows, want):
        assert row.tokens.tolist() == tokens and row.prefix_len == (part_a,)
        assert row.positions.tolist() == list(range(len(tokens)))
        (read_at, read_ids), = row.reads
        assert read_at.tolist() == [i for i, m in enumerate(loss_mask) if m]
        assert read_ids.tolist() == [t for t, m in zip(targets, loss_mask) if m]
        scored += read_ids.tolist()
    if not unidirectional:  # the windows score every token once
        assert scored == list(doc.tokens)


WORDS = ["<pad>", "the", "dog", "cat", ".", ",", "big", "x"]


def _decode(ids):
    return " ".join(WORDS[i] for i in ids)


def _encode(text):
    return [WORDS.index(w) for w in text.split()]


@pytest.mark.parametrize("hypotheses, answer", [
    ([[6, 2], [3, 5]], "cat"),  # "big dog": its second word is no punctuation; "cat ," is
    ([[6, 2], [3, 2]], "big"),  # none is: the best hypothesis's first word
    ([[2, 4, 3]], "dog"),
])
def test_lambada_takes_the_first_word_before_punctuation(hypotheses, answer):
    assert _decode(generation.lambada_answer(hypotheses, _encode, _decode)) == answer


def test_lambada_bans_every_punctuation_mark():
    """Each mark as the authors tokenize it alone, and as it follows a word (a SentencePiece
    vocabulary spells the two differently: ``▁.`` or ``▁ .`` at the start, ``.`` after a word)."""
    cfg = variant("glm-130b")

    def encode(text):  # a toy SentencePiece: "a" is [20]; a mark alone is [9 (the boundary), mark]
        ids = [20] if text.startswith("a") else [9]
        for ch in text.lstrip("a"):
            ids.append(50 + string.punctuation.index(ch) if ch != "'" else 7)
        return ids

    banned, prefixes = generation.lambada_bans(cfg, encode)
    assert len(prefixes) == 64 and (9, 50) in prefixes and (50,) in prefixes  # "!" at the start, "!" after a word
    assert set(banned) == {50 + i for i in range(32) if string.punctuation[i] != "'"} | {7}


# -- the CLI, on the shared workdir ----------------------------------------------------------

QA = [("the quick brown", "fox"), ("jumps over the lazy", "dog number"), ("hello", "world")]


def _text(workdir):
    from glm_jax.data.vocab import GLMVocabulary
    from glm_jax.inference.text import PromptText

    model = load(workdir)
    return model, PromptText(GLMVocabulary(os.path.join(os.path.dirname(workdir), "sp.model"), model.config))


def _write_task(d, name, body, lines):
    (d / "data" / name).mkdir(parents=True, exist_ok=True)
    (d / "data" / name / "x.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    (d / f"{name}.yaml").write_text(f'name: "{name}"\npath: "{name}"\nmax_seq_length: 64\n' + body)
    return str(d / f"{name}.yaml")


def test_eval_generation_tasks_match_the_models_own_decoding(setup, tmp_path, capsys):
    workdir = str(setup / "run")
    model, text = _text(workdir)
    cfg = model.config
    prompts = [text.encode(q) + [cfg.mask_token_id, cfg.sop_token_id] for q, _ in QA]
    greedy = [[t for t in row.tolist()] for row in model.generate(prompts, 6)[:, -6:]]
    greedy = [row[: next((i for i, t in enumerate(row) if t in model.generator.stop_tokens), 6)] for row in greedy]
    beams = BeamSearch(num_beams=3, no_repeat_ngram_size=2)
    beam = model.generator.beam_search(prompts, 6, beams, context_lengths=[32] * 3)
    # The first sample's target is the greedy answer itself: EM counts it.
    lines = [{"inputs_pretokenized": q, "targets_pretokenized": [text.decode(greedy[0]) if i == 0 else a, "zzz"]}
             for i, (q, a) in enumerate(QA)]
    greedy_task = _write_task(tmp_path, "qa", 'type: "gen"\nmax_gen_length: 6\n', lines)
    beam_task = _write_task(tmp_path, "qa-beam", 'type: "gen"\nmax_gen_length: 6\nsampling_strategy: "BeamSearchStrategy"\n'
                            "num_beams: 3\nno_repeat_ngram_size: 2\n", lines)
    lambada = _write_task(tmp_path, "lambada", 'type: "gen"\nmax_gen_length: 6\nsampling_strategy: "BeamSearchStrategy"\n'
                          'module: "tasks.lambada.task.LAMBADA"\nnum_beams: 3\n',
                          [{"inputs_pretokenized": q, "targets_pretokenized": [a]} for q, a in QA])
    args = ["--checkpoint", workdir, "--data", str(tmp_path / "data"), "--results", str(tmp_path / "results"), "--json",
            "--task", greedy_task, "--task", beam_task, "--task", lambada]
    assert eval_cli.main(args) == 0
    out, err = capsys.readouterr()
    results = {r["task"]: r for r in map(json.loads, out.strip().splitlines())}

    def record(name):
        (path,) = (tmp_path / "results" / name).glob("*/x.jsonl.result.json")
        return json.load(open(path))

    got = record("qa")
    assert got["predictions"] == [text.decode(g) for g in greedy]
    targets = [[x["targets_pretokenized"][0], "zzz"] for x in lines]
    assert got["metrics"]["EM"] == pytest.approx(metrics.best_over_targets(metrics.exact_match, got["predictions"], targets))
    assert got["metrics"]["EM"] >= 100 / 3 and results["qa"]["overall"]["F1"]["average"] == pytest.approx(got["metrics"]["F1"])

    got = record("qa-beam")  # the authors pad a prompt to 32 tokens, and count them in the length penalty
    assert got["hypotheses"] == [[list(h.tokens) for h in hs] for hs in beam]
    assert got["predictions"] == [text.decode(hs[0].tokens) for hs in beam]

    got = record("lambada")
    banned, prefixes = generation.lambada_bans(cfg, text.encode)
    assert banned or prefixes
    for hs in got["hypotheses"]:
        for h in hs:
            assert not set(h) & set(banned) and not any(tuple(h[:len(p)]) == p for p in prefixes)
    assert set(results["lambada"]["overall"]) == {"Accuracy"}


def test_eval_lm_task_perplexity_from_the_models_logits(setup, tmp_path, capsys):
    import jax

    workdir = str(setup / "run")
    model, text = _text(workdir)
    cfg = model.config
    doc = "the quick brown fox jumps over the lazy dog number 7. hello world! " * 6
    (tmp_path / "data" / "wiki").mkdir(parents=True)
    (tmp_path / "data" / "wiki" / "doc.txt").write_text(doc)
    (tmp_path / "wiki.yaml").write_text('name: "wiki"\ntype: "lm"\npath: "wiki"\nfile-pattern: "*.txt"\n'
                                        "max_seq_length: 40\ngeneration_length: 16\nuse_task_mask: true\n")
    assert eval_cli.main(["--checkpoint", workdir, "--data", str(tmp_path / "data"), "--task", str(tmp_path / "wiki.yaml"),
                          "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tokens = text.encode(doc)
    loss = 0.0
    for row, targets, loss_mask, _ in authors_lm_windows(tokens, cfg, 40, 16, True, False):
        lp = np.asarray(jax.nn.log_softmax(model.logits([row])[0], axis=-1))
        loss -= sum(lp[i, t] for i, (t, m) in enumerate(zip(targets, loss_mask)) if m)
    words = len(doc.strip().split(" "))
    assert len(tokens) > 40 and result["groups"]["all"]["files"]["doc.txt"]["samples"] > 1
    assert result["overall"]["PPL"]["average"] == pytest.approx(math.exp(min(20, loss / words)), rel=1e-4)


@pytest.mark.parametrize("body, line, message", [
    ('type: "gen"\nmax_gen_length: 8\n', {"inputs_pretokenized": "q"}, "x.jsonl:1: no targets_pretokenized (or targets)"),
    ('type: "gen"\nmax_gen_length: 63\n', {"inputs_pretokenized": "q", "targets_pretokenized": ["a"]},
     "max_gen_length 63 leaves no room for a context in max_seq_length 64"),
    ('type: "gen"\nmax_gen_length: 8\nmetrics: ["BLEU"]\n', {}, "metric 'BLEU' is not computed for a gen task; valid: EM, F1, Accuracy"),
], ids=["no-targets", "no-room", "metric"])
def test_bad_generation_tasks_are_one_line(setup, tmp_path, capsys, body, line, message):
    task = _write_task(tmp_path, "bad", body, [line])
    with pytest.raises(SystemExit) as e:
        run_main(eval_cli.main, ["--checkpoint", str(setup / "run"), "--task", task, "--data", str(tmp_path / "data")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message in err[-1] and err[-1].startswith("error:"), err


def test_the_head_in_chunks_scores_what_the_whole_head_does(monkeypatch):
    """Reads past READ_CHUNK run the vocabulary head chunk by chunk: the same scores."""
    from glm_jax.evaluation import scoring
    from helpers import init_params, randomize

    cfg = variant("glm-130b")
    params = randomize(init_params(cfg), seed=3)
    doc = Document(tuple(int(t) for t in np.random.default_rng(0).integers(1, 99, 150)), words=100)
    rows = language_model.window_rows(doc, cfg, max_seq_length=64, generation_length=32, use_task_mask=True,
                                      unidirectional=False)
    whole = scoring.Scorer(cfg, params, batch_rows=2).row_scores(rows, greedy=True)
    monkeypatch.setattr(scoring, "READ_CHUNK", 32)
    assert scoring.batch(rows[:2], cfg)["read_ids"].shape[1] == 64  # two chunks of reads
    chunked = scoring.Scorer(cfg, params, batch_rows=2).row_scores(rows, greedy=True)
    for w, c in zip(whole, chunked):
        assert w[0][1] == c[0][1]
        np.testing.assert_allclose(w[0][0], c[0][0], rtol=1e-6)


def test_scoring_on_a_mesh_equals_one_device(setup):
    """Rows split over data=4, heads and MLP over model=2: the single-device scores."""
    from glm_jax.config import MeshConfig
    from glm_jax.evaluation import scoring
    from glm_jax.parallel.mesh import make_mesh

    mesh = make_mesh(MeshConfig(data=-1, model=2))
    sharded, one = load(str(setup / "run"), mesh=mesh), load(str(setup / "run"))
    cfg = one.config
    doc = Document(tuple(int(t) for t in np.random.default_rng(1).integers(1, 99, 120)), words=80)
    rows = language_model.window_rows(doc, cfg, max_seq_length=64, generation_length=32, use_task_mask=False,
                                      unidirectional=False)
    scorer = scoring.Scorer(cfg, sharded.params, batch_rows=3, mesh=mesh)
    assert scorer.batch_rows == 4  # a multiple of the data axis
    got = scorer.row_scores(rows)
    want = scoring.Scorer(cfg, one.params, batch_rows=3).row_scores(rows)
    np.testing.assert_allclose(np.ravel(got), np.ravel(want), rtol=1e-5)
