"""Property tests of GLM blank infilling over thousands of generated documents."""

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
