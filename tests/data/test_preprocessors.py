"""The numpy side of the seqio preprocessors, on small hand-made blocks."""

import numpy as np

from glm_jax.data import infilling as inf
from glm_jax.data import preprocessors as prep

IDS = inf.SpecialIds(mask=1000, smask=1002, gmask=1001, sop=1004, eop=1005, pad=0)


def test_pairs_are_cut_to_fit_keeping_the_prompt_end_and_the_response_start():
    import tensorflow as tf

    pairs = [  # (prompt, response); room = 64 - 2 = 62 tokens
        (list(range(10, 13)), [20, 21]),  # fits
        (list(range(100, 400)), [20, 21]),  # long prompt: keeps its last 60 tokens
        ([10, 11], list(range(100, 400))),  # long response: keeps 60, the prompt fits in the rest
        (list(range(100, 400)), list(range(400, 700))),  # both long: the response keeps half
        ([], [20]),  # no prompt
        ([10], []),  # no response: nothing to learn
    ]
    expected = [
        (list(range(10, 13)), [20, 21]),
        (list(range(340, 400)), [20, 21]),
        ([10, 11], list(range(100, 160))),
        (list(range(369, 400)), list(range(400, 431))),
        ([], [20]),
        None,
    ]
    ds = tf.data.Dataset.from_tensors(
        {
            "prompt": tf.ragged.constant([p for p, _ in pairs], dtype=tf.int32, row_splits_dtype=tf.int64),
            "response": tf.ragged.constant([r for _, r in pairs], dtype=tf.int32, row_splits_dtype=tf.int64),
        }
    )
    out = list(prep.instruction(IDS, one_d=True, max_len=64)(ds).as_numpy_iterator())
    assert len(out) == len(pairs)
    for ex, want in zip(out, expected):
        if want is None:
            assert len(ex["tokens"]) == 0
            continue
        p, r = want
        np.testing.assert_array_equal(ex["tokens"], p + [IDS.gmask, IDS.sop] + r)
        np.testing.assert_array_equal(ex["targets"], p + [IDS.gmask] + r + [IDS.eop])
        np.testing.assert_array_equal(ex["loss_weights"], [0] * (len(p) + 1) + [1] * (len(r) + 1))
        np.testing.assert_array_equal(ex["positions"], np.arange(len(p) + len(r) + 2))  # 1D: arange for [gMASK]
        np.testing.assert_array_equal(ex["block_positions"], [0] * (len(p) + 1) + list(range(1, len(r) + 2)))
        assert len(ex["tokens"]) <= 64


def test_blank_infilling_blocks_are_a_function_of_their_seed():
    import seqio
    import tensorflow as tf

    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 1000, size=n).tolist() for n in rng.integers(1, 200, size=300)]
    block = {"ids": tf.ragged.constant(docs, dtype=tf.int32, row_splits_dtype=tf.int64)}

    def examples(seed):
        with seqio.utils.map_seed_manager(seed):
            ds = prep.blank_infilling("mask", IDS, one_d=False)(tf.data.Dataset.from_tensors(block).repeat(2))
        return list(ds.as_numpy_iterator())

    a, b, c = examples(1), examples(1), examples(2)
    assert len(a) == 2 * len(docs)
    for x, y in zip(a, b):
        for k in prep.FEATURES:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
    # The two copies of the block get their own seeds, so their samples differ.
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a[: len(docs)], a[len(docs) :]))
    for ex, doc in zip(a, docs + docs):
        n_a = int((ex["block_positions"] == 0).sum())
        s = inf.Sample(ex["tokens"], ex["targets"], ex["loss_weights"], ex["positions"], ex["block_positions"], n_a, [], "mask")
        np.testing.assert_array_equal(inf.restore(s, (IDS.mask,)), doc)  # each example is its own document
