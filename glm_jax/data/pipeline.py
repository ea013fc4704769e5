"""From config to numpy batches for the trainer: seqio mixture -> GLM feature converter -> batch.

Batches are a pure function of (seed, step): the mixture, the per-example seeds and the
shuffles are all seeded, so ``batches(cfg, start_step=N)`` yields exactly the batches an
uninterrupted run sees from step N on. Each process reads its own shard (seqio
ShardInfo) and produces its share of the global batch. TensorFlow runs on the host CPU
only and never claims accelerator memory.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from glm_jax.config import Config, ConfigError


def _tf():
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")  # keep TF off the accelerators JAX uses
    except RuntimeError:
        pass  # already initialised, with the same setting
    return tf


def host_batch_size(cfg: Config, process_count: int) -> int:
    if cfg.train.batch_size % process_count:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by the {process_count} processes")
    return cfg.train.batch_size // process_count


def examples(cfg: Config, split: str = "train", *, process_index: int = 0, process_count: int = 1, seed: Optional[int] = None):
    """The seqio mixture's examples (unbatched, variable length) as a tf.data.Dataset."""
    import seqio

    from glm_jax.data import tasks
    from glm_jax.data.vocab import load_vocabulary

    _tf()
    vocab = load_vocabulary(cfg.model, cfg.data.vocab, cfg.data.vocab_id_offset)
    name = tasks.register(cfg, vocab)
    provider = seqio.get_mixture_or_task(name)
    kwargs = {} if isinstance(provider, seqio.Mixture) else {"try_in_mem_cache": False}
    return provider.get_dataset(
        sequence_length=None,
        split=split,
        shuffle=True,
        seed=cfg.train.seed if seed is None else seed,
        shard_info=seqio.ShardInfo(index=process_index, num_shards=process_count) if process_count > 1 else None,
        num_epochs=None,
        trim_output_features=False,
        **kwargs,
    )


EXAMPLE_BLOCK = 256  # examples per TensorFlow -> Python hand-over


def _unbatch(blocks) -> Iterator[dict]:
    """Ragged blocks of examples -> one numpy dict per example (views, no copies)."""
    for block in blocks:
        keys = list(block)
        splits = block[keys[0]].row_splits.numpy()
        values = {k: block[k].values.numpy() for k in keys}
        for i in range(len(splits) - 1):
            a, b = splits[i], splits[i + 1]
            yield {k: values[k][a:b] for k in keys}


def to_model_batch(batch: dict, cfg: Config) -> dict:
    """Numpy converter output -> the model's inputs (2D positions stacked as [b, 2, L])."""
    out = {k: np.asarray(v) for k, v in batch.items() if k != "block_ids"}
    if cfg.model.position_encoding in ("rotary_2d", "learned_2d"):
        out["positions"] = np.stack([batch["positions"], batch["block_ids"]], axis=1)
    return out


def batches(cfg: Config, split: str = "train", *, start_step: int = 0, process_index: int = 0,
            process_count: int = 1) -> Iterator[dict]:
    """Model batches from ``start_step`` on: this process's share of each global batch."""
    if cfg.data.mixture == "synthetic":
        from glm_jax.data.synthetic import copy_batch

        per_host = host_batch_size(cfg, process_count)
        step = start_step
        while True:
            b = copy_batch(cfg.model, cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed, step, cfg.data.synthetic_vocab_size)
            yield {k: v[process_index * per_host : (process_index + 1) * per_host] for k, v in b.items()}
            step += 1
    from glm_jax.data.feature_converter import GLMFeatureConverter, batch_rows

    tf = _tf()
    ds = examples(cfg, split, process_index=process_index, process_count=process_count)
    ds = ds.ragged_batch(EXAMPLE_BLOCK).prefetch(tf.data.AUTOTUNE)
    it = iter(ds)
    converter = GLMFeatureConverter(cfg.train.seq_len, cfg.data.pack, cfg.model.pad_token_id)
    try:
        rows = converter.rows(_unbatch(it))
        for step, b in enumerate(batch_rows(rows, host_batch_size(cfg, process_count))):
            if step >= start_step:
                yield to_model_batch(b, cfg)
    finally:
        del it  # lets TensorFlow's generator threads end, so the process can exit
