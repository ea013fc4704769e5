"""Generation throughput and memory-bandwidth utilisation, float and INT8/INT4.

    python -m glm_jax.bench decode --json [--preset glm-tiny|chatglm-6b-2l|all]
        [--weights float32,bfloat16,int8,int4] [--batch 1,8] [--prompt-len P] [--chunk C] [--chunks K] [--repeats R]

Presets:
  glm-tiny       configs/glm-tiny.yaml (GLM-130B's architecture at toy size), random weights.
  chatglm-6b-2l  configs/chatglm-6b.yaml cut to 2 layers: full width, the real 130528-token
                 vocabulary and its untied lm_head, random weights.

Weights: ``float32`` and ``bfloat16`` compute and store in that dtype; ``int8``/``int4`` are
MODEL.md §2.5's weight-only quantization of the four linears per layer, computing in
bfloat16 (the embeddings and the head stay bfloat16, as the authors keep them fp16).
Default: all four on a CPU, all but float32 on accelerators. Parameters are laid out as
``generate`` runs them (``glm_jax.inference.weights``: layers unrolled, matrices in the
compute dtype, compact weights streamed block by block on a CPU).

For each preset, weights and batch: one run compiles, then ``--repeats`` timed runs each
prefill a ``P``-token prompt and decode ``1 + C * K`` tokens (stop tokens off) in ``K``
chunks of ``C`` steps, the way ``stream`` runs them: one compiled loop, one dispatch per
chunk. Prefill is the time to the first token. Decode is steady state: the fastest chunk's
steps per second (``decode_steps_per_s``; ``decode_steps_per_s_median`` over all chunks),
so compilation, prefill and the first call's set-up are not in it.

Bandwidth utilisation = bytes read per decoding step x steps/s / measured bandwidth.
``weight_bytes`` is what one step reads of the parameters as stored (compact weights at
their own width; the embedding table only a row per example, unless it is also the
head); ``cache_bytes`` is the KV cache the step attends over (all slots, as the XLA
decode path reads them). The bandwidth is measured in the same run, before and after the
decoding runs of each preset, as the best of reductions and float32 matrix-vector
products over 512 MiB (``measure_bandwidth``). ``speedup_vs_float32`` compares decode
steps/s with the float32 row of the same preset and batch (same run, same load).

With ``torch`` installed (the authors' runtime; ``--no-torch`` skips it), each preset and
batch also times PyTorch float32 on the same CPU doing only the matrix products of one
decoding step (``F.linear`` with the preset's four linears per layer and the head, in
the authors' ``[out, in]`` layout): an upper bound on the authors' float32 decoding speed,
which also runs attention, LayerNorms and Python for every layer.
``speedup_vs_torch_float32_bound`` divides decode steps/s by that bound's steps/s, so it
underestimates the speedup over the authors' code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Optional, Sequence

from glm_jax import cli
from glm_jax.config import ModelConfig, load_config

PRESETS = ("glm-tiny", "chatglm-6b-2l")
WEIGHTS = ("float32", "bfloat16", "int8", "int4")


def preset_model(name: str, dtype: str) -> ModelConfig:
    if name == "glm-tiny":
        cfg = load_config("configs/glm-tiny.yaml").model
    elif name == "chatglm-6b-2l":
        cfg = dataclasses.replace(load_config("configs/chatglm-6b.yaml").model, num_layers=2, remat_policy="none")
    else:
        raise cli.ConfigError(f"--preset {name!r} is not valid; valid values: {', '.join(PRESETS)}, all")
    return dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)


def random_params(cfg: ModelConfig, seed: int = 0):
    """Random weights of the layout's shapes, made on the device (no host copy of a large model)."""
    import jax
    import jax.numpy as jnp

    from glm_jax.checkpoint import authors_layout

    tree: dict = {}
    key = jax.random.key(seed)
    for i, (path, shape) in enumerate(sorted(authors_layout.leaf_shapes(cfg).items())):
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        make = jax.jit(lambda k, shape=shape: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(cfg.param_dtype))
        node[path[-1]] = make(jax.random.fold_in(key, i))
    return tree


def measure_bandwidth(nbytes: int = 1 << 29) -> dict:
    """Best read rate (bytes/s) of each probe over an ``nbytes`` float32 matrix ``A [m, 4096]``:
    a row sum, a sum of everything, ``A @ v`` and ``v @ A`` (each reads every byte once; on
    XLA's CPU backend the row-major ones come closest to the memory's rate)."""
    import jax
    import jax.numpy as jnp

    n = 4096
    m = nbytes // (4 * n)
    x = jnp.ones((m, n), jnp.float32)
    col, row = jnp.ones((n, 1), jnp.float32), jnp.ones((1, m), jnp.float32)
    probes = {
        "row_sum": jax.jit(lambda a: jnp.sum(a, axis=1)),
        "sum": jax.jit(jnp.sum),
        "gemv_rows": jax.jit(lambda a, v=col: a @ v),
        "gemv_cols": jax.jit(lambda a, v=row: v @ a),
    }
    best = {}
    for name, f in probes.items():
        f(x).block_until_ready()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            f(x).block_until_ready()
            times.append(time.perf_counter() - t)
        best[name] = x.nbytes / min(times)
    del x
    return best


def weight_bytes_per_step(params, cfg: ModelConfig, batch: int) -> int:
    """Bytes of the parameters one decoding step reads, as stored."""
    import jax

    from glm_jax.model import linear

    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=linear.is_compact)[0]:
        size = sum(a.nbytes for a in jax.tree.leaves(leaf))
        if jax.tree_util.keystr(path) == "['word_embeddings']" and not cfg.tie_embeddings:
            size = size // cfg.vocab_size * batch  # the rows looked up
        total += size
    return total


def _prompts(cfg: ModelConfig, batch: int, prompt_len: int):
    import numpy as np

    rng = np.random.default_rng(0)
    body = rng.integers(5, min(cfg.mask_token_id, 20000), size=(batch, prompt_len - 2))
    return np.concatenate([body, np.full((batch, 1), cfg.gmask_token_id), np.full((batch, 1), cfg.sop_token_id)], axis=1)


def run_case(gen, cfg: ModelConfig, batch: int, prompt_len: int, chunk: int, chunks: int, repeats: int) -> dict:
    prompts = _prompts(cfg, batch, prompt_len)
    new_tokens = 1 + chunk * chunks
    prefill, steps, first_run = [], [], 0.0
    for r in range(repeats + 1):  # the first run compiles
        start = time.perf_counter()
        blocks = gen.stream(prompts, new_tokens, chunk=chunk, stop_tokens=[])
        first = next(blocks)
        last = time.perf_counter()
        to_first = last - start
        got = first.shape[1]
        for block in blocks:
            now = time.perf_counter()
            steps.append((now - last) / block.shape[1])
            got += block.shape[1]
            last = now
        assert first.shape == (batch, 1) and got == new_tokens, (first.shape, got)
        if r == 0:
            first_run, steps = last - start, []
        else:
            prefill.append(to_first)
    best = min(steps)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "first_run_s": first_run,
        "prefill_tokens_per_s": batch * prompt_len / min(prefill),
        "decode_tokens_per_s": batch / best,
        "decode_steps_per_s": 1.0 / best,
        "decode_steps_per_s_median": 1.0 / statistics.median(steps),
    }


def _params_for(fmt: str, float_params, cfg: ModelConfig):
    """(config, parameters) of one weight format from the float32 parameters."""
    from glm_jax.inference import quantize as qz

    if fmt in ("float32", "bfloat16"):
        return dataclasses.replace(cfg, dtype=fmt), float_params
    qcfg = dataclasses.replace(cfg, dtype="bfloat16")
    return qcfg, qz.quantize(float_params, qcfg, int(fmt[3:]))


def bench_preset(name: str, args, formats: Sequence[str], batches: Sequence[int]) -> list[dict]:
    from glm_jax.inference import kv_cache
    from glm_jax.inference.decode import Generator

    cfg = preset_model(name, "float32")
    prompt_len = min(args.prompt_len, cfg.max_seq_len - 1 - args.chunk * args.chunks)
    float_params = random_params(cfg)
    rows = []
    for fmt in formats:
        fcfg, params = _params_for(fmt, float_params, cfg)
        gen = Generator(fcfg, params)
        del params
        for batch in batches:
            print(f"bench decode: {name} {fmt} batch {batch}", file=sys.stderr, flush=True)
            r = run_case(gen, gen.cfg, batch, prompt_len, args.chunk, args.chunks, args.repeats)
            r.update(
                preset=name,
                weights=fmt,
                dtype=fcfg.dtype,
                weight_bytes=weight_bytes_per_step(gen.params, gen.cfg, batch),
                cache_bytes=kv_cache.nbytes(gen.cfg, batch, prompt_len + r["new_tokens"]),
            )
            rows.append(r)
        del gen
    return rows


def torch_float32_bound(cfg: ModelConfig, batch: int, repeats: int = 3) -> Optional[float]:
    """Steps/s of PyTorch float32 doing only one decoding step's matrix products (see the
    module doc), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    import torch.nn.functional as F

    h, f, v = cfg.hidden_size, cfg.mlp_dim, cfg.vocab_size
    inner = 2 * f if cfg.mlp_type == "geglu" else f
    gen = torch.Generator().manual_seed(0)
    layer = [torch.randn(3 * h, h, generator=gen), torch.randn(h, h, generator=gen),
             torch.randn(inner, h, generator=gen), torch.randn(h, f, generator=gen)]
    layers = [layer] + [[w.clone() for w in layer] for _ in range(cfg.num_layers - 1)]  # distinct memory per layer
    head = torch.randn(v, h, generator=gen)
    x, x_f = torch.randn(batch, h, generator=gen), torch.randn(batch, f, generator=gen)

    def step():
        with torch.no_grad():
            for qkv, dense, up, down in layers:
                F.linear(x, qkv)
                F.linear(x, dense)
                F.linear(x, up)
                F.linear(x_f, down)
            F.linear(x, head)

    step()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
    return 1.0 / best


def _list(value: str, valid: Sequence, what: str, cast=str) -> list:
    items = [cast(v) for v in value.split(",") if v]
    bad = [v for v in items if v not in valid]
    if bad or not items:
        raise cli.ConfigError(f"--{what} {value!r} is not valid; valid values: {', '.join(map(str, valid))} (comma-separated)")
    return items


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m glm_jax.bench decode", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[4:]),
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--preset", default="all", help=f"one of {', '.join(PRESETS)}, all (default all)")
    parser.add_argument("--weights", default=None, help="comma-separated formats (default float32,bfloat16,int8,int4 on a CPU, "
                        "bfloat16,int8,int4 on accelerators)")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per example (default 64)")
    parser.add_argument("--chunk", type=int, default=None, help="decoding steps per timed chunk (default 4 for chatglm-6b-2l on a CPU, else 16)")
    parser.add_argument("--chunks", type=int, default=3, help="timed chunks per run (default 3)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the compiling one (default 1)")
    parser.add_argument("--no-torch", dest="torch", action="store_false",
                        help="skip the PyTorch float32 matrix-product bound (run when torch is installed and the backend is a CPU)")
    args = parser.parse_args(argv)
    presets = PRESETS if args.preset == "all" else (args.preset,)
    for p in presets:
        preset_model(p, "float32")  # validates the name
    batches = _list(args.batch, range(1, 1 << 16), "batch", int)
    if args.prompt_len < 3 or args.chunks < 1 or args.repeats < 1 or (args.chunk is not None and args.chunk < 1):
        raise cli.ConfigError("--prompt-len must be >= 3 and --chunk, --chunks, --repeats >= 1")

    import jax

    backend = jax.default_backend()
    formats = _list(args.weights, WEIGHTS, "weights") if args.weights else [w for w in WEIGHTS if backend == "cpu" or w != "float32"]
    probes = [measure_bandwidth()]
    rows, torch_bound = [], {}
    for p in presets:
        a = argparse.Namespace(**vars(args))
        if a.chunk is None:
            a.chunk = 4 if (p == "chatglm-6b-2l" and backend == "cpu") else 16
        rows.extend(bench_preset(p, a, formats, batches))
        probes.append(measure_bandwidth())
        if args.torch and backend == "cpu":
            for b in batches:
                print(f"bench decode: {p} torch float32 bound, batch {b}", file=sys.stderr, flush=True)
                torch_bound[(p, b)] = torch_float32_bound(preset_model(p, "float32"), b)
    bandwidth = max(v for probe in probes for v in probe.values())
    base = {(r["preset"], r["batch"]): r["decode_steps_per_s"] for r in rows if r["weights"] == "float32"}
    for r in rows:
        r["weight_bandwidth_utilisation"] = r["weight_bytes"] * r["decode_steps_per_s"] / bandwidth
        r["bandwidth_utilisation"] = (r["weight_bytes"] + r["cache_bytes"]) * r["decode_steps_per_s"] / bandwidth
        ref = base.get((r["preset"], r["batch"]))
        r["speedup_vs_float32"] = r["decode_steps_per_s"] / ref if ref else None
        bound = torch_bound.get((r["preset"], r["batch"]))
        r["torch_float32_bound_steps_per_s"] = bound
        r["speedup_vs_torch_float32_bound"] = r["decode_steps_per_s"] / bound if bound else None
        print(
            f"{r['preset']:>14} {r['weights']:>8} b={r['batch']}: prefill {r['prefill_tokens_per_s']:,.0f} tok/s, "
            f"decode {r['decode_tokens_per_s']:,.1f} tok/s, weights {r['weight_bytes'] / 2**20:,.1f} MiB/step, "
            f"{100 * r['weight_bandwidth_utilisation']:.0f}% of bandwidth ({100 * r['bandwidth_utilisation']:.0f}% with the cache)"
            + (f", {r['speedup_vs_float32']:.2f}x float32" if ref else "")
            + (f", {r['speedup_vs_torch_float32_bound']:.2f}x torch float32 matmuls" if bound else ""),
            file=sys.stderr,
        )
    result = {
        "backend": backend,
        "device": jax.devices()[0].device_kind,
        "bandwidth_bytes_per_s": bandwidth,
        "bandwidth_probes": probes,
        "results": rows,
    }
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
