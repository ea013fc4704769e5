"""seqio preprocessors for GLM: tokenize, chunk, and build blank-infilling examples.

They work on blocks of documents: tokenization, chunking and infilling each run once
per block of up to ``BLOCK`` documents (one SentencePiece call, one ragged reshape, one
numpy call), and the block is split into single examples only at the end, before
seqio's shuffle and mixture sampling. Per-element tf.data work costs far more than
these operations on short GLM samples.

Randomness: each block gets a seed from seqio (``map_over_dataset(num_seeds=1)``) and
example i of the block uses ``default_rng([seed, i])``, so the same dataset seed always
yields the same examples. Output features, rank 1 and of one length per example:
``tokens, targets, loss_weights, positions, block_ids`` (GLM's block positions).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from glm_jax.data import infilling as inf

FEATURES = ("tokens", "targets", "loss_weights", "positions", "block_ids")
_NP_DTYPES = (np.int32, np.int32, np.float32, np.int32, np.int32)
BLOCK = 256  # documents per block


def _tf():
    import tensorflow as tf

    return tf


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
        tf = _tf()
        return ds.map(lambda ex: {o: encode_tf(ex[k]) for k, o in zip(keys, out)}, num_parallel_calls=tf.data.AUTOTUNE)

    return fn


def chunk(max_len: int, key: str = "ids"):
    """Split every document of a ragged block into pieces of at most ``max_len`` tokens;
    empty documents disappear."""

    def fn(ds):
        tf = _tf()

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


def _emit(sample: inf.Sample, one_d: bool):
    pos = inf.positions_1d(sample) if one_d else sample.positions
    return (sample.tokens, sample.targets, sample.loss_weights, pos, sample.block_positions)


def _per_block(make_one: Callable, inputs: tuple[str, ...], with_seed: bool):
    """Apply ``make_one(*arrays[, rng]) -> 5 arrays`` to every example of a ragged block in
    one numpy call, then split the block into single examples."""

    def run(*args):
        n_in = len(inputs)
        values, splits = args[:n_in], args[n_in : 2 * n_in]
        seed = [int(s) & 0xFFFFFFFF for s in args[2 * n_in]] if with_seed else None
        outs: list[list[np.ndarray]] = [[] for _ in FEATURES]
        lengths = []
        for i in range(len(splits[0]) - 1):
            arrays = [v[sp[i] : sp[i + 1]] for v, sp in zip(values, splits)]
            if with_seed:
                arrays.append(np.random.default_rng(seed + [i]))
            feats = make_one(*arrays)
            for o, f in zip(outs, feats):
                o.append(f)
            lengths.append(len(feats[0]))
        flat = [np.concatenate(o).astype(dt) if o else np.zeros(0, dt) for o, dt in zip(outs, _NP_DTYPES)]
        return (*flat, np.asarray(lengths, np.int64))

    def fn(ds):
        tf = _tf()

        def call(block):
            rts = [block[k] for k in inputs]
            args = [rt.flat_values for rt in rts] + [rt.row_splits for rt in rts]
            if with_seed:
                args.append(block["seed"])
            out = tf.numpy_function(run, args, [tf.int32, tf.int32, tf.float32, tf.int32, tf.int32, tf.int64], stateful=False)
            lengths = out[-1]
            return {k: tf.RaggedTensor.from_row_lengths(tf.ensure_shape(v, [None]), lengths) for k, v in zip(FEATURES, out[:-1])}

        return ds.map(call).unbatch()

    return fn


def blank_infilling(objective: str, ids: inf.SpecialIds, *, one_d: bool, mask_ratio: float = 0.15,
                    gmask_min_ratio: float = 0.2, ends_sentence: np.ndarray | None = None, budget: int = 1 << 30):
    """One GLM example per token chunk: ``objective`` in mask | smask | gmask."""

    def make(tokens, rng):
        tokens = np.asarray(tokens, np.int32)
        if objective == "mask":
            s = inf.mask_sample(tokens, ids, rng, mask_ratio)
        elif objective == "smask":
            s = inf.smask_sample(tokens, ids, rng, ends_sentence, mask_ratio, budget)
        else:
            s = inf.gmask_sample(tokens, ids, rng, gmask_min_ratio)
        return _emit(s, one_d)

    import seqio

    @seqio.map_over_dataset(num_seeds=1)
    def attach_seed(block, seed):
        return {"ids": block["ids"], "seed": _tf().ensure_shape(seed, [2])}

    per_block = _per_block(make, ("ids",), with_seed=True)
    return lambda ds: per_block(attach_seed(ds))


def instruction(ids: inf.SpecialIds, *, one_d: bool, max_len: int):
    """Prompt/response pairs as ``prompt [gMASK] <sop> response <eop>``, cut to fit ``max_len``
    (the response keeps at least half the room; the prompt loses its start first)."""

    def make(prompt, response):
        prompt = np.asarray(prompt, np.int32)
        response = np.asarray(response, np.int32)
        room = max_len - 2
        if len(prompt) + len(response) > room:
            response = response[: max(1, room // 2, room - len(prompt))]
            prompt = prompt[len(prompt) - (room - len(response)) :] if room > len(response) else prompt[:0]
        if len(response) == 0:  # nothing to learn; the converter drops empty examples
            return tuple(np.zeros(0, dt) for dt in _NP_DTYPES)
        return _emit(inf.prompt_sample(prompt, response, ids), one_d)

    return _per_block(make, ("prompt", "response"), with_seed=False)
