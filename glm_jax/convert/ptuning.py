"""P-tuning v2 checkpoints in the authors' layout (ChatGLM-6B ``ptuning/``), both ways.

The authors' trainer saves only what trained: a directory with ``config.json`` (the
model's, with ``pre_seq_len`` and ``prefix_projection``) and ``pytorch_model.bin`` holding
``transformer.prefix_encoder.embedding.weight`` (and, with the projection,
``transformer.prefix_encoder.trans.{0,2}.{weight,bias}``), float32. Their loader reads
``pre_seq_len`` from the config it is given and the tensors from that file.

* :func:`read` takes such a directory (``pytorch_model.bin`` or ``model.safetensors``)
  or a glm_jax P-tuning run (a workdir or params directory whose config has
  ``model.pre_seq_len``) and returns, for a base model config, the config with the prefix
  and the prefix encoder's parameters in glm_jax's layout. Every disagreement (the
  config's ``pre_seq_len`` against the tensors, a prefix made for another architecture) is
  one line naming both sides.
* :func:`export` writes a glm_jax P-tuning run's prefix in the authors' layout.

The tensors map through ``glm_jax.checkpoint.authors_layout.prefix_entries``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

import numpy as np

from glm_jax.checkpoint import authors_layout, directory, params
from glm_jax.config import ModelConfig
from glm_jax.convert import hf_config
from glm_jax.convert.errors import ConvertError

WEIGHTS = "pytorch_model.bin"


def _arch(cfg: ModelConfig) -> str:
    return f"{cfg.num_layers} layers x hidden {cfg.hidden_size}, {cfg.num_heads} heads"


def _with_prefix(base: ModelConfig, pre_seq_len: int, projection: bool) -> ModelConfig:
    return dataclasses.replace(base, pre_seq_len=pre_seq_len, prefix_projection=projection)


def read(path: str, base: ModelConfig) -> tuple[ModelConfig, dict]:
    """(base with the prefix, ``{"embedding": ..., ...}`` float32) from ``path``."""
    if not os.path.isdir(path):
        raise ConvertError(f"--ptuning-checkpoint {path}: no such directory")
    if os.path.isfile(os.path.join(path, directory.CONFIG)):
        return _read_glm_jax(path, base)
    return _read_authors(path, base)


def _read_glm_jax(path: str, base: ModelConfig) -> tuple[ModelConfig, dict]:
    stored = params.open_params(directory.resolve(path))
    cfg = stored.config
    if not cfg.pre_seq_len:
        raise ConvertError(f"{path}: its config has no prefix (model.pre_seq_len is 0); not a P-tuning run")
    if (cfg.num_layers, cfg.hidden_size, cfg.num_heads) != (base.num_layers, base.hidden_size, base.num_heads):
        raise ConvertError(f"{path}: a prefix for {_arch(cfg)}, but the base model has {_arch(base)}")
    tree = {p[1]: np.asarray(stored.read(p), np.float32) for p in stored.shapes if p[0] == "prefix_encoder"}
    return _with_prefix(base, cfg.pre_seq_len, cfg.prefix_projection), tree


def _read_authors(path: str, base: ModelConfig) -> tuple[ModelConfig, dict]:
    from glm_jax.convert.hf_read import HFSource  # torch / safetensors: only when such a file is read
    from glm_jax.convert.tensors import to_numpy

    hf = hf_config.read_config_json(path)
    where = os.path.join(path, "config.json")
    pre_seq_len = hf.get("pre_seq_len")
    if not isinstance(pre_seq_len, int) or isinstance(pre_seq_len, bool) or pre_seq_len <= 0:
        raise ConvertError(f"{where}: pre_seq_len={pre_seq_len!r}; a P-tuning checkpoint's config names its prefix length")
    projection = bool(hf.get("prefix_projection", False))
    for key, ours in (("num_layers", base.num_layers), ("hidden_size", base.hidden_size),
                      ("num_attention_heads", base.num_heads)):
        if key in hf and hf[key] != ours:
            raise ConvertError(f"{where}: {key}={hf[key]}, but the base model has {ours} ({_arch(base)}): "
                               "a prefix for another architecture")
    source = HFSource(path)
    cfg = _with_prefix(base, pre_seq_len, projection)
    tree = {}
    for e in authors_layout.prefix_entries(cfg):
        info = source.infos.get(e.key)
        if info is None:
            found = [k for k in source.infos if k.startswith(authors_layout.PREFIX_KEY)]
            raise ConvertError(f"{path}: no {e.key} (prefix_projection={str(projection).lower()} in config.json; "
                               f"the file has {', '.join(found) or 'no prefix encoder tensors'})")
        want = e.transform.authors_shape
        if tuple(info.shape) != want:
            if e.key.endswith("embedding.weight") and len(info.shape) == 2 and info.shape[0] != pre_seq_len:
                raise ConvertError(f"{where}: pre_seq_len={pre_seq_len}, but {e.key} holds {info.shape[0]} prefix "
                                   "positions: set pre_seq_len to the length the prefix was trained with")
            raise ConvertError(f"{e.key} has shape {list(info.shape)}, but a prefix of {pre_seq_len} positions for "
                               f"{_arch(base)} has {list(want)}: a prefix for another architecture")
        with source.open(info.file) as f, f.block(e.key, 0, want[0]) as rows:
            tree[e.path[1]] = e.transform.to_ours(to_numpy(rows).astype(np.float32))
    return cfg, tree


def export(src: str, dst: str, *, step: Optional[int] = None, overwrite: bool = False) -> dict:
    """Write the prefix of a glm_jax P-tuning run (a workdir, newest checkpoint or ``step``,
    or a params directory) as the authors' checkpoint directory ``dst``."""
    import torch  # the authors' file is a torch pickle

    t0 = time.perf_counter()
    source = directory.resolve(src, step)
    stored = params.open_params(source)
    cfg = stored.config
    if not cfg.pre_seq_len:
        raise ConvertError(f"{src}: its config has no prefix (model.pre_seq_len is 0); not a P-tuning run")
    if os.path.exists(dst) and not overwrite:
        raise ConvertError(f"{dst} exists; pass --overwrite to replace it")
    tensors = {}
    for e in authors_layout.prefix_entries(cfg):
        tensors[e.key] = torch.from_numpy(np.ascontiguousarray(e.transform.to_authors(np.asarray(stored.read(e.path), np.float32))))
    hf = hf_config.hf_config(cfg, "float16")
    hf.update({"pre_seq_len": cfg.pre_seq_len, "prefix_projection": cfg.prefix_projection})
    tmp = f"{dst}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    torch.save(tensors, os.path.join(tmp, WEIGHTS))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if os.path.exists(dst):
        import shutil

        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return {"tensors": len(tensors), "pre_seq_len": cfg.pre_seq_len, "prefix_projection": cfg.prefix_projection,
            "step": source.step, "bytes": sum(t.numel() * 4 for t in tensors.values()),
            "seconds": time.perf_counter() - t0}
