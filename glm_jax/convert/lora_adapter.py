"""LoRA adapters in PEFT's format, both ways, and merging adapters into a base checkpoint.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` (``peft_type: LORA``,
``r``, ``lora_alpha``, ``target_modules``, ...) and ``adapter_model.safetensors`` (newer
PEFT) or ``adapter_model.bin`` (older), holding for each adapted linear
``base_model.model.<module>.lora_A.weight [r, in]`` and ``...lora_B.weight [out, r]``,
where ``<module>`` is the authors' name (``transformer.layers.N.attention.query_key_value``
for ChatGLM-6B). ``W' = W + B @ A * lora_alpha / r`` in the torch ``[out, in]`` orientation.

* :func:`read` takes such a directory, or a glm_jax LoRA run (``finetune.method=lora``),
  and returns, for a base model config, the config with the adapters and their leaves in
  glm_jax's layout. A rank, a target or a shape the base cannot take is one line naming
  both sides.
* :func:`export` writes a glm_jax LoRA run's adapters as a PEFT adapter directory.
* :func:`merge` writes a params directory with the adapters folded into the base's
  kernels (``convert merge-lora``, and ``to-hf --merge-lora`` through it), one leaf (one
  layer of a stacked leaf) at a time.

The tensors map through ``glm_jax.checkpoint.authors_layout`` (its LoRA entries); the
merge arithmetic is ``glm_jax.model.lora.merged_kernel``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Optional

import numpy as np

from glm_jax.checkpoint import authors_layout, directory, params, store
from glm_jax.config import LORA_TARGETS, FinetuneConfig, ModelConfig
from glm_jax.convert.errors import ConvertError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
# PEFT's target_modules names (the last part of the authors' module name) for each model.lora_targets value
MODULE_NAMES = {t: authors_layout.LORA_MODULES[t].rsplit(".", 1)[1] for t in LORA_TARGETS}
# adapter_config.json settings whose non-default values change the arithmetic this reader implements
_UNSUPPORTED = {"fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "bias": "none", "lora_bias": False,
                "layers_to_transform": None, "layer_replication": None, "rank_pattern": {}, "alpha_pattern": {},
                "modules_to_save": None}


def _arch(cfg: ModelConfig) -> str:
    return f"{cfg.num_layers} layers x hidden {cfg.hidden_size}, mlp {cfg.mlp_dim}"


def adapter_entries(cfg: ModelConfig) -> list[authors_layout.Entry]:
    return [e for e in authors_layout.entries(cfg) if ".lora_" in e.key]


def _with_lora(base: ModelConfig, rank: int, alpha: float, targets: list[str], dropout: float = 0.0) -> ModelConfig:
    return dataclasses.replace(base, lora_rank=rank, lora_alpha=float(alpha), lora_dropout=float(dropout),
                               lora_targets=",".join(t for t in LORA_TARGETS if t in targets))


def read(path: str, base: ModelConfig) -> tuple[ModelConfig, dict]:
    """(base with the adapters, ``{leaf path: float32 array}``) from ``path``."""
    if not os.path.isdir(path):
        raise ConvertError(f"--lora-adapter {path}: no such directory")
    if os.path.isfile(os.path.join(path, directory.CONFIG)):
        return _read_glm_jax(path, base)
    return _read_peft(path, base)


def _read_glm_jax(path: str, base: ModelConfig) -> tuple[ModelConfig, dict]:
    stored = params.open_params(directory.resolve(path))
    cfg = stored.config
    if not cfg.lora_rank:
        raise ConvertError(f"{path}: its config has no adapters (model.lora_rank is 0); not a LoRA run")
    shape = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.mlp_dim, cfg.mlp_type)
    if shape != (base.num_layers, base.hidden_size, base.num_heads, base.mlp_dim, base.mlp_type):
        raise ConvertError(f"{path}: adapters for {_arch(cfg)}, but the base model has {_arch(base)}")
    want = _with_lora(base, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","))
    leaves = {e.path: np.asarray(stored.read(e.path), np.float32) for e in adapter_entries(want)}
    return want, leaves


def _peft_config(path: str) -> dict:
    where = os.path.join(path, CONFIG)
    if not os.path.isfile(where):
        raise ConvertError(f"{path}: no {CONFIG} (a PEFT adapter directory) and no config.yaml (a glm_jax LoRA run)")
    try:
        with open(where) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{where}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict) or str(cfg.get("peft_type", "")).upper() != "LORA":
        raise ConvertError(f"{where}: peft_type={cfg.get('peft_type') if isinstance(cfg, dict) else None!r}; "
                           "only LoRA adapters (peft_type LORA) can be read")
    for key, default in _UNSUPPORTED.items():
        value = cfg.get(key)
        if value is not None and value != default and value not in ([], {}):
            raise ConvertError(f"{where}: {key}={cfg[key]!r} is not supported (glm_jax reads plain LoRA: "
                               f"{', '.join(f'{k}={json.dumps(v)}' for k, v in _UNSUPPORTED.items())})")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise ConvertError(f"{where}: {key}={cfg.get(key)!r}; expected a positive number")
    return cfg


def _targets(cfg: dict, where: str) -> list[str]:
    modules = cfg.get("target_modules")
    if isinstance(modules, str):
        modules = [modules]  # PEFT reads a string as a regular expression; glm_jax takes a plain module name
    by_name = {v: k for k, v in MODULE_NAMES.items()}
    if not isinstance(modules, list) or not modules:
        raise ConvertError(f"{where}: target_modules={modules!r}; expected a list of module names")
    bad = [m for m in modules if m not in by_name]
    if bad:
        raise ConvertError(f"{where}: target_modules names {', '.join(map(str, bad))}, which this model does not "
                           f"have: an adapter for another architecture (valid: {', '.join(MODULE_NAMES.values())})")
    return [by_name[m] for m in modules]


def _read_peft(path: str, base: ModelConfig) -> tuple[ModelConfig, dict]:
    pc = _peft_config(path)
    where = os.path.join(path, CONFIG)
    cfg = _with_lora(base, int(pc["r"]), pc["lora_alpha"], _targets(pc, where))
    tensors = _load_tensors(path)
    tensors = {k[len(KEY_PREFIX):] if k.startswith(KEY_PREFIX) else k: v for k, v in tensors.items()}
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}  # a name some tools keep
    entries = adapter_entries(cfg)
    known = {e.key for e in entries}
    extra = sorted(k for k in tensors if k not in known)
    if extra:
        raise ConvertError(f"{path}: {KEY_PREFIX}{extra[0]} has no place in {_arch(base)} with target_modules "
                           f"{', '.join(MODULE_NAMES[t] for t in cfg.lora_targets.split(','))}: an adapter for another "
                           "architecture")
    leaves: dict = {}
    shapes = authors_layout.leaf_shapes(cfg)
    for e in entries:
        if e.key not in tensors:
            raise ConvertError(f"{path}: no {KEY_PREFIX}{e.key} (adapter_config.json's target_modules implies it)")
        x = np.asarray(tensors[e.key])
        want = e.transform.authors_shape
        if x.shape != want:
            rank_axis = 0 if ".lora_A." in e.key else 1
            if x.ndim == 2 and x.shape[rank_axis] != cfg.lora_rank and x.shape[1 - rank_axis] == want[1 - rank_axis]:
                raise ConvertError(f"{where}: r={cfg.lora_rank}, but {KEY_PREFIX}{e.key} has rank "
                                   f"{x.shape[rank_axis]} (shape {list(x.shape)}): an adapter of another rank")
            raise ConvertError(f"{KEY_PREFIX}{e.key} has shape {list(x.shape)}, but rank {cfg.lora_rank} on "
                               f"{_arch(base)} needs {list(want)}: an adapter for another architecture")
        x = e.transform.to_ours(x.astype(np.float32))
        index = authors_layout.leaf_index(e, cfg)
        if index:
            leaves.setdefault(e.path, np.zeros(shapes[e.path], np.float32))[index] = x
        else:
            leaves[e.path] = x
    return cfg, leaves


def _load_tensors(path: str) -> dict:
    st, legacy = os.path.join(path, WEIGHTS), os.path.join(path, LEGACY_WEIGHTS)
    if os.path.isfile(st):
        from safetensors.numpy import load_file  # the converters' optional dependency: only when reading one

        try:
            return load_file(st)
        except Exception as e:
            raise ConvertError(f"{st}: not a readable safetensors file ({e})") from None
    if os.path.isfile(legacy):
        import torch  # older PEFT saved a torch pickle

        try:
            sd = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConvertError(f"{legacy}: not a readable torch file ({e})") from None
        return {k: v.float().numpy() for k, v in sd.items()}
    raise ConvertError(f"{path}: no {WEIGHTS} or {LEGACY_WEIGHTS}")


def peft_config(cfg: ModelConfig, base_model: Optional[str] = None) -> dict:
    """``adapter_config.json`` for ``cfg``'s adapters, as PEFT writes it for a LoRA on ChatGLM-6B:
    only keys every PEFT release since ChatGLM-6B's time reads (older ones refuse unknown keys)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        "target_modules": [MODULE_NAMES[t] for t in cfg.lora_targets.split(",") if t],
        "inference_mode": True, "init_lora_weights": True, "fan_in_fan_out": False, "bias": "none",
        "modules_to_save": None,
    }


def export(src: str, dst: str, *, step: Optional[int] = None, overwrite: bool = False) -> dict:
    """Write the adapters of a glm_jax LoRA run (a workdir, newest checkpoint or ``step``, or
    a params directory) as the PEFT adapter directory ``dst``."""
    from safetensors.numpy import save_file  # the converters' optional dependency

    t0 = time.perf_counter()
    source = directory.resolve(src, step)
    stored = params.open_params(source)
    cfg = stored.config
    if not cfg.lora_rank:
        raise ConvertError(f"{src}: its config has no adapters (model.lora_rank is 0); not a LoRA run")
    tensors = {}
    for e in adapter_entries(cfg):
        leaf = np.asarray(stored.read(e.path), np.float32)
        tensors[KEY_PREFIX + e.key] = e.transform.to_authors(leaf[authors_layout.leaf_index(e, cfg)])
    base = stored.run_config.train.init_from or None
    with directory.staged_output(dst, overwrite=overwrite) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(peft_config(cfg, base), f, indent=2)
    return {"tensors": len(tensors), "rank": cfg.lora_rank, "step": source.step,
            "bytes": sum(t.nbytes for t in tensors.values()), "seconds": time.perf_counter() - t0}


def merge(src: str, dst: str, *, adapter: Optional[str] = None, step: Optional[int] = None,
          overwrite: bool = False, progress=None) -> dict:
    """Write ``src``'s parameters with LoRA adapters folded in as a params directory ``dst``.

    src: a LoRA run (its own adapters), or with ``adapter`` any base (a params directory or
    a workdir) and ``adapter`` a PEFT adapter directory or a glm_jax LoRA run.
    progress: an optional callable taking the bytes written so far and the total.
    """
    # The merge arithmetic lives with the model's LoRA (and imports jax): only when merging.
    from glm_jax.model import lora

    t0 = time.perf_counter()
    source = directory.resolve(src, step)
    stored = params.open_params(source)
    base_cfg = stored.config
    if adapter is None:
        if not base_cfg.lora_rank:
            raise ConvertError(f"{src}: its config has no adapters (model.lora_rank is 0): name the adapter to merge "
                               "with --adapter")
        cfg, given = base_cfg, {}
    else:
        if base_cfg.lora_rank:
            raise ConvertError(f"{src} already has LoRA adapters (model.lora_rank={base_cfg.lora_rank}); merge them "
                               "first, or merge the adapter into the base it was trained on")
        cfg, given = read(adapter, base_cfg)
    scale = cfg.lora_alpha / cfg.lora_rank
    adapted = {w: (a, b) for w, a, b in lora.kernel_paths({p: None for p in authors_layout.leaf_shapes(cfg)}, cfg)}

    def leaf(path, region=()):
        if path in given:
            return given[path][region]
        return stored.read(path, region or None)

    out_cfg = lora.without_lora(cfg)
    shapes = authors_layout.leaf_shapes(out_cfg)
    total = sum(math.prod(s) * np.dtype(stored.dtype_name(p)).itemsize for p, s in shapes.items())
    with directory.staged_output(dst, overwrite=overwrite) as tmp:
        writer = store.CheckpointWriter(os.path.join(tmp, directory.PARAMS))
        done = 0
        for path, shape in shapes.items():
            dtype = np.dtype(stored.dtype_name(path))
            stacked = path[0] == "layers"
            chunk = ((1,) + params.chunk_shape(shape[1:], dtype.itemsize)) if stacked else params.chunk_shape(shape, dtype.itemsize)
            arr = writer.create(path, shape, dtype, chunk)
            for region in ([(i,) for i in range(shape[0])] if stacked else [()]):
                w = np.asarray(stored.read(path, tuple(slice(i, i + 1) for i in region) or None))
                if path in adapted:
                    a_path, b_path = adapted[path]
                    w = lora.merged_kernel(w, leaf(a_path, tuple(slice(i, i + 1) for i in region)),
                                           leaf(b_path, tuple(slice(i, i + 1) for i in region)), scale, stacked=stacked)
                writer.write(arr, tuple(slice(i, i + 1) for i in region) or tuple(slice(None) for _ in shape), w)
                done += w.nbytes
                if progress:
                    progress(done, total)
        writer.finish()
        # The merged model is a plain one: fine-tuning settings of the LoRA run do not carry over.
        params.write_config(tmp, out_cfg, dataclasses.replace(stored.run_config, finetune=FinetuneConfig()))
    return {"bytes": total, "seconds": time.perf_counter() - t0, "step": source.step, "rank": cfg.lora_rank,
            "merged": len(adapted)}
