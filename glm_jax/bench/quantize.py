"""What weight-only INT8/INT4 costs a trained model: held-out perplexity and linear bytes.

    python -m glm_jax.bench quantize --checkpoint DIR --json [--batches N]

DIR is a training workdir (or a converted checkpoint with a ``data`` section). The same
held-out batches (the config's validation split, Part B tokens, as ``train`` evaluates)
are scored with the float weights and with the four linears of every layer quantized
to INT8 and INT4 (MODEL.md §2.5); ``ppl_increase`` is the relative rise in perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional, Sequence

from glm_jax import cli


def held_out_loss(model_cfg, params, batches: list) -> float:
    """Mean Part B loss of ``params`` (laid out for ``model_cfg``, as ``glm_jax.load`` gives them)."""
    import jax

    from glm_jax.model import GLM
    from glm_jax.training.state import loss_sums

    model = GLM(model_cfg)
    step = jax.jit(lambda p, b: loss_sums(model, p, b))
    total = weight = 0.0
    for b in batches:
        ls, w = step(params, b)
        total, weight = total + float(ls), weight + float(w)
    return total / max(weight, 1.0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.bench quantize", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="training workdir or converted checkpoint")
    parser.add_argument("--batches", type=int, default=16, help="held-out batches of train.batch_size rows")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from glm_jax.config import load_config
    from glm_jax.checkpoint import directory
    from glm_jax.data.pipeline import BatchStream
    from glm_jax.inference import quantize as qz
    from glm_jax.inference.loading import load

    cfg = load_config(os.path.join(args.checkpoint, directory.CONFIG))
    model = load(args.checkpoint, quantize=0)
    stream = BatchStream(cfg, "validation")
    batches = [stream.next(cfg.train.batch_size) for _ in range(args.batches)]
    stream.close()
    result = {"checkpoint": args.checkpoint, "batches": args.batches, "tokens": int(sum(b.loss_weights.sum() for b in batches))}
    base = held_out_loss(model.config, model.params, batches)
    result["float"] = {"loss": base, "perplexity": math.exp(base)}
    for bits in qz.BITS[::-1]:
        params = model.quantize(bits).params
        loss = held_out_loss(model.config, params, batches)
        result[f"int{bits}"] = {
            "loss": loss,
            "perplexity": math.exp(loss),
            "ppl_increase": math.exp(loss - base) - 1.0,
            **qz.linear_bytes(params),
        }
    for name in ("float", "int8", "int4"):
        r = result[name]
        extra = f"  +{100 * r['ppl_increase']:.2f}%  linears {r['ratio']:.3f}x bf16 bytes" if "ratio" in r else ""
        print(f"{name:>5}: held-out loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}{extra}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
