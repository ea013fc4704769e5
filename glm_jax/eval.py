"""``python -m glm_jax.eval --checkpoint DIR --task TASK.yaml [--task ...] --data ROOT [...]``:
evaluate a model on tasks in GLM-130B's format.

Each ``--task`` is one of the authors' task YAML files (``name``, ``type``, ``path``,
``file-pattern``, ``use_task_mask``, ``max_seq_length``, ...); its data is read from
``ROOT/<path>``. Tasks are evaluated as the authors evaluate them
(``glm_jax.evaluation``): multiple choice (``mul``, accuracy), generation (``gen``,
greedy or beam search; exact match and F1, LAMBADA's own rule) and language modelling
(``lm``, perplexity over rolling windows); per data file, then per group the max,
median and sample-weighted average. ``--results DIR`` keeps each file's predictions and
scores, and a rerun resumes from them. ``--quantize int8|int4`` evaluates the same
checkpoint with quantized weights (the authors' quality table). Progress goes to stderr;
the results to stdout (``--json``: one object per task). Bad input (an unknown key or
type, a data line with a missing field or a label out of range) is one line naming the
file (and line), exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from glm_jax.checkpoint.compiled_step import source_digest
from glm_jax.cli import run_main
from glm_jax.convert import lora_adapter, ptuning
from glm_jax.evaluation import runner
from glm_jax.evaluation.task_config import TaskError, load_task
from glm_jax.inference import cli


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m glm_jax.eval", description=__doc__.splitlines()[0])
    cli.add_model_args(p)
    p.add_argument("--task", action="append", required=True, help="a task YAML file in GLM-130B's format (repeat for more)")
    p.add_argument("--data", required=True, help="the data root: each task reads ROOT/<its path>")
    p.add_argument("--results", default=None, help="keep each data file's results here and resume from them")
    p.add_argument("--batch-rows", type=int, default=8, help="rows per forward pass (default 8)")
    p.add_argument("--json", action="store_true", help="one JSON object per task on stdout")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.batch_rows < 1:
        raise cli.UsageError(f"--batch-rows must be >= 1, got {args.batch_rows}")
    if not os.path.isdir(args.data):
        raise TaskError(f"--data {args.data}: no such directory")
    tasks = [load_task(t) for t in args.task]  # every task file checked before the model loads
    for t in tasks:
        t.file_groups(args.data)
    model, text = cli.load_model_and_text(args, read_prefix=ptuning.read, read_adapter=lora_adapter.read)
    from glm_jax.evaluation.evaluator import Evaluator  # imports jax: after the inputs are checked

    evaluator = Evaluator(model.config, model.params, text.encode, text.decode, batch_rows=args.batch_rows,
                          generator=model.generator, mesh=model.mesh)
    identity = {"checkpoint": os.path.abspath(args.checkpoint), "quantize": args.quantize, "dtype": args.dtype,
                "ptuning": args.ptuning_checkpoint, "lora": args.lora_adapter, "vocab": args.vocab,
                # The code too: results cached before a fix must not be served after it.
                "code": source_digest()[:16]}
    for task in tasks:
        result = runner.run_task(task, args.data, evaluator, model_identity=identity,
                                 results=args.results)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            for name, s in result["overall"].items():
                print(f"{task.name} {name}: max = {s['max']:.3f}, median = {s['median']:.3f}, "
                      f"average = {s['average']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
