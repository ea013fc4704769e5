"""``python -m glm_jax.convert {from-hf,to-hf} --src DIR --dst DIR [...]``.

Bad input (a missing file, a tensor that disagrees with config.json, an existing
destination) is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Optional, Sequence

from glm_jax.config import ConfigError
from glm_jax.convert import memory
from glm_jax.convert.errors import ConvertError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2GB, 500MB, 10GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m glm_jax.convert", description="Convert GLM checkpoints to and from glm_jax's format.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("from-hf", help="Hugging Face ChatGLM-6B checkpoint -> glm_jax checkpoint")
    f.add_argument("--src", required=True, help="directory with config.json and pytorch_model*.bin or *.safetensors")
    f.add_argument("--dst", required=True, help="output directory (config.yaml, params/, hf_source.json)")
    f.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="cast every tensor (default: keep the source dtypes)")
    f.add_argument("--no-scan-layers", dest="scan_layers", action="store_false",
                   help="one parameter subtree per layer instead of stacking layers on a leading axis")
    f.add_argument("--no-compression", dest="compression", action="store_false", help="store chunks uncompressed (faster, ~10%% larger)")
    f.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    f.add_argument("--quiet", action="store_true", help="no progress line")

    t = sub.add_parser("to-hf", help="glm_jax checkpoint -> Hugging Face ChatGLM-6B checkpoint")
    t.add_argument("--src", required=True, help="glm_jax checkpoint directory (config.yaml and params/)")
    t.add_argument("--dst", required=True, help="output directory")
    t.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="cast the weights (LayerNorms stay float32 for float16/bfloat16, as released); default: as stored")
    t.add_argument("--quantize", type=int, choices=(0, 4, 8), default=None,
                   help="write the layers' linears as INT8/INT4 weight + weight_scale (0: dense); default: as the from-hf source")
    t.add_argument("--format", dest="fmt", choices=("bin", "safetensors"), default="bin", help="weight file format (default: bin)")
    t.add_argument("--max-shard-size", type=parse_size, default="2GB", help="split into shards with an index above this (default: 2GB)")
    t.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    t.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    memory.return_freed_blocks()
    try:
        if args.command == "from-hf":
            from glm_jax.convert import from_hf

            out = from_hf.convert(args.src, args.dst, dtype=args.dtype, scan_layers=args.scan_layers,
                                  compression=args.compression, overwrite=args.overwrite, progress=not args.quiet)
        else:
            from glm_jax.convert import to_hf

            out = to_hf.convert(args.src, args.dst, dtype=args.dtype, fmt=args.fmt, quantize=args.quantize,
                                max_shard_bytes=args.max_shard_size,
                                overwrite=args.overwrite, progress=not args.quiet)
    except (ConvertError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the destination", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"wrote {args.dst} ({out['bytes'] / 1e6:.1f} MB in {out['seconds']:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
