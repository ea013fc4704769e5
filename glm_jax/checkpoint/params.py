"""Reading the parameters of a params directory or a training workdir, and exporting them.

Everything that reads parameters from disk (``glm_jax.load``, the exporters to-hf and
to-sat, ``convert export``) goes through :func:`open_params`: it resolves the directory
(``glm_jax.checkpoint.directory``), reads its ``config.yaml`` and checks every stored leaf
against the shapes that config implies (``authors_layout.leaf_shapes``, which a test
holds equal to the model's own ``abstract_params``), so a mismatch is one line naming the
leaf rather than a failure deep inside a restore. Leaves are opened lazily and read one
at a time, so no reader holds more than one tensor (or one chunk of it) in memory.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from typing import Optional, Sequence

import numpy as np

from glm_jax.checkpoint import authors_layout, directory, store
from glm_jax.checkpoint.directory import Source
from glm_jax.config import (INIT_FROM_NEUTRAL_KEYS, Config, ConfigError, ModelConfig, TrainConfig, differences,
                            dump_config, load_config)
from glm_jax.errors import CheckpointError, UnreadableCheckpoint, one_line

Path = tuple[str, ...]


def read_config(source: Source) -> Config:
    try:
        return load_config(source.config_path)
    except ConfigError as e:
        raise CheckpointError(f"{source.config_path}: {e}") from None


@dataclasses.dataclass
class StoredParams:
    """The parameter leaves of a source, checked against its model config, opened lazily.
    run_config: the source's whole config.yaml (``config`` is its model section)."""

    source: Source
    run_config: Config
    reader: store.CheckpointReader
    shapes: dict[Path, tuple[int, ...]]
    # kernels a run with finetune.quantize_base keeps as INT8/INT4 ``q`` + ``scale`` leaves
    quantized: frozenset = frozenset()

    @property
    def config(self) -> ModelConfig:
        return self.run_config.model

    def array(self, path: Path):
        """The tensorstore array of one leaf (path within the parameter tree)."""
        if path in self.quantized:
            raise CheckpointError(f"{self.source.describe()}: parameter {'/'.join(path)} is stored quantized "
                                  f"(finetune.quantize_base={self.run_config.finetune.quantize_base}); it reads only "
                                  "as a whole (dequantized) tensor")
        return self.reader.open(self.source.prefix + tuple(path))

    def read(self, path: Path, region: Optional[tuple] = None) -> np.ndarray:
        """One leaf (or ``region`` of it) as stored; a quantized kernel dequantized to float32."""
        if path in self.quantized:
            return self._dequantized(path, region)
        return self.reader.read(self.source.prefix + tuple(path), region)

    def _dequantized(self, path: Path, region: Optional[tuple]) -> np.ndarray:
        # The INT4 unpacking and scaling live with the quantized matmul (and import jax): only here.
        from glm_jax.model.linear import QuantizedWeight

        lead = region if region is not None and len(region) == 1 else None  # a run of layers of a stacked leaf
        q, scale = (self.reader.read(self.source.prefix + tuple(path) + (k,), lead) for k in ("q", "scale"))
        w = np.asarray(QuantizedWeight(q, scale, bits=self.run_config.finetune.base_bits).dequantize(np.float32))
        return w if region is None or lead is not None else w[region]

    def dtype_name(self, path: Path) -> str:
        if path in self.quantized:
            return "float32"
        return np.dtype(self.array(path).dtype.numpy_dtype).name

    def tree(self, skip: Sequence[Path] = ()) -> dict:
        """The nested parameter dict as numpy arrays, leaves in ``skip`` left out."""
        out: dict = {}
        for path in self.shapes:
            if path in skip:
                continue
            node = out
            for p in path[:-1]:
                node = node.setdefault(p, {})
            node[path[-1]] = self.read(path)
        return out


def open_params(source: Source) -> StoredParams:
    """The parameters of ``source``, every leaf checked against its config.yaml."""
    run_config = read_config(source)
    cfg = run_config.model
    try:
        reader = store.CheckpointReader(source.params_dir)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    n = len(source.prefix)
    got = {p[n:]: p for p in reader.leaves if p[:n] == source.prefix}
    want = authors_layout.leaf_shapes(cfg)
    where = directory.PARAMS + "/" if not source.is_workdir else f"the step-{source.step} checkpoint"
    quantized = set()
    for path, shape in want.items():
        if path not in got and run_config.finetune.base_bits and path + ("q",) in got and path + ("scale",) in got:
            quantized.add(path)  # a frozen base kept quantized (finetune.quantize_base)
            continue
        if path not in got:
            raise CheckpointError(
                f"{source.describe()}: parameter {'/'.join(path)} is missing from {where} ({directory.CONFIG} implies it)"
            )
        try:
            have = tuple(reader.open(got[path]).shape)
        except Exception as e:  # tensorstore reports a torn or missing file as ValueError
            raise UnreadableCheckpoint(f"{source.describe()}: parameter {'/'.join(path)} cannot be read "
                                       f"({one_line(e)})") from None
        if have != shape:
            raise CheckpointError(
                f"{source.describe()}: parameter {'/'.join(path)} has shape {list(have)}, but {directory.CONFIG} "
                f"implies {list(shape)}"
            )
    extra = sorted(set(got) - set(want) - {p + (k,) for p in quantized for k in ("q", "scale")})
    if extra:
        raise CheckpointError(
            f"{source.describe()}: parameter {'/'.join(extra[0])} is not part of the model {directory.CONFIG} describes"
        )
    return StoredParams(source, run_config, reader, want, frozenset(quantized))


def read_onto(stored: StoredParams, targets: dict) -> dict:
    """The stored parameters as jax arrays laid out like ``targets`` (a tree of
    ``jax.ShapeDtypeStruct`` with shardings, the model's parameter tree): each process reads
    only the regions its own devices hold, cast to the target dtype."""
    import jax  # here, not at module level: the converters' exporters use this module without jax

    def one(key_path, target):
        path = tuple(str(k.key) for k in key_path)
        if stored.shapes.get(path) != tuple(target.shape):
            raise CheckpointError(
                f"{stored.source.describe()}: parameter {'/'.join(path)} is "
                f"{list(stored.shapes[path]) if path in stored.shapes else 'missing'}, this model's is {list(target.shape)}"
            )
        array = stored.array(path)
        return jax.make_array_from_callback(
            target.shape, target.sharding, lambda index: np.asarray(array[index].read().result()).astype(target.dtype))

    return jax.tree_util.tree_map_with_path(one, targets)


def open_for_init(path: str, cfg: ModelConfig) -> StoredParams:
    """The parameters ``train.init_from=path`` names (a params directory, or a workdir's
    newest checkpoint), refused when their model differs from ``cfg`` in a key that
    changes what the weights mean (``INIT_FROM_NEUTRAL_KEYS`` may differ)."""
    stored = open_params(directory.resolve(path))
    changed = differences(Config(model=stored.config), Config(model=cfg), sections=("model",),
                          neutral=INIT_FROM_NEUTRAL_KEYS)
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise CheckpointError(
            f"train.init_from={path}: its model differs from this run's ({'; '.join(changed[:3])}{more}); "
            f"start from its own config (--config {os.path.join(path, directory.CONFIG)}) and override what may "
            "differ (dropout, dtypes, remat, attention kernel)"
        )
    return stored


def stored_bits(source: Source) -> int:
    """The quantization of a params directory converted from an INT8/INT4 release (0 if
    none): from-hf and from-sat both record it in their source record."""
    if source.quantized_dir is None:
        return 0
    for name in (directory.HF_SOURCE, directory.SAT_SOURCE):
        record = source.record(name)
        if record:
            return int(record.get("quantization_bit") or 0)
    raise CheckpointError(
        f"{source.root}: {directory.QUANTIZED}/ holds quantized tensors but neither {directory.HF_SOURCE} nor "
        f"{directory.SAT_SOURCE} says their width; reconvert the checkpoint"
    )


# ---------------------------------------------------------------------------
# Writing a params directory.

CHUNK_BYTES = 64 << 20


def chunk_shape(shape: Sequence[int], itemsize: int, limit: int = CHUNK_BYTES) -> tuple[int, ...]:
    """Storage chunks of at most ``limit`` bytes, cut along the leading axes first (a
    stacked ``[layers, ...]`` leaf becomes one chunk per layer, or per run of its rows)."""
    chunk = [max(1, int(s)) for s in shape]
    for i in range(len(chunk)):
        if math.prod(chunk) * itemsize <= limit:
            break
        inner = math.prod(chunk[i + 1:]) * itemsize
        chunk[i] = max(1, min(chunk[i], limit // max(inner, 1)))
    return tuple(chunk)


def write_config(path: str, cfg: ModelConfig, base: Optional[Config] = None) -> None:
    """``config.yaml`` for parameters of ``cfg``: ``base``'s other sections, or training
    defaults with the sequence length capped by the model's."""
    if base is not None:
        full = dataclasses.replace(base, model=cfg)
    else:
        full = Config(model=cfg, train=TrainConfig(seq_len=min(TrainConfig.seq_len, cfg.max_seq_len)))
    with open(os.path.join(path, directory.CONFIG), "w") as f:
        f.write(dump_config(full))


def export(src: str, dst: str, *, step: Optional[int] = None, overwrite: bool = False, progress=None) -> dict:
    """Write the parameters of ``src`` (a training workdir at ``step``, default its newest
    checkpoint, or a params directory) as a standalone params directory ``dst``: its
    config.yaml and the parameter tree, no optimizer state. Leaves are copied one storage
    chunk at a time, so memory stays at a chunk whatever the model's size.

    progress: an optional callable taking the bytes copied so far and the total.
    """
    source = directory.resolve(src, step)
    stored = open_params(source)
    total = sum(math.prod(s) * np.dtype(stored.array(p).dtype.numpy_dtype).itemsize for p, s in stored.shapes.items())
    t0, done = time.perf_counter(), 0
    with directory.staged_output(dst, overwrite=overwrite) as tmp:
        writer = store.CheckpointWriter(os.path.join(tmp, directory.PARAMS))
        for path, shape in stored.shapes.items():
            arr = stored.array(path)
            dtype = np.dtype(arr.dtype.numpy_dtype)
            chunk = chunk_shape(shape, dtype.itemsize)
            out = writer.create(path, shape, dtype, chunk)
            for corner in itertools.product(*(range(0, s, c) for s, c in zip(shape, chunk))):
                region = tuple(slice(a, min(a + c, s)) for a, c, s in zip(corner, chunk, shape))
                try:
                    value = np.asarray(arr[region].read().result())
                except Exception as e:  # a torn or missing file: name it, in one line
                    raise UnreadableCheckpoint(f"{source.describe()}: parameter {'/'.join(path)} cannot be read "
                                               f"({one_line(e)})") from None
                writer.write(out, region, value)
                done += value.nbytes
                if progress:
                    progress(done, total)
        writer.finish()
        write_config(tmp, stored.config, stored.run_config)
    return {"bytes": total, "seconds": time.perf_counter() - t0, "step": source.step, "leaves": len(stored.shapes)}
