"""The compiled generation loop: greedy equals the uncached loop, streaming, sampling, stops,
blank filling, and one clear error per bad prompt."""

import dataclasses

import jax
import numpy as np
import pytest

from inference_fixtures import VARIANTS, prompts
from glm_jax.inference.blanks import fill_blanks
from glm_jax.inference.decode import PromptError
from glm_jax.inference.sampling import Sampling
from glm_jax.model import GLM, prepare_inputs


def uncached_greedy(cfg, params, rows, n, stops, width=None):
    """The plain loop: the whole sequence through the full forward for every new token (rows
    left-padded to one width and filled on the right, which changes no earlier logit)."""
    apply = jax.jit(GLM(cfg).apply)
    width = width or max(len(r) for r in rows)
    seqs = np.full((len(rows), width + n), 1, np.int32)
    for i, r in enumerate(rows):
        seqs[i, : width - len(r)] = cfg.pad_token_id
        seqs[i, width - len(r) : width] = r
    inputs = prepare_inputs(seqs, cfg)
    out = [[] for _ in rows]
    for t in range(width, width + n):
        logits = apply({"params": params}, seqs, inputs["positions"], inputs["prefix_len"], inputs["segment_ids"])
        nxt = np.argmax(np.asarray(logits[:, t - 1]), axis=-1)
        seqs[:, t] = nxt
        for i in range(len(rows)):
            if not out[i] or out[i][-1] not in stops:
                out[i].append(int(nxt[i]))
    return out


@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_equals_uncached_loop(models, generators, name):
    cfg, params = models[name]
    gen = generators[name]
    rows = prompts(cfg)
    n = 8
    out = gen.generate(rows, n)
    width = max(len(r) for r in rows)
    assert out.shape == (2, width + n)
    wants = uncached_greedy(cfg, params, rows, n, gen.stop_tokens)
    for i, (row, want) in enumerate(zip(rows, wants)):
        np.testing.assert_array_equal(out[i, width - len(row):width], row)  # the prompt, left-padded
        assert out[i, width:width + len(want)].tolist() == want
        assert (out[i, width + len(want):] == cfg.pad_token_id).all()
    assert out[0, width:].tolist() != out[1, width:].tolist()  # the prompts matter
    if name == "chatglm-6b":  # prompts left-padded to a bucket (chat) generate the same tokens
        np.testing.assert_array_equal(gen.generate(rows, n, bucket=16), out)


def test_stop_token_ends_an_example_and_streaming_changes_nothing(models, generators):
    """Sampled tokens are the same whether the loop runs in one call or in chunks; an
    example that produces a stop token gets pad after it while the other goes on."""
    cfg, _ = models["chatglm-6b"]
    gen = generators["chatglm-6b"]
    rows = prompts(cfg)
    s = Sampling(greedy=False, temperature=1.5, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=7)
    out = gen.generate(rows, 12, s)[:, -12:]
    blocks = list(gen.stream(rows, 12, s, chunk=5))
    assert [b.shape[1] for b in blocks][:2] == [1, 5]  # the prefill's token, then chunks
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), out[:, : sum(b.shape[1] for b in blocks)])
    assert not np.array_equal(out, gen.generate(rows, 12, dataclasses.replace(s, seed=8))[:, -12:])

    stop = int(out[0, 3])
    got = gen.generate(rows, 12, s, stop_tokens=[stop])[:, -12:]
    for i in range(2):
        j = got[i].tolist().index(stop) if stop in got[i] else 12
        np.testing.assert_array_equal(got[i, : j + 1], out[i, : j + 1])
        assert (got[i, j + 1:] == cfg.pad_token_id).all()
    assert got[0, 3] == stop and (got[1] != cfg.pad_token_id).sum() > 4


def test_blanks_fill_left_to_right(models, generators):
    """Two [MASK]s: the first answer is written into the row before the second is asked."""
    cfg, params = models["glm-130b"]
    gen = generators["glm-130b"]
    row = [11, 12, cfg.mask_token_id, 13, 14, cfg.mask_token_id, 15, cfg.eos_token_id]
    filled, answers = fill_blanks(gen, [row], 4)
    assert len(answers[0]) == 2
    first = uncached_greedy(cfg, params, [row + [cfg.sop_token_id]], 4, gen.stop_tokens, width=16)[0]
    first = [t for t in first if t not in gen.stop_tokens]
    assert answers[0][0] == first
    row2 = row[:2] + first + row[3:]
    second = uncached_greedy(cfg, params, [row2 + [cfg.sop_token_id]], 4, gen.stop_tokens, width=16)[0]
    assert answers[0][1] == [t for t in second if t not in gen.stop_tokens]
    at = len(row2) - 3
    assert filled[0] == row2[:at] + answers[0][1] + row2[at + 1:]


@pytest.mark.parametrize("bad,message", [
    ([[]], "prompt 0 is empty"),
    ([[5, 6, 101, 104], [5, 300, 101, 104]], "prompt 1: token id 300 is outside the vocabulary \\[0, 128\\)"),
    ([[5, 6, 101]], "prompt 0 has no <sop> \\(id 104\\)"),
    ([[5, 6, 104]], "no \\[MASK\\]/\\[sMASK\\]/\\[gMASK\\] before its <sop>"),
    ([[5] * 70 + [101, 104]], "a prompt of 72 tokens is longer than the model's maximum of 64"),
    ([[5] * 60 + [101, 104]], "a prompt of 62 tokens \\+ max_new_tokens 4 exceeds the model's maximum of 64 .*at most 2 new"),
])
def test_bad_prompts_raise_one_clear_error(generators, bad, message):
    with pytest.raises(PromptError, match=message):
        generators["glm-130b"].generate(bad, 4)


@pytest.mark.parametrize("projection", [False, True], ids=["embedding", "projection"])
def test_greedy_with_a_ptuning_prefix_equals_the_uncached_loop(projection):
    """The prefix's keys sit in front of the KV cache at every decoding step as they sit in
    front of the sequence in the full forward (and a projected encoder, folded into its
    output table once for generation, gives the same tokens)."""
    from glm_jax.inference.decode import Generator
    from helpers import variant
    from inference_fixtures import random_params

    cfg = variant("chatglm-6b", pre_seq_len=3, prefix_projection=projection)
    params = random_params(cfg)
    rows = prompts(cfg)
    gen = Generator(cfg, params)
    out = gen.generate(rows, 6)
    width = max(len(r) for r in rows)
    wants = uncached_greedy(cfg, params, rows, 6, gen.stop_tokens)
    for i, want in enumerate(wants):
        assert out[i, width:width + len(want)].tolist() == want
    plain = Generator(variant("chatglm-6b"), {k: v for k, v in params.items() if k != "prefix_encoder"})
    assert plain.generate(rows, 6).tolist() != out.tolist()  # the prefix changes what is generated
