"""``python -m glm_jax.train [--config PATH] [key=value ...]``: train GLM on the mesh.

The default config is configs/glm-tiny.yaml, which trains on this CPU in seconds.
Progress lines go to stderr; the last line on stdout is one JSON object with the
final step, train loss and throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from glm_jax import cli
from glm_jax.config import dump_config


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.train", description=__doc__.splitlines()[0])
    cli.add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = cli.config_from_args(args)  # every key and value checked before jax starts

    import jax
    import numpy as np

    from glm_jax.data.pipeline import batches
    from glm_jax.model import GLM
    from glm_jax.parallel.mesh import make_mesh
    from glm_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from glm_jax.training.state import init_state, make_train_step, state_shardings

    mesh = make_mesh(cfg.mesh)
    sizes = dict(mesh.shape)
    if cfg.train.batch_size % sizes["data"]:
        raise cli.ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by mesh.data ({sizes['data']})")
    if cfg.workdir:
        os.makedirs(cfg.workdir, exist_ok=True)
        with open(os.path.join(cfg.workdir, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"glm_jax.train: model {cfg.model.name}, mesh {sizes} on {jax.device_count()} {jax.default_backend()} device(s)")
    model = GLM(cfg.model, deterministic=False)
    optimizer = make_optimizer(cfg.train)
    state = init_state(cfg, model, optimizer, mesh, jax.random.key(cfg.train.seed))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    log(f"glm_jax.train: {n_params:,} parameters")
    step_fn = make_train_step(cfg, model, optimizer, mesh, state_shardings(cfg, model, optimizer, mesh))
    schedule = learning_rate_schedule(cfg.train)

    log(f"glm_jax.train: data {cfg.data.mixture} on corpus {cfg.data.corpus}")
    data = batches(cfg, "train")
    tokens_seen, t_start, metrics, loss = 0, None, None, float("nan")
    for step in range(cfg.train.steps):
        batch = next(data)
        state, metrics = step_fn(state, batch)
        if step == 0:
            loss = float(metrics["loss"])  # wait for compilation before timing
            t_start = time.perf_counter()
        else:
            tokens_seen += cfg.train.batch_size * cfg.train.seq_len
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            loss = float(metrics["loss"])
            elapsed = time.perf_counter() - t_start
            tps = tokens_seen / elapsed if elapsed > 0 and tokens_seen else float("nan")
            log(
                f"step {done}/{cfg.train.steps}  loss {loss:.4f}  lr {float(schedule(step)):.2e}  "
                f"grad_norm {float(metrics['grad_norm']):.3f}  tokens/s {tps:,.0f}"
            )
    data.close()
    elapsed = time.perf_counter() - t_start if t_start else 0.0
    result = {
        "step": cfg.train.steps,
        "train_loss": loss,
        "tokens_per_s": tokens_seen / elapsed if elapsed > 0 and tokens_seen else None,
        "parameters": n_params,
        "mesh": sizes,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
