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

The loop is ``glm_jax.training.loop``; what a step is, ``glm_jax.training.trainer``.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from glm_jax import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.train", description=__doc__.splitlines()[0])
    cli.add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = cli.config_from_args(args)  # every key and value checked before jax is imported
    # Deliberately here: jax.distributed must be initialised before anything else touches
    # jax, and a bad config should fail in a second without importing it at all.
    from glm_jax.parallel import distributed

    info = distributed.initialize()
    from glm_jax.training.loop import SIGTERM, TrainingRun

    SIGTERM.install()  # from here on a SIGTERM stops the run cleanly, start-up included
    try:
        result = TrainingRun(cfg, info).run()
    finally:
        SIGTERM.uninstall()
    if distributed.is_main_process():
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
