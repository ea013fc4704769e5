"""``python -m glm_jax.train [--config PATH] [key=value ...]``: train GLM on the mesh.

The default config is configs/glm-tiny.yaml. With ``workdir=DIR`` the run keeps
``DIR/config.yaml`` and ``DIR/checkpoints`` (orbax, every ``train.checkpoint_every``
steps, the last ``train.keep_checkpoints`` kept), and a rerun with the same workdir
resumes from the newest checkpoint, data included. SIGTERM (preemption, maintenance)
finishes the current step, saves, and exits 0. Progress lines go to stderr; the last
line on stdout is one JSON object with the final step, losses and throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Optional, Sequence

from glm_jax import cli
from glm_jax.config import dump_config


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    from glm_jax.training.checkpointing import Checkpointer, abstract_with_shardings
    from glm_jax.training.metrics import flops_per_token, peak_flops
    from glm_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from glm_jax.training.state import abstract_state, init_state, make_eval_step, make_train_step, state_shardings

    mesh = make_mesh(cfg.mesh)
    sizes = dict(mesh.shape)
    if cfg.train.batch_size % sizes["data"]:
        raise cli.ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by mesh.data ({sizes['data']})")
    log(f"glm_jax.train: model {cfg.model.name}, mesh {sizes} on {jax.device_count()} {jax.default_backend()} device(s)")

    model = GLM(cfg.model, deterministic=False)
    optimizer = make_optimizer(cfg.train)
    shardings = state_shardings(cfg, model, optimizer, mesh)

    ckpt, state, start = None, None, 0
    if cfg.workdir:
        os.makedirs(cfg.workdir, exist_ok=True)
        with open(os.path.join(cfg.workdir, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))
        ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), cfg.train.checkpoint_every, cfg.train.keep_checkpoints)
        target = abstract_with_shardings(abstract_state(cfg, model, optimizer), shardings)
        restored = ckpt.restore_latest(target, warn=lambda m: log(f"warning: {m}"))
        if restored is not None:
            state, meta, start = restored
            log(f"glm_jax.train: resuming from step {start} ({ckpt.directory})")
    else:
        log("glm_jax.train: no workdir set, so no checkpoints are kept")
    if state is None:
        state = init_state(cfg, model, optimizer, mesh, jax.random.key(cfg.train.seed), shardings)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    log(f"glm_jax.train: {n_params:,} parameters; data {cfg.data.mixture} on corpus {cfg.data.corpus}")

    peak, peak_source = peak_flops(list(mesh.devices.flat))
    token_flops = flops_per_token(cfg.model, cfg.train.seq_len)
    log(f"glm_jax.train: MFU against {peak / 1e12:,.3f} TFLOP/s ({peak_source})")
    step_fn = make_train_step(cfg, model, optimizer, mesh, shardings)
    eval_fn = make_eval_step(GLM(cfg.model), mesh, shardings)
    schedule = learning_rate_schedule(cfg.train)

    def evaluate(params) -> float:
        loss_sum = weight = 0.0
        gen = batches(cfg, "validation")
        for _ in range(cfg.train.eval_batches):
            ls, w = eval_fn(params, next(gen))
            loss_sum, weight = loss_sum + float(ls), weight + float(w)
        gen.close()
        return loss_sum / max(weight, 1.0)

    stop = {"signal": None}

    def on_sigterm(signum, frame):
        stop["signal"] = signum
        log("glm_jax.train: SIGTERM received; finishing this step and saving")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    data = batches(cfg, "train", start_step=start)
    tokens_seen, t_start, t_end, loss, eval_loss = 0, None, None, float("nan"), None
    step = start
    try:
        while step < cfg.train.steps and stop["signal"] is None:
            state, metrics = step_fn(state, next(data))
            step += 1
            if t_start is None:
                loss = float(metrics["loss"])  # the first step includes compilation: time from here
                t_start = time.perf_counter()
            else:
                tokens_seen += cfg.train.batch_size * cfg.train.seq_len
            if ckpt:
                ckpt.save(step, state, {"data_step": step})
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                loss = float(metrics["loss"])
                elapsed = time.perf_counter() - t_start
                tps = tokens_seen / elapsed if elapsed > 0 and tokens_seen else float("nan")
                eta = (cfg.train.steps - step) * cfg.train.batch_size * cfg.train.seq_len / tps if tps == tps else float("nan")
                log(
                    f"step {step}/{cfg.train.steps}  loss {loss:.4f}  lr {float(schedule(step - 1)):.2e}  "
                    f"grad_norm {float(metrics['grad_norm']):.3f}  tokens/s {tps:,.0f}  "
                    f"mfu {100 * tps * token_flops / peak:.1f}%  eta {eta:,.0f}s"
                    + (f"  skipped {int(state.skipped)}" if int(state.skipped) else "")
                )
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                log(f"step {step}: eval loss {evaluate(state.params):.4f}")
        t_end = time.perf_counter()
        if stop["signal"] is None:
            eval_loss = evaluate(state.params)
            log(f"step {step}: eval loss {eval_loss:.4f}")
        if ckpt:
            ckpt.save(step, state, {"data_step": step}, force=True, wait=True)
    finally:
        data.close()
        if ckpt:
            ckpt.close()
        signal.signal(signal.SIGTERM, previous)

    elapsed = t_end - t_start if t_start else 0.0
    result = {
        "step": step,
        "train_loss": loss,
        "eval_loss": eval_loss,
        "tokens_per_s": tokens_seen / elapsed if elapsed > 0 and tokens_seen else None,
        "mfu": tokens_seen / elapsed * token_flops / peak if elapsed > 0 and tokens_seen else None,
        "skipped_steps": int(state.skipped),
        "resumed_from": start or None,
        "preempted": stop["signal"] is not None,
        "parameters": n_params,
        "mesh": sizes,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
