"""Hugging Face ChatGLM-6B checkpoint -> glm_jax checkpoint, streamed block by block.

    python -m glm_jax.convert from-hf --src DIR --dst DIR [--dtype float32] [--no-scan-layers]

Everything is checked before anything is written: every tensor the config implies must
be present with the implied shape, and nothing else may be (bar the rotary ``inv_freq``
buffers the authors' loader ignores too). Then tensors are read in file order, a block
of rows at a time, mapped to our layout (``glm_jax.checkpoint.authors_layout``) and written as one
storage chunk each; a stacked ``[layers, ...]`` leaf is filled one layer slice at a time
and never exists in memory. Source dtypes are kept unless ``dtype`` is given (the
release is fp16 with fp32 LayerNorms; to-hf writes them back the same way).

A pre-quantized checkpoint (``quantization_bit`` 4 or 8: int8 ``weight`` and fp16
``weight_scale`` for the four linears of each layer, MODEL.md §2.5) is dequantized as
the authors' runtime does, so the model runs it as fp16 weights; its own quantized
tensors are kept beside the parameters (``quantized/``) so that to-hf can write them
back bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np

from glm_jax.convert import blocks as blk
from glm_jax.convert import hf_config, params_write
from glm_jax.checkpoint import authors_layout, directory, params, quantized
from glm_jax.convert.errors import ConvertError
from glm_jax.convert.hf_read import HFSource
from glm_jax.convert.progress import Progress
from glm_jax.convert.tensors import np_dtype, to_numpy, to_torch

DTYPES = params_write.DTYPES


def _is_inv_freq(key: str) -> bool:
    return key.endswith("rotary_emb.inv_freq")



def _expect(source: HFSource, key: str, shape: tuple, dtypes: tuple[str, ...]) -> None:
    info = source.infos.get(key)
    if info is None:
        raise ConvertError(f"{source.directory}: tensor {key} is missing from the weight files (config.json implies it)")
    if info.shape != tuple(shape):
        raise ConvertError(f"{info.file}: {key} has shape {list(info.shape)}, but config.json implies {list(shape)}")
    if info.dtype not in dtypes:
        raise ConvertError(f"{info.file}: {key} has dtype {info.dtype}; expected {' or '.join(dtypes)}")


def check_source(source: HFSource, cfg, entries: list[authors_layout.Entry], bits: int = 0) -> None:
    """Every implied tensor present with its implied shape and dtype; nothing unexplained."""
    wanted = set()
    for e in entries:
        wanted.add(e.key)
        if bits and quantized.is_quantized_linear(e.key):
            _expect(source, e.key, quantized.packed_shape(e.transform.authors_shape, bits), ("int8",))
            wanted.add(quantized.scale_key(e.key))
            _expect(source, quantized.scale_key(e.key), e.transform.authors_shape[:1], DTYPES)
        else:
            _expect(source, e.key, e.transform.authors_shape, DTYPES)
    for key, info in source.infos.items():
        if key in wanted or _is_inv_freq(key):
            continue
        if "prefix_encoder" in key:
            raise ConvertError(f"{info.file}: {key} is a P-tuning prefix encoder, which is not supported")
        if key.endswith(".weight_scale"):
            raise ConvertError(f"{info.file}: {key} is a quantization scale, but config.json has no quantization_bit")
        raise ConvertError(
            f"{info.file}: unexpected tensor {key} (not part of the ChatGLM-6B layout that config.json describes: "
            f"{cfg.num_layers} layers, hidden {cfg.hidden_size})"
        )


def _source_record(source: HFSource, hf: dict, bits: int) -> dict:
    inv = [i for k, i in source.infos.items() if _is_inv_freq(k)]
    return {
        "config": hf,
        "format": source.format,
        "files": [os.path.basename(f) for f in source.files],
        "rotary_inv_freq": bool(inv),
        "rotary_inv_freq_dtype": inv[0].dtype if inv else None,
        "quantization_bit": bits,
    }


def convert(
    src: str,
    dst: str,
    *,
    dtype: Optional[str] = None,
    scan_layers: bool = True,
    overwrite: bool = False,
    block_bytes: int = blk.DEFAULT_BLOCK_BYTES,
    compression: bool = True,
    progress: bool = True,
) -> dict:
    """Convert; returns a summary (bytes, seconds, config)."""
    params_write.check_dtype(dtype)
    if not os.path.isdir(src):
        raise ConvertError(f"{src} is not a directory")
    hf = hf_config.read_config_json(src)
    where = os.path.join(src, "config.json")
    bits = hf_config.quantization_bits(hf, where)
    cfg = dataclasses.replace(hf_config.model_config(hf, where), scan_layers=scan_layers)
    source = HFSource(src)
    entries = authors_layout.entries(cfg)
    check_source(source, cfg, entries, bits)
    dtypes = params_write.leaf_dtypes(
        entries, lambda e: "float16" if bits and quantized.is_quantized_linear(e.key) else source.infos[e.key].dtype, dtype)
    cfg = dataclasses.replace(cfg, param_dtype=params_write.weights_dtype(dtypes), dtype="float32")
    total = sum(info.nbytes for k, info in source.infos.items() if not _is_inv_freq(k))

    by_file: dict[str, list[authors_layout.Entry]] = {}
    for e in entries:
        by_file.setdefault(source.infos[e.key].file, []).append(e)
    order = {k: i for i, k in enumerate(source.infos)}

    with directory.staged_output(dst, overwrite=overwrite) as tmp:
        writer = params_write.ParamWriter(os.path.join(tmp, directory.PARAMS), cfg, entries, dtypes,
                                          block_bytes=block_bytes, compression=compression)
        keeper = params_write.KeptWriter(os.path.join(tmp, directory.QUANTIZED)) if bits else None
        if keeper:
            for e in entries:
                if quantized.is_quantized_linear(e.key):
                    for key in (e.key, quantized.scale_key(e.key)):
                        info = source.infos[key]
                        keeper.add(key, info.shape, np_dtype(info.dtype), writer.block_rows(e))
        scales = _read_scales(source, entries) if bits else {}

        bar = Progress(total, "from-hf", enabled=progress)
        for file in source.files:
            with source.open(file) as reader:
                for e in sorted(by_file.get(file, []), key=lambda x: order[x.key]):
                    is_quantized = bits and quantized.is_quantized_linear(e.key)
                    for b in writer.blocks(e):
                        with reader.block(e.key, b.row_start, b.row_stop) as rows:
                            nbytes = rows.numel() * rows.element_size()
                            if is_quantized:
                                packed = to_numpy(rows).copy()
                                scale = scales[e.key][b.row_start:b.row_stop]
                                keeper.write(e.key, b.row_start, packed)
                                keeper.write(quantized.scale_key(e.key), b.row_start, scale)
                                nbytes += scale.nbytes
                                rows = to_torch(quantized.dequantize(packed, scale.astype(np.float16), bits))
                            writer.write(e, b, rows)
                        bar.update(nbytes)
        writer.finish()
        if keeper:
            keeper.finish()
        seconds = bar.close()

        params.write_config(tmp, cfg)
        with open(os.path.join(tmp, directory.HF_SOURCE), "w") as f:
            json.dump(_source_record(source, hf, bits), f, indent=1)
    return {"bytes": total, "seconds": seconds, "config": cfg}


def _read_scales(source: HFSource, entries: list[authors_layout.Entry]) -> dict[str, np.ndarray]:
    """Every ``weight_scale`` up front (one fp16 per output row: small), keyed by its weight."""
    keys = {quantized.scale_key(e.key): e.key for e in entries if quantized.is_quantized_linear(e.key)}
    out = {}
    for file in source.files:
        mine = [k for k in keys if source.infos[k].file == file]
        if not mine:
            continue
        with source.open(file) as reader:
            for k in mine:
                n = source.infos[k].shape[0]
                with reader.block(k, 0, n) as rows:
                    out[keys[k]] = to_numpy(rows).copy()
    return out
