"""Beam search: one beam is greedy, the best beam is the exhaustive best on a tiny
vocabulary, and every rule (n-gram bans, banned prefixes and tokens, the minimum length,
finished hypotheses, the early stop) matches a plain restatement of GLM-130B's
``BeamSearchStrategy`` driven by the uncached forward pass."""

import itertools

import jax
import numpy as np
import pytest

from helpers import variant
from inference_fixtures import VARIANTS, prompts, random_params
from glm_jax.config import ConfigError
from glm_jax.inference.beam_search import BeamSearch
from glm_jax.inference.decode import Generator
from glm_jax.model import GLM, prepare_inputs


def full_forward(cfg, params):
    """rows (one length) -> the next token's float32 logits ``[rows, V]``, uncached."""
    apply = jax.jit(GLM(cfg).apply)

    def logits(rows):
        seqs = np.asarray(rows, np.int32)
        inputs = prepare_inputs(seqs, cfg)
        out = apply({"params": params}, seqs, inputs["positions"], inputs["prefix_len"], inputs["segment_ids"])
        return np.asarray(out[:, -1], np.float32)

    return logits


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def authors_beam_search(next_logits, prompt, max_gen, stops, beams: BeamSearch):
    """GLM-130B's BeamSearchStrategy (deterministic, consider_end) for one prompt, restated
    with Python lists; returns [(tokens without the stop token, penalized score)], best first."""
    k, n = beams.num_beams, beams.no_repeat_ngram_size
    rows, scores, bans = [list(prompt)], np.zeros(1), [{}]
    ends, end_scores = [], []
    done = False

    def add_end(score, beam):
        score = score / ((5.0 + len(beam)) / 6) ** beams.length_penalty
        i = len(ends)
        while i > 0 and not score < end_scores[i - 1]:
            i -= 1
        ends.insert(i, beam)
        end_scores.insert(i, score)
        del ends[k:], end_scores[k:]

    for generated in range(max_gen):
        seq_len = len(rows[0])
        logits = next_logits(rows + [rows[0]] * (k - len(rows)))[: len(rows)].copy()
        logits[:, list(beams.banned_tokens)] = -65504
        for p in beams.banned_prefixes:
            if generated == len(p) - 1:
                for j, row in enumerate(rows):
                    if len(p) == 1 or row[-(len(p) - 1):] == list(p[:-1]):
                        logits[j, p[-1]] = -65504
        if beams.min_gen_length > generated:
            logits[:, list(stops)] = -65504
        if n > 0 and seq_len > n:
            for j, row in enumerate(rows):
                for banned in bans[j].get(tuple(row[-(n - 1):]), ()):
                    logits[j, banned] = -65504
        total = (log_softmax(logits) + scores[:, None]).reshape(-1)
        vocab = logits.shape[-1]
        cand = np.argsort(-total, kind="stable")[: min((max(1, len(stops)) + 1) * k, total.size)]
        new_rows, new_scores, new_bans = [], [], []
        for c in cand:
            parent, token = divmod(int(c), vocab)
            beam = rows[parent] + [token]
            if not done and token in stops:
                add_end(total[c], beam)
            elif len(new_rows) < k:
                new_rows.append(beam)
                new_scores.append(total[c])
                if n > 0:
                    b = dict(bans[parent])
                    key = tuple(rows[parent][-(n - 1):])
                    b[key] = b.get(key, ()) + (token,)
                    new_bans.append(b)
            else:
                break
        rows, scores, bans = new_rows, np.asarray(new_scores), new_bans or [{}] * len(new_rows)
        if len(ends) == k and end_scores[-1] >= scores.max() / ((5.0 + seq_len + 1) / 6) ** beams.length_penalty:
            done = True
            break
    if not done:
        for score, row in zip(scores, rows):
            add_end(score, row)
    out = []
    for beam, score in zip(ends, end_scores):
        gen = beam[len(prompt):]
        out.append((tuple(gen[:-1] if gen and gen[-1] in stops else gen), float(score)))
    return out


@pytest.mark.parametrize("name", VARIANTS)
def test_one_beam_is_greedy(generators, name):
    """Without stop tokens one beam has nothing to finish early: it is greedy, token for token."""
    gen = generators[name]
    rows = prompts(gen.cfg)
    greedy = gen.generate(rows, 10, stop_tokens=())[:, -10:]
    got = gen.beam_search(rows, 10, BeamSearch(num_beams=1), stop_tokens=())
    assert [list(h[0].tokens) for h in got] == greedy.tolist()


def test_rules_match_the_authors_strategy(models, generators):
    """Every rule at once, on the prompts of a left-padded batch, against the restatement."""
    cfg, params = models["glm-130b"]
    gen = generators["glm-130b"]
    rows = prompts(cfg)
    stops = gen.stop_tokens
    beams = BeamSearch(num_beams=4, length_penalty=1.3, no_repeat_ngram_size=2, min_gen_length=2,
                       banned_tokens=(91, 83), banned_prefixes=((5,), (87, 23), (15, 40)))
    got = gen.beam_search(rows, 7, beams)
    forward = full_forward(cfg, params)
    for row, hyps in zip(rows, got):
        want = authors_beam_search(forward, row, 7, stops, beams)
        assert [h.tokens for h in hyps] == [w[0] for w in want]
        np.testing.assert_allclose([h.score for h in hyps], [w[1] for w in want], rtol=1e-5, atol=1e-5)
        for h in hyps:
            assert len(h.tokens) >= 1 and not set(h.tokens) & {91, 83}
            assert h.tokens[:1] != (5,) and h.tokens[:2] != (87, 23) and h.tokens[:2] != (15, 40)
            seq = list(row) + list(h.tokens)
            grams = [tuple(seq[i:i + 2]) for i in range(len(row) - 1, len(seq) - 1)]
            assert len(grams) == len(set(grams)), "a generated bigram repeats"


def tiny_vocab(name):
    """A 10-token vocabulary: two ordinary tokens, the specials, two stop tokens."""
    ids = dict(vocab_size=10, pad_token_id=0, mask_token_id=3, gmask_token_id=4, smask_token_id=5, eod_token_id=6,
               sop_token_id=7, eop_token_id=8, eos_token_id=9)
    return variant(name, **ids)


@pytest.mark.parametrize("name", VARIANTS)
def test_best_beam_is_the_exhaustive_best(name):
    """With beams enough for every prefix, the best hypothesis is the best of all
    continuations of length <= 3 (a stop token may end one early), by penalized score."""
    cfg = tiny_vocab(name)
    params = random_params(cfg, seed=5, scale=3.0)
    gen = Generator(cfg, params)
    prompt = [1, 2, 1, cfg.gmask_token_id, cfg.sop_token_id]
    stops = set(gen.stop_tokens)
    live = [t for t in range(cfg.vocab_size) if t not in stops]
    forward = full_forward(cfg, params)
    # Every two-token continuation's three next-token distributions in one batch.
    pairs = list(itertools.product(range(cfg.vocab_size), repeat=2))
    lp1 = log_softmax(forward([prompt])[0])
    lp2 = log_softmax(forward([prompt + [a] for a in range(cfg.vocab_size)]))
    lp3 = log_softmax(forward([prompt + list(p) for p in pairs])).reshape(cfg.vocab_size, cfg.vocab_size, -1)
    pen = lambda n: ((5.0 + len(prompt) + n) / 6) ** 1.0  # noqa: E731
    scored = [((a,), lp1[a] / pen(1)) for a in stops]
    scored += [((a, b), (lp1[a] + lp2[a, b]) / pen(2)) for a in live for b in stops]
    scored += [((a, b, c), (lp1[a] + lp2[a, b] + lp3[a, b, c]) / pen(3))
               for a in live for b in live for c in range(cfg.vocab_size)]
    best_tokens, best_score = max(scored, key=lambda s: s[1])
    got = gen.beam_search([prompt], 3, BeamSearch(num_beams=len(live) ** 2, length_penalty=1.0))[0][0]
    assert got.tokens == tuple(t for t in best_tokens if t not in stops)
    np.testing.assert_allclose(got.score, best_score, rtol=1e-5, atol=1e-5)
    # A narrower beam still returns hypotheses best first.
    narrow = gen.beam_search([prompt], 3, BeamSearch(num_beams=3))[0]
    assert [h.score for h in narrow] == sorted((h.score for h in narrow), reverse=True)
    assert narrow[0].score <= best_score + 1e-5


@pytest.mark.parametrize("bad, message", [
    (BeamSearch(num_beams=0), "num_beams must be >= 1"),
    (BeamSearch(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be >= 0"),
    (BeamSearch(banned_tokens=(500,)), "banned token id 500 is outside the vocabulary"),
    (BeamSearch(banned_prefixes=((),)), "an empty banned prefix"),
])
def test_bad_settings_raise_one_clear_error(generators, bad, message):
    gen = generators["glm-130b"]
    with pytest.raises(ConfigError, match=message):
        gen.beam_search(prompts(gen.cfg), 4, bad)



def test_loaded_model_generate_returns_the_best_hypothesis(models):
    from glm_jax.inference.loading import LoadedModel

    cfg, params = models["chatglm-6b"]
    model = LoadedModel(cfg, params)
    rows = prompts(cfg)
    hyps = model.beam_search(rows, 6, num_beams=3)
    out = model.generate(rows, 6, num_beams=3)
    width = max(len(r) for r in rows)
    assert out.shape == (2, width + 6)
    for row, h in zip(out, hyps):
        best = list(h[0].tokens) + ([h[0].stop] if h[0].stop is not None else [])
        assert row[width:width + len(best)].tolist() == best
        assert (row[width + len(best):] == cfg.pad_token_id).all()
    with pytest.raises(ValueError, match="beam search is deterministic"):
        model.generate(rows, 6, num_beams=3, temperature=0.5)
    with pytest.raises(ValueError, match="length_penalty is a beam search option"):
        model.generate(rows, 6, length_penalty=2.0)
