"""GLM attention: the fused Pallas kernel against the XLA reference, and block skipping.

    python -m glm_jax.bench attention --json [--seq 2048,8192] [--batch 1] [--heads 16]
        [--head-dim 128] [--dtype bfloat16] [--masks gmask-50,mask-packed] [--repeats 5]
        [--blocks Q,KV,Q_BWD,KV_BWD] [--skip-seqs 2048,8192]

Two parts, one JSON object:

``skip``: for typical GLM masks at seq 2048 and 8192 (causal = Part A of length 0 for
comparison; [gMASK] rows with Part A 25/50/75% of the row; [MASK] rows packing four
samples whose Part A is 80% of each) the share of blocks the kernels visit and the share
they take as fully visible (no mask evaluation), with this backend's block sizes, and the
share of query-key pairs the mask keeps (what an ideal kernel would compute). Computed
from one integer per token, as the kernels do; no kernel runs.

``timing``: best and median milliseconds of forward and forward+backward, kernel and XLA
reference, on random inputs; achieved TFLOP/s counts the pairs the mask keeps (forward
4 x head_dim FLOPs per pair, forward+backward 3x that, recomputation not counted) and
``dense_tflops`` counts every pair (what the XLA reference computes). ``peak_tflops``
is the published bf16 peak of the device, or a measured float32 matmul on a CPU. On CPU
the kernels run in Pallas interpret mode: those timings are not speed results.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Sequence

import numpy as np

MASKS = ("causal", "gmask-25", "gmask-50", "gmask-75", "mask-packed")
SKIP_SEQS = (2048, 8192)


def mask_rows(name: str, batch: int, length: int):
    """(prefix_len ``[b, 4]``, segment_ids ``[b, L]``) of a named mask, numpy int32."""
    seg = np.ones((batch, length), np.int32)
    plen = np.zeros((batch, 4), np.int32)
    if name == "causal":
        return plen, seg
    if name.startswith("gmask-") and name[6:] in ("25", "50", "75"):
        plen[:, 0] = length * int(name[6:]) // 100
        return plen, seg
    if name == "mask-packed":  # four samples per row, Part A 80% of each (GLM-130B packs four)
        n = length // 4
        seg = np.minimum(np.arange(length) // n + 1, 4).astype(np.int32)[None].repeat(batch, 0)
        plen[:] = [s * 4 // 5 for s in (n, n, n, length - 3 * n)]
        return plen, seg
    raise ValueError(f"mask {name!r} is not valid; valid values: {', '.join(MASKS)}")


def skip_stats(name: str, length: int, blocks) -> dict:
    from glm_jax.kernels import block_mask

    plen, seg = mask_rows(name, 1, length)
    q_ranges, kv_ranges, pairs = _skip_arrays()(plen, seg, length, tuple(blocks))
    padded = -(-length // max(blocks)) * max(blocks)
    fwd = block_mask.visit_fraction(q_ranges, padded // blocks[1])
    dkv = block_mask.visit_fraction(kv_ranges, padded // blocks[2])
    return {"mask": name, "seq": length, "pairs_kept": round(float(pairs[0]) / length**2, 4), "fwd_visited": round(fwd[0], 4),
            "fwd_full": round(fwd[1], 4), "bwd_visited": round(dkv[0], 4), "bwd_full": round(dkv[1], 4)}


@functools.cache
def _skip_arrays():
    """Forward and dK/dV block ranges and kept pairs; jitted once per (length, blocks)."""
    import jax

    from glm_jax.kernels import attention_mask, block_mask

    @functools.partial(jax.jit, static_argnums=(2, 3))
    def arrays(plen, seg, length, blocks):
        bq, bk, bqb, bkb = blocks
        padded = -(-length // max(blocks)) * max(blocks)
        tm = block_mask.token_mask(attention_mask.part_a_end(plen, seg, length), seg, padded)
        return block_mask.q_block_ranges(tm, bq, bk), block_mask.kv_block_ranges(tm, bqb, bkb), block_mask.kept_pairs(tm, length)

    return arrays


def _best_median(f, args, repeats: int) -> tuple[float, float]:
    import jax

    jax.block_until_ready(f(*args))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return min(times), float(np.median(times))


def time_case(name: str, length: int, batch: int, heads: int, head_dim: int, dtype: str, repeats: int, block_sizes) -> dict:
    import jax
    import jax.numpy as jnp

    from glm_jax.kernels import attention_mask, block_mask, flash_attention, reference

    plen, seg = mask_rows(name, batch, length)
    pae = attention_mask.part_a_end(jnp.asarray(plen), jnp.asarray(seg), length)
    seg = jnp.asarray(seg)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(x, (batch, length, heads, head_dim), jnp.float32).astype(dtype) for x in keys)
    pairs = float(block_mask.kept_pairs(block_mask.token_mask(pae, seg, length), length).sum())
    fwd_flops = 4.0 * head_dim * heads * pairs
    dense_flops = 4.0 * head_dim * heads * batch * length**2

    def kernel(q, k, v):
        return flash_attention.attention(q, k, v, pae, seg, layer_scale=jnp.float32(2.0), block_sizes=block_sizes)

    def xla(q, k, v):
        return reference.attention(q, k, v, pae, seg, layer_scale=jnp.float32(2.0))

    row = {"mask": name, "seq": length, "batch": batch, "heads": heads, "head_dim": head_dim, "dtype": dtype}
    for impl_name, impl in (("kernel", kernel), ("xla", xla)):
        fwd = jax.jit(impl)
        both = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.vdot(impl(q, k, v).astype(jnp.float32), ct), argnums=(0, 1, 2)))
        for part, f, flops in (("fwd", fwd, fwd_flops), ("fwd_bwd", both, 3 * fwd_flops)):
            try:
                best, median = _best_median(f, (q, k, v), repeats)
            except Exception as e:  # e.g. the reference's L x L scores not fitting in memory
                row[f"{impl_name}_{part}_error"] = str(e).splitlines()[0][:200]
                continue
            row[f"{impl_name}_{part}_ms"] = round(best * 1e3, 3)
            row[f"{impl_name}_{part}_ms_median"] = round(median * 1e3, 3)
            # Four significant figures, not decimals: interpret-mode rates on a loaded CPU are ~1e-5.
            row[f"{impl_name}_{part}_tflops"] = float(f"{flops / best / 1e12:.4g}")
            row[f"{impl_name}_{part}_dense_tflops"] = float(f"{dense_flops * flops / fwd_flops / best / 1e12:.4g}")
    for part in ("fwd", "fwd_bwd"):
        if f"kernel_{part}_ms" in row and f"xla_{part}_ms" in row:
            row[f"speedup_{part}"] = round(row[f"xla_{part}_ms"] / row[f"kernel_{part}_ms"], 3)
    return row


def _csv(kind, text: str):
    return tuple(kind(x) for x in text.split(",") if x)


def main(argv: Sequence[str] | None = None) -> int:
    import jax

    from glm_jax import cli
    from glm_jax.kernels import flash_attention
    from glm_jax.training.metrics import peak_flops

    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(prog="python -m glm_jax.bench attention", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--seq", default="256" if on_cpu else "2048,8192", help="timed sequence lengths, comma-separated")
    parser.add_argument("--batch", type=int, default=1, help="timed batch (default 1)")
    parser.add_argument("--heads", type=int, default=2 if on_cpu else 16, help="timed heads (default 16; 2 on CPU)")
    parser.add_argument("--head-dim", type=int, default=64 if on_cpu else 128, help="head_dim (default 128; 64 on CPU)")
    parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16", choices=flash_attention.DTYPES,
                        help="q, k, v dtype (default bfloat16; float32 on CPU)")
    parser.add_argument("--masks", default="gmask-50,mask-packed", help=f"timed masks, from {', '.join(MASKS)}")
    parser.add_argument("--skip-seqs", default=",".join(map(str, SKIP_SEQS)),
                        help="lengths of the block-skip table (default 2048,8192)")
    parser.add_argument("--repeats", type=int, default=2 if on_cpu else 5, help="timed calls per case after one compiling call")
    parser.add_argument("--blocks", default="", help="kernel block sizes Q,KV,Q_BWD,KV_BWD (default: the backend's; 64 on CPU)")
    args = parser.parse_args(argv)
    try:
        seqs, masks_, blocks = _csv(int, args.seq), _csv(str, args.masks), _csv(int, args.blocks)
        skip_seqs = _csv(int, args.skip_seqs)
    except ValueError as e:
        raise cli.ConfigError(f"--seq, --skip-seqs and --blocks take comma-separated integers: {e}") from None
    try:
        for m in masks_:
            mask_rows(m, 1, 8)  # names checked before any work
    except ValueError as e:
        raise cli.ConfigError(str(e)) from None
    if blocks and len(blocks) != 4:
        raise cli.ConfigError(f"--blocks takes four sizes Q,KV,Q_BWD,KV_BWD, got {args.blocks!r}")
    sizes = flash_attention.BlockSizes(*blocks) if blocks else flash_attention.BlockSizes(*(64,) * 4 if on_cpu else ())
    try:
        sizes.validate("--blocks")
    except ValueError as e:
        raise cli.ConfigError(str(e)) from None

    lowering, interpret = flash_attention.resolve_lowering()
    skip_blocks = flash_attention.default_block_sizes(lowering, args.head_dim)  # the compiled kernels' blocks
    print("bench attention: block skipping ...", file=sys.stderr, flush=True)
    skip = [skip_stats(m, n, skip_blocks) for n in skip_seqs for m in MASKS]
    timing = []
    for n in seqs:
        for m in masks_:
            print(f"bench attention: timing {m} at seq {n} ...", file=sys.stderr, flush=True)
            timing.append(time_case(m, n, args.batch, args.heads, args.head_dim, args.dtype, args.repeats, sizes))
    peak, source = peak_flops(jax.devices()[:1])
    result = {
        "bench": "attention",
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "lowering": lowering,
        "interpret": interpret,
        "note": ("CPU: the Pallas kernels run in interpret mode; these timings are not speed results"
                 if interpret else "timings on one device"),
        "skip_block_sizes": dict(zip(("q", "kv", "q_bwd", "kv_bwd"), skip_blocks)),
        "skip": skip,
        "timing_block_sizes": dataclasses.asdict(sizes),
        "timing": timing,
        "peak_tflops": round(peak / 1e12, 3),
        "peak_source": source,
    }
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for k, v in result.items():
            print(f"{k:20s} {v}")
    for s in skip:
        if s["seq"] == max(skip_seqs):
            print(f"{s['mask']:12s} seq {s['seq']}: visits {100 * s['fwd_visited']:.1f}% of blocks (fully visible "
                  f"{100 * s['fwd_full']:.1f}%), the mask keeps {100 * s['pairs_kept']:.1f}% of pairs", file=sys.stderr)
    return 0
