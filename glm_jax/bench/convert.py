"""Checkpoint conversion throughput and peak memory, on a synthetic HF checkpoint.

    python -m glm_jax.bench convert --json [--layers 2] [--vocab 65536] [--format bin|safetensors] [--shards 1]

The default checkpoint is ChatGLM-6B's layer shapes (hidden 4096, 32 heads, inner
16384) with 2 layers and a 65536 vocabulary: 1.88 GB of fp16 (fp32 LayerNorms, as
released) in one file, whose largest tensors (``word_embeddings``, ``lm_head``) are
512 MiB each. It is written streaming by glm_jax's own writer from a pool of random
fp16 values (so compression sees realistic data) in a child process; then ``from-hf``
and ``to-hf`` each run in a child of their own, timed, with their peak RSS taken from
``wait4``'s rusage. A child that only imports what the converter imports gives the
baseline RSS. Acceptance: peak RSS < 1.5 GB for from-hf.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

RSS_LIMIT_MB = 1500


def synthetic_hf(directory: str, *, vocab: int, hidden: int, layers: int, heads: int, inner: int,
                 fmt: str = "bin", shards: int = 1, seed: int = 0) -> dict:
    """Write a ChatGLM-6B-format checkpoint of random fp16 weights without holding it in memory."""
    from glm_jax.convert import hf_write, layout
    from glm_jax.convert.hf_config import model_config

    hf = {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "vocab_size": vocab, "hidden_size": hidden,
        "num_layers": layers, "num_attention_heads": heads, "inner_hidden_size": inner, "layernorm_epsilon": 1e-5,
        "max_sequence_length": 2048, "position_encoding_2d": True, "torch_dtype": "float16",
        "bos_token_id": vocab - 524, "eos_token_id": vocab - 523, "mask_token_id": vocab - 528,
        "gmask_token_id": vocab - 527, "pad_token_id": 3,
    }
    cfg = model_config(hf)
    rng = np.random.default_rng(seed)
    pool = (0.05 * rng.standard_normal(32 << 20, dtype=np.float32)).astype(np.float16)  # 64 MiB
    tensors = [
        hf_write.OutTensor(e.key, e.transform.authors_shape, "float32" if e.is_layernorm else "float16")
        for e in layout.entries(cfg)
    ]
    cursor = [0]

    def rows(key: str):
        t = next(x for x in tensors if x.key == key)
        width = int(np.prod(t.shape[1:], dtype=np.int64)) if len(t.shape) > 1 else 1
        per = max(1, (8 << 20) // width)
        for r in range(0, t.shape[0], per):
            n = min(per, t.shape[0] - r) * width
            start = cursor[0] % (pool.size - n) if pool.size > n else 0
            cursor[0] += 7919 * 64 + n
            block = pool[start:start + n].astype(t.dtype if t.dtype == "float32" else np.float16)
            if t.dtype == "float32":
                block = block + 1.0 if key.endswith("weight") else block
            yield block.reshape((-1,) + tuple(t.shape[1:]))

    os.makedirs(directory, exist_ok=True)
    groups = hf_write.shard(tensors, -(-sum(t.nbytes for t in tensors) // shards))
    names, index_name = hf_write.shard_names(fmt, len(groups))
    write = hf_write.write_bin if fmt == "bin" else hf_write.write_safetensors
    for name, group in zip(names, groups, strict=True):
        write(os.path.join(directory, name), group, rows)
    if len(groups) > 1:
        with open(os.path.join(directory, index_name), "w") as f:
            json.dump({"metadata": {}, "weight_map": {t.key: n for n, g in zip(names, groups, strict=True) for t in g}}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    return {
        "bytes": sum(t.nbytes for t in tensors),
        "largest_tensor_bytes": max(t.nbytes for t in tensors),
        "files": len(groups),
    }


def run_child(argv: list[str]) -> dict:
    """Run a Python child; its wall time and peak RSS (from wait4, so only that process)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[:4])} failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": out}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glm_jax.bench convert", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--inner", type=int, default=16384)
    p.add_argument("--format", dest="fmt", choices=("bin", "safetensors"), default="bin")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--workdir", default=None, help="where to put the checkpoints (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    work = args.workdir or tempfile.mkdtemp(prefix="glm_jax_bench_convert_")
    hf_dir, jax_dir, back_dir = (os.path.join(work, n) for n in ("hf", "jax", "hf_back"))
    for d in (hf_dir, jax_dir, back_dir):
        shutil.rmtree(d, ignore_errors=True)
    try:
        spec = dict(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads, inner=args.inner,
                    fmt=args.fmt, shards=args.shards)
        gen = run_child(["-c", f"import json,sys; from glm_jax.bench.convert import synthetic_hf; "
                               f"print(json.dumps(synthetic_hf({hf_dir!r}, **{spec!r})))"])
        source = json.loads(gen["stdout"])
        base = run_child(["-c", "import numpy, torch, tensorstore, safetensors, yaml; import glm_jax.convert.from_hf"])
        frm = run_child(["-m", "glm_jax.convert", "from-hf", "--src", hf_dir, "--dst", jax_dir, "--quiet"])
        to = run_child(["-m", "glm_jax.convert", "to-hf", "--src", jax_dir, "--dst", back_dir, "--quiet"])
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    mb = source["bytes"] / 1e6
    result = {
        "bench": "convert",
        "source": {"format": args.fmt, "files": source["files"], "mb": round(mb, 1),
                   "largest_tensor_mb": round(source["largest_tensor_bytes"] / 1e6, 1)},
        "baseline_rss_mb": round(base["peak_rss_mb"], 1),
        "from_hf": {"seconds": round(frm["seconds"], 2), "mb_per_s": round(mb / frm["seconds"], 1),
                    "peak_rss_mb": round(frm["peak_rss_mb"], 1)},
        "to_hf": {"seconds": round(to["seconds"], 2), "mb_per_s": round(mb / to["seconds"], 1),
                  "peak_rss_mb": round(to["peak_rss_mb"], 1)},
        "rss_limit_mb": RSS_LIMIT_MB,
        "ok": frm["peak_rss_mb"] < RSS_LIMIT_MB,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:18s} {v}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
