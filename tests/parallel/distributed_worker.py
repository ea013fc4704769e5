"""One process of a multi-process CPU training run, for tests/parallel/test_distributed.py.

``python tests/parallel/distributed_worker.py STEPS [key=value ...]`` with XLA_FLAGS giving
this process its CPU devices and, for a multi-process run, JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID. Trains STEPS steps of configs/glm-tiny.yaml (plus
the overrides) on synthetic data, on the mesh from the config and again on the multi-slice
mesh with each process as a slice, and prints one JSON line: this process's place in the
run, the data shard it fed, and each step's loss and gradient norm.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def train(steps: int, overrides: list[str], per_process_slices: bool = False) -> dict:
    """Train ``steps`` steps on this run's mesh; each process feeds its own rows.

    ``per_process_slices`` builds the multi-slice mesh with each process standing in for
    a slice (the data axis split across processes as it would be across DCN).
    """
    import jax

    from glm_jax.config import load_config
    from glm_jax.data.pipeline import batches
    from glm_jax.parallel import distributed, rules
    from glm_jax.parallel.mesh import make_mesh
    from glm_jax.training.trainer import Trainer

    cfg = load_config(os.path.join(ROOT, "configs", "glm-tiny.yaml"), ["data.mixture=synthetic", *overrides])
    if per_process_slices:
        mesh = distributed.multislice_mesh(cfg.mesh, process_is_granule=True)
    else:
        mesh = make_mesh(cfg.mesh)
    trainer = Trainer.build(cfg, mesh)
    state, train_step = trainer.init_state(), trainer.train_step

    shard, shards = distributed.data_shard(mesh)
    data = batches(cfg, "train", process_index=shard, process_count=shards)
    # Per-row token sums of the global batch, gathered everywhere: checks the row order.
    row_sums = jax.jit(lambda t: t.sum(axis=1), out_shardings=rules.replicated(mesh))
    losses, grad_norms, rows, stops = [], [], [], []
    for step in range(steps):
        batch = distributed.global_batch(next(data), mesh)
        rows.append(row_sums(batch.tokens).tolist())
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
        # As if only the last process had received SIGTERM during the first step.
        stops.append(distributed.any_process(step == 0 and jax.process_index() == jax.process_count() - 1))
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_device_count": jax.local_device_count(),
        "device_count": jax.device_count(),
        "main": distributed.is_main_process(),
        "data_shard": [shard, shards],
        "global_batch_shape": list(batch.tokens.shape),
        "mesh": dict(mesh.shape),
        "losses": losses,
        "grad_norms": grad_norms,
        "row_sums": rows,
        "stops": stops,
    }


def main(argv: list[str]) -> int:
    from glm_jax.parallel import distributed

    info = distributed.initialize()  # before any other JAX use
    steps, overrides = int(argv[0]), argv[1:]
    result = {"method": info.method, "describe": info.describe(), **train(steps, overrides)}
    result["multislice"] = train(steps, overrides, per_process_slices=True)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
