"""seqio preprocessors for GLM: tokenize, chunk, and build blank-infilling examples.

They work on blocks of documents: tokenization, chunking and infilling each run once
per block of up to ``BLOCK`` documents (one SentencePiece call, one ragged reshape, one
numpy call), and the block is split into single examples only at the end, before
seqio's shuffle and mixture sampling. Per-element tf.data work costs far more than
these operations on short GLM samples.

Randomness: each block gets a seed from seqio (``map_over_dataset(num_seeds=1)``) and one
``default_rng(seed)`` draws for the whole block (infilling builds a block in one pass), so
the same dataset seed always yields the same examples. Output features, rank 1 and of one
length per example: ``tokens, targets, loss_weights, positions, block_positions`` (GLM's block
positions).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from glm_jax.data import infilling as inf
from glm_jax.data import tf_runtime

FEATURES = ("tokens", "targets", "loss_weights", "positions", "block_positions")
BLOCK = 256  # documents per block


# TensorFlow and seqio are imported inside the functions that use them (tf_runtime.tensorflow()):
# they take seconds to import, and config checks, the synthetic mixture and the jax-only
# tools never need them.


def as_blocks(keys: tuple[str, ...]):
    """Sources that yield one document per element (e.g. TFDS) are grouped into blocks."""

    def fn(ds):
        if ds.element_spec[keys[0]].shape.rank == 0:
            ds = ds.batch(BLOCK)
        return ds.map(lambda ex: {k: ex[k] for k in keys})

    return fn


def tokenize(encode_tf: Callable, keys: tuple[str, ...] = ("text",), out: tuple[str, ...] = ("ids",)):
    """Each key's block of strings -> a ragged block of token ids."""

    def fn(ds):
        tf = tf_runtime.tensorflow()
        return ds.map(lambda ex: {o: encode_tf(ex[k]) for k, o in zip(keys, out)}, num_parallel_calls=tf.data.AUTOTUNE)

    return fn


def chunk(max_len: int, key: str = "ids"):
    """Split every document of a ragged block into pieces of at most ``max_len`` tokens;
    empty documents disappear."""

    def fn(ds):
        tf = tf_runtime.tensorflow()

        def split(ex):
            docs = ex[key]
            n = tf.cast(docs.row_lengths(), tf.int32)
            k = (n + max_len - 1) // max_len  # chunks per document
            j = tf.ragged.range(k).flat_values  # chunk index within its document
            doc = tf.repeat(tf.range(tf.size(n)), k)
            lengths = tf.minimum(max_len, tf.gather(n, doc) - j * max_len)
            return {key: tf.RaggedTensor.from_row_lengths(docs.flat_values, lengths)}

        return ds.map(split, num_parallel_calls=tf.data.AUTOTUNE)

    return fn


def example_options():
    """tf.data options for the examples and everything built on them (options propagate to
    derived datasets: seqio's shuffle and mixture, the pipeline's batching).

    Autotuning is off: past the blocks, every stage handles single short examples, and
    autotune's per-element bookkeeping and extra thread hand-offs cost 20-30% of the
    pipeline's examples/s on glm-tiny with two host cores. ``AUTOTUNE`` then means
    tf.data's fixed defaults (a parallel map uses every core, a prefetch buffer grows
    while it runs dry). The order of the examples does not depend on it
    (``deterministic`` stays on).
    """
    options = tf_runtime.tensorflow().data.Options()
    options.autotune.enabled = False
    return options


def _per_block(make_block: Callable, inputs: tuple[str, ...], with_seed: bool):
    """Apply ``make_block(values, splits[, rng])`` (the flat ``FEATURES`` of a block of examples,
    then their lengths) to a ragged block in one numpy call, then split the block into
    single examples."""

    def run(*args):
        n_in = len(inputs)
        values, splits = args[:n_in], args[n_in : 2 * n_in]
        if with_seed:
            rng = np.random.default_rng([int(s) & 0xFFFFFFFF for s in args[2 * n_in]])
            return make_block(values, splits, rng)
        return make_block(values, splits)

    def fn(ds):
        tf = tf_runtime.tensorflow()

        def call(block):
            rts = [block[k] for k in inputs]
            args = [rt.flat_values for rt in rts] + [rt.row_splits for rt in rts]
            if with_seed:
                args.append(block["seed"])
            out = tf.numpy_function(run, args, [tf.int32, tf.int32, tf.float32, tf.int32, tf.int32, tf.int64], stateful=False)
            lengths = out[-1]
            return {k: tf.RaggedTensor.from_row_lengths(tf.ensure_shape(v, [None]), lengths) for k, v in zip(FEATURES, out[:-1])}

        return ds.map(call).unbatch().with_options(example_options())

    return fn


def _features(block: inf.Block, one_d: bool) -> tuple[np.ndarray, ...]:
    """The block's flat features in ``FEATURES`` order, then each example's length."""
    pos = block.positions_1d() if one_d else block.positions
    return (block.tokens, block.targets, block.loss_weights, pos, block.block_positions, block.lengths)


def blank_infilling(objective: str, ids: inf.SpecialIds, *, one_d: bool, mask_ratio: float = 0.15,
                    gmask_min_ratio: float = 0.2, ends_sentence: np.ndarray | None = None, budget: int = 1 << 30):
    """One GLM example per token chunk: ``objective`` in mask | smask | gmask."""

    def make(values, splits, rng):
        text, splits = np.asarray(values[0], np.int32), np.asarray(splits[0], np.int64)
        if objective == "mask":
            block = inf.mask_block(text, splits, ids, rng, mask_ratio)
        elif objective == "smask":
            block = inf.smask_block(text, splits, ids, rng, ends_sentence, mask_ratio, budget)
        else:
            block = inf.gmask_block(text, splits, ids, rng, gmask_min_ratio)
        return _features(block, one_d)

    import seqio

    @seqio.map_over_dataset(num_seeds=1)
    def attach_seed(block, seed):
        return {"ids": block["ids"], "seed": tf_runtime.tensorflow().ensure_shape(seed, [2])}

    per_block = _per_block(make, ("ids",), with_seed=True)
    return lambda ds: per_block(attach_seed(ds))


def fit_pairs(prompt_lens: np.ndarray, response_lens: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """How many prompt and response tokens each pair keeps to fit ``prompt [gMASK] <sop>
    response`` in ``max_len``: the response keeps at least half the room, the prompt loses its
    start first. A pair without a response keeps nothing (the converter drops it)."""
    p, r = np.asarray(prompt_lens, np.int64), np.asarray(response_lens, np.int64)
    room = max_len - 2
    over = p + r > room
    r = np.where(over, np.minimum(r, np.maximum(max(1, room // 2), room - p)), r)
    p = np.where(over, np.clip(room - r, 0, p), p)
    return np.where(r > 0, p, 0), r


def instruction(ids: inf.SpecialIds, *, one_d: bool, max_len: int):
    """Prompt/response pairs as ``prompt [gMASK] <sop> response <eop>``, cut by ``fit_pairs``."""

    def make(values, splits):
        (prompt, response), (p_splits, r_splits) = values, [np.asarray(s, np.int64) for s in splits]
        p_len, r_len = fit_pairs(np.diff(p_splits), np.diff(r_splits), max_len)
        # Each text is the kept end of its prompt, then the kept start of its response.
        starts = np.stack([p_splits[1:] - p_len, r_splits[:-1] + len(prompt)], axis=1).ravel()
        pieces = np.stack([p_len, r_len], axis=1).ravel()
        text = np.concatenate([prompt, response]).astype(np.int32)[inf.concat_ranges(starts, pieces)]
        splits = np.concatenate([[0], np.cumsum(p_len + r_len)])
        return _features(inf.prompt_block(text, splits, p_len, ids), one_d)

    return _per_block(make, ("prompt", "response"), with_seed=False)


def chat(ids: inf.SpecialIds, *, one_d: bool, max_source: int, max_target: int, count: Callable[[str, int], None]):
    """Tokenized (prompt, response) pairs laid out by ``infilling.chat_block`` (the authors'
    fine-tuning layout); ``count(name, n)`` receives what each block cut or dropped."""

    def make(values, splits):
        block, counts = inf.chat_block(values[0], splits[0], values[1], splits[1], ids, max_source, max_target)
        for what, n in counts.items():
            count(what, n)
        return _features(block, one_d)

    return _per_block(make, ("prompt", "response"), with_seed=False)
