"""The training loop: from start (or resume) to the final save, as ``python -m glm_jax.train`` runs it.

:class:`TrainingRun` drives a :class:`glm_jax.training.trainer.Trainer` (what a step is)
over the data stream, saving checkpoints, evaluating, logging progress and TensorBoard
scalars, rolling back after loss spikes and stopping cleanly on SIGTERM.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Optional

import jax
from etils import epath

from glm_jax.checkpoint import directory
from glm_jax.checkpoint.lock import WorkdirLock
from glm_jax.config import Config, ConfigError, differences, dump_config, load_config
from glm_jax.data import tasks
from glm_jax.data.pipeline import BatchStream, EmptySplit
from glm_jax.parallel import distributed
from glm_jax.parallel.mesh import make_mesh
from glm_jax.training import pipeline_plan
from glm_jax.training.batch_rampup import batch_size_at, batch_sizes
from glm_jax.training.held_out import held_out_loss
from glm_jax.training.metrics import flops_per_token, peak_flops
from glm_jax.training.stability import SpikeMonitor
from glm_jax.training.tensorboard import ScalarWriter
from glm_jax.training.trainer import Trainer


# Reader counts that are repairs (the input was used), not input left out.
REPAIRED_INPUT = frozenset({"cut_documents", "invalid_utf8_documents", "cut_prompts", "cut_responses"})


class SigtermFlag:
    """SIGTERM (preemption, maintenance) as a flag the loop checks between steps: the run
    finishes its step, saves and exits 0. Installed as soon as jax is imported, so a
    SIGTERM during start-up (restore, compilation) also ends the run cleanly instead of
    in a native crash handler's stack dump."""

    def __init__(self):
        self.received = False
        self._previous = None

    def _handle(self, signum, frame):
        self.received = True
        log("glm_jax.train: SIGTERM received; finishing this step and saving")

    def install(self) -> None:
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


SIGTERM = SigtermFlag()


def log(msg: str) -> None:
    if distributed.is_main_process():
        print(msg, file=sys.stderr, flush=True)


def check_batch_sizes(cfg, data_shards: int) -> None:
    """Every batch size the run will use splits evenly over data shards and microbatches."""
    unit = data_shards * cfg.train.microbatches
    for size in batch_sizes(cfg.train):
        if size % unit:
            key = "train.batch_size" if size == cfg.train.batch_size else "the ramp-up (train.batch_size_start/increment)"
            raise ConfigError(
                f"{key} gives a batch of {size}, which must be divisible by mesh.data ({data_shards}) "
                f"x train.microbatches ({cfg.train.microbatches}) = {unit}"
            )


def prepare_workdir(workdir, cfg: Config) -> None:
    """Create ``workdir`` if needed, and refuse (ConfigError, nothing written) when it is
    not a directory or holds another run: checkpoints saved with a different model or
    data config, unless ``train.allow_config_change``."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir={workdir} is a file, not a directory")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"workdir={workdir} cannot be created: {e.strerror or e}") from None
    saved = workdir / directory.CONFIG
    has_checkpoints = (workdir / directory.CHECKPOINTS).exists() and any(
        p.name.isdigit() for p in (workdir / directory.CHECKPOINTS).iterdir())
    if not (saved.exists() and has_checkpoints) or cfg.train.allow_config_change:
        return
    try:
        before = load_config(str(saved))
    except ConfigError as e:
        raise ConfigError(f"workdir={workdir} holds checkpoints but its {directory.CONFIG} does not load ({e}); "
                          "train in a new workdir=") from None
    changed = differences(before, cfg, sections=("model", "data", "finetune"))
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(
            f"workdir={workdir} holds checkpoints of another configuration ({'; '.join(changed[:3])}{more}); "
            "train in a new workdir=, or pass train.allow_config_change=true to resume with the new values"
        )


def enable_compile_cache(path) -> None:
    """Cache compiled executables under ``path`` (unless JAX_COMPILATION_CACHE_DIR
    already names a cache): a resumed run then loads instead of compiling."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class TrainingRun:
    """One invocation of the training loop: the trainer, the state, the data, the
    checkpoints and the logs, from start (or resume) to the final save."""

    def __init__(self, cfg: Config, info):
        self.cfg, self.info = cfg, info
        self.lock = None
        workdir = epath.Path(cfg.workdir) if cfg.workdir else None  # a local path or gs://bucket/dir
        if cfg.data.mixture != "synthetic":
            tasks.check_sources(cfg.data)  # missing or unusable data fails before anything is written
        self._claim_workdir(workdir)  # before any work: the workdir may belong to another run
        try:
            self._setup(workdir)
        except BaseException:
            self.close()  # a refused or failed start leaves the workdir free for the next try
            raise

    def _setup(self, workdir) -> None:
        cfg = self.cfg
        if workdir and cfg.train.compile_cache:
            enable_compile_cache(workdir / directory.COMPILE_CACHE)
        mesh = self._mesh()
        self.trainer = Trainer.build(cfg, mesh)
        if self.trainer.precompiled:
            log(f"glm_jax.train: train step loaded from {cfg.train.compiled_step} "
                f"({self.trainer.precompiled.describe()}); batches of its shape run without compiling")
        self.shard_index, self.shard_count = distributed.data_shard(mesh)
        self.ckpt = self.trainer.checkpointer(str(workdir)) if workdir else None
        if workdir is None:
            log("glm_jax.train: no workdir set, so nothing this run learns is kept (add workdir=runs/NAME to keep it)")
        self.state, self.start, start_row = self._restore_or_init()
        if workdir and distributed.is_main_process():
            (workdir / directory.CONFIG).write_text(dump_config(self.cfg))
        self.peak, peak_source = peak_flops(list(mesh.devices.flat))
        self.token_flops = flops_per_token(cfg.model, cfg.train.seq_len)
        log(f"glm_jax.train: {self.trainer.parameter_count(self.state):,} parameters; data {cfg.data.mixture} "
            + (f"on data.chat={cfg.data.chat}" if cfg.data.mixture == "chat" else f"on corpus {cfg.data.corpus}"))
        log(f"glm_jax.train: MFU against {self.peak / 1e12:,.3f} TFLOP/s ({peak_source})")
        use_tb = workdir and cfg.train.tensorboard and distributed.is_main_process()
        self.writer = ScalarWriter(str(workdir / directory.TENSORBOARD) if use_tb else None)
        self.monitor = SpikeMonitor(cfg.train.rollback_after, cfg.train.spike_factor)
        self.start_row = start_row
        self.eval_seconds = 0.0  # time spent evaluating, kept out of the training tokens/s
        self.no_eval = False  # the held-out split turned out empty
        self.first_step_s = 0.0

    def _mesh(self):
        cfg = self.cfg
        mesh = distributed.multislice_mesh(cfg.mesh) if distributed.slice_count() > 1 else make_mesh(cfg.mesh)
        check_batch_sizes(cfg, dict(mesh.shape)["data"])
        plan = pipeline_plan.plan(cfg, dict(mesh.shape))  # refuses a pipeline that does not fit, before any work
        if self.info.process_count > 1 or self.info.note:
            log(f"glm_jax.train: {self.info.describe()}")
        log(f"glm_jax.train: model {cfg.model.name}, mesh {dict(mesh.shape)} ({cfg.mesh.param_sharding}) on "
            f"{jax.device_count()} {jax.default_backend()} device(s)")
        if plan.active:
            sched = plan.schedule(cfg.model.num_layers)
            log(f"glm_jax.train: pipeline of {plan.stages} stages x {plan.repeats} layer group(s), "
                f"{sched.per_group} layer slot(s) each, {plan.microbatches} microbatches; bubble {sched.bubble:.1%}")
        return mesh

    def _claim_workdir(self, workdir) -> None:
        """Make ``workdir`` this run's: it exists (or is created), its saved config describes
        the same model and data (else its checkpoints belong to another run and are left
        alone), and no other run holds its lock. This run's config is written once its
        state is restored or created (a refused restore leaves the workdir as it was)."""
        if workdir is None:
            return
        prepare_workdir(workdir, self.cfg)  # every process checks, so all refuse together
        if distributed.is_main_process():
            self.lock = WorkdirLock(str(workdir)).acquire()
            if self.lock.previous:
                log(f"glm_jax.train: taking over {workdir} from a run that ended without releasing it "
                    f"(pid {self.lock.previous.get('pid')} on {self.lock.previous.get('host')})")

    def close(self) -> None:
        """Finish pending saves and free the workdir (idempotent)."""
        ckpt, self.ckpt = getattr(self, "ckpt", None), None
        try:
            if ckpt is not None:
                ckpt.close()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def _restore_or_init(self):
        """(state, first step, data position in global rows)."""
        restored = self.trainer.restore(self.ckpt, warn=lambda m: log(f"warning: {m}")) if self.ckpt else None
        if restored is None:
            if self.cfg.train.init_from:
                log(f"glm_jax.train: parameters from {self.cfg.train.init_from}; fresh optimizer state from step 0")
                return self.trainer.init_state_from(self.cfg.train.init_from), 0, 0
            return self.trainer.init_state(), 0, 0
        if self.cfg.train.init_from:
            log(f"glm_jax.train: {self.ckpt.directory} already has checkpoints, so train.init_from is not read")
        log(f"glm_jax.train: resuming from step {restored.step} ({self.ckpt.directory})")
        # Checkpoints from before the data position was saved kept only the step, at a fixed batch size.
        rows = restored.data_rows if restored.data_rows is not None else restored.step * self.cfg.train.batch_size
        return restored.state, restored.step, int(rows)

    def evaluate(self) -> Optional[float]:
        """Mean Part B loss over ``train.eval_batches`` held-out batches; None (with one
        warning, the first time) when the held-out split has no examples."""
        if self.no_eval:
            return None
        t0 = time.perf_counter()
        try:
            return held_out_loss(self.trainer, self.state.params, self.cfg, self.cfg.train.eval_batches,
                                 process_index=self.shard_index, process_count=self.shard_count)
        except EmptySplit as e:
            self.no_eval = True
            log(f"warning: {e}; the held-out loss is not computed in this run (give the corpus more documents)")
            return None
        finally:
            self.eval_seconds += time.perf_counter() - t0

    def log_eval(self, step: int, value: Optional[float]) -> None:
        if value is None:
            return
        log(f"step {step}: eval loss {value:.4f}")
        self.writer.scalars(step, {"eval/loss": value})

    def stopping(self) -> bool:
        # Every process must stop at the same step, or the others hang in a collective.
        mine = SIGTERM.received
        return distributed.any_process(mine) if self.info.process_count > 1 else mine

    def log_progress(self, step: int, metrics, batch_size: int, tokens_seen: int, t_start: float) -> float:
        cfg = self.cfg
        loss = float(metrics["loss"])
        elapsed = time.perf_counter() - t_start - self.eval_seconds
        timed = elapsed > 0 and tokens_seen > 0  # the first step includes compilation: no rate yet
        skipped = int(self.state.skipped)
        skipped_input = tasks.skipped_input()
        dropped = sum(v for k, v in skipped_input.items() if k not in REPAIRED_INPUT)
        scalars = {
            "train/loss": loss,
            "train/learning_rate": float(self.trainer.learning_rate(step - 1)),
            "train/grad_norm": float(metrics["grad_norm"]),
            "train/batch_size": batch_size,
            "train/skipped_steps": skipped,
            **{f"data/{k}": v for k, v in skipped_input.items()},
        }
        if timed:
            tps = tokens_seen / elapsed
            scalars.update({"train/tokens_per_s": tps, "train/mfu": tps * self.token_flops / self.peak})
            eta = (cfg.train.steps - step) * batch_size * cfg.train.seq_len / tps
            speed = f"tokens/s {tps:,.0f}  mfu {100 * scalars['train/mfu']:.1f}%  eta {eta:,.0f}s"
        else:
            speed = f"first step {self.first_step_s:.1f}s (with compilation)"
        self.writer.scalars(step, scalars)
        log(
            f"step {step}/{cfg.train.steps}  loss {loss:.4f}  lr {scalars['train/learning_rate']:.2e}  "
            f"grad_norm {scalars['train/grad_norm']:.3f}  {speed}"
            + (f"  batch {batch_size}" if cfg.train.batch_size_start else "")
            + (f"  skipped {skipped}" if skipped else "")
            + (f"  input skipped {dropped}" if dropped else "")
        )
        return loss

    def rollback(self, step: int, data_rows: int) -> int:
        """Restore the newest checkpoint after a run of bad steps; the data goes on from where
        it is, so the batches that led into the spike are not seen again. Returns the step
        to continue from."""
        if self.ckpt is None:
            log(f"step {step}: too many bad steps in a row, but there is no workdir to roll back to; going on")
            return step
        self.ckpt.wait()
        restored = self.trainer.restore(self.ckpt, warn=lambda m: log(f"warning: {m}"))
        if restored is None:
            log(f"step {step}: too many bad steps in a row, but no checkpoint has been saved yet; going on")
            return step
        log(f"step {step}: too many bad steps in a row; rolled back to the checkpoint of step {restored.step}, "
            f"data continues at row {data_rows}")
        self.state = restored.state
        return restored.step

    def run(self) -> dict:
        cfg, trainer = self.cfg, self.trainer

        data = BatchStream(cfg, "train", start_row=self.start_row, process_index=self.shard_index,
                           process_count=self.shard_count)
        tokens_seen, t_start, t_end, loss, eval_loss, first_eval = 0, None, None, float("nan"), None, None
        rollbacks, skips_rolled_back, step = 0, 0, self.start
        try:
            if self.start == 0 and cfg.train.eval_every:
                first_eval = self.evaluate()
                self.log_eval(0, first_eval)
            while step < cfg.train.steps and not self.stopping():
                batch_size = batch_size_at(cfg.train, data.rows)
                t_step = time.perf_counter()
                self.state, metrics = trainer.train_step(self.state, distributed.global_batch(data.next(batch_size), trainer.mesh))
                step += 1
                if t_start is None:
                    loss = float(metrics["loss"])  # the first step includes compilation: time from here
                    t_start, self.eval_seconds = time.perf_counter(), 0.0
                    self.first_step_s = t_start - t_step
                else:
                    tokens_seen += batch_size * cfg.train.seq_len
                if cfg.train.rollback_after and self.monitor.observe(float(metrics["loss"]), bool(metrics["skipped"])):
                    skipped_before = int(self.state.skipped)
                    step = self.rollback(step, data.rows)
                    skips_rolled_back += skipped_before - int(self.state.skipped)
                    rollbacks += 1
                    continue
                if self.ckpt and not self.monitor.bad_streak:  # never save weights in the middle of a spike
                    self.ckpt.save(step, self.state, data.rows)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    loss = self.log_progress(step, metrics, batch_size, tokens_seen, t_start)
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                    self.log_eval(step, self.evaluate())
                    self.writer.flush()
            t_end = time.perf_counter() - self.eval_seconds
            preempted = self.stopping()
            if self.ckpt:  # saved before the final eval, so nothing trained is lost if eval fails
                self.ckpt.save(step, self.state, data.rows, force=True, wait=True)
            if not preempted:
                eval_loss = self.evaluate()
                self.log_eval(step, eval_loss)
        finally:
            data.close()
            self.writer.close()
            self.close()

        elapsed = t_end - t_start if t_start else 0.0
        rate = tokens_seen / elapsed if elapsed > 0 and tokens_seen else None
        return {
            "step": step,
            "train_loss": loss,
            "eval_loss": eval_loss,
            "first_eval_loss": first_eval,
            "tokens_per_s": rate,
            "mfu": rate * self.token_flops / self.peak if rate else None,
            "skipped_steps": int(self.state.skipped) + skips_rolled_back,
            "skipped_input": tasks.skipped_input(),
            "rollbacks": rollbacks,
            "resumed_from": self.start or None,
            "preempted": preempted,
            "parameters": trainer.parameter_count(self.state),
            "mesh": dict(trainer.mesh.shape),
            "processes": self.info.process_count,
        }
