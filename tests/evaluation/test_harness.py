"""lm-evaluation-harness: ``python -m glm_jax.harness --model glm_jax`` runs local
multiple-choice, generation and perplexity tasks end to end, and what it records per
request is GLM's own computation (the row ``context [MASK] <sop> continuation``, the
KV-cache generator, rolling windows)."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from eval_fixtures import QUESTIONS
from glm_jax.evaluation import language_model
from glm_jax.evaluation.samples import Document
from glm_jax.inference.loading import load

pytest.importorskip("lm_eval")

ANSWERS = [("the quick brown", "fox"), ("hello", "world")]
TEXTS = ["the quick brown fox jumps over the lazy dog number 7. hello world! " * 3, "hello world!"]


def _task(path, name, data, body):
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            + body)


@pytest.fixture(scope="module")
def harness_run(setup, tmp_path_factory):
    d = tmp_path_factory.mktemp("harness")
    (d / "mc.jsonl").write_text("\n".join(json.dumps({"question": q, "choices": c, "label": y}) for q, c, y in QUESTIONS))
    (d / "gen.jsonl").write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in ANSWERS))
    (d / "ppl.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    (d / "tasks").mkdir()
    (d / "tasks" / "toy_mc.yaml").write_text(_task(d, "toy_mc", d / "mc.jsonl", (
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n')))
    (d / "tasks" / "toy_gen.yaml").write_text(_task(d, "toy_gen", d / "gen.jsonl", (
        'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["o"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")))
    (d / "tasks" / "toy_ppl.yaml").write_text(_task(d, "toy_ppl", d / "ppl.jsonl", (
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n")))
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(d / "hf"), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.getcwd())
    args = [sys.executable, "-m", "glm_jax.harness", "--model", "glm_jax",
            "--model_args", f"checkpoint={setup / 'run'},mask=gMASK,rolling_stride=16", "--batch_size", "4",
            "--tasks", "toy_mc", "toy_gen", "toy_ppl", "--include_path", str(d / "tasks"),
            "--output_path", str(d / "out"), "--log_samples"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = {}
    for task in ("toy_mc", "toy_gen", "toy_ppl"):
        (path,) = glob.glob(str(d / "out" / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        samples[task] = [json.loads(x) for x in open(path)]
    return done.stdout, samples


def _model(setup):
    from glm_jax.data.vocab import GLMVocabulary
    from glm_jax.inference.text import PromptText

    model = load(str(setup / "run"))
    return model, PromptText(GLMVocabulary(str(setup / "sp.model"), model.config))


def test_the_harness_runs_local_tasks_end_to_end(harness_run):
    out, samples = harness_run
    for task, metric in (("toy_mc", "acc"), ("toy_gen", "exact_match"), ("toy_ppl", "word_perplexity")):
        assert task in out and metric in out
    assert len(samples["toy_mc"]) == len(QUESTIONS) and len(samples["toy_gen"]) == len(ANSWERS)


def test_loglikelihood_is_the_continuation_after_the_mask(setup, harness_run):
    _, samples = harness_run
    model, text = _model(setup)
    cfg = model.config
    for s in samples["toy_mc"]:
        for args, resp in zip(s["arguments"].values(), s["resps"]):
            context, cont = text.encode(args["arg_0"]), text.encode(args["arg_1"])
            row = context + [cfg.gmask_token_id, cfg.sop_token_id] + cont[:-1]
            lp = np.asarray(jax.nn.log_softmax(model.logits([row])[0], axis=-1))
            at = len(context) + 1
            want = sum(lp[at + i, t] for i, t in enumerate(cont))
            greedy = all(np.argmax(lp[at + i]) == t for i, t in enumerate(cont))
            assert float(resp[0][0]) == pytest.approx(want, rel=1e-5, abs=1e-4)
            assert resp[0][1] == str(greedy)


def test_generate_until_is_the_generator_cut_at_the_stop_string(setup, harness_run):
    _, samples = harness_run
    model, text = _model(setup)
    cfg = model.config
    for s in samples["toy_gen"]:
        prompt = text.encode(s["doc"]["question"]) + [cfg.gmask_token_id, cfg.sop_token_id]
        new = model.generate([prompt], 6)[0, -6:].tolist()
        stop = next((i for i, t in enumerate(new) if t in model.generator.stop_tokens), 6)
        want = text.decode(new[:stop]).split("o")[0]
        assert s["resps"][0][0] == want


def test_loglikelihood_rolling_scores_every_token_once(setup, harness_run):
    _, samples = harness_run
    model, text = _model(setup)
    cfg = model.config
    for s in samples["toy_ppl"]:
        tokens = text.encode(s["doc"]["text"])
        rows = language_model.window_rows(Document(tuple(tokens), 1), cfg, max_seq_length=cfg.max_seq_len,
                                          generation_length=16, use_task_mask=True, unidirectional=False)
        assert sum(len(r.reads[0][1]) for r in rows) == len(tokens)
        want = 0.0
        for r in rows:  # each window through the plain forward pass ([gMASK]: the model's positions are 0, 1, ...)
            lp = np.asarray(jax.nn.log_softmax(model.logits([r.tokens.tolist()])[0], axis=-1))
            at, ids = r.reads[0]
            want += float(sum(lp[a, t] for a, t in zip(at, ids)))
        assert float(s["resps"][0][0]) == pytest.approx(want, rel=1e-5)
