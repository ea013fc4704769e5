"""Input-pipeline throughput (read -> tokenize -> infill -> pack -> batch) against the
token rate of a training step of the same config, measured in one run.

    python -m glm_jax.bench data --json [--batches N] [key=value ...]

``ratio`` = pipeline tokens/s over train-step tokens/s: above 1 the data never bounds
training; the target for glm-tiny on a CPU host is 20.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from typing import Optional, Sequence

from glm_jax import cli


def pipeline_rate(cfg, n_batches: int) -> dict:
    from glm_jax.data import tasks
    from glm_jax.data.pipeline import batches

    tasks.reset_stats()
    gen = batches(cfg, "train")
    next(gen)  # startup: corpus, vocabulary, TF graph building
    t = time.perf_counter()
    rows = real = 0
    for b in itertools.islice(gen, n_batches):
        rows += b.tokens.shape[0]
        real += int((b.loss_weights > 0).sum() + (b.prefix_len.sum()))
    elapsed = time.perf_counter() - t
    gen.close()
    return {
        "tokens_per_s": rows * cfg.train.seq_len / elapsed,
        "non_padding_tokens_per_s": real / elapsed,
        "batches": n_batches,
        "seconds": elapsed,
        "reader_stats": dict(tasks.STATS),
    }


def train_rate(cfg, n_steps: int) -> float:
    import dataclasses

    import jax

    from glm_jax.data.synthetic import copy_batch
    from glm_jax.parallel.mesh import make_mesh
    from glm_jax.training.trainer import Trainer

    mesh = make_mesh(cfg.mesh)
    trainer = Trainer.build(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=n_steps + 1)), mesh)
    state, step = trainer.init_state(seed=0), trainer.train_step
    batch = copy_batch(cfg.model, cfg.train.batch_size, cfg.train.seq_len, 0, 0)
    state, m = step(state, batch)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(n_steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return n_steps * cfg.train.batch_size * cfg.train.seq_len / (time.perf_counter() - t)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.bench data", description=__doc__.splitlines()[0])
    cli.add_config_args(parser)
    parser.add_argument("--batches", type=int, default=200, help="batches to time after the first")
    parser.add_argument("--steps", type=int, default=20, help="train steps to time")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cfg = cli.config_from_args(args)
    if cfg.data.mixture == "synthetic":
        raise cli.ConfigError("bench data measures the seqio pipeline; pick a real data.mixture")
    data = pipeline_rate(cfg, args.batches)
    train = train_rate(cfg, args.steps)
    result = {
        "bench": "data",
        "mixture": cfg.data.mixture,
        "pack": cfg.data.pack,
        "seq_len": cfg.train.seq_len,
        "batch_size": cfg.train.batch_size,
        "pipeline_tokens_per_s": round(data["tokens_per_s"]),
        "pipeline_non_padding_tokens_per_s": round(data["non_padding_tokens_per_s"]),
        "train_step_tokens_per_s": round(train),
        "ratio": round(data["tokens_per_s"] / train, 2),
        "reader_stats": data["reader_stats"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:36s} {v}")
    print(f"pipeline/train token-rate ratio {result['ratio']} (target >= 20)", file=sys.stderr)
    return 0
