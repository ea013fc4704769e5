"""glm_jax checkpoint -> Hugging Face ChatGLM-6B checkpoint (the inverse of from-hf).

    python -m glm_jax.convert to-hf --src DIR --dst DIR [--dtype float16] [--quantize 0|4|8]
                                     [--format bin|safetensors] [--max-shard-size 2GB]

Writes ``config.json`` (the fields the authors' ``ChatGLMConfig`` reads, over the
source's own config.json when the checkpoint came from from-hf) and the weights under
the authors' key names, shapes and layouts, sharded with an index when larger than
``--max-shard-size``. Stored dtypes are kept by default; ``--dtype float16`` casts as
released: LayerNorms stay float32. The rotary ``inv_freq`` buffers are written as the
authors' code computes them (fp16-rounded) unless the from-hf source had none, so
from-hf followed by to-hf gives back the same tensors bit for bit.

``--quantize 8|4`` writes the four linears of each layer as the authors' INT8/INT4
``weight`` + ``weight_scale`` (MODEL.md §2.5); a checkpoint converted from a quantized
source is written quantized again by default, with the source's own quantized tensors
wherever the weights still match them.

Memory: a ``.bin`` file is written one whole tensor at a time (torch's zip records are
written whole); ``--format safetensors`` streams, one block at a time.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Optional

import numpy as np

from glm_jax.config import ModelConfig
from glm_jax.convert import blocks as blk
from glm_jax.convert import hf_config, hf_write, params_read, params_write
from glm_jax.checkpoint import authors_layout, directory, quantized
from glm_jax.convert.errors import ConvertError
from glm_jax.convert.tensors import np_dtype
from glm_jax.convert.progress import Progress

DTYPES = params_write.DTYPES
FORMATS = ("bin", "safetensors")
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9


def _inv_freq(cfg: ModelConfig, dtype: str) -> np.ndarray:
    """The authors' buffer: 1 / base^(2i/dim) in float32, rounded to fp16 (MODEL.md §2.2)."""
    import torch

    dim = cfg.rotary_dim
    inv = 1.0 / (cfg.rotary_base ** (torch.arange(0, dim, 2).float() / dim))
    inv = inv.half().float().numpy()
    return inv.astype(np_dtype(dtype))


def convert(
    src: str,
    dst: str,
    *,
    dtype: Optional[str] = None,
    fmt: str = "bin",
    quantize: Optional[int] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    step: Optional[int] = None,
    merge_lora: bool = False,
    adapter: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Convert a params directory or a training workdir (at ``step``, default its newest
    checkpoint); ``quantize`` 4/8 writes INT4/INT8 linears, 0 dense ones, None as the
    from-hf source was. ``merge_lora``: fold LoRA adapters in first, the source's own or
    ``adapter``'s (``glm_jax.convert.lora_adapter.merge``, into a scratch directory beside
    ``dst`` that is removed afterwards)."""
    if adapter is not None and not merge_lora:
        raise ConvertError("--adapter is merged into the weights: pass --merge-lora with it")
    if merge_lora:
        return _merged_then_converted(src, dst, adapter=adapter, step=step, dtype=dtype, fmt=fmt, quantize=quantize,
                                      max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress)
    params_write.check_dtype(dtype)
    if fmt not in FORMATS:
        raise ConvertError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    stored = params_read.open_source(src, step)
    cfg = stored.config
    if cfg.lora_rank:
        raise ConvertError(f"{src} has LoRA adapters (model.lora_rank={cfg.lora_rank}), which the authors' model "
                           "has no place for: pass --merge-lora to fold them into the weights, or write them alone "
                           "with export-lora")
    hf_config.check_representable(cfg)
    record = stored.source.record(directory.HF_SOURCE)
    bits = record.get("quantization_bit", 0) if quantize is None else quantize
    if bits not in (0, *quantized.BITS):
        raise ConvertError(f"--quantize {bits}: expected 0, 4 or 8")
    kept = _Kept(stored.source.quantized_dir, bits) if bits and record.get("quantization_bit") == bits else None

    entries = {e.key: e for e in authors_layout.entries(cfg)}

    def out_dtype(e: authors_layout.Entry) -> str:
        if bits and quantized.is_quantized_linear(e.key):
            return "float16"  # what is quantized, and what the runtime dequantizes to
        if dtype is None:
            return stored.dtype_name(e.path)
        return "float32" if e.is_layernorm and dtype in ("float16", "bfloat16") else dtype

    weights_dtype = out_dtype(entries["transformer.word_embeddings.weight"])
    with_inv_freq = record.get("rotary_inv_freq", True)
    inv_dtype = (record.get("rotary_inv_freq_dtype") if dtype is None else None) or weights_dtype

    tensors: list[hf_write.OutTensor] = []
    for key, e in entries.items():
        if with_inv_freq and key.endswith(".attention.query_key_value.weight"):
            inv_key = key.replace("query_key_value.weight", "rotary_emb.inv_freq")
            tensors.append(hf_write.OutTensor(inv_key, _inv_freq(cfg, inv_dtype).shape, inv_dtype))
        if bits and quantized.is_quantized_linear(key):
            shape = e.transform.authors_shape
            tensors.append(hf_write.OutTensor(key, quantized.packed_shape(shape, bits), "int8"))
            tensors.append(hf_write.OutTensor(quantized.scale_key(key), shape[:1],
                                              kept.dtype_name(quantized.scale_key(key)) if kept else "float16"))
        else:
            tensors.append(hf_write.OutTensor(key, e.transform.authors_shape, out_dtype(e)))
    for t in tensors:
        if t.dtype not in DTYPES + ("int8",):
            raise ConvertError(f"{src}: {t.key} would be written as {t.dtype}; expected one of {', '.join(DTYPES)}")

    bar = Progress(sum(t.nbytes for t in tensors), "to-hf", enabled=progress)

    def dense(e: authors_layout.Entry) -> Iterator[tuple[blk.Block, np.ndarray]]:
        return params_read.authors_blocks(e, stored.array(e.path), cfg, out_dtype(e), stored.source.describe())

    def rows(key: str) -> Iterator[np.ndarray]:
        for part in _rows(key):
            bar.update(part.nbytes)
            yield part

    def _rows(key: str) -> Iterator[np.ndarray]:
        if key.endswith("rotary_emb.inv_freq"):
            yield _inv_freq(cfg, inv_dtype)
        elif key in entries and not (bits and quantized.is_quantized_linear(key)):
            yield from (part for _, part in dense(entries[key]))
        else:  # a quantized linear's weight or weight_scale
            wkey = key if key in entries else key[: -len("weight_scale")] + "weight"
            for b, part in dense(entries[wkey]):
                q, scale = (kept.reuse(wkey, b, part) if kept else None) or quantized.quantize(part, bits)
                yield q if key == wkey else scale

    groups = hf_write.shard(tensors, max_shard_bytes)
    names, index_name = hf_write.shard_names(fmt, len(groups))
    write = hf_write.write_bin if fmt == "bin" else hf_write.write_safetensors
    with directory.staged_output(dst, overwrite=overwrite) as tmp:
        for name, group in zip(names, groups, strict=True):
            write(os.path.join(tmp, name), group, rows)
        if len(groups) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in tensors)},
                "weight_map": {t.key: name for name, group in zip(names, groups, strict=True) for t in group},
            }
            with open(os.path.join(tmp, index_name), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config.hf_config(cfg, weights_dtype, record.get("config"), quantization_bit=bits), f, indent=2)
        seconds = bar.close()
    return {"bytes": bar.total, "seconds": seconds, "files": names}


def _merged_then_converted(src: str, dst: str, *, adapter: Optional[str], step: Optional[int], **options) -> dict:
    import shutil
    import tempfile

    from glm_jax.convert import lora_adapter

    if os.path.exists(dst) and not options["overwrite"]:
        raise ConvertError(f"{os.path.abspath(dst)} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(dst)) + ".merging-", dir=parent)
    try:
        merged = os.path.join(scratch, "merged")
        lora_adapter.merge(src, merged, adapter=adapter, step=step)
        return convert(merged, dst, **options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _Kept(quantized.KeptTensors):
    """A quantized source's own tensors (``quantized/``, written by from-hf).

    Requantizing dequantized weights does not always reproduce them (glm_jax.checkpoint.quantized),
    so a block whose weights still dequantize from the kept tensors is written with those.
    """

    def __init__(self, path: Optional[str], bits: int):
        super().__init__(path)
        self.bits = bits

    def reuse(self, weight_key: str, b: blk.Block, dense_rows: np.ndarray):
        if not self.has(weight_key):
            return None
        q, scale = self.pair(weight_key, slice(b.row_start, b.row_stop))
        return (q, scale) if quantized.reproduces(q, scale, dense_rows, self.bits) else None
