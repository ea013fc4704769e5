"""seqio preprocessors for GLM: tokenize, chunk, and build blank-infilling examples.

Each example's randomness comes from seqio's per-example seeds (``map_over_dataset``
with ``num_seeds``), so the same dataset seed always yields the same examples.
Output features, all rank 1 and of one length per example:
``tokens, targets, loss_weights, positions, block_ids`` (GLM's block positions).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from glm_jax.data import infilling as inf

FEATURES = ("tokens", "targets", "loss_weights", "positions", "block_ids")


def _tf():
    import tensorflow as tf

    return tf


def tokenize(encode_tf: Callable, key: str = "text", out: str = "ids"):
    def fn(ds):
        tf = _tf()
        return ds.map(lambda ex: {out: encode_tf(ex[key])}, num_parallel_calls=tf.data.AUTOTUNE)

    return fn


def tokenize_pairs(encode_tf: Callable):
    def fn(ds):
        tf = _tf()
        return ds.map(
            lambda ex: {"prompt": encode_tf(ex["prompt"]), "response": encode_tf(ex["response"])},
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    return fn


def chunk(max_len: int, key: str = "ids"):
    """Split each token sequence into pieces of at most ``max_len``; drop empty ones."""

    def fn(ds):
        tf = _tf()

        def split(ex):
            ids = ex[key]
            pad = (max_len - tf.size(ids) % max_len) % max_len
            rows = tf.reshape(tf.pad(ids, [[0, pad]], constant_values=-1), [-1, max_len])
            return {key: tf.RaggedTensor.from_tensor(rows, padding=-1)}

        ds = ds.filter(lambda ex: tf.size(ex[key]) > 0)
        # One ragged tensor of chunks per document, then unbatch: no per-document dataset.
        return ds.map(split, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

    return fn


def _emit(sample: inf.Sample, one_d: bool):
    pos = inf.positions_1d(sample) if one_d else sample.positions
    return (
        sample.tokens,
        sample.targets,
        sample.loss_weights,
        pos.astype(np.int32),
        sample.block_positions,
    )


def _dtypes():
    tf = _tf()
    return [tf.int32, tf.int32, tf.float32, tf.int32, tf.int32]


BLOCK = 128  # examples per numpy call: one Python crossing per block, not per example


def _blockwise(make_one: Callable, inputs: tuple[str, ...], with_seed: bool):
    """Apply ``make_one(*arrays[, seed]) -> 5 arrays`` to blocks of examples inside tf.data.

    Examples are grouped into ragged blocks, handed to numpy once per block, and split
    back into single examples, so each keeps its own seed and results do not depend on
    the block size.
    """

    def run(*args):
        n_in = len(inputs)
        values = args[:n_in]
        splits = args[n_in : 2 * n_in]
        seeds = args[2 * n_in] if with_seed else None
        outs = [[] for _ in FEATURES]
        lengths = []
        for i in range(len(splits[0]) - 1):
            arrays = [v[sp[i] : sp[i + 1]] for v, sp in zip(values, splits)]
            if with_seed:
                arrays.append(seeds[i])
            feats = make_one(*arrays)
            for o, f in zip(outs, feats):
                o.append(f)
            lengths.append(len(feats[0]))
        dtypes = [np.int32, np.int32, np.float32, np.int32, np.int32]
        flat = [np.concatenate(o).astype(dt) if o else np.zeros(0, dt) for o, dt in zip(outs, dtypes)]
        return (*flat, np.asarray(lengths, np.int64))

    def fn(ds):
        tf = _tf()
        ds = ds.ragged_batch(BLOCK)

        def call(block):
            rts = [block[k] for k in inputs]
            args = [rt.flat_values for rt in rts] + [rt.row_splits for rt in rts]
            if with_seed:
                args.append(block["seed"])
            out = tf.numpy_function(run, args, _dtypes() + [tf.int64], stateful=False)
            lengths = out[-1]
            feats = {k: tf.RaggedTensor.from_row_lengths(tf.ensure_shape(v, [None]), lengths) for k, v in zip(FEATURES, out[:-1])}
            return tf.data.Dataset.from_tensor_slices(feats)

        return ds.flat_map(call)

    return fn


def blank_infilling(objective: str, ids: inf.SpecialIds, *, one_d: bool, mask_ratio: float = 0.15,
                    gmask_min_ratio: float = 0.2, ends_sentence: np.ndarray | None = None, budget: int = 1 << 30):
    """One GLM example per token sequence: ``objective`` in mask | smask | gmask."""

    def make(tokens, seed):
        rng = np.random.default_rng([int(s) & 0xFFFFFFFF for s in seed])
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
    def attach_seed(ex, seed):
        # A static [2] shape makes ragged_batch stack the seeds densely as [block, 2].
        return {"ids": ex["ids"], "seed": _tf().ensure_shape(seed, [2])}

    blockwise = _blockwise(make, ("ids",), with_seed=True)
    return lambda ds: blockwise(attach_seed(ds))


def instruction(ids: inf.SpecialIds, *, one_d: bool, max_len: int):
    """Prompt/response pairs as ``prompt [gMASK] <sop> response <eop>``, cut to fit ``max_len``."""

    def make(prompt, response):
        prompt = np.asarray(prompt, np.int32)
        response = np.asarray(response, np.int32)
        room = max_len - 2
        response = response[: max(1, room // 2)] if len(prompt) + len(response) > room else response
        prompt = prompt[-max(0, room - len(response)) :] if len(prompt) + len(response) > room else prompt
        return _emit(inf.prompt_sample(prompt, response, ids), one_d)

    blockwise = _blockwise(make, ("prompt", "response"), with_seed=False)

    def fn(ds):
        tf = _tf()
        return blockwise(ds.filter(lambda ex: tf.size(ex["response"]) > 0))

    return fn
