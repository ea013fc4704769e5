"""``python -m glm_jax.train [--config PATH] [key=value ...]``: train GLM on the mesh.

The default config is configs/glm-tiny.yaml. With ``workdir=DIR`` the run keeps
``DIR/config.yaml`` and ``DIR/checkpoints`` (orbax, every ``train.checkpoint_every``
steps, the last ``train.keep_checkpoints`` kept), and a rerun with the same workdir
resumes from the newest checkpoint, data included. SIGTERM (preemption, maintenance)
finishes the current step, saves, and exits 0. Progress lines go to stderr and the same
scalars to ``DIR/tensorboard``; the last line on stdout is one JSON object with the final
step, losses and throughput. With several processes (TPU pod slices, SLURM, or the
JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID variables) jax.distributed is
initialised first, each process feeds its own data shard, and only process 0 logs.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from typing import Optional, Sequence

from glm_jax import cli
from glm_jax.config import dump_config


def log(msg: str) -> None:
    from glm_jax.parallel.distributed import is_main_process

    if is_main_process():
        print(msg, file=sys.stderr, flush=True)


def check_batch_sizes(cfg, data_shards: int) -> None:
    """Every batch size the run will use splits evenly over data shards and microbatches."""
    from glm_jax.training.batch_rampup import batch_sizes

    unit = data_shards * cfg.train.microbatches
    for size in batch_sizes(cfg.train):
        if size % unit:
            key = "train.batch_size" if size == cfg.train.batch_size else "the ramp-up (train.batch_size_start/increment)"
            raise cli.ConfigError(
                f"{key} gives a batch of {size}, which must be divisible by mesh.data ({data_shards}) "
                f"x train.microbatches ({cfg.train.microbatches}) = {unit}"
            )


def enable_compile_cache(directory) -> None:
    """Cache compiled executables under ``directory`` (unless JAX_COMPILATION_CACHE_DIR
    already names a cache): a resumed run then loads instead of compiling."""
    import os

    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.train", description=__doc__.splitlines()[0])
    cli.add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = cli.config_from_args(args)  # every key and value checked before jax starts

    from glm_jax.parallel import distributed

    info = distributed.initialize()  # before any other use of jax

    import jax
    import numpy as np
    from etils import epath

    from glm_jax.data.pipeline import BatchStream
    from glm_jax.model import GLM
    from glm_jax.parallel.mesh import make_mesh
    from glm_jax.training.batch_rampup import batch_size_at
    from glm_jax.training.checkpointing import Checkpointer, abstract_with_shardings
    from glm_jax.training.metrics import flops_per_token, peak_flops
    from glm_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from glm_jax.training.stability import SpikeMonitor
    from glm_jax.training.state import abstract_state, init_state, make_eval_step, make_train_step, state_shardings
    from glm_jax.training.tensorboard import ScalarWriter

    if cfg.workdir and cfg.train.compile_cache:
        enable_compile_cache(epath.Path(cfg.workdir) / "compile_cache")
    mesh = distributed.multislice_mesh(cfg.mesh) if distributed.slice_count() > 1 else make_mesh(cfg.mesh)
    sizes = dict(mesh.shape)
    check_batch_sizes(cfg, sizes["data"])
    if info.process_count > 1 or info.note:
        log(f"glm_jax.train: {info.describe()}")
    log(f"glm_jax.train: model {cfg.model.name}, mesh {sizes} ({cfg.mesh.param_sharding}) on {jax.device_count()} "
        f"{jax.default_backend()} device(s)")

    model = GLM(cfg.model, deterministic=False)
    optimizer = make_optimizer(cfg.train)
    shardings = state_shardings(cfg, model, optimizer, mesh)
    shard_index, shard_count = distributed.data_shard(mesh)

    ckpt, state, start, meta = None, None, 0, {}
    if cfg.workdir:
        workdir = epath.Path(cfg.workdir)  # a local path or gs://bucket/dir
        if distributed.is_main_process():
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "config.yaml").write_text(dump_config(cfg))
        ckpt = Checkpointer(workdir / "checkpoints", cfg.train.checkpoint_every, cfg.train.keep_checkpoints)
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
    eval_fn = make_eval_step(GLM(cfg.model), mesh, shardings, cfg.train.loss_vocab_chunks)
    schedule = learning_rate_schedule(cfg.train)
    use_tb = cfg.workdir and cfg.train.tensorboard and distributed.is_main_process()
    writer = ScalarWriter(str(epath.Path(cfg.workdir) / "tensorboard") if use_tb else None)
    monitor = SpikeMonitor(cfg.train.rollback_after, cfg.train.spike_factor)

    eval_seconds = [0.0]  # time spent evaluating, kept out of the training tokens/s

    def evaluate(params) -> float:
        t0 = time.perf_counter()
        loss_sum = weight = 0.0
        stream = BatchStream(cfg, "validation", process_index=shard_index, process_count=shard_count)
        for _ in range(cfg.train.eval_batches):
            ls, w = eval_fn(params, distributed.global_batch(stream.next(cfg.train.batch_size), mesh))
            loss_sum, weight = loss_sum + float(ls), weight + float(w)
        stream.close()
        eval_seconds[0] += time.perf_counter() - t0
        return loss_sum / max(weight, 1.0)

    stop = {"signal": None}

    def on_sigterm(signum, frame):
        stop["signal"] = signum
        log("glm_jax.train: SIGTERM received; finishing this step and saving")

    def stopping() -> bool:
        # Every process must stop at the same step, or the others hang in a collective.
        mine = stop["signal"] is not None
        return distributed.any_process(mine) if info.process_count > 1 else mine

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    # Where the data stands, in global rows: saved with each checkpoint (older checkpoints
    # kept only the step, at a fixed batch size).
    start_row = int(meta.get("data_rows", start * cfg.train.batch_size))
    data = BatchStream(cfg, "train", start_row=start_row, process_index=shard_index, process_count=shard_count)
    tokens_seen, t_start, t_end, loss, eval_loss, first_eval = 0, None, None, float("nan"), None, None
    rollbacks, skips_rolled_back, step = 0, 0, start
    try:
        if start == 0 and cfg.train.eval_every:
            first_eval = evaluate(state.params)
            log(f"step 0: eval loss {first_eval:.4f}")
            writer.scalars(0, {"eval/loss": first_eval})
        while step < cfg.train.steps and not stopping():
            batch_size = batch_size_at(cfg.train, data.rows)
            state, metrics = step_fn(state, distributed.global_batch(data.next(batch_size), mesh))
            step += 1
            if t_start is None:
                loss = float(metrics["loss"])  # the first step includes compilation: time from here
                t_start, eval_seconds[0] = time.perf_counter(), 0.0
            else:
                tokens_seen += batch_size * cfg.train.seq_len
            if cfg.train.rollback_after and monitor.observe(float(metrics["loss"]), bool(metrics["skipped"])):
                skipped_before = int(state.skipped)
                target = abstract_with_shardings(abstract_state(cfg, model, optimizer), shardings)
                step, state = rollback(ckpt, target, step, data.rows, state)
                skips_rolled_back += skipped_before - int(state.skipped)
                rollbacks += 1
                continue
            if ckpt and not monitor.bad_streak:  # never save weights in the middle of a spike
                ckpt.save(step, state, {"data_rows": data.rows, "step": step})
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                loss = float(metrics["loss"])
                elapsed = time.perf_counter() - t_start - eval_seconds[0]
                tps = tokens_seen / elapsed if elapsed > 0 and tokens_seen else float("nan")
                eta = (cfg.train.steps - step) * batch_size * cfg.train.seq_len / tps if math.isfinite(tps) else float("nan")
                scalars = {
                    "train/loss": loss,
                    "train/learning_rate": float(schedule(step - 1)),
                    "train/grad_norm": float(metrics["grad_norm"]),
                    "train/tokens_per_s": tps,
                    "train/mfu": tps * token_flops / peak,
                    "train/batch_size": batch_size,
                    "train/skipped_steps": int(state.skipped),
                }
                writer.scalars(step, scalars)
                log(
                    f"step {step}/{cfg.train.steps}  loss {loss:.4f}  lr {scalars['train/learning_rate']:.2e}  "
                    f"grad_norm {scalars['train/grad_norm']:.3f}  tokens/s {tps:,.0f}  "
                    f"mfu {100 * scalars['train/mfu']:.1f}%  eta {eta:,.0f}s"
                    + (f"  batch {batch_size}" if cfg.train.batch_size_start else "")
                    + (f"  skipped {int(state.skipped)}" if int(state.skipped) else "")
                )
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                value = evaluate(state.params)
                log(f"step {step}: eval loss {value:.4f}")
                writer.scalars(step, {"eval/loss": value})
                writer.flush()
        t_end = time.perf_counter() - eval_seconds[0]
        preempted = stopping()
        if not preempted:
            eval_loss = evaluate(state.params)
            log(f"step {step}: eval loss {eval_loss:.4f}")
            writer.scalars(step, {"eval/loss": eval_loss})
        if ckpt:
            ckpt.save(step, state, {"data_rows": data.rows, "step": step}, force=True, wait=True)
    finally:
        data.close()
        writer.close()
        if ckpt:
            ckpt.close()
        signal.signal(signal.SIGTERM, previous)

    elapsed = t_end - t_start if t_start else 0.0
    result = {
        "step": step,
        "train_loss": loss,
        "eval_loss": eval_loss,
        "first_eval_loss": first_eval,
        "tokens_per_s": tokens_seen / elapsed if elapsed > 0 and tokens_seen else None,
        "mfu": tokens_seen / elapsed * token_flops / peak if elapsed > 0 and tokens_seen else None,
        "skipped_steps": int(state.skipped) + skips_rolled_back,
        "rollbacks": rollbacks,
        "resumed_from": start or None,
        "preempted": preempted,
        "parameters": n_params,
        "mesh": sizes,
        "processes": info.process_count,
    }
    if distributed.is_main_process():
        print(json.dumps(result), flush=True)
    return 0


def rollback(ckpt, target, step: int, data_rows: int, state):
    """Restore the newest checkpoint after a run of bad steps; the data goes on from where it
    is, so the batches that led into the spike are not seen again."""
    if ckpt is None:
        log(f"step {step}: too many bad steps in a row, but there is no workdir to roll back to; going on")
        return step, state
    ckpt.manager.wait_until_finished()
    restored = ckpt.restore_latest(target, warn=lambda m: log(f"warning: {m}"))
    if restored is None:
        log(f"step {step}: too many bad steps in a row, but no checkpoint has been saved yet; going on")
        return step, state
    new_state, _, saved = restored
    log(f"step {step}: too many bad steps in a row; rolled back to the checkpoint of step {saved}, "
        f"data continues at row {data_rows}")
    return saved, new_state


if __name__ == "__main__":
    cli.run_main(main)
