"""``python -m glm_jax.bench {data,train,finetune,convert,attention,decode,quantize,serve} [--json] ...``: benchmarks that print JSON."""

from __future__ import annotations

import importlib
import sys

from glm_jax import cli

BENCHES = ("data", "train", "finetune", "convert", "attention", "decode", "quantize", "serve")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        print(f"usage: python -m glm_jax.bench {{{','.join(BENCHES)}}} [--json] [--config PATH] [key=value ...]", file=sys.stderr)
        return 2
    return importlib.import_module(f"glm_jax.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    cli.run_main(main)
