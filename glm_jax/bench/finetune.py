"""What each fine-tuning method costs, and what it makes the model forget.

    python -m glm_jax.bench finetune --json [--steps N] [--shape chatglm-6b-2l-narrow]
    python -m glm_jax.bench finetune --json --forgetting WORKDIR [--train-steps 200]

**Cost** (the default): for full fine-tuning, P-tuning v2 (prefix 128) and LoRA (rank 8
on query_key_value), each on a float32, bfloat16 and INT4 base (``finetune.quantize_base``;
full fine-tuning trains the base, so it has no INT4 row):

* ``param_bytes`` / ``optimizer_bytes``: the device bytes of the train state's parameters
  and optimizer state, summed over its arrays' shapes (exactly what the trainer
  allocates; nothing is allocated to count them), for ChatGLM-6B with 2 layers (its
  embedding and output head are most of it) and for the whole 28-layer ChatGLM-6B;
* ``tokens_per_s``: ``--steps`` timed train steps (after one compiling step) on a shape
  this CPU can run (``--shape``, default ChatGLM-6B's architecture narrowed to hidden
  1024, 2 layers, vocabulary 32000: batch 4 x 128 tokens), ratios against full
  fine-tuning on the float32 base measured in the same run.

**Forgetting** (``--forgetting WORKDIR``, a pretrained run such as the README's glm-tiny
job): each method fine-tunes WORKDIR for ``--train-steps`` steps on the chat task built
from the default corpus (``data.chat=stdlib``), and the held-out loss of the pretraining
task (what fine-tuning may destroy) and of the chat answers (what it should improve) is
measured before and after, on the same held-out batches. ``--replay-rates 0,0.2`` runs each
method again with that share of rows replaying WORKDIR's pretraining mixture
(``data.replay_rate``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence

from glm_jax import cli
from glm_jax.config import Config, load_config

METHODS = {
    "full": [],
    "ptuning": ["finetune.method=ptuning", "model.pre_seq_len=128", "model.prefix_dropout=0.1"],
    "lora": ["finetune.method=lora", "model.lora_rank=8", "model.lora_alpha=32", "model.lora_dropout=0.1"],
}
BASES = {"float32": ["model.param_dtype=float32"], "bfloat16": ["model.param_dtype=bfloat16"],
         "int4": ["model.param_dtype=bfloat16", "finetune.quantize_base=int4"]}
SHAPES = {
    "chatglm-6b-2l": ["model.num_layers=2"],
    "chatglm-6b-2l-narrow": ["model.num_layers=2", "model.hidden_size=1024", "model.num_heads=8", "model.mlp_dim=4096",
                             "model.vocab_size=32000", "model.mask_token_id=31990", "model.gmask_token_id=31991",
                             "model.smask_token_id=31992", "model.eod_token_id=31993", "model.sop_token_id=31994",
                             "model.eop_token_id=31995", "model.eos_token_id=31995", "model.pad_token_id=3"],
    "chatglm-6b": [],
}
# The learning rates the methods are run with for the forgetting measurement (the
# authors' 2e-2 for P-tuning; common LoRA and full fine-tuning values for a model this small).
REPLAYABLE = ("glm130b", "glm-original", "mask", "smask", "gmask", "instructions")
FORGETTING_LR = {"full": 1e-3, "ptuning": 2e-2, "lora": 5e-3}


def _config(shape: str, method: str, base: str, extra: Sequence[str] = ()) -> Config:
    return load_config("chatglm-6b", ["data.mixture=synthetic", "mesh.data=-1", "train.batch_size=4", "train.seq_len=128",
                                      "train.microbatches=1",
                                      *SHAPES[shape], *BASES[base], *METHODS[method], *extra])


def state_bytes(cfg: Config) -> dict:
    """Bytes of the train state's parameters and optimizer state, from its abstract shapes."""
    import jax

    from glm_jax.model import linear
    from glm_jax.parallel.mesh import make_mesh
    from glm_jax.training.finetune import is_trainable
    from glm_jax.training.trainer import Trainer

    trainer = Trainer.build(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state = trainer.abstract_state()

    def nbytes(tree):
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))

    from flax import traverse_util

    flat = traverse_util.flatten_dict(state.params)
    trainable = sum(nbytes(v) for k, v in flat.items() if is_trainable(k, cfg.finetune.method))
    quantized = sum(nbytes(v) for v in flat.values() if isinstance(v, linear.QuantizedWeight))
    return {"param_bytes": nbytes(state.params), "trainable_param_bytes": trainable, "quantized_linear_bytes": quantized,
            "optimizer_bytes": nbytes(state.opt_state)}


def tokens_per_s(cfg: Config, steps: int) -> dict:
    import jax

    from glm_jax.data.synthetic import copy_batch
    from glm_jax.parallel.distributed import global_batch
    from glm_jax.parallel.mesh import make_mesh
    from glm_jax.training.trainer import Trainer

    mesh = make_mesh(cfg.mesh)
    trainer = Trainer.build(cfg, mesh)
    state = trainer.init_state(seed=0)
    batch = global_batch(copy_batch(cfg.model, cfg.train.batch_size, cfg.train.seq_len, 0, 0), mesh)
    t = time.perf_counter()
    state, m = trainer.train_step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = trainer.train_step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"tokens_per_s": cfg.train.batch_size * cfg.train.seq_len / best, "step_s_best": round(best, 4),
            "compile_s": round(compile_s, 1), "loss": float(m["loss"])}


def bench_cost(shape: str, steps: int, overrides: Sequence[str]) -> list[dict]:
    rows = []
    for base in BASES:
        for method in METHODS:
            if method == "full" and base == "int4":
                continue  # full fine-tuning trains the base: there is no frozen base to quantize
            print(f"bench finetune: {method} on a {base} base ...", file=sys.stderr, flush=True)
            row = {"bench": "finetune", "method": method, "base": base}
            for name in ("chatglm-6b-2l", "chatglm-6b"):
                row[name] = state_bytes(_config(name, method, base, overrides))
            row["timed_shape"] = shape
            row.update(tokens_per_s(_config(shape, method, base, overrides), steps))
            rows.append(row)
    ref = next(r for r in rows if r["method"] == "full" and r["base"] == "float32")
    for r in rows:
        r["tokens_per_s_vs_full_float32"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 3)
        r["state_bytes_vs_full_float32"] = round(
            (r["chatglm-6b"]["param_bytes"] + r["chatglm-6b"]["optimizer_bytes"])
            / (ref["chatglm-6b"]["param_bytes"] + ref["chatglm-6b"]["optimizer_bytes"]), 4)
    return rows


def bench_forgetting(workdir: str, train_steps: int, eval_batches: int, overrides: Sequence[str],
                     replay_rates: Sequence[float] = (0.0,)) -> list[dict]:
    import os

    import jax

    from glm_jax.data.pipeline import BatchStream
    from glm_jax.parallel.distributed import global_batch
    from glm_jax.parallel.mesh import make_mesh
    from glm_jax.training.held_out import held_out_loss
    from glm_jax.training.trainer import Trainer

    pretrain = load_config(os.path.join(workdir, "config.yaml"), ["mesh.data=-1"])
    rows = []
    runs = [(method, extra, rate) for rate in replay_rates for method, extra in (
        ("full", []), ("ptuning", ["finetune.method=ptuning", "model.pre_seq_len=16"]),
        ("lora", ["finetune.method=lora", "model.lora_rank=8", "model.lora_alpha=16",
                  "model.lora_targets=qkv,dense,mlp_in,mlp_out"]))]
    for method, extra, rate in runs:
        print(f"bench finetune: forgetting, {method}, replay {rate} ...", file=sys.stderr, flush=True)
        cfg = load_config(os.path.join(workdir, "config.yaml"), [
            "mesh.data=-1", "data.mixture=chat", "data.chat=stdlib", f"train.steps={train_steps}", "train.warmup_steps=10",
            f"train.learning_rate={FORGETTING_LR[method]}", f"train.init_from={workdir}", f"data.replay_rate={rate}",
            f"data.replay_mixture={pretrain.data.mixture if pretrain.data.mixture in REPLAYABLE else 'gmask'}",
            *extra, *overrides])
        trainer = Trainer.build(cfg, make_mesh(cfg.mesh))
        state = trainer.init_state_from(workdir)
        pre_cfg = dataclasses.replace(cfg, data=pretrain.data)
        chat_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, replay_rate=0.0))  # held-out answers alone
        before = {"pretraining": held_out_loss(trainer, state.params, pre_cfg, eval_batches),
                  "chat_response": held_out_loss(trainer, state.params, chat_cfg, eval_batches)}
        stream = BatchStream(cfg, "train")
        t = time.perf_counter()
        try:
            for _ in range(train_steps):
                state, m = trainer.train_step(state, global_batch(stream.next(cfg.train.batch_size), trainer.mesh))
            jax.block_until_ready(m)
        finally:
            stream.close()
        after = {"pretraining": held_out_loss(trainer, state.params, pre_cfg, eval_batches),
                 "chat_response": held_out_loss(trainer, state.params, chat_cfg, eval_batches)}
        rows.append({"bench": "finetune-forgetting", "method": method, "replay_rate": rate, "train_steps": train_steps,
                     "train_s": round(time.perf_counter() - t, 1),
                     **{f"{k}_loss_before": round(v, 4) for k, v in before.items()},
                     **{f"{k}_loss_after": round(v, 4) for k, v in after.items()},
                     "pretraining_loss_change": round(after["pretraining"] - before["pretraining"], 4),
                     "chat_response_loss_change": round(after["chat_response"] - before["chat_response"], 4)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.bench finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed train steps per method and base (default 3)")
    parser.add_argument("--shape", default="chatglm-6b-2l-narrow", choices=sorted(SHAPES),
                        help="the model shape whose steps are timed (default chatglm-6b-2l-narrow)")
    parser.add_argument("--forgetting", metavar="WORKDIR", default=None,
                        help="measure forgetting instead: fine-tune this pretrained run with each method")
    parser.add_argument("--train-steps", type=int, default=200, help="with --forgetting: fine-tuning steps (default 200)")
    parser.add_argument("--eval-batches", type=int, default=8, help="with --forgetting: held-out batches (default 8)")
    parser.add_argument("--replay-rates", default="0", help="with --forgetting: comma-separated data.replay_rate values to "
                        "run each method with (the share of rows replaying the pretraining mixture; default 0)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every config")
    args = parser.parse_args(argv)
    if args.forgetting:
        try:
            rates = [float(r) for r in args.replay_rates.split(",")]
        except ValueError:
            raise cli.ConfigError(f"--replay-rates {args.replay_rates!r}: expected numbers separated by commas") from None
        rows = bench_forgetting(args.forgetting, args.train_steps, args.eval_batches, args.overrides, rates)
    else:
        _config(args.shape, "full", "float32", args.overrides)  # a bad override fails before any work
        rows = bench_cost(args.shape, args.steps, args.overrides)
    for row in rows:
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
