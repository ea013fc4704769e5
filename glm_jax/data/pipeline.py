"""From config to numpy batches for the trainer: seqio mixture -> GLM feature converter -> batch.

Batches are a pure function of (seed, position): the mixture, the per-example seeds and
the shuffles are all seeded, so ``batches(cfg, start_step=N)`` (or a ``BatchStream`` at
row R) yields exactly the batches an uninterrupted run sees from there on. Each process reads its own shard (seqio
ShardInfo) and produces its share of the global batch. TensorFlow runs on the host CPU
only and never claims accelerator memory.
"""

from __future__ import annotations

import itertools
import logging
from typing import Iterator, Optional

import numpy as np

from glm_jax.config import Config, ConfigError
from glm_jax.data import tasks, tf_runtime
from glm_jax.data.feature_converter import GLMFeatureConverter, batch_rows
from glm_jax.data.synthetic import copy_rows
from glm_jax.data.vocab import load_vocabulary
from glm_jax.model.batch import Batch

# TensorFlow and seqio are imported inside the functions that use them (tf_runtime.tensorflow()):
# they take seconds to import, and config checks, the synthetic mixture and the jax-only
# tools never need them.


class _DropSeqioCacheAdvice(logging.Filter):
    """seqio warns on every dataset build that uncached tasks shuffle poorly on restart;
    ours resume by position, not by reshuffling, so the advice is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "uncached FunctionDataset" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropSeqioCacheAdvice())




def host_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ConfigError(f"the batch size ({global_batch_size}) must be divisible by the {process_count} processes")
    return global_batch_size // process_count


def examples(cfg: Config, split: str = "train", *, process_index: int = 0, process_count: int = 1, seed: Optional[int] = None):
    """The seqio mixture's examples (unbatched, variable length) as a tf.data.Dataset."""
    import seqio

    tf_runtime.tensorflow()
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
# Blocks made ahead of the trainer: a fixed number, so the reader's memory has a fixed
# bound (with autotune off, example_options, tf.data's AUTOTUNE buffer grows each time the
# consumer finds it empty).
PREFETCH_BLOCKS = 2


def _unbatch(blocks) -> Iterator[dict]:
    """Ragged blocks of examples -> one numpy dict per example (views, no copies)."""
    for block in blocks:
        keys = list(block)
        splits = block[keys[0]].row_splits.numpy()
        values = {k: block[k].values.numpy() for k in keys}
        for i in range(len(splits) - 1):
            a, b = splits[i], splits[i + 1]
            yield {k: values[k][a:b] for k in keys}


def abstract_batch(cfg: Config, rows: int) -> Batch:
    """The shapes and dtypes of a ``rows``-row batch as this config's data produces it
    (``jax.ShapeDtypeStruct`` leaves): the argument of an ahead-of-time compile."""
    import jax  # the data pipeline itself runs without jax; only this description needs it

    length = cfg.train.seq_len

    def spec(*shape, dtype=np.int32):
        return jax.ShapeDtypeStruct(shape, dtype)

    positions = spec(rows, 2, length) if cfg.model.two_d_positions else spec(rows, length)
    packed = cfg.data.pack and cfg.data.mixture != "synthetic"  # the synthetic task never packs
    return Batch(
        tokens=spec(rows, length),
        positions=positions,
        prefix_len=spec(rows, max(1, length // 2)) if packed else spec(rows),
        targets=spec(rows, length),
        loss_weights=spec(rows, length, dtype=np.float32),
        segment_ids=spec(rows, length) if packed else None,
    )


def to_model_batch(features: dict, cfg: Config) -> Batch:
    """Numpy converter output -> the model's batch (with 2D positions, the block positions
    become row 1 of ``positions``, ``[b, 2, L]``)."""
    positions = np.asarray(features["positions"])
    if cfg.model.two_d_positions:
        positions = np.stack([positions, np.asarray(features["block_positions"])], axis=1)
    segments = features.get("segment_ids")
    return Batch(
        tokens=np.asarray(features["tokens"]),
        positions=positions,
        prefix_len=np.asarray(features["prefix_len"]),
        targets=np.asarray(features["targets"]),
        loss_weights=np.asarray(features["loss_weights"]),
        segment_ids=None if segments is None else np.asarray(segments),
    )


class EmptySplit(ConfigError):
    """A split that yields no examples at all (a corpus too small, or nothing readable in it)."""


class BatchStream:
    """This process's share of consecutive global batches, of any size, from a position
    counted in global rows (``rows``, saved with checkpoints).

    A global batch of B rows is B/process_count rows from each process's own shard, so
    a stream resumed at ``start_row`` yields what the uninterrupted stream would have.
    Batch sizes may change from step to step (batch-size ramp-up).
    """

    def __init__(self, cfg: Config, split: str = "train", *, start_row: int = 0, process_index: int = 0,
                 process_count: int = 1):
        if start_row % process_count:
            raise ValueError(f"start_row {start_row} is not divisible by the {process_count} processes")
        self.cfg, self.rows, self.split = cfg, start_row, split
        self.process_index, self.process_count = process_index, process_count
        self._it = self._local_rows = None
        if cfg.data.mixture != "synthetic":
            tf = tf_runtime.tensorflow()
            ds = examples(cfg, split, process_index=process_index, process_count=process_count)
            self._it = iter(ds.ragged_batch(EXAMPLE_BLOCK).prefetch(PREFETCH_BLOCKS))
            converter = GLMFeatureConverter(cfg.train.seq_len, cfg.data.pack, cfg.model.pad_token_id)
            self._local_rows = converter.rows(_unbatch(self._it))
            for _ in itertools.islice(self._local_rows, start_row // process_count):
                pass  # replay to the resume position

    def next(self, global_batch_size: int) -> Batch:
        per_host = host_batch_size(global_batch_size, self.process_count)
        if self._local_rows is None:
            cfg = self.cfg
            first = self.rows + self.process_index * per_host
            batch = copy_rows(cfg.model, first, per_host, cfg.train.seq_len, cfg.train.seed, cfg.data.synthetic_vocab_size)
        else:
            try:
                features = next(batch_rows(itertools.islice(self._local_rows, per_host), per_host))
            except StopIteration:
                skipped = tasks.skipped_input()
                raise EmptySplit(
                    f"data: the {self.split} split of data.corpus={self.cfg.data.corpus} yields no examples"
                    + (f" (the readers skipped: {', '.join(f'{v} {k}' for k, v in sorted(skipped.items()))})" if skipped else "")
                ) from None
            batch = to_model_batch(features, self.cfg)
        self.rows += global_batch_size
        return batch

    def close(self) -> None:
        # Dropping the iterator lets TensorFlow's generator threads end, so the process can exit.
        self._local_rows = self._it = None


def batches(cfg: Config, split: str = "train", *, start_step: int = 0, process_index: int = 0,
            process_count: int = 1) -> Iterator[dict]:
    """Model batches of ``train.batch_size`` from ``start_step`` on: this process's share."""
    stream = BatchStream(cfg, split, start_row=start_step * cfg.train.batch_size, process_index=process_index,
                         process_count=process_count)
    try:
        while True:
            yield stream.next(cfg.train.batch_size)
    finally:
        stream.close()
