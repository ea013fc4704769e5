"""Multiple-choice evaluation in GLM-130B's format: the packed row is the authors' row
(their mask and positions, restated), its scores equal each choice scored alone, and
``python -m glm_jax.eval`` reports, caches and refuses as a user expects."""

import json
import os

import jax
import numpy as np
import pytest
from scipy.linalg import block_diag

from glm_jax import eval as eval_cli
from glm_jax.cli import run_main
from glm_jax.evaluation import multiple_choice as mc, scoring
from glm_jax.evaluation.samples import ChoiceSample
from glm_jax.evaluation.task_config import TaskError, load_task
from glm_jax.inference.loading import load
from glm_jax.model import GLM
from eval_fixtures import QUESTIONS
from helpers import init_params, randomize, variant
from reference_glm import authors_state_dict, forward


def authors_row(text, choices, cfg, use_task_mask):
    """GLM-130B's MultiChoiceTaskDataset.build_multiple_choice_sample, restated (1D positions):
    (tokens, position ids, mask True = masked, per choice the indices its tokens are read at)."""
    mask_id = cfg.gmask_token_id if use_task_mask else cfg.mask_token_id
    single = all(len(c) == 1 for c in choices)
    token, position_id = list(text), list(range(len(text)))
    if mask_id not in text:
        mask_position = len(token)
        token.append(mask_id)
        position_id.append(mask_position)
    else:
        mask_position = text.index(mask_id)
    division = len(token)
    blocks, reads = [np.ones((division, division))], []
    for choice in choices:
        position_id += ([mask_position] * len(choice) if not use_task_mask
                        else list(range(division, division + len(choice))))
        reads.append(np.arange(len(token), len(token) + len(choice)))
        blocks.append(np.tril(np.ones((len(choice), len(choice)))))
        token += [cfg.sop_token_id] + list(choice[:-1])
        if single:
            break
    mask = block_diag(*blocks)
    mask[: len(token), :division] = 1
    return np.asarray([token]), np.asarray([position_id]), (mask < 0.5)[None, None], reads


CASES = {  # model, use_task_mask, context, choices
    "glm-130b-mask": ("glm-130b", False, [11, 12, 13, 14, 15], [[21, 22, 23], [24], [25, 26]]),
    "glm-130b-gmask": ("glm-130b", True, [11, 12, 13, 14, 15], [[21, 22, 23], [24], [25, 26]]),
    "glm-130b-blank": ("glm-130b", False, [11, 12, "MASK", 14, 15], [[21, 22], [23, 24, 25]]),
    "glm-130b-single-token": ("glm-130b", False, [11, 12, 13], [[21], [22], [23], [24]]),
    "chatglm-6b-gmask": ("chatglm-6b", True, [11, 12, 13, 14], [[21, 22, 23], [24, 25]]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_scores_are_the_authors_row_and_equal_each_choice_alone(case):
    name, task_mask, context, choices = CASES[case]
    cfg = variant(name, dtype="float32")
    context = [cfg.mask_token_id if t == "MASK" else t for t in context]
    params = randomize(init_params(cfg))
    sample = ChoiceSample(tuple(context), tuple(map(tuple, choices)), 0)
    packed = mc.packed_row(sample, cfg, task_mask)
    scorer = scoring.Scorer(cfg, params, batch_rows=2)

    if not cfg.two_d_positions:  # the authors' evaluation code is GLM-130B's (1D positions)
        tokens, positions, mask, reads = authors_row(context, choices, cfg, task_mask)
        np.testing.assert_array_equal(packed.tokens, tokens[0])
        np.testing.assert_array_equal(packed.positions, positions[0])
        inputs = scoring.batch([packed], cfg)
        n = len(packed.tokens)
        got = np.asarray(GLM(cfg).apply({"params": params}, inputs["tokens"], inputs["positions"], inputs["prefix_len"],
                                        inputs["segment_ids"], shared_end=inputs["shared_end"]))[0, :n]
        want = forward(authors_state_dict(params, cfg), cfg, tokens, positions, mask)[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
        for (idx, _), authors_idx in zip(packed.reads, reads):
            np.testing.assert_array_equal(idx, authors_idx)

    packed_scores = scorer.row_scores([packed])[0]
    alone = [s[0] for s in scorer.row_scores(mc.alone_rows(sample, cfg, task_mask))]
    assert len(packed_scores) == len(choices)
    np.testing.assert_allclose(packed_scores, alone, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(packed_scores, 3))) > 1  # the choices score differently


def _expected_predictions(workdir, questions):
    """Each choice scored alone through glm_jax.load(...).logits and the model's own prompt rules."""
    from glm_jax.data.vocab import GLMVocabulary
    from glm_jax.inference.text import PromptText

    model = load(workdir)
    cfg = model.config
    text = PromptText(GLMVocabulary(os.path.join(os.path.dirname(workdir), "sp.model"), cfg))
    out = []
    for q, choices, _ in questions:
        context = list(text.encode(q)) + [cfg.mask_token_id]
        scores = []
        for c in choices:
            ids = list(text.encode(c))
            logits = model.logits([context + [cfg.sop_token_id] + ids[:-1]])[0]
            lp = jax.nn.log_softmax(logits, axis=-1)
            scores.append(float(sum(lp[len(context) + t, i] for t, i in enumerate(ids))))
        out.append(int(np.argmax(scores)))
    return out


def test_eval_reports_per_file_and_group_and_resumes_from_its_results(setup, capsys):
    d = setup
    args = ["--checkpoint", str(d / "run"), "--task", str(d / "toy.yaml"), "--data", str(d / "data"),
            "--results", str(d / "results"), "--json"]
    assert eval_cli.main(args) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["groups"]) == {"a", "b"} and "[1/2] a: a/x.jsonl: Accuracy = " in err
    (record_path,) = (d / "results" / "toy").glob("*/a/x.jsonl.result.json")  # under the model's fingerprint
    record = json.load(open(record_path))
    want = _expected_predictions(str(d / "run"), QUESTIONS)
    assert record["predictions"] == want and record["labels"] == [y for _, _, y in QUESTIONS]
    acc_a = 100.0 * sum(p == y for p, (_, _, y) in zip(want, QUESTIONS)) / 3
    assert result["groups"]["a"]["files"]["a/x.jsonl"]["metrics"]["Accuracy"] == pytest.approx(acc_a)
    b = result["groups"]["b"]["files"]["b/x.jsonl"]
    overall = result["overall"]["Accuracy"]
    assert overall["average"] == pytest.approx((3 * acc_a + 6 * b["metrics"]["Accuracy"]) / 9)
    assert overall["max"] == max(acc_a, b["metrics"]["Accuracy"])

    assert eval_cli.main(args) == 0  # the rerun reads the results back
    again, err = capsys.readouterr()
    assert json.loads(again.strip().splitlines()[-1]) == result and err.count("cached") == 2
    assert eval_cli.main(args[:-1] + ["--quantize", "int8"]) == 0  # another model identity: evaluated again
    out, err = capsys.readouterr()
    assert "cached" not in err and out.startswith("toy Accuracy: max = ")
    assert len(list((d / "results" / "toy").glob("*/a/x.jsonl.result.json"))) == 2  # side by side, float's kept


@pytest.mark.parametrize("yaml_text, message", [
    ('name: "t"\ntype: "mul"\npath: "toy"\nnum_beams: 4\n', "unknown key 'num_beams' for a mul task; valid keys: name, type"),
    ('name: "t"\ntype: "cls"\npath: "toy"\n', "type 'cls' is not one of mul, gen, lm"),
    ('name: "t"\ntype: "mul"\npath: "toy"\nmax_seq_length: "long"\n', "max_seq_length='long'; expected a non-negative integer"),
    ('name: "t"\ntype: "mul"\npath: "toy"\nfile-pattern: "*.csv"\n', "file-pattern '*.csv' (group all) matches no file"),
], ids=["key", "type", "value", "pattern"])
def test_a_bad_task_file_is_one_line_naming_it(setup, tmp_path, capsys, yaml_text, message):
    (tmp_path / "t.yaml").write_text(yaml_text)
    with pytest.raises(SystemExit) as e:
        run_main(eval_cli.main, ["--checkpoint", str(setup / "run"), "--task", str(tmp_path / "t.yaml"),
                                 "--data", str(setup / "data")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err and str(tmp_path / "t.yaml") in err


@pytest.mark.parametrize("line, message", [
    ({"choices_pretokenized": ["a"], "label": 0}, "x.jsonl:2: no inputs_pretokenized (or inputs)"),
    ({"inputs_pretokenized": "q", "choices_pretokenized": ["a", "b"], "label": 2}, "x.jsonl:2: label 2 is out of range for 2 choices"),
    ({"inputs_pretokenized": "q", "choices_pretokenized": "a", "label": 0}, "x.jsonl:2: choices_pretokenized must be a non-empty list"),
], ids=["no-inputs", "label", "choices"])
def test_a_bad_data_line_is_one_line_naming_file_and_line(setup, tmp_path, capsys, line, message):
    (tmp_path / "bad").mkdir()
    good = {"inputs_pretokenized": "q", "choices_pretokenized": ["a", "b"], "label": 0}
    (tmp_path / "bad" / "x.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    (tmp_path / "t.yaml").write_text('name: "t"\ntype: "mul"\npath: "bad"\n')
    with pytest.raises(SystemExit) as e:
        run_main(eval_cli.main, ["--checkpoint", str(setup / "run"), "--task", str(tmp_path / "t.yaml"),
                                 "--data", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and [x for x in err if x.startswith("error:")] == err[-1:] and message in err[-1], err


def test_the_authors_task_files_load():
    """Keys as the authors write them: kebab-case file-pattern groups, micro-batch-size, module."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mmlu.yaml")
        with open(path, "w") as f:
            f.write('name: "MMLU"\ntype: "mul"\nmodule: "tasks.mmlu.task.MMLU"\npath: "MMLU"\nfile-pattern:\n'
                    '  stem: "stem/*.json"\n  humanities: "humanities/*.json"\nmicro-batch-size: 1\n')
        task = load_task(path)
        assert task.type == "mul" and task.file_pattern == {"stem": "stem/*.json", "humanities": "humanities/*.json"}
        with open(path, "w") as f:
            f.write('name: "LAMBADA"\ntype: "gen"\npath: "lambada/lambada"\nfile-pattern:\n  test: "**/test.jsonl"\n'
                    'sampling_strategy: "BeamSearchStrategy"\nnum_beams: 16\nmax_gen_length: 5\nuse_task_mask: true\n')
        task = load_task(path)
        assert (task.num_beams, task.max_gen_length, task.use_task_mask) == (16, 5, True)
        with pytest.raises(TaskError, match="unidirectional needs use_task_mask"):
            with open(path, "w") as f:
                f.write('name: "x"\ntype: "lm"\npath: "p"\nunidirectional: true\n')
            load_task(path)
