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
import importlib
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
        if cfg.finetune.method in EXPORTS and cfg.workdir:
            result[EXPORTS[cfg.finetune.method][0]] = _export_trained(cfg.finetune.method, cfg.workdir, log)
        print(json.dumps(result), flush=True)
    return 0


# What a fine-tuning run also leaves in its workdir, in the format other tools read:
# method -> (result key, subdirectory, convert subcommand, the module its file needs, what it is)
EXPORTS = {
    "ptuning": ("ptuning_checkpoint", PTUNING_DIR, "export-ptuning", "torch",
                "the prefix in the authors' layout (config.json + pytorch_model.bin)"),
    "lora": ("lora_adapter", LORA_DIR, "export-lora", "safetensors",
             "the adapters in PEFT's format (adapter_config.json + adapter_model.safetensors)"),
}


def _export_trained(method: str, workdir: str, log) -> Optional[str]:
    """Write what a P-tuning / LoRA run trained to ``WORKDIR/<subdirectory>`` (the authors'
    P-tuning layout, PEFT's adapter), which ``--ptuning-checkpoint`` / ``--lora-adapter`` and
    the authors' tools read; without the module the file needs, say how to write it later."""
    _, sub, command, module, what = EXPORTS[method]
    out = workdir.rstrip("/") + "/" + sub
    command = f"python -m glm_jax.convert {command} --src {workdir} --dst OUT"
    if "://" in workdir:
        log(f"glm_jax.train: write {what} from a local copy of the workdir: {command}")
        return None
    try:
        importlib.import_module(module)
    except ImportError:
        log(f"glm_jax.train: {module} is not installed, so the run is saved in orbax only; with it: {command}")
        return None
    # The formats live with the converters.
    from glm_jax.convert import lora_adapter, ptuning

    (ptuning if method == "ptuning" else lora_adapter).export(workdir, out, overwrite=True)
    log(f"glm_jax.train: {what}: {out}")
    return out


if __name__ == "__main__":
    cli.run_main(main)
