"""``python -m glm_jax.info``: parameter count and per-device memory, computed abstractly.

Nothing is allocated: shapes come from ``glm_jax.model.abstract_params`` and the
per-device share from the logical-axis rules on the configured mesh, so a laptop can
size GLM-130B on a pod.

    python -m glm_jax.info --config configs/glm-130b.yaml mesh.data=16 --json
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from glm_jax import cli
from glm_jax.training.sizing import report


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.info", description=__doc__.splitlines()[0])
    cli.add_config_args(parser)
    parser.add_argument("--devices", type=int, default=None, help="device count to size for (default: the mesh's explicit sizes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    cfg = cli.config_from_args(args)
    r = report(cfg, args.devices)
    if args.json:
        print(json.dumps(r))
        return 0
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    b = r["per_device_bytes"]
    print(f"model        {r['model']}")
    print(f"parameters   {r['parameters']:,}")
    print(f"mesh         {mesh} ({r['devices']} devices)")
    print(f"per device   params {_gib(b['params'])} + AdamW state {_gib(b['adamw_state'])} = {_gib(b['total'])} ({r['param_dtype']})")
    print(f"largest      {_gib(r['largest_tensor_bytes'])} (one parameter array, unsharded; scanned layers are one stacked array)")
    if "pipeline" in r:
        p = r["pipeline"]
        print(f"pipeline     {p['stages']} stages x {p['repeats']} group(s), {p['microbatches']} microbatches, "
              f"bubble {100 * p['bubble']:.1f}%; layers per stage {p['layers_per_stage']}")
        heaviest = max(p["per_stage_layer_bytes"], key=lambda b: b["params"])
        print(f"per stage    up to params {_gib(heaviest['params'])} + AdamW state {_gib(heaviest['adamw_state'])} "
              f"of its own layers; {100 * p['layer_weights_split_over_pipe']:.1f}% of the layer weights split over pipe")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
