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
A P-tuning run (``finetune.method=ptuning``) also leaves its prefix in the authors'
layout in ``DIR/ptuning`` (with torch installed; else ``convert export-ptuning`` later), and
a LoRA run its adapters as a PEFT adapter in ``DIR/lora`` (with safetensors; else
``convert export-lora``).

The loop is ``glm_jax.training.loop``; what a step is, ``glm_jax.training.trainer``.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from glm_jax import cli

PTUNING_DIR = "ptuning"  # in the workdir: the prefix as the authors' trainer saves it
LORA_DIR = "lora"  # in the workdir: the adapters as PEFT saves them


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.train", description=__doc__.splitlines()[0])
    cli.add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = cli.config_from_args(args)  # every key and value checked before jax is imported
    # Deliberately here: jax.distributed must be initialised before anything else touches
    # jax, and a bad config should fail in a second without importing it at all.
    from glm_jax.parallel import distributed

    info = distributed.initialize()
    from glm_jax.training.loop import SIGTERM, TrainingRun, log

    SIGTERM.install()  # from here on a SIGTERM stops the run cleanly, start-up included
    try:
        result = TrainingRun(cfg, info).run()
    finally:
        SIGTERM.uninstall()
    if distributed.is_main_process():
        if cfg.finetune.method == "ptuning" and cfg.workdir:
            result["ptuning_checkpoint"] = _export_prefix(cfg.workdir, log)
        if cfg.finetune.method == "lora" and cfg.workdir:
            result["lora_adapter"] = _export_adapters(cfg.workdir, log)
        print(json.dumps(result), flush=True)
    return 0


def _export_prefix(workdir: str, log) -> Optional[str]:
    """The run's prefix in the authors' layout too (``WORKDIR/ptuning``: config.json +
    pytorch_model.bin), which their loader and ``--ptuning-checkpoint`` read; it needs torch."""
    out = workdir.rstrip("/") + "/" + PTUNING_DIR
    command = f"python -m glm_jax.convert export-ptuning --src {workdir} --dst OUT"
    if "://" in workdir:
        log(f"glm_jax.train: write the prefix in the authors' layout from a local copy of the workdir: {command}")
        return None
    try:
        import torch  # noqa: F401  (the authors' file is a torch pickle)
    except ImportError:
        log(f"glm_jax.train: torch is not installed, so the prefix is saved in orbax only; with torch: {command}")
        return None
    from glm_jax.convert import ptuning  # the authors' layout lives with the converters

    ptuning.export(workdir, out, overwrite=True)
    log(f"glm_jax.train: prefix in the authors' layout: {out} (config.json + pytorch_model.bin)")
    return out


def _export_adapters(workdir: str, log) -> Optional[str]:
    """The run's LoRA adapters as a PEFT adapter too (``WORKDIR/lora``: adapter_config.json +
    adapter_model.safetensors), which PEFT and ``--lora-adapter`` read; it needs safetensors."""
    out = workdir.rstrip("/") + "/" + LORA_DIR
    command = f"python -m glm_jax.convert export-lora --src {workdir} --dst OUT"
    if "://" in workdir:
        log(f"glm_jax.train: write the adapters in PEFT's format from a local copy of the workdir: {command}")
        return None
    try:
        import safetensors  # noqa: F401  (PEFT's adapter file)
    except ImportError:
        log(f"glm_jax.train: safetensors is not installed, so the adapters are saved in orbax only; with it: {command}")
        return None
    from glm_jax.convert import lora_adapter  # PEFT's format lives with the converters

    lora_adapter.export(workdir, out, overwrite=True)
    log(f"glm_jax.train: adapters in PEFT's format: {out} (adapter_config.json + adapter_model.safetensors)")
    return out


if __name__ == "__main__":
    cli.run_main(main)
