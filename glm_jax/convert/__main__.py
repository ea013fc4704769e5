"""``python -m glm_jax.convert {from-hf,to-hf,from-sat,to-sat,export,export-ptuning,export-lora,merge-lora} --src DIR --dst DIR [...]``.

to-hf, to-sat and export read a params directory (from from-hf / from-sat / export) or a
training workdir (``--step N``, default its newest checkpoint). Bad input (a missing
file, a tensor that disagrees with config.json, an existing destination) is one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Optional, Sequence

from glm_jax.convert import memory
from glm_jax.errors import UserError, one_line

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2GB, 500MB, 10GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


SRC_HELP = "a glm_jax params directory (config.yaml and params/) or a training workdir (config.yaml and checkpoints/)"
STEP_HELP = "with a training workdir: the checkpoint step to read (default: the newest)"


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
    t.add_argument("--src", required=True, help=SRC_HELP)
    t.add_argument("--step", type=int, default=None, help=STEP_HELP)
    t.add_argument("--dst", required=True, help="output directory")
    t.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="cast the weights (LayerNorms stay float32 for float16/bfloat16, as released); default: as stored")
    t.add_argument("--quantize", type=int, choices=(0, 4, 8), default=None,
                   help="write the layers' linears as INT8/INT4 weight + weight_scale (0: dense); default: as the from-hf source")
    t.add_argument("--format", dest="fmt", choices=("bin", "safetensors"), default="bin", help="weight file format (default: bin)")
    t.add_argument("--max-shard-size", type=parse_size, default="2GB", help="split into shards with an index above this (default: 2GB)")
    t.add_argument("--merge-lora", action="store_true",
                   help="fold LoRA adapters into the weights: the source's own (a finetune.method=lora run) or --adapter's")
    t.add_argument("--adapter", default=None, help="with --merge-lora: a PEFT LoRA adapter directory or a glm_jax LoRA "
                   "run whose adapters to merge into --src")
    t.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    t.add_argument("--quiet", action="store_true", help="no progress line")

    fs = sub.add_parser("from-sat", help="tensor-parallel SAT checkpoint (GLM-130B or the original GLM) -> glm_jax checkpoint",
                        description="Merge a SAT checkpoint (DIR/latest + DIR/<iter>/mp_rank_XX_model_states.pt, any "
                                    "tensor-parallel degree, fp16/fp32 or INT8/INT4) into a glm_jax checkpoint. The "
                                    "architecture comes from --config and key=value overrides; every tensor is checked "
                                    "against it.")
    fs.add_argument("--src", required=True, help="SAT checkpoint directory (with latest or latest_checkpointed_iteration.txt)")
    fs.add_argument("--dst", required=True, help="output directory (config.yaml, params/, sat_source.json)")
    fs.add_argument("--config", default=None,
                    help="glm_jax config of the architecture (default: configs/glm-130b.yaml for GLM-130B's layout; for the "
                         "original GLM's, the shipped glm-large/glm-10b config of the checkpoint's width and depth)")
    fs.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.num_layers=2")
    fs.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="cast every tensor (default: keep the source dtypes)")
    fs.add_argument("--no-scan-layers", dest="scan_layers", action="store_const", const=False, default=None,
                    help="one parameter subtree per layer (default: the config's model.scan_layers)")
    fs.add_argument("--no-compression", dest="compression", action="store_false", help="store chunks uncompressed")
    fs.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    fs.add_argument("--quiet", action="store_true", help="no progress line")

    ts = sub.add_parser("to-sat", help="glm_jax checkpoint -> tensor-parallel SAT checkpoint",
                        description="Split a glm_jax checkpoint into a SAT checkpoint of --tp ranks: GLM-130B's layout, or "
                                    "the original GLM's for models with learned positions.")
    ts.add_argument("--src", required=True, help=SRC_HELP)
    ts.add_argument("--step", type=int, default=None, help=STEP_HELP)
    ts.add_argument("--dst", required=True, help="output directory (latest, <iteration>/mp_rank_XX_model_states.pt)")
    ts.add_argument("--tp", type=int, required=True, help="tensor-parallel degree: the number of rank files")
    ts.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="cast every tensor (default: as stored)")
    ts.add_argument("--quantize", type=int, choices=(0, 4, 8), default=None,
                    help="write the layers' linears as INT8/INT4 weight + weight_scale, quantized per rank (0: dense); "
                         "default: as the from-sat source, with its own quantized tensors")
    ts.add_argument("--iteration", default=None, help="the iteration directory name (default: the source's, else 1)")
    ts.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    ts.add_argument("--quiet", action="store_true", help="no progress line")

    def from_run(name, help, description, dst_help, quiet_help="no progress line", src_help=SRC_HELP):
        """A subcommand that reads a params directory or a workdir (--src, --step) and writes --dst."""
        q = sub.add_parser(name, help=help, description=description)
        q.add_argument("--src", required=True, help=src_help)
        q.add_argument("--dst", required=True, help=dst_help)
        q.add_argument("--step", type=int, default=None, help=STEP_HELP)
        q.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        q.add_argument("--quiet", action="store_true", help=quiet_help)
        return q

    small = "(accepted for symmetry; the export is one small file)"
    from_run("export", "training workdir -> standalone glm_jax params directory",
             "Write the parameters of one checkpoint of a training workdir (no optimizer state) as a params directory "
             "(config.yaml + params/) that glm_jax.load, to-hf, to-sat and generate read, for sharing or archiving.",
             "output directory (config.yaml, params/)")
    from_run("export-ptuning", "glm_jax P-tuning run -> the authors' P-tuning checkpoint",
             "Write the prefix encoder of a P-tuning run (finetune.method=ptuning) as ChatGLM-6B's P-tuning trainer "
             "saves it: config.json (with pre_seq_len, prefix_projection) and pytorch_model.bin holding "
             "transformer.prefix_encoder.* in float32. Needs torch.",
             "output directory (config.json, pytorch_model.bin)", small)
    from_run("export-lora", "glm_jax LoRA run -> PEFT LoRA adapter",
             "Write the adapters of a LoRA run (finetune.method=lora) as PEFT saves a LoRA adapter for ChatGLM-6B: "
             "adapter_config.json and adapter_model.safetensors with "
             "base_model.model.transformer.layers.N.<module>.lora_A/lora_B.weight in float32. Needs safetensors.",
             "output directory (adapter_config.json, adapter_model.safetensors)", small)
    ml = from_run("merge-lora", "LoRA adapters + base -> glm_jax params directory with merged weights",
                  "Fold LoRA adapters into their base's kernels (W + B A alpha/r, in float32, stored in the base's "
                  "dtype) and write a plain params directory: the adapters of a LoRA run (--src alone), or a PEFT "
                  "adapter / LoRA run (--adapter) over any base (--src).",
                  "output directory (config.yaml, params/)", src_help=SRC_HELP + "; a LoRA run, or the base for --adapter")
    ml.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory (adapter_config.json + "
                    "adapter_model.safetensors or .bin) or a glm_jax LoRA run")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    memory.return_freed_blocks()
    try:
        # Each subcommand's module is imported when it runs: torch and tensorstore only for the work asked.
        if args.command == "from-hf":
            from glm_jax.convert import from_hf

            out = from_hf.convert(args.src, args.dst, dtype=args.dtype, scan_layers=args.scan_layers,
                                  compression=args.compression, overwrite=args.overwrite, progress=not args.quiet)
        elif args.command == "to-hf":
            from glm_jax.convert import to_hf

            out = to_hf.convert(args.src, args.dst, dtype=args.dtype, fmt=args.fmt, quantize=args.quantize,
                                max_shard_bytes=args.max_shard_size, merge_lora=args.merge_lora, adapter=args.adapter,
                                overwrite=args.overwrite, progress=not args.quiet)
        elif args.command == "from-sat":
            from glm_jax.convert import from_sat

            out = from_sat.convert(args.src, args.dst, config=args.config, overrides=args.overrides, dtype=args.dtype,
                                   scan_layers=args.scan_layers, compression=args.compression,
                                   overwrite=args.overwrite, progress=not args.quiet)
        elif args.command == "to-sat":
            from glm_jax.convert import to_sat

            out = to_sat.convert(args.src, args.dst, tp=args.tp, dtype=args.dtype, quantize=args.quantize,
                                 iteration=args.iteration, step=args.step, overwrite=args.overwrite,
                                 progress=not args.quiet)
        elif args.command == "export-ptuning":
            from glm_jax.convert import ptuning

            out = ptuning.export(args.src, args.dst, step=args.step, overwrite=args.overwrite)
        elif args.command == "export-lora":
            from glm_jax.convert import lora_adapter

            out = lora_adapter.export(args.src, args.dst, step=args.step, overwrite=args.overwrite)
        elif args.command == "merge-lora":
            from glm_jax.convert import lora_adapter
            from glm_jax.convert.progress import Progress

            bar = None if args.quiet else Progress(1, "merge-lora")
            out = lora_adapter.merge(args.src, args.dst, adapter=args.adapter, step=args.step, overwrite=args.overwrite,
                                     progress=bar.set if bar else None)
            if bar:
                bar.close()
        else:
            from glm_jax.checkpoint import params
            from glm_jax.convert.progress import Progress

            bar = None if args.quiet else Progress(1, "export")
            out = params.export(args.src, args.dst, step=args.step, overwrite=args.overwrite,
                                progress=bar.set if bar else None)
            if bar:
                bar.close()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the destination", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours, not bad input: say so in one line, then the traceback
        print(f"error: the conversion failed unexpectedly ({one_line(e)}); nothing was written to the destination; "
              "the traceback follows", file=sys.stderr, flush=True)
        raise
    if not args.quiet:
        print(f"wrote {args.dst} ({out['bytes'] / 1e6:.1f} MB in {out['seconds']:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
