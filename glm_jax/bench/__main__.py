"""``python -m glm_jax.bench {data,train,convert,attention} [--json] ...``: benchmarks that print JSON."""

from __future__ import annotations

import sys

from glm_jax import cli

BENCHES = ("data", "train", "convert", "attention")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        print(f"usage: python -m glm_jax.bench {{{','.join(BENCHES)}}} [--json] [--config PATH] [key=value ...]", file=sys.stderr)
        return 2
    if argv[0] == "data":
        from glm_jax.bench import data

        return data.main(argv[1:])
    if argv[0] == "train":
        from glm_jax.bench import train

        return train.main(argv[1:])
    if argv[0] == "convert":
        from glm_jax.bench import convert

        return convert.main(argv[1:])
    if argv[0] == "attention":
        from glm_jax.bench import attention

        return attention.main(argv[1:])
    return 2


if __name__ == "__main__":
    cli.run_main(main)
