"""glm_jax checkpoint -> tensor-parallel SAT checkpoint (the inverse of from-sat).

    python -m glm_jax.convert to-sat --src DIR --dst DIR --tp N [--dtype float16] [--quantize 0|4|8]

Writes ``DST/latest`` and ``DST/<iteration>/mp_rank_XX_model_states.pt`` for N ranks,
each ``{"module": state_dict, ...}`` with the authors' keys and per-rank shapes, split by
the rules of ``glm_jax.convert.sat_layout``: GLM-130B's layout, or the original GLM's for
a model with learned positions. Any N that divides the shapes works (whole heads per
rank); otherwise the error names the tensor and N. A checkpoint that came from from-sat
is written back as it was read: same key order, iteration, tracker files, plain
top-level metadata (``mp_world_size`` set to N) and rotary ``inv_freq`` buffers, dtypes
kept (``--dtype`` casts every tensor, LayerNorms too, as SAT's fp16 models hold them).

``--quantize 8|4`` writes the four linears of each layer as int8 ``weight`` +
``weight_scale``, quantized per rank shard as GLM-130B's ``tools/convert_tp.py`` does
(MODEL.md §2.5); INT4 splits the packed bytes, so each rank's columns of a row-parallel
linear must be even in number. A checkpoint converted from a quantized source is written
quantized again by default, with the source's own int8 tensors and scales wherever they
still give the stored weights. A row-parallel linear's scales belong to the source's
ranks (one per rank and output row), so by default N must let each new rank take its
columns from ranks sharing one scale (a multiple of the source's degree always does);
``--quantize`` with the source's bits requantizes what cannot be kept instead.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from glm_jax.convert import params_read, params_write, sat_layout
from glm_jax.checkpoint import directory, quantized
from glm_jax.convert.errors import ConvertError
from glm_jax.convert.hf_write import OutTensor
from glm_jax.convert.progress import Progress
from glm_jax.convert.sat_layout import SatEntry
from glm_jax.convert.sat_write import RankWriters, Shards
from glm_jax.convert.tensors import np_dtype

DEFAULT_ITERATION = "1"


class KeptScales(quantized.KeptTensors):
    """The quantized source's own tensors (``quantized/``, from from-sat), for reuse."""

    def rank_groups(self, se: SatEntry, tp: int) -> Optional[list[int]]:
        """For a row-parallel linear: which source rank's scales each of ``tp`` new ranks
        takes (its columns must come from source ranks whose scales are all equal), or None."""
        scale = np.asarray(self.array(se.scale_key).read().result())
        groups, cols = scale.shape[0], se.shape[1]
        out = []
        for r in range(tp):
            lo, hi = r * cols // tp, (r + 1) * cols // tp
            touched = range(lo * groups // cols, (hi * groups - 1) // cols + 1)
            if any(not np.array_equal(scale[g].view(np.uint16), scale[touched[0]].view(np.uint16)) for g in touched):
                return None
            out.append(touched[0])
        return out


def _order(default: list[str], record_keys: list[str], keep: set[str]) -> list[str]:
    """The record's key order (what the source had) with our other keys placed after their predecessors."""
    out = [k for k in record_keys if k in keep]
    for i, k in enumerate(default):
        if k not in out:
            prev = default[i - 1] if i else None
            out.insert(out.index(prev) + 1 if prev in out else 0, k)
    return out


def _trackers(fmt: str, record: dict, iteration: Optional[str]) -> tuple[str, dict[str, str]]:
    if iteration is None and record.get("trackers"):
        return record["iteration"], record["trackers"]
    it = str(iteration if iteration is not None else record.get("iteration", DEFAULT_ITERATION))
    if not it or os.sep in it or it in (".", ".."):
        raise ConvertError(f"--iteration {it!r}: expected a number or a directory name")
    names = ["latest_checkpointed_iteration.txt", "latest"] if fmt == "glm" else ["latest"]
    return it, {n: it for n in names}


def _plan(entries: list[SatEntry], tp: int, bits: int, quantize: Optional[int], kept: Optional[KeptScales],
          dense_dtype) -> tuple[dict, dict]:
    """Check that every tensor splits ``tp`` ways (and that kept INT8/INT4 tensors can be
    reused, unless requantizing was asked for). Returns ({key: (merged shape, dtype,
    split)}, {row-parallel linear key: the source scales each new rank takes, or None})."""
    merged: dict[str, tuple[tuple[int, ...], str, sat_layout.Split]] = {}  # key -> (merged shape, dtype, split)
    groups: dict[str, Optional[list[int]]] = {}
    for se in entries:
        why = se.split.why_not(se.shape, tp)
        if bits and se.quantizable and not why and se.split.why_not(se.quantized_shape(bits), tp):
            why = (f"INT4 packs two input columns per byte, so each rank's {se.shape[1] // tp} columns must be "
                   "an even number")
        if why:
            raise ConvertError(f"to-sat --tp {tp}: {se.key} {list(se.shape)} cannot be split {tp} ways: {why}")
        if bits and se.quantizable:
            scale_dtype = "float16"
            if kept and kept.has(se.key):
                scale_dtype = kept.dtype_name(se.scale_key)
                if se.split.kind == "cols":
                    groups[se.key] = kept.rank_groups(se, tp)
                    if groups[se.key] is None and quantize is None:
                        g = kept.array(se.scale_key).shape[0]
                        raise ConvertError(
                            f"to-sat --tp {tp}: {se.key} holds INT{bits} weights quantized over the columns of {g} "
                            f"source ranks, each with its own scales, and {tp} ranks would have to share different "
                            f"scales; use --tp {g} (or a multiple), --quantize {bits} to requantize those weights "
                            "(lossy), or --quantize 0 for fp16"
                        )
            merged[se.key] = (se.quantized_shape(bits), "int8", se.split)
            merged[se.scale_key] = ((tp, se.shape[0]) if se.split.kind == "cols" else (se.shape[0],), scale_dtype, se.scale_split)
        else:
            merged[se.key] = (se.shape, dense_dtype(se), se.split)
    return merged, groups


def convert(
    src: str,
    dst: str,
    *,
    tp: int,
    dtype: Optional[str] = None,
    quantize: Optional[int] = None,
    iteration: Optional[str] = None,
    step: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Convert a params directory or a training workdir (at ``step``, default its newest
    checkpoint); ``quantize`` 4/8 writes INT4/INT8 linears, 0 dense ones, None as the
    from-sat source was."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConvertError(f"--tp {tp}: expected a positive number of tensor-parallel ranks")
    params_write.check_dtype(dtype)
    if quantize not in (None, 0, *quantized.BITS):
        raise ConvertError(f"--quantize {quantize}: expected 0, 4 or 8")
    stored = params_read.open_source(src, step)
    cfg = stored.config
    if cfg.lora_rank:
        raise ConvertError(f"{src} has LoRA adapters (model.lora_rank={cfg.lora_rank}): fold them in first with "
                           "convert merge-lora, or write them alone with export-lora")
    fmt = sat_layout.layout_of(cfg)
    why = sat_layout.check_representable(cfg, fmt)
    if why:
        raise ConvertError(f"to-sat writes {sat_layout.DESCRIPTION[fmt]}, which cannot express this model: {why}")
    record = stored.source.record(directory.SAT_SOURCE)
    src_bits = record.get("quantization_bit", 0)
    bits = src_bits if quantize is None else quantize
    kept = KeptScales(stored.source.quantized_dir) if bits and bits == src_bits else None
    entries = sat_layout.sat_entries(cfg, fmt)
    by_key = {se.key: se for se in entries}

    def dense_dtype(se: SatEntry) -> str:
        if bits and se.quantizable:
            return "float16"  # what is quantized, and what the runtime dequantizes to
        return dtype or stored.dtype_name(se.entry.path)

    merged, groups = _plan(entries, tp, bits, quantize, kept, dense_dtype)
    buffers = dict(record.get("buffers", {}))
    default = [k for se in entries for k in ((se.key, se.scale_key) if bits and se.quantizable else (se.key,))]
    keys = _order(default, record.get("keys", []), set(merged) | set(buffers))
    tensors = []
    for k in keys:
        if k in buffers:
            tensors.append(OutTensor(k, tuple(buffers[k]["shape"]), buffers[k]["dtype"]))
        else:
            shape, dt, split = merged[k]
            tensors.append(OutTensor(k, split.shard_shape(shape, tp), dt))
    for t in tensors:
        if t.dtype not in params_write.DTYPES + ("int8",):
            raise ConvertError(f"{src}: {t.key} would be written as {t.dtype}; expected one of {', '.join(params_write.DTYPES)}")
    metadata = dict(record.get("metadata", {}))
    if "mp_world_size" in metadata:
        metadata["mp_world_size"] = tp
    top_keys = record.get("top_keys") or ["module"]

    def wrap(state: dict, rank: int) -> dict:
        return {k: state if k == "module" else metadata[k] for k in top_keys}

    it, trackers = _trackers(fmt, record, iteration)
    bar = Progress(sum(t.nbytes for t in tensors) * tp, "to-sat", enabled=progress)
    with directory.staged_output(dst, overwrite=overwrite) as tmp:
        for name, text in trackers.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        with RankWriters(os.path.join(tmp, it), tp, tensors, wrap) as writers:
            for k in keys:
                if k in buffers:
                    b = buffers[k]
                    value = np.frombuffer(bytes.fromhex(b["hex"]), np_dtype(b["dtype"])).reshape(b["shape"]).copy()
                    for f in writers.files:
                        f.write(k, value)
                    bar.update(value.nbytes * tp)
                elif k in by_key:
                    se = by_key[k]
                    if bits and se.quantizable:
                        _write_quantized(se, stored.array(se.entry.path), cfg, merged, writers, kept, groups.get(k), bits, bar,
                                         stored.source.describe())
                    else:
                        shape, dt, split = merged[k]
                        shards = Shards(writers, k, split, shape, dt)
                        for b, box in params_read.ours_blocks(se.entry, stored.array(se.entry.path), cfg, stored.source.describe()):
                            shards.add_box(se.entry.transform, b, box)
                            bar.update(box.numel() * np_dtype(dt).itemsize * (tp if split.kind == "replicated" else 1))
                        shards.done()
            writers.close()
        seconds = bar.close()
    return {"bytes": bar.total, "seconds": seconds, "tp": tp, "layout": fmt, "iteration": it}


def _write_quantized(se: SatEntry, arr, cfg, merged: dict, writers: RankWriters, kept: Optional[KeptScales],
                     groups: Optional[list[int]], bits: int, bar: Progress, where: str = "") -> None:
    """A quantized linear's ``weight`` and ``weight_scale`` shards, from its fp16 rows:
    the kept source tensors where they still give these weights, else quantized per shard."""
    tp = writers.tp
    qs = Shards(writers, se.key, se.split, *merged[se.key][:2])
    ss = Shards(writers, se.scale_key, se.scale_split, *merged[se.scale_key][:2])
    use_kept = kept is not None and kept.has(se.key) and (se.split.kind != "cols" or groups is not None)
    for b, rows in params_read.authors_blocks(se.entry, arr, cfg, "float16", where):
        a, z = b.row_start, b.row_stop
        kq = np.asarray(kept.array(se.key)[a:z].read().result()) if use_kept else None
        if se.split.kind == "cols":
            ks = np.asarray(kept.array(se.scale_key)[:, a:z].read().result()) if use_kept else None
            width, qwidth = se.shape[1] // tp, se.quantized_shape(bits)[1] // tp
            for r in range(tp):
                dense = np.ascontiguousarray(rows[:, r * width:(r + 1) * width])
                pair = None
                if kq is not None:
                    q, s = kq[:, r * qwidth:(r + 1) * qwidth], ks[groups[r]]
                    pair = (q, s) if quantized.reproduces(q, s, dense, bits) else None
                q, s = pair or quantized.quantize(dense, bits)
                qs.put(r, a, q)
                ss.put(r, a, s)
                bar.update(q.nbytes + s.nbytes)
        else:
            pair = None
            if kq is not None:
                s = np.asarray(kept.array(se.scale_key)[a:z].read().result())
                pair = (kq, s) if quantized.reproduces(kq, s, rows, bits) else None
            q, s = pair or quantized.quantize(rows, bits)
            qs.add(a, q)
            ss.add(a, s)
            bar.update(q.nbytes + s.nbytes)
    qs.done()
    ss.done()
