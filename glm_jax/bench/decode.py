"""Generation throughput and memory-bandwidth utilisation, float and INT8/INT4.

    python -m glm_jax.bench decode --json [--preset glm-tiny|chatglm-6b-2l|all] [--prompt-len P] [--new-tokens N]

Presets:
  glm-tiny       configs/glm-tiny.yaml (GLM-130B's architecture at toy size), random weights.
  chatglm-6b-2l  configs/chatglm-6b.yaml cut to 2 layers: full width, the real 130528-token
                 vocabulary and its untied lm_head, random weights.

For each preset, weight format (float, int8, int4) and batch (1, 8) it times the prefill of
a ``P``-token prompt and the ``N - 1`` cached decoding steps after it (one compiled loop;
stop tokens off so every step runs), each after a compiling run, best of ``--repeats``.
Floats compute in bfloat16 on accelerators and float32 on a CPU (where XLA has no fast
bfloat16 matmul); weights are stored in the compute dtype.

Bandwidth utilisation = bytes read per decoding step x steps/s / measured bandwidth.
``weight_bytes`` is what one step reads of the parameters (everything but the embedding
table, of which it reads a row per example, unless the head is tied to it); ``cache_bytes``
is the KV cache the step attends over (all slots, as the XLA decode path reads them).
The bandwidth is measured in the same run, before and after the decoding runs, as the best
of a large reduction and a large matrix-vector product (each reads every byte once).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Optional, Sequence

from glm_jax import cli
from glm_jax.config import ModelConfig, load_config

PRESETS = ("glm-tiny", "chatglm-6b-2l")


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

    from glm_jax.convert import layout

    tree: dict = {}
    key = jax.random.key(seed)
    for i, (path, shape) in enumerate(sorted(layout.leaf_shapes(cfg).items())):
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        make = jax.jit(lambda k, shape=shape: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(cfg.param_dtype))
        node[path[-1]] = make(jax.random.fold_in(key, i))
    return tree


def measure_bandwidth(nbytes: int = 1 << 29) -> dict:
    """Best read rate (bytes/s) of a reduction and a matrix-vector product over ``nbytes``."""
    import jax
    import jax.numpy as jnp

    n = 4096
    m = nbytes // (4 * n)
    x = jnp.ones((m, n), jnp.float32)
    v = jnp.ones((1, m), jnp.float32)
    probes = {"reduce": jax.jit(lambda a: jnp.sum(a, axis=0)), "gemv": jax.jit(lambda a, b=v: b @ a)}
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
    import jax

    from glm_jax.model.linear import QuantizedWeight

    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))[0]:
        arrays = [leaf.q, leaf.scale] if isinstance(leaf, QuantizedWeight) else [leaf]
        size = sum(a.nbytes for a in arrays)
        if jax.tree_util.keystr(path) == "['word_embeddings']" and not cfg.tie_embeddings:
            size = size // cfg.vocab_size * batch  # the rows looked up
        total += size
    return total


def run_case(gen, cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    body = rng.integers(5, min(cfg.mask_token_id, 20000), size=(batch, prompt_len - 2))
    prompts = np.concatenate([body, np.full((batch, 1), cfg.gmask_token_id), np.full((batch, 1), cfg.sop_token_id)], axis=1)
    best_prefill = best_decode = float("inf")
    for r in range(repeats + 1):  # the first run compiles
        t0 = time.perf_counter()
        blocks = gen.stream(prompts, new_tokens, stop_tokens=[])
        first = next(blocks)
        t1 = time.perf_counter()
        rest = np.concatenate(list(blocks), axis=1)
        t2 = time.perf_counter()
        assert first.shape == (batch, 1) and rest.shape == (batch, new_tokens - 1)
        if r:
            best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, t2 - t1)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": batch * prompt_len / best_prefill,
        "decode_tokens_per_s": batch * (new_tokens - 1) / best_decode,
        "decode_steps_per_s": (new_tokens - 1) / best_decode,
    }


def bench_preset(name: str, args, dtype: str) -> list[dict]:
    import jax

    from glm_jax.inference import kv_cache
    from glm_jax.inference import quantize as qz
    from glm_jax.inference.decode import Generator

    cfg = preset_model(name, dtype)
    prompt_len = min(args.prompt_len, cfg.max_seq_len - args.new_tokens)
    float_params = random_params(cfg)
    rows = []
    for fmt in ("float", "int8", "int4"):
        params = float_params if fmt == "float" else jax.device_put(qz.quantize(float_params, cfg, int(fmt[3:])))
        gen = Generator(cfg, params)
        for batch in (1, 8):
            print(f"bench decode: {name} {fmt} batch {batch}", file=sys.stderr, flush=True)
            r = run_case(gen, cfg, batch, prompt_len, args.new_tokens, args.repeats)
            slots = prompt_len + args.new_tokens
            r.update(
                preset=name,
                weights=fmt,
                dtype=dtype,
                weight_bytes=weight_bytes_per_step(params, cfg, batch),
                cache_bytes=kv_cache.nbytes(cfg, batch, slots),
            )
            rows.append(r)
        del gen, params
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.bench decode", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--preset", default="all", help=f"one of {', '.join(PRESETS)}, all")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per run (default 64; 16 for chatglm-6b-2l on a CPU)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    presets = PRESETS if args.preset == "all" else (args.preset,)
    for p in presets:
        preset_model(p, "float32")  # validates the name

    import jax

    backend = jax.default_backend()
    dtype = "float32" if backend == "cpu" else "bfloat16"
    bw_before = measure_bandwidth()
    rows = []
    for p in presets:
        a = argparse.Namespace(**vars(args))
        if a.new_tokens is None:
            a.new_tokens = 16 if (p == "chatglm-6b-2l" and backend == "cpu") else 64
        rows.extend(bench_preset(p, a, dtype))
    bw_after = measure_bandwidth()
    bandwidth = max(*bw_before.values(), *bw_after.values())
    for r in rows:
        r["weight_bandwidth_utilisation"] = r["weight_bytes"] * r["decode_steps_per_s"] / bandwidth
        r["bandwidth_utilisation"] = (r["weight_bytes"] + r["cache_bytes"]) * r["decode_steps_per_s"] / bandwidth
        print(
            f"{r['preset']:>14} {r['weights']:>5} b={r['batch']}: prefill {r['prefill_tokens_per_s']:,.0f} tok/s, "
            f"decode {r['decode_tokens_per_s']:,.1f} tok/s, weights {r['weight_bytes'] / 2**20:,.1f} MiB/step, "
            f"{100 * r['weight_bandwidth_utilisation']:.0f}% of bandwidth ({100 * r['bandwidth_utilisation']:.0f}% with the cache)",
            file=sys.stderr,
        )
    result = {
        "backend": backend,
        "device": jax.devices()[0].device_kind,
        "dtype": dtype,
        "bandwidth_bytes_per_s": bandwidth,
        "bandwidth_probes": {"before": bw_before, "after": bw_after},
        "results": rows,
    }
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
