"""Tensor-parallel SAT checkpoint -> glm_jax checkpoint, merged and streamed block by block.

    python -m glm_jax.convert from-sat --src DIR --dst DIR [--config FILE] [key=value ...]

Reads GLM-130B's SwissArmyTransformer checkpoints and the original GLM's (``DIR/latest``
or ``latest_checkpointed_iteration.txt``, then ``DIR/<iter>/mp_rank_XX_model_states.pt``)
at any tensor-parallel degree; which of the two a checkpoint is comes from its keys
(``glm_jax.convert.sat_layout``).

SAT files carry no architecture, so it comes from a glm_jax config: ``--config`` (default
``configs/glm-130b.yaml`` for GLM-130B's layout; for the original GLM's, the shipped
``glm-large``/``glm-10b`` config whose width and depth the checkpoint has) with
``key=value`` overrides. Every tensor's merged shape is checked against it before
anything is written; on a disagreement the error names the file, the tensor, both
shapes, and the sizes the checkpoint's shapes imply as overrides to pass (the number of
heads cannot be read from shapes: it always comes from the config).

Tensors are merged by the split rules of ``sat_layout`` a block of merged rows at a time:
each block gathers its rows from the ranks' memory-mapped files and is written as one
chunk of the orbax checkpoint, so memory stays near one block. Replicated tensors must
be equal on every rank. A pre-quantized checkpoint (int8 ``weight`` + ``weight_scale``
for the four linears, MODEL.md §2.5; INT4 when the int8 weights are half as wide) is
dequantized rank by rank as the authors' runtime does, and its own tensors are kept
merged in ``quantized/`` so that to-sat writes them back bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np

from glm_jax.config import Config, ConfigError, ModelConfig, load_config, resolve_config
from glm_jax.convert import blocks as blk
from glm_jax.convert import params_write, sat_layout
from glm_jax.checkpoint import directory, params, quantized
from glm_jax.convert.errors import ConvertError
from glm_jax.convert.progress import Progress
from glm_jax.convert.sat_layout import SatEntry
from glm_jax.convert.sat_read import SatSource, rank_file_name
from glm_jax.convert.tensors import np_dtype, to_numpy, to_torch

DEFAULT_CONFIG = {"glm-130b": "glm-130b.yaml"}
ORIGINAL_GLM_CONFIGS = ("glm-large.yaml", "glm-10b.yaml")
BUFFER_LIMIT = 1 << 20  # ignored tensors (inv_freq) up to this size are kept for to-sat


def config_path(name: str) -> str:
    """A shipped config (``glm_jax/configs/NAME``)."""
    return resolve_config(name)


def _default_config(fmt: str, sizes: dict[str, int]) -> str:
    if fmt in DEFAULT_CONFIG:
        return config_path(DEFAULT_CONFIG[fmt])
    for name in ORIGINAL_GLM_CONFIGS:
        path = config_path(name)
        try:
            m = load_config(path).model
        except ConfigError:
            continue
        if (m.hidden_size, m.num_layers) == (sizes.get("hidden_size"), sizes.get("num_layers")):
            return path
    raise ConvertError(
        f"the original GLM checkpoint has hidden size {sizes.get('hidden_size')} and {sizes.get('num_layers')} layers, "
        f"which no shipped config ({', '.join(ORIGINAL_GLM_CONFIGS)}) has: pass --config"
    )


def load_model_config(fmt: str, sizes: dict[str, int], config: Optional[str], overrides: Sequence[str]) -> tuple[Config, str]:
    """(the full config, where it came from) for a checkpoint of layout ``fmt``."""
    path = config or _default_config(fmt, sizes)
    cfg = load_config(path, overrides)
    where = path + (" with " + " ".join(overrides) if overrides else "")
    why = sat_layout.check_representable(cfg.model, fmt)
    if why:
        raise ConvertError(f"the checkpoint is in {sat_layout.DESCRIPTION[fmt]}, but the config ({where}) does not describe it: {why}")
    return cfg, where


def _hint(cfg: ModelConfig, sizes: dict[str, int]) -> str:
    wrong = [f"model.{k}={v}" for k, v in sizes.items() if getattr(cfg, k) != v]
    return f"; the checkpoint's shapes say {' '.join(wrong)} (pass them as overrides, or another --config)" if wrong else ""


def _missing_ranks(source: SatSource, split: sat_layout.Split, shard: tuple[int, ...], full: tuple[int, ...]) -> str:
    """A hint when more ranks of the same shard shape would give the config's shape."""
    for tp in range(source.tp + 1, 4 * source.tp + 1):
        if split.kind in ("rows", "cols") and split.merged_shape(shard, tp) == tuple(full):
            return f"; {tp} ranks would match it: is {rank_file_name(source.tp)} missing?"
    return ""


def quantization_bits(source: SatSource, entries: list[SatEntry]) -> int:
    """0 for fp16/fp32 linears, else 8 or 4 (from how wide the int8 weights are)."""
    probe = next(se for se in entries if se.quantizable)
    info = source.info(probe.key) if probe.key in source.keys else None
    if info is None or info.dtype != "int8":
        return 0
    merged = probe.split.merged_shape(info.shape, source.tp)
    for bits in quantized.BITS:
        if merged == probe.quantized_shape(bits):
            return bits
    raise ConvertError(
        f"{source.ranks[0].path}: {probe.key} is int8 {list(info.shape)} per rank: neither INT8 {list(probe.quantized_shape(8))} "
        f"nor INT4 {list(probe.quantized_shape(4))} merged over {source.tp} ranks"
    )


def check_source(source: SatSource, cfg: ModelConfig, fmt: str, entries: list[SatEntry], where: str, sizes: dict[str, int]) -> int:
    """Every implied tensor present on every rank, ranks agreeing, merged shapes as the
    config implies; nothing unexplained. Returns the quantization bits."""
    bits = quantization_bits(source, entries)
    wanted: dict[str, tuple[sat_layout.Split, tuple[int, ...], tuple[str, ...]]] = {}  # key -> (split, merged shape, dtypes)
    for se in entries:
        if bits and se.quantizable:
            wanted[se.key] = (se.split, se.quantized_shape(bits), ("int8",))
            wanted[se.scale_key] = (se.scale_split, se.merged_scale_shape(source.tp), params_write.DTYPES)
        else:
            wanted[se.key] = (se.split, se.shape, params_write.DTYPES)
    first = source.ranks[0].path
    for key in source.keys:
        if key in wanted or sat_layout.is_ignored(key):
            continue
        if key.endswith(".weight_scale"):
            raise ConvertError(f"{first}: {key} is a quantization scale, but the linears' weights are not int8")
        raise ConvertError(
            f"{first}: unexpected tensor {key} (not part of {sat_layout.DESCRIPTION[fmt]} for the config {where}: "
            f"{cfg.num_layers} layers, hidden {cfg.hidden_size}){_hint(cfg, sizes)}"
        )
    for key, (split, shape, dtypes) in wanted.items():
        if key not in source.keys:
            raise ConvertError(f"{first}: tensor {key} is missing (the config {where} implies it){_hint(cfg, sizes)}")
        info = source.info(key)
        merged = split.merged_shape(info.shape, source.tp)
        if merged != tuple(shape):
            raise ConvertError(
                f"{first}: {key} has shape {list(info.shape)} on each of {source.tp} ranks, {list(merged)} merged, "
                f"but the config ({where}) implies {list(shape)}{_missing_ranks(source, split, info.shape, shape) or _hint(cfg, sizes)}"
            )
        why = split.why_not(shape, source.tp)
        if why:
            raise ConvertError(f"{first}: {key} cannot have been split over {source.tp} ranks: {why} (model.num_heads={cfg.num_heads})")
        if info.dtype not in dtypes:
            raise ConvertError(f"{first}: {key} has dtype {info.dtype}; expected {' or '.join(dtypes)}")
    return bits


def _json_value(v) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, list):
        return all(_json_value(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _json_value(x) for k, x in v.items())
    return False


def _source_record(source: SatSource, fmt: str, bits: int) -> dict:
    """What to-sat needs to write the checkpoint back as it was: layout, iteration and
    tracker files, key order, top-level metadata (plain values only) and small ignored
    buffers (the rotary inv_freq) with their bytes."""
    first = source.ranks[0]
    buffers, dropped = {}, []
    for key in source.keys:
        if sat_layout.is_ignored(key):
            t = first.tensors[key]
            if t.numel() * t.element_size() <= BUFFER_LIMIT:
                info = first.info(key)
                buffers[key] = {"dtype": info.dtype, "shape": list(info.shape), "hex": to_numpy(t.contiguous()).tobytes().hex()}
            else:
                dropped.append(key)
    metadata = {k: v for k, v in first.metadata.items() if _json_value(v)}
    return {
        "layout": fmt,
        "tp": source.tp,
        "iteration": source.iteration,
        "trackers": source.trackers,
        "quantization_bit": bits,
        "keys": [k for k in source.keys if k not in dropped],
        "top_keys": [k for k in first.top_keys if k == "module" or k in metadata],
        "metadata": metadata,
        "dropped": dropped + [k for k in first.metadata if k not in metadata],
        "buffers": buffers,
    }


def convert(
    src: str,
    dst: str,
    *,
    config: Optional[str] = None,
    overrides: Sequence[str] = (),
    dtype: Optional[str] = None,
    scan_layers: Optional[bool] = None,
    overwrite: bool = False,
    block_bytes: int = blk.DEFAULT_BLOCK_BYTES,
    compression: bool = True,
    progress: bool = True,
) -> dict:
    """Convert; returns a summary (bytes, seconds, config, tp, layout)."""
    params_write.check_dtype(dtype)
    source = SatSource(src)
    fmt = sat_layout.detect(source.keys)
    if fmt is None:
        raise ConvertError(
            f"{source.ranks[0].path}: neither GLM-130B's SAT layout (transformer.word_embeddings.weight) nor the "
            "original GLM's (word_embeddings.weight)"
        )
    shapes = {k: source.ranks[0].info(k).shape for k in source.keys}
    sizes = sat_layout.inferred_sizes(shapes, source.tp, fmt)
    full, where = load_model_config(fmt, sizes, config, overrides)
    cfg = full.model if scan_layers is None else dataclasses.replace(full.model, scan_layers=scan_layers)
    entries = sat_layout.sat_entries(cfg, fmt)
    bits = check_source(source, cfg, fmt, entries, where, sizes)
    dtypes = params_write.leaf_dtypes([se.entry for se in entries], _stored_dtypes(source, entries, bits), dtype)
    cfg = dataclasses.replace(cfg, param_dtype=params_write.weights_dtype(dtypes), dtype="float32")
    total = sum(source.shard_nbytes(k) * source.tp for k in source.keys if not sat_layout.is_ignored(k))

    with directory.staged_output(dst, overwrite=overwrite) as tmp:
        writer = params_write.ParamWriter(os.path.join(tmp, directory.PARAMS), cfg, [se.entry for se in entries], dtypes,
                                          block_bytes=block_bytes, compression=compression)
        keeper = params_write.KeptWriter(os.path.join(tmp, directory.QUANTIZED)) if bits else None
        if keeper:
            for se in entries:
                if se.quantizable:
                    step = writer.block_rows(se.entry)
                    keeper.add(se.key, se.quantized_shape(bits), np.int8, step)
                    scale_shape = se.merged_scale_shape(source.tp)
                    keeper.add(se.scale_key, scale_shape, np_dtype(source.info(se.scale_key).dtype), step, len(scale_shape) - 1)
        bar = Progress(total, "from-sat", enabled=progress)
        for se in entries:
            e = se.entry
            for b in writer.blocks(e):
                a, z = b.row_start, b.row_stop
                if bits and se.quantizable:
                    nbytes = _write_quantized(source, se, b, writer, keeper, bits)
                else:
                    with source.pieces(se.key, se.split, a, z) as parts:
                        if se.split.kind == "replicated":
                            source.check_replicated(se.key, parts)
                            writer.write(e, b, parts[0])
                        else:
                            writer.write_pieces(e, b, parts, 0 if se.split.kind == "rows" else 1)
                        nbytes = sum(p.numel() * p.element_size() for p in parts)
                bar.update(nbytes)
        writer.finish()
        if keeper:
            keeper.finish()
        seconds = bar.close()

        params.write_config(tmp, cfg, full)
        with open(os.path.join(tmp, directory.SAT_SOURCE), "w") as f:
            json.dump(_source_record(source, fmt, bits), f, indent=1)
    return {"bytes": total, "seconds": seconds, "config": cfg, "tp": source.tp, "layout": fmt}


def _stored_dtypes(source: SatSource, entries: list[SatEntry], bits: int):
    by_key = {se.entry.key: se for se in entries}

    def stored(e) -> str:
        se = by_key[e.key]
        return "float16" if bits and se.quantizable else source.info(se.key).dtype

    return stored


def _write_quantized(source: SatSource, se: SatEntry, b: blk.Block, writer: params_write.ParamWriter,
                     keeper: params_write.KeptWriter, bits: int) -> int:
    """One block of a quantized linear: dequantized rank by rank (each rank's rows with its
    own scales) into the parameters, the int8 weights and scales kept merged. Returns the
    bytes read."""
    a = b.row_start
    axis = 1 if se.split.kind == "cols" else 0
    with source.pieces(se.key, se.split, a, b.row_stop) as qs, source.pieces(se.scale_key, se.scale_split, a, b.row_stop) as ss:
        qs = [to_numpy(q) for q in qs]
        ss = [to_numpy(s) for s in ss]
        dense = [to_torch(quantized.dequantize(q, s.astype(np.float16), bits)) for q, s in zip(qs, ss, strict=True)]
        keeper.write(se.key, a, np.concatenate(qs, axis=axis))  # (copies: the views die with the block)
        keeper.write(se.scale_key, a, np.stack(ss) if se.split.kind == "cols" else np.concatenate(ss))
        nbytes = sum(x.nbytes for x in qs + ss)
    writer.write_pieces(se.entry, b, dense, axis)
    return nbytes
