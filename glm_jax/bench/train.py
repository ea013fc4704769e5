"""Training-step throughput and MFU against this machine's measured matmul peak.

    python -m glm_jax.bench train --json [--preset glm-tiny|small-anchor|100m|all] [--steps N]
    python -m glm_jax.bench train --pipe 4 [--preset glm-tiny] [--steps N] [key=value ...]

Presets:
  glm-tiny      configs/glm-tiny.yaml as the trainer runs it.
  small-anchor  a GLM-130B-style block at toy width: embed 256, 4 layers, 4 heads of 64,
                GeGLU inner 1024, vocab 32000, seq 256, batch 4, bf16 compute, fp32 params
                (layers unrolled).
  100m          ~110M parameters (embed 768, 12 layers, 12 heads, GeGLU inner 2048,
                vocab 32000) at seq 512, batch 4, bf16 compute.

Each preset times ``--steps`` train steps (after one compiling step) on synthetic
batches; after each step it times 1024^3 and 2048^3 matmuls in float32 and in bfloat16, so
steps and peak see the same load on a shared host. ``mfu`` = model FLOP/s of the best step over the
best matmul rate of either dtype (``mfu_median_step`` uses the median step). Model FLOPs
follow ``glm_jax.training.metrics`` (6 x matmul params + attention, no remat counted).

``--pipe P`` times the same global batch three ways on all devices: unpipelined
(``mesh.pipe=1``), pipelined over P stages with M microbatches, and pipelined with twice
the batch and 2M microbatches (microbatches of the same size). The pipeline runs
R·M + P - 1 iterations of equal cost, so the two pipelined times give the cost of one
iteration, and the observed bubble is (P - 1) iterations over the measured step, next
to the predicted (P - 1) / (R·M + P - 1). Simulated CPU devices share the host's cores,
so stages never overlap there: the ratio to the unpipelined step is the schedule's
overhead, not a speed-up; the output says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence

from glm_jax import cli
from glm_jax.config import Config, MeshConfig, ModelConfig, TrainConfig, load_config

PRESETS = ("glm-tiny", "small-anchor", "100m")

_GLM130B_STYLE = dict(
    norm_order="post", mlp_type="geglu", gelu_approximate=False, position_encoding="rotary_1d", tie_embeddings=True,
    init="deepnorm", dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="none",
    mask_token_id=31990, gmask_token_id=31991, smask_token_id=31992, eod_token_id=31993, sop_token_id=31994,
    eop_token_id=31995, eos_token_id=31996, pad_token_id=0,
)


def preset_config(name: str, overrides: Sequence[str] = ()) -> Config:
    if name == "glm-tiny":
        return load_config("configs/glm-tiny.yaml", ["mesh.data=-1", *overrides])
    if name == "small-anchor":
        # Four layers compile quickly unrolled, and unrolled they run ~15% faster on CPU than
        # under nn.scan (no per-layer slicing of stacked weights and saved activations).
        model = ModelConfig(name="small-anchor", vocab_size=32000, hidden_size=256, num_layers=4, num_heads=4,
                            mlp_dim=1024, max_seq_len=256, **dict(_GLM130B_STYLE, scan_layers=False))
        train = TrainConfig(batch_size=4, seq_len=256)
    elif name == "100m":
        model = ModelConfig(name="100m", vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12,
                            mlp_dim=2048, max_seq_len=512, **_GLM130B_STYLE)
        train = TrainConfig(batch_size=4, seq_len=512)
    else:
        raise cli.ConfigError(f"--preset {name!r} is not valid; valid values: {', '.join(PRESETS)}, all")
    cfg = Config(model=model, mesh=MeshConfig(data=-1), train=train)
    if overrides:  # key=value on top of the preset, validated like any config
        from glm_jax.config import config_from_dict

        cfg = config_from_dict(dataclasses.asdict(cfg), overrides)
    cfg.validate()
    return cfg


def _matmul_timers(sizes: Sequence[int] = (1024, 2048)):
    """Jitted n^3 matmuls per dtype, compiled; each timer returns the best FLOP/s of its sizes.

    Several sizes, because which square matmul a CPU runs fastest varies by machine (and
    between runs of one machine by more than between sizes); the peak is the best of all.
    """
    import jax
    import jax.numpy as jnp

    timers = {}
    for dtype in ("float32", "bfloat16"):
        calls = []
        for n in sizes:
            a = jnp.ones((n, n), dtype)
            f = jax.jit(lambda x: x @ x)
            f(a).block_until_ready()
            calls.append((n, f, a))

        def rate(calls=calls):
            best = 0.0
            for n, f, a in calls:
                t = time.perf_counter()
                f(a).block_until_ready()
                best = max(best, 2.0 * n**3 / (time.perf_counter() - t))
            return best

        timers[dtype] = rate
    return timers


def time_steps(cfg: Config, steps: int) -> dict:
    """Steps and peak matmuls interleaved, so both see the same machine load."""
    import jax

    from glm_jax.data.synthetic import copy_batch
    from glm_jax.parallel.distributed import global_batch
    from glm_jax.parallel.mesh import make_mesh
    from glm_jax.training.trainer import Trainer

    mesh = make_mesh(cfg.mesh)
    trainer = Trainer.build(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps + 2)), mesh)
    state, step = trainer.init_state(seed=0), trainer.train_step
    batch = global_batch(copy_batch(cfg.model, cfg.train.batch_size, cfg.train.seq_len, 0, 0), mesh)
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    timers = _matmul_timers()
    times, peaks = [], {k: [] for k in timers}
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
        for k, rate in timers.items():
            peaks[k].append(rate())
    return {"step_s": times, "peaks": {k: max(v) for k, v in peaks.items()}, "compile_s": compile_s,
            "parameters": trainer.parameter_count(state), "loss": float(m["loss"])}


def bench(cfg: Config, steps: int) -> dict:
    import jax
    import numpy as np

    from glm_jax.training.metrics import flops_per_token

    timing = time_steps(cfg, steps)
    peaks = timing["peaks"]
    peak = max(peaks.values())  # the fastest this machine multiplied, in either dtype
    tokens = cfg.train.batch_size * cfg.train.seq_len
    flops_per_step = tokens * flops_per_token(cfg.model, cfg.train.seq_len)
    best, median = min(timing["step_s"]), float(np.median(timing["step_s"]))
    return {
        "bench": "train",
        "model": cfg.model.name,
        "parameters": timing["parameters"],
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "dtype": cfg.model.dtype,
        "param_dtype": cfg.model.param_dtype,
        "scan_layers": cfg.model.scan_layers,
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "steps_timed": steps,
        "step_s_best": round(best, 4),
        "step_s_median": round(median, 4),
        "compile_s": round(timing["compile_s"], 2),
        "tokens_per_s": round(tokens / best, 1),
        "model_tflops_per_s": round(flops_per_step / best / 1e12, 4),
        "peak_tflops_per_s": {k: round(v / 1e12, 4) for k, v in peaks.items()},
        "mfu": round(flops_per_step / best / peak, 4),
        "mfu_median_step": round(flops_per_step / median / peak, 4),
    }


def bench_pipeline(cfg: Config, stages: int, steps: int) -> dict:
    """The pipelined step against the unpipelined one of the same global batch (see the
    module doc): step times, their ratio, and the bubble predicted and observed."""
    import jax
    import numpy as np

    from glm_jax.training import pipeline_plan

    def variant(pipe: int, batch_scale: int = 1, microbatches: int = 0) -> Config:
        mesh = dataclasses.replace(cfg.mesh, pipe=pipe, data=-1)
        train = dataclasses.replace(cfg.train, batch_size=cfg.train.batch_size * batch_scale,
                                    pipeline_microbatches=microbatches)
        model = dataclasses.replace(cfg.model, scan_layers=True)  # the pipeline runs stacked layers; so does the baseline
        out = dataclasses.replace(cfg, mesh=mesh, train=train, model=model)
        out.validate()
        return out

    piped = variant(stages, 1, cfg.train.pipeline_microbatches)
    plan = pipeline_plan.plan(piped, piped.mesh.axis_sizes(jax.device_count()))
    doubled = variant(stages, 2, 2 * plan.microbatches)
    print(f"bench train --pipe: unpipelined, then {stages} stages x {plan.repeats} with {plan.microbatches} and "
          f"{2 * plan.microbatches} microbatches ...", file=sys.stderr, flush=True)
    runs = {name: float(np.median(time_steps(c, steps)["step_s"]))
            for name, c in (("plain", variant(1)), ("piped", piped), ("doubled", doubled))}
    sched = plan.schedule(cfg.model.num_layers)
    per_iteration = (runs["doubled"] - runs["piped"]) / (plan.repeats * plan.microbatches)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    cpu = jax.default_backend() == "cpu"
    return {
        "bench": "train-pipeline",
        "model": cfg.model.name,
        "layers": cfg.model.num_layers,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "stages": plan.stages,
        "repeats": plan.repeats,
        "microbatches": plan.microbatches,
        "steps_timed": steps,
        "step_s_unpipelined": round(runs["plain"], 4),
        "step_s_pipelined": round(runs["piped"], 4),
        "pipelined_over_unpipelined": round(runs["piped"] / runs["plain"], 3),
        "tokens_per_s_unpipelined": round(tokens / runs["plain"], 1),
        "tokens_per_s_pipelined": round(tokens / runs["piped"], 1),
        "iteration_s": round(per_iteration, 5),
        "bubble_predicted": round(sched.bubble, 4),
        "bubble_observed": round((plan.stages - 1) * per_iteration / runs["piped"], 4),
        "note": ("simulated devices share this host's CPU cores, so stages never overlap: the ratio is the "
                 "pipeline's overhead, not its speed-up" if cpu else "stages overlap on real devices"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="all", help=f"one of {', '.join(PRESETS)}, or all")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per preset (after one compiling step)")
    parser.add_argument("--json", action="store_true", help="one JSON object per preset on stdout")
    parser.add_argument("--pipe", type=int, default=0,
                        help="compare a pipeline of this many stages with the unpipelined step (default preset glm-tiny "
                             "with 8 layers; train.pipeline_repeats / train.pipeline_microbatches as overrides)")
    parser.add_argument("overrides", nargs="*", help="key=value applied to each preset's config")
    args = parser.parse_args(argv)
    if args.pipe:
        return _main_pipeline(args)
    names = PRESETS if args.preset == "all" else (args.preset,)
    configs = [preset_config(n, args.overrides) for n in names]  # every error before any work
    for name, cfg in zip(names, configs):
        print(f"bench train: {name} ...", file=sys.stderr, flush=True)
        result = dict(preset=name, **bench(cfg, args.steps))
        _emit(result, args.json)
        print(f"{name}: {result['tokens_per_s']:,.0f} tokens/s, MFU {100 * result['mfu']:.1f}% of the measured "
              f"{max(result['peak_tflops_per_s'].values()):.3f} TFLOP/s matmul peak", file=sys.stderr, flush=True)
    return 0


def _emit(result: dict, as_json: bool) -> None:
    """One JSON line on stdout, or one ``key value`` line per field."""
    if as_json:
        print(json.dumps(result), flush=True)
    else:
        for k, v in result.items():
            print(f"{k:28s} {v}")


def _main_pipeline(args) -> int:
    if args.pipe < 2:
        raise cli.ConfigError(f"--pipe {args.pipe}: a pipeline needs at least 2 stages")
    name = "glm-tiny" if args.preset == "all" else args.preset
    layers = [] if any(o.startswith("model.num_layers=") for o in args.overrides) else ["model.num_layers=8"]
    cfg = preset_config(name, [*layers, *args.overrides])
    result = dict(preset=name, **bench_pipeline(cfg, args.pipe, args.steps))
    _emit(result, args.json)
    print(f"{name}: pipelined step {result['pipelined_over_unpipelined']:.2f}x the unpipelined one; bubble "
          f"{100 * result['bubble_observed']:.1f}% observed, {100 * result['bubble_predicted']:.1f}% predicted "
          f"({result['note']})", file=sys.stderr, flush=True)
    return 0
