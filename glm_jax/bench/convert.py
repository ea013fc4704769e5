"""Checkpoint conversion throughput and peak memory, on a synthetic HF or SAT checkpoint.

    python -m glm_jax.bench convert --json [--layers 2] [--vocab 65536] [--format bin|safetensors] [--shards 1]
    python -m glm_jax.bench convert --json --format sat [--tp 4] [--layers 3]

The default checkpoint is ChatGLM-6B's layer shapes (hidden 4096, 32 heads, inner
16384) with 2 layers and a 65536 vocabulary: 1.88 GB of fp16 (fp32 LayerNorms, as
released) in one file, whose largest tensors (``word_embeddings``, ``lm_head``) are
512 MiB each. It is written streaming by glm_jax's own writer from a pool of random
fp16 values (so compression sees realistic data) in a child process; then ``from-hf``
and ``to-hf`` each run in a child of their own, timed, with their peak RSS taken from
``wait4``'s rusage. A child that only imports what the converter imports gives the
baseline RSS. Acceptance: peak RSS < 1.5 GB for from-hf.

``--format sat`` does the same for from-sat/to-sat on GLM-130B's SAT layout: the same
widths with GeGLU (``dense_h_to_4h`` 2 x inner rows) and 3 layers, 2.1 GB of fp16 in
``--tp`` rank files, the largest tensor the 512 MiB ``word_embeddings``.
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


class RandomPool:
    """Random fp16 values (64 MiB, so compression sees realistic data) handed out in
    arrays of any shape from a moving cursor: checkpoints of any size without holding one."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.pool = (0.05 * rng.standard_normal(32 << 20, dtype=np.float32)).astype(np.float16)
        self.cursor = 0

    def take(self, shape: tuple[int, ...], dtype: str, layernorm_weight: bool = False) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        start = self.cursor % (self.pool.size - n) if self.pool.size > n else 0
        self.cursor += 7919 * 64 + n
        if n > self.pool.size:
            block = np.resize(self.pool, n)
        else:
            block = self.pool[start:start + n]
        block = block.astype(np.float32 if dtype == "float32" else np.float16)
        if layernorm_weight:
            block = block + np.asarray(1.0, block.dtype)
        return block.reshape(shape)


def synthetic_hf(directory: str, *, vocab: int, hidden: int, layers: int, heads: int, inner: int,
                 fmt: str = "bin", shards: int = 1, seed: int = 0) -> dict:
    """Write a ChatGLM-6B-format checkpoint of random fp16 weights without holding it in memory."""
    from glm_jax.convert import hf_write
    from glm_jax.checkpoint import authors_layout
    from glm_jax.convert.hf_config import model_config

    hf = {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "vocab_size": vocab, "hidden_size": hidden,
        "num_layers": layers, "num_attention_heads": heads, "inner_hidden_size": inner, "layernorm_epsilon": 1e-5,
        "max_sequence_length": 2048, "position_encoding_2d": True, "torch_dtype": "float16",
        "bos_token_id": vocab - 524, "eos_token_id": vocab - 523, "mask_token_id": vocab - 528,
        "gmask_token_id": vocab - 527, "pad_token_id": 3,
    }
    cfg = model_config(hf)
    pool = RandomPool(seed)
    tensors = [
        hf_write.OutTensor(e.key, e.transform.authors_shape, "float32" if e.is_layernorm else "float16")
        for e in authors_layout.entries(cfg)
    ]

    def rows(key: str):
        t = next(x for x in tensors if x.key == key)
        width = int(np.prod(t.shape[1:], dtype=np.int64)) if len(t.shape) > 1 else 1
        per = max(1, (8 << 20) // width)
        for r in range(0, t.shape[0], per):
            n = min(per, t.shape[0] - r)
            yield pool.take((n,) + tuple(t.shape[1:]), t.dtype, t.dtype == "float32" and key.endswith("weight"))

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


def sat_overrides(*, vocab: int, hidden: int, layers: int, heads: int, inner: int) -> list[str]:
    """``configs/glm-tiny.yaml`` (GLM-130B's architecture) overridden to these sizes."""
    return [f"model.vocab_size={vocab}", f"model.hidden_size={hidden}", f"model.num_layers={layers}",
            f"model.num_heads={heads}", f"model.mlp_dim={inner}"]


def synthetic_sat(directory: str, *, vocab: int, hidden: int, layers: int, heads: int, inner: int, tp: int = 4,
                  seed: int = 0) -> dict:
    """Write a GLM-130B-layout SAT checkpoint of ``tp`` ranks of random fp16 weights, one
    shard at a time (replicated tensors equal on every rank, as the format requires)."""
    from glm_jax.config import load_config
    from glm_jax.convert import hf_write, sat_layout
    from glm_jax.convert.from_sat import config_path
    from glm_jax.convert.sat_write import RankWriters

    cfg = load_config(config_path("glm-tiny.yaml"), sat_overrides(vocab=vocab, hidden=hidden, layers=layers, heads=heads, inner=inner)).model
    pool = RandomPool(seed)
    entries = sat_layout.sat_entries(cfg, "glm-130b")
    tensors = [hf_write.OutTensor(se.key, se.split.shard_shape(se.shape, tp), "float16") for se in entries]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "latest"), "w") as f:
        f.write("1")
    writers = RankWriters(os.path.join(directory, "1"), tp, tensors, lambda sd, r: {"module": sd})
    for se, t in zip(entries, tensors, strict=True):
        shared = se.split.kind == "replicated"
        value = pool.take(t.shape, "float16", se.entry.is_layernorm and se.key.endswith("weight")) if shared else None
        for f in writers.files:
            f.write(t.key, value if shared else pool.take(t.shape, "float16"))
    writers.close()
    full = [int(np.prod(se.shape, dtype=np.int64)) * 2 for se in entries]
    return {
        "bytes": sum(t.nbytes for t in tensors) * tp,
        "largest_tensor_bytes": max(full),
        "files": tp,
    }


# Runs a child's ``-m module`` or ``-c code`` and writes the child's own peak RSS (VmHWM of
# its address space) to a file at exit. wait4's ru_maxrss cannot serve: Linux carries the
# parent's high-water mark into a child across fork/vfork + exec, so a child of a large
# process (pytest, say) reported the parent's peak, not its own.
_PEAK_WRAPPER = """
import atexit, runpy, sys
report, kind, target = sys.argv[1:4]
def _peak():
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(report, "w") as f:
        f.write(str(kb))
atexit.register(_peak)
sys.argv = [kind] + sys.argv[4:]
if kind == "-m":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
"""


def run_child(argv: list[str]) -> dict:
    """Run a Python child (``["-m", module, *args]`` or ``["-c", code]``); its wall time and
    its own peak RSS (VmHWM on Linux; elsewhere wait4's ru_maxrss)."""
    import tempfile

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "peak")
        wrapped = ["-c", _PEAK_WRAPPER, report, *argv] if argv[0] in ("-m", "-c") and os.path.exists("/proc/self/status") else argv
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *wrapped], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
        if proc.returncode:
            raise RuntimeError(f"{' '.join(argv[:4])} failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
        peak_kb = int(open(report).read()) if os.path.exists(report) else usage.ru_maxrss
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024, "stdout": out}


def _stats(seconds: float, peak_rss_mb: float, mb: float) -> dict:
    return {"seconds": round(seconds, 2), "mb_per_s": round(mb / seconds, 1), "peak_rss_mb": round(peak_rss_mb, 1)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glm_jax.bench convert", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="default: 2 (HF), 3 (SAT)")
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--inner", type=int, default=16384)
    p.add_argument("--format", dest="fmt", choices=("bin", "safetensors", "sat"), default="bin",
                   help="bin/safetensors: a HF ChatGLM-6B checkpoint through from-hf/to-hf; sat: a GLM-130B-layout "
                        "SAT checkpoint of --tp ranks through from-sat/to-sat")
    p.add_argument("--shards", type=int, default=1, help="HF weight files")
    p.add_argument("--tp", type=int, default=4, help="SAT ranks (the checkpoint's, and to-sat's)")
    p.add_argument("--workdir", default=None, help="where to put the checkpoints (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sat = args.fmt == "sat"
    layers = args.layers or (3 if sat else 2)

    work = args.workdir or tempfile.mkdtemp(prefix="glm_jax_bench_convert_")
    src_dir, jax_dir, back_dir = (os.path.join(work, n) for n in ("src", "jax", "back"))
    for d in (src_dir, jax_dir, back_dir):
        shutil.rmtree(d, ignore_errors=True)
    sizes = dict(vocab=args.vocab, hidden=args.hidden, layers=layers, heads=args.heads, inner=args.inner)
    name, steps = ("sat", ("from_sat", "to_sat")) if sat else ("hf", ("from_hf", "to_hf"))
    try:
        spec = dict(sizes, tp=args.tp) if sat else dict(sizes, fmt=args.fmt, shards=args.shards)
        gen = run_child(["-c", f"import json,sys; from glm_jax.bench.convert import synthetic_{name}; "
                               f"print(json.dumps(synthetic_{name}({src_dir!r}, **{spec!r})))"])
        source = json.loads(gen["stdout"])
        base = run_child(["-c", f"import numpy, torch, tensorstore, safetensors, yaml; import glm_jax.convert.from_{name}"])
        if sat:
            from glm_jax.convert.from_sat import config_path

            config = ["--config", config_path("glm-tiny.yaml"), *sat_overrides(**sizes)]
            frm = run_child(["-m", "glm_jax.convert", "from-sat", "--src", src_dir, "--dst", jax_dir, "--quiet", *config])
            to = run_child(["-m", "glm_jax.convert", "to-sat", "--src", jax_dir, "--dst", back_dir, "--tp", str(args.tp), "--quiet"])
        else:
            frm = run_child(["-m", "glm_jax.convert", "from-hf", "--src", src_dir, "--dst", jax_dir, "--quiet"])
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
        steps[0]: _stats(frm["seconds"], frm["peak_rss_mb"], mb),
        steps[1]: _stats(to["seconds"], to["peak_rss_mb"], mb),
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
