"""Property tests of GLM blank infilling over thousands of generated documents."""

import itertools

import numpy as np
import pytest
from scipy import stats

from glm_jax.data import infilling as inf

IDS = inf.SpecialIds(mask=1000, smask=1002, gmask=1001, sop=1004, eop=1005, pad=0)
MASKS = (IDS.mask, IDS.smask, IDS.gmask)
ENDS = np.zeros(1024, bool)
ENDS[[7, 8]] = True  # ids 7 and 8 end sentences in these tests


def documents(n_docs, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n_docs):
        kind = i % 10
        if kind == 0:
            n = 1
        elif kind == 1:
            n = int(rng.integers(2, 6))  # shorter than a typical span
        elif kind == 2:
            n = int(rng.integers(1500, 4000))  # very long
        else:
            n = int(rng.integers(6, 600))
        yield rng.integers(10, 1000, size=n).astype(np.int32)


def check_sample(doc, s, mask_ids=MASKS):
    n_a = s.prefix_len
    assert len(s.tokens) == len(s.targets) == len(s.loss_weights) == len(s.positions) == len(s.block_positions)
    np.testing.assert_array_equal(inf.restore(s, mask_ids), doc)  # spans back in place = original
    # Loss weights cover exactly Part B, and Part B targets are the next tokens of each span.
    assert (s.loss_weights[:n_a] == 0).all() and (s.loss_weights[n_a:] == 1).all()
    b_tok, b_tgt, b_blk = s.tokens[n_a:], s.targets[n_a:], s.block_positions[n_a:]
    starts = np.flatnonzero(b_blk == 1)
    assert len(starts) == len(s.spans)
    for j, st in enumerate(starts):
        en = starts[j + 1] if j + 1 < len(starts) else len(b_tok)
        assert b_tok[st] == IDS.sop and b_tgt[en - 1] == IDS.eop
        np.testing.assert_array_equal(b_tgt[st : en - 1], b_tok[st + 1 : en])
        np.testing.assert_array_equal(b_blk[st:en], np.arange(1, en - st + 1))  # <sop> = 1
        # Every token of a span takes the position of its mask token in Part A.
        slot = s.positions[n_a + st]
        assert (s.positions[n_a + st : n_a + en] == slot).all() and s.tokens[slot] in mask_ids
    np.testing.assert_array_equal(s.positions[:n_a], np.arange(n_a))
    assert (s.block_positions[:n_a] == 0).all()


def test_mask_samples_reconstruct_and_follow_the_layout():
    for doc in documents(1200):
        s = inf.mask_sample(doc, IDS, np.random.default_rng(len(doc)))
        check_sample(doc, s)
        starts = sorted(st for st, _ in s.spans)
        ends = sorted(en for _, en in s.spans)
        assert all(e < st for e, st in zip(ends[:-1], starts[1:]))  # never adjacent


def test_smask_and_gmask_samples_reconstruct():
    rng = np.random.default_rng(1)
    for doc in documents(1200, seed=2):
        doc = doc.copy()
        doc[rng.random(len(doc)) < 0.08] = 7  # sentence ends
        check_sample(doc, inf.smask_sample(doc, IDS, rng, ENDS))
        check_sample(doc, inf.gmask_sample(doc, IDS, rng, min_ratio=0.2))


def test_part_b_spans_are_shuffled():
    doc = np.arange(10, 610, dtype=np.int32)
    in_text_order = []
    for seed in range(20):
        s = inf.mask_sample(doc, IDS, np.random.default_rng(seed))
        starts = [st for st, _ in s.spans]
        in_text_order.append(starts == sorted(starts))
    assert not any(in_text_order)  # ~25 spans each: text order by chance is vanishingly rare


def test_mask_fraction_and_span_length_statistics():
    rng = np.random.default_rng(3)
    masked = total = 0
    lengths = []
    for _ in range(10_000):
        doc = rng.integers(10, 1000, size=512).astype(np.int32)  # GLM-130B's [MASK] sample length
        s = inf.mask_sample(doc, IDS, rng)
        masked += sum(e - st for st, e in s.spans)
        total += len(doc)
        lengths += [e - st for st, e in s.spans]
    assert masked / total == pytest.approx(0.15, abs=0.005)
    assert np.mean(lengths) == pytest.approx(inf.SPAN_LENGTH_MEAN, rel=0.05)
    assert max(lengths) <= 39 and min(lengths) >= 1


def test_gmask_lengths_are_uniform_over_the_range():
    rng = np.random.default_rng(4)
    n, r = 200, 0.2
    lengths = [inf.gmask_sample(np.arange(n, dtype=np.int32) + 10, IDS, rng, r).spans[0] for _ in range(20_000)]
    lengths = np.asarray([e - s for s, e in lengths])
    lo, hi = int(r * n), n
    assert lengths.min() == lo and lengths.max() == hi
    counts = np.bincount(lengths - lo, minlength=hi - lo + 1)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_one_dimensional_positions():
    doc = np.arange(10, 40, dtype=np.int32)
    g = inf.gmask_sample(doc, IDS, np.random.default_rng(0))
    np.testing.assert_array_equal(inf.positions_1d(g), np.arange(len(g.tokens)))
    m = inf.mask_sample(doc, IDS, np.random.default_rng(0))
    np.testing.assert_array_equal(inf.positions_1d(m), m.positions)


def test_samples_are_a_function_of_the_seed():
    doc = np.arange(10, 300, dtype=np.int32)
    a = inf.mask_sample(doc, IDS, np.random.default_rng(7))
    b = inf.mask_sample(doc, IDS, np.random.default_rng(7))
    np.testing.assert_array_equal(a.tokens, b.tokens)


# -- blocks: the pipeline lays out hundreds of texts per call ------------------------------


def as_block(docs):
    docs = list(docs)
    splits = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    return np.concatenate(docs).astype(np.int32), splits, docs


def test_every_text_of_a_block_is_a_valid_sample():
    rng = np.random.default_rng(5)
    docs = [d.copy() for d in documents(600, seed=6)]
    for d in docs:
        d[rng.random(len(d)) < 0.08] = 8  # sentence ends
    text, splits, docs = as_block(docs)
    blocks = [
        inf.mask_block(text, splits, IDS, rng),
        inf.smask_block(text, splits, IDS, rng, ENDS),
        inf.gmask_block(text, splits, IDS, rng, min_ratio=0.2),
    ]
    for block in blocks:
        assert len(block.lengths) == len(docs)
        for i, doc in enumerate(docs):
            s = block.sample(i)
            check_sample(doc, s)
            assert len(s.tokens) == len(doc) + 2 * len(s.spans)
        if block.objective == "mask":
            for i in range(len(docs)):
                spans = sorted(block.sample(i).spans)
                assert all(e < st for (_, e), (st, _) in itertools.pairwise(spans))  # never adjacent


def test_smask_takes_whole_sentences_until_the_ratio_or_the_budget():
    rng = np.random.default_rng(7)
    docs = [d.copy() for d in documents(400, seed=8)]
    for d in docs:
        d[rng.random(len(d)) < 0.05] = 7
    text, splits, docs = as_block(docs)
    for budget in (1 << 30, 4):
        block = inf.smask_block(text, splits, IDS, rng, ENDS, ratio=0.15, budget=budget)
        for i, doc in enumerate(docs):
            spans = block.sample(i).spans
            lengths = [e - s for s, e in spans]
            ends = ENDS[doc]
            for s, e in spans:
                assert s == 0 or ends[s - 1]  # starts a sentence
                assert e == len(doc) or ends[e - 1]  # ends one
                assert not ends[s : e - 1].any()  # and is only one
            assert 2 * len(spans) <= budget
            target = max(1, int(np.ceil(0.15 * len(doc))))
            if budget >= 2 * len(spans) + 2:  # not capped by the budget: enough, and no sentence too many
                assert sum(lengths) >= target and sum(lengths) - max(lengths) < target


def test_block_statistics_match_glm():
    rng = np.random.default_rng(10)
    text, splits, _ = as_block(rng.integers(10, 1000, size=(10_000, 512)))
    block = inf.mask_block(text, splits, IDS, rng)
    lengths = block.spans.end - block.spans.start
    assert lengths.sum() / len(text) == pytest.approx(0.15, abs=0.005)
    assert lengths.mean() == pytest.approx(inf.SPAN_LENGTH_MEAN, rel=0.05)
    assert lengths.max() <= 39 and lengths.min() >= 1
    in_text_order = [np.all(np.diff([s for s, _ in block.sample(i).spans]) > 0) for i in range(200)]
    assert sum(in_text_order) < 5  # ~20 spans per text: Part B is shuffled per text
    n, r = 200, 0.2
    text, splits, _ = as_block(np.tile(np.arange(10, 10 + n, dtype=np.int32), (20_000, 1)))
    g = inf.gmask_block(text, splits, IDS, rng, r)
    counts = np.bincount(g.spans.end - g.spans.start - int(r * n), minlength=n - int(r * n) + 1)
    assert len(counts) == n - int(r * n) + 1 and stats.chisquare(counts).pvalue > 1e-3


def test_texts_of_a_block_draw_independently_and_blocks_follow_the_seed():
    doc = np.arange(10, 310, dtype=np.int32)
    text, splits, _ = as_block([doc] * 100)
    block = inf.mask_block(text, splits, IDS, np.random.default_rng(11))
    layouts = {tuple(block.sample(i).spans) for i in range(100)}
    assert len(layouts) > 95  # the same text, 100 different samples
    again = inf.mask_block(text, splits, IDS, np.random.default_rng(11))
    np.testing.assert_array_equal(again.tokens, block.tokens)
    other = inf.mask_block(text, splits, IDS, np.random.default_rng(12))
    assert not np.array_equal(other.tokens, block.tokens)


def test_block_1d_positions_restart_per_gmask_example():
    text, splits, _ = as_block([np.arange(10, 10 + n, dtype=np.int32) for n in (5, 1, 30)])
    block = inf.gmask_block(text, splits, IDS, np.random.default_rng(0))
    expected = np.concatenate([np.arange(n) for n in block.lengths])
    np.testing.assert_array_equal(block.positions_1d(), expected)
    m = inf.mask_block(text, splits, IDS, np.random.default_rng(0))
    np.testing.assert_array_equal(m.positions_1d(), m.positions)


def test_spans_that_cannot_fit_are_dropped_and_the_rest_stay_apart():
    rng = np.random.default_rng(13)
    text, splits, docs = as_block([rng.integers(10, 1000, size=n).astype(np.int32) for n in range(1, 40)] * 20)
    block = inf.mask_block(text, splits, IDS, rng, ratio=0.9)  # far more than fits with gaps
    for i, doc in enumerate(docs):
        s = block.sample(i)
        check_sample(doc, s)
        spans = sorted(s.spans)
        assert all(e < st for (_, e), (st, _) in itertools.pairwise(spans))
        assert sum(e - st for st, e in spans) + len(spans) - 1 <= len(doc)


def test_span_lengths_do_not_depend_on_their_place_in_the_text():
    # The last length drawn is cut to hit 15% exactly; placement must not put it last.
    rng = np.random.default_rng(14)
    text, splits, _ = as_block(rng.integers(10, 1000, size=(5_000, 512)))
    spans = inf.mask_block(text, splits, IDS, rng).spans
    order = np.lexsort((spans.start, spans.owner))
    owner, length = spans.owner[order], (spans.end - spans.start)[order]
    first = np.r_[True, owner[1:] != owner[:-1]]
    last = np.r_[owner[1:] != owner[:-1], True]
    assert length[first].mean() == pytest.approx(length[last].mean(), rel=0.05)
