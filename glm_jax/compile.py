"""``python -m glm_jax.compile``: will this run fit that pod? The trainer's own step,
compiled ahead of time for a TPU topology from any host.

    python -m glm_jax.compile --config configs/glm-130b.yaml --topology v4-1024 \\
        mesh.model=4 mesh.pipe=8 mesh.param_sharding=zero1 train.batch_size=1024 --json

The mesh is built from the topology's compile-only devices as the trainer builds it on
that pod (several slices with ``--num-slices``), the step is the one ``python -m
glm_jax.train`` runs (Pallas attention included where the config picks it), and libtpu
compiles it. Printed: per-chip bytes (arguments, outputs, temporaries, code, aliasing)
against the chip's HBM, FITS or DOES NOT FIT with the margin, the compiled FLOPs against
the model-FLOPs formula, the step time at the chip's peak and at 50% MFU, tokens/s for
the pod, and the compile time. GPU clusters (``h100:64``...) cannot be compiled for
without a GPU: for them the abstract estimate of ``glm_jax.info`` is printed, labelled.

``--save PATH`` writes the compiled step (when it fits) for ``python -m glm_jax.train
train.compiled_step=PATH``, which loads it on the pod instead of compiling, and refuses it
when the config, jax/libtpu, glm_jax's code or the mesh differ
(``glm_jax.checkpoint.compiled_step``).

``--search`` tries remat policies x gradient-accumulation microbatches x parameter
sharding (x pipeline microbatches and FSDP gathering with ``mesh.pipe`` > 1) around the
given config, in order of estimated step time, compiling each until ``--search-fits``
of them fit; it prints a table of what it tried and the override line for
``python -m glm_jax.train``. The estimate is the model-FLOPs time at 50% MFU times the
remat policy's recompute (none 1, dots 1.05, dots_no_batch 1.1, full 4/3) over the
pipeline's non-bubble share; communication is not modelled (ties go to the candidate
that moves fewer bytes: ZeRO-1 before FSDP, per-step before per-layer gathers).

Exit status: 0 fits, 1 does not fit, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from glm_jax import cli

MFU_FOR_ESTIMATE = 0.5
RECOMPUTE = {"none": 1.0, "dots": 1.05, "dots_no_batch": 1.1, "full": 4 / 3}


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _step_s_at_peak(cfg, pod) -> float:
    """Model FLOPs of one step (``glm_jax.training.metrics``) over the pod's peak rate."""
    from glm_jax.training.metrics import flops_per_token  # jax-using: imported once bad input has been refused

    tokens = cfg.train.batch_size * cfg.train.seq_len
    return tokens * flops_per_token(cfg.model, cfg.train.seq_len) / (pod.chips * pod.kind.peak_flops)


def _speed(cfg, pod) -> dict:
    at_peak = _step_s_at_peak(cfg, pod)
    at_mfu = at_peak / MFU_FOR_ESTIMATE
    return {
        "step_s_at_peak": round(at_peak, 4),
        "step_s_at_50pct_mfu": round(at_mfu, 4),
        "tokens_per_s_at_50pct_mfu": round(cfg.train.batch_size * cfg.train.seq_len / at_mfu, 1),
    }


def report_tpu(cfg, pod, save: Optional[str] = None) -> dict:
    # jax-using imports here: --help and bad input answer without starting jax.
    from glm_jax.parallel import distributed
    from glm_jax.parallel.mesh import make_mesh
    from glm_jax.training.aot import DoesNotFit, compile_step

    devices = pod.devices()
    if pod.slices > 1:
        mesh = distributed.multislice_mesh(cfg.mesh, devices)
    else:
        mesh = make_mesh(cfg.mesh, devices, whole_system=True)
    hbm = pod.kind.hbm_bytes
    common = {
        "model": cfg.model.name,
        "topology": pod.name,
        "slices": pod.slices,
        "chips": pod.chips,
        "mesh": dict(mesh.shape),
        "param_sharding": cfg.mesh.param_sharding,
        "remat_policy": cfg.model.remat_policy,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "microbatches": cfg.train.microbatches,
        **_speed(cfg, pod),
        "estimate": False,
    }
    try:
        step = compile_step(cfg, mesh)
    except DoesNotFit as e:  # the compiler stopped: it knows the step needs more than the chip has
        return {
            **common,
            "per_chip_bytes": {"total": e.required},
            "hbm_bytes": hbm,
            "fits": False,
            "margin_bytes": None if e.required is None else hbm - e.required,
            "compiler_message": str(e),
            "compile_s": round(e.compile_s, 1),
        }
    m = step.memory
    pipelining = step.trainer.pipelining
    fits = m.total <= hbm
    saved = None
    if save and fits:
        print(f"glm_jax.compile: saving the compiled step to {save} ...", file=sys.stderr, flush=True)
        size = step.save(save, {"topology": pod.name, "slices": pod.slices, "per_chip_bytes": m.total, "hbm_bytes": hbm})
        saved = {"path": save, "executable_bytes": size}
    return {
        **common,
        "pipeline_microbatches": pipelining.microbatches if pipelining.active else 0,
        "per_chip_bytes": {
            "arguments": m.arguments,
            "outputs": m.outputs,
            "aliased": m.aliased,
            "temporaries": m.temporaries,
            "generated_code": m.generated_code,
            "total": m.total,
        },
        "hbm_bytes": hbm,
        "fits": fits,
        "margin_bytes": hbm - m.total,
        "compiled_flops_per_chip": step.flops,
        "model_flops_per_chip": _step_s_at_peak(cfg, pod) * pod.kind.peak_flops,
        "compile_s": round(step.compile_s, 1),
        **({"saved": saved} if save else {}),
    }


def report_gpu(cfg, pod) -> dict:
    from glm_jax.training.sizing import report  # the abstract per-device estimate

    info = report(cfg, pod.chips)
    total = info["per_device_bytes"]["total"]
    return {
        "model": cfg.model.name,
        "topology": pod.name,
        "slices": 1,
        "chips": pod.chips,
        "mesh": info["mesh"],
        "param_sharding": cfg.mesh.param_sharding,
        "per_chip_bytes": {"params": info["per_device_bytes"]["params"], "adamw_state": info["per_device_bytes"]["adamw_state"],
                           "total": total},
        "hbm_bytes": pod.kind.hbm_bytes,
        "fits": total <= pod.kind.hbm_bytes,
        "margin_bytes": pod.kind.hbm_bytes - total,
        **_speed(cfg, pod),
        "estimate": True,
        "note": "an estimate: parameters and AdamW state only (no gradients, activations or temporaries); "
                "compiling for a GPU needs a GPU",
    }


def _print(r: dict) -> None:
    b = r["per_chip_bytes"]
    print(f"model        {r['model']} on {r['topology']}" + (f" x {r['slices']} slices" if r["slices"] > 1 else "")
          + f" ({r['chips']} chips), mesh {' x '.join(f'{k}={v}' for k, v in r['mesh'].items())}, {r['param_sharding']}")
    if "compiler_message" in r:
        print(f"per chip     the compiler stopped: {r['compiler_message']}")
        print(f"compile      {r['compile_s']:.1f} s (until it ran out of memory)")
    elif r["estimate"]:
        print(f"per chip     ESTIMATE params {_gib(b['params'])} + AdamW state {_gib(b['adamw_state'])} = {_gib(b['total'])}"
              f" of {_gib(r['hbm_bytes'])} ({r['note']})")
    else:
        print(f"per chip     arguments {_gib(b['arguments'])} + outputs {_gib(b['outputs'])} - aliased {_gib(b['aliased'])} "
              f"+ temporaries {_gib(b['temporaries'])} + code {_gib(b['generated_code'])} = {_gib(b['total'])} "
              f"of {_gib(r['hbm_bytes'])} HBM")
        if r["compiled_flops_per_chip"]:
            print(f"flops        XLA's cost analysis {r['compiled_flops_per_chip']:.3e} per chip (it counts a loop body "
                  f"once, so scanned layers are counted once); model formula {r['model_flops_per_chip']:.3e} per chip per step")
        print(f"compile      {r['compile_s']:.1f} s")
    print(f"speed        step {r['step_s_at_peak']:.3f} s at peak, {r['step_s_at_50pct_mfu']:.3f} s at 50% MFU: "
          f"{r['tokens_per_s_at_50pct_mfu']:,.0f} tokens/s for the pod")
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    if r["margin_bytes"] is None:
        print(verdict)
    else:
        print(f"{verdict}  {'margin' if r['fits'] else 'short by'} {_gib(abs(r['margin_bytes']))} per chip")
    if "saved" in r:
        print(f"saved        {r['saved']['path']} ({r['saved']['executable_bytes'] / 2**20:,.1f} MiB executable)"
              if r["saved"] else "saved        nothing: the step does not fit")


def estimated_step_s(cfg, pod) -> float:
    """Model FLOPs at 50% MFU, times the remat recompute, over the pipeline's non-bubble share."""
    from glm_jax.training import pipeline_plan  # jax-using: imported once bad input has been refused

    t = _step_s_at_peak(cfg, pod) / MFU_FOR_ESTIMATE
    plan = pipeline_plan.plan(cfg, cfg.mesh.axis_sizes(pod.chips))
    bubble = plan.schedule(cfg.model.num_layers).bubble if plan.active else 0.0
    return t * RECOMPUTE[cfg.model.remat_policy] / (1.0 - bubble)


def search_candidates(args, pod) -> list[tuple[float, int, list[str], object]]:
    """(estimated step s, communication rank, overrides, config) of every valid variant."""
    from glm_jax.config import ConfigError, load_config
    from glm_jax.training.loop import check_batch_sizes  # jax-using, like every import below main's checks

    base = cli.config_from_args(args)
    sizes = base.mesh.axis_sizes(pod.chips)
    pipe = sizes["pipe"]
    shardings = ("zero1", "fsdp")
    out = []
    for remat in ("none", "dots_no_batch", "full"):
        for micro in (1, 2, 4, 8):
            for sharding in shardings:
                gathers = ("step", "layer") if pipe > 1 and sharding == "fsdp" else ("step",)
                pipeline_ms = (pipe, 2 * pipe, 4 * pipe) if pipe > 1 else (0,)
                for gather in gathers:
                    for pm in pipeline_ms:
                        overrides = [f"model.remat_policy={remat}", f"train.microbatches={micro}",
                                     f"mesh.param_sharding={sharding}"]
                        if pipe > 1:
                            overrides += [f"train.pipeline_microbatches={pm}", f"train.pipeline_gather={gather}"]
                        try:
                            cfg = load_config(args.config or cli.DEFAULT_CONFIG, [*args.overrides, *overrides])
                            check_batch_sizes(cfg, sizes["data"])  # every batch splits over data x accumulation
                            est = estimated_step_s(cfg, pod)
                        except ConfigError:
                            continue
                        rank = shardings.index(sharding) + 2 * (gather == "layer") + micro / 100
                        out.append((est, rank, overrides, cfg))
    return sorted(out, key=lambda c: (c[0], c[1]))


def search(args, pod) -> int:
    candidates = search_candidates(args, pod)
    if not candidates:
        raise cli.ConfigError("--search: no valid variant of this config for the pod (check train.batch_size against mesh.data)")
    rows, fits = [], 0
    for est, _, overrides, cfg in candidates:
        print(f"glm_jax.compile: trying {' '.join(overrides)} (est. {est:.3f} s) ...", file=sys.stderr, flush=True)
        r = report_tpu(cfg, pod, save=None if fits else args.save)  # --save keeps the fastest that fits
        rows.append({"overrides": overrides, "fits": r["fits"], "total_bytes": r["per_chip_bytes"]["total"],
                     "est_step_s": round(est, 4), "compile_s": r["compile_s"]})
        fits += r["fits"]
        if fits >= args.search_fits:
            break
    best = next((row for row in rows if row["fits"]), None)
    command = None
    if best:
        config = f"--config {args.config} " if args.config else ""
        saved = [f"train.compiled_step={args.save}"] if args.save else []
        command = "python -m glm_jax.train " + config + " ".join([*args.overrides, *best["overrides"], *saved])
    if args.json:
        print(json.dumps({"topology": pod.name, "tried": rows, "untried": len(candidates) - len(rows), "train_command": command}))
    else:
        print(f"{'fits':5s} {'GiB/chip':>9s} {'est. step':>10s} {'compile':>8s}  overrides")
        for row in rows:
            total = "?" if row["total_bytes"] is None else f"{row['total_bytes'] / 2**30:.2f}"
            print(f"{'yes' if row['fits'] else 'no':5s} {total:>9s} {row['est_step_s']:>9.3f}s {row['compile_s']:>7.1f}s  "
                  + " ".join(row["overrides"]))
        print(f"({len(candidates) - len(rows)} slower candidates not compiled)")
        print(command if command else "nothing tried fits this pod")
    return 0 if best else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.compile", description=__doc__.splitlines()[0])
    cli.add_config_args(parser)
    parser.add_argument("--topology", required=True, help="v4-N, v5p-N (TensorCores), v5e-N, v6e-N (chips), or GPU KIND:N")
    parser.add_argument("--num-slices", type=int, default=1, help="TPU slices of that topology (multislice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--search", action="store_true",
                        help="try remat x accumulation x sharding (x pipeline) variants, fastest estimate first")
    parser.add_argument("--search-fits", type=int, default=1, help="with --search: stop after this many fit (default 1)")
    parser.add_argument("--save", metavar="PATH",
                        help="write the compiled step (if it fits; with --search, the fastest that fits) to the directory "
                             "PATH, for python -m glm_jax.train train.compiled_step=PATH on the pod")
    args = parser.parse_args(argv)
    cfg = cli.config_from_args(args)
    if cfg.train.compiled_step:
        raise cli.ConfigError("train.compiled_step names a step to load when training; to write one, use --save PATH")
    from glm_jax.parallel import topology  # jax-free parsing: bad names fail fast

    pod = topology.parse(args.topology, args.num_slices)
    cfg.mesh.axis_sizes(pod.chips)  # the mesh must match the pod's chips: one line, exit 2
    if args.save and not pod.kind.tpu:
        raise cli.ConfigError("--save needs a TPU topology: compiling for a GPU cluster needs its GPUs")
    print(f"glm_jax.compile: {cfg.model.name} for {pod.name}"
          + (f" x {pod.slices}" if pod.slices > 1 else "") + " ...", file=sys.stderr, flush=True)
    if args.search:
        if not pod.kind.tpu:
            raise cli.ConfigError("--search compiles, which needs a TPU topology; GPU clusters get only the estimate")
        return search(args, pod)
    r = report_tpu(cfg, pod, args.save) if pod.kind.tpu else report_gpu(cfg, pod)
    if r.get("saved"):
        config = f"--config {args.config} " if args.config else ""
        r["train_command"] = f"python -m glm_jax.train {config}" + " ".join([*args.overrides, f"train.compiled_step={args.save}"])
    if args.json:
        print(json.dumps(r))
    else:
        _print(r)
        if r.get("train_command"):
            print(r["train_command"])
    return 0 if r["fits"] else 1


if __name__ == "__main__":
    cli.run_main(main)
