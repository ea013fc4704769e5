"""Writing and reading orbax parameter checkpoints through tensorstore, chunk by chunk.

Orbax saves a ``jax.Array`` only whole, so a stacked ``[layers, ...]`` leaf would have to
exist in memory at once. The converters instead write the layout orbax itself writes
with ``use_ocdbt=False`` -- one zarr v2 array per leaf in ``DIR/<dotted.path>/``
(zstd level 1, as orbax compresses) plus the ``_METADATA`` tree description and the
``_CHECKPOINT_METADATA`` naming the StandardCheckpointHandler -- and fill each array one
chunk at a time. The result restores with ``orbax.checkpoint.StandardCheckpointer()
.restore(DIR, target)`` (tests/convert/test_store.py checks that against the pinned orbax).

The reader opens any orbax parameter checkpoint, OCDBT or not (e.g. one saved by
StandardCheckpointer after fine-tuning), so ``to-hf`` can stream it back out.
"""

from __future__ import annotations

import ast
import collections
import json
import os
import time
from typing import Optional, Sequence

import numpy as np
import tensorstore as ts

STANDARD_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
_KEY_TYPE_DICT = 2  # orbax's KeyType.DICT in _METADATA's key_metadata


def zarr_dtype(dtype: np.dtype) -> str:
    """The zarr v2 dtype string orbax/tensorstore use (bfloat16 has no numpy typestr)."""
    dtype = np.dtype(dtype)
    return "bfloat16" if dtype.name == "bfloat16" else dtype.str


def _context() -> ts.Context:
    cpus = os.cpu_count() or 1
    return ts.Context({"data_copy_concurrency": {"limit": cpus}, "file_io_concurrency": {"limit": max(4, cpus)}})


class CheckpointWriter:
    """Create leaves, write chunks (a few in flight at once), then :meth:`finish`.

    ``max_inflight`` bounds how many written chunks tensorstore may still be encoding
    and flushing; with chunks of ~8 MiB that bounds the writer's own memory.
    """

    def __init__(self, directory: str, *, compression: bool = True, max_inflight: int = 6):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self._compressor = {"id": "zstd", "level": 1} if compression else None
        self._max_inflight = max_inflight
        self._pending: collections.deque = collections.deque()
        self._leaves: dict[tuple[str, ...], tuple[int, ...]] = {}
        self._ctx = _context()
        self._t0 = time.time_ns()

    def create(self, path: Sequence[str], shape: Sequence[int], dtype, chunks: Sequence[int]) -> ts.TensorStore:
        path = tuple(path)
        name = ".".join(path)
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": os.path.join(self.directory, name)},
            "metadata": {
                "shape": list(shape),
                "chunks": [max(1, int(c)) for c in chunks],
                "dtype": zarr_dtype(dtype),
                "compressor": self._compressor,
                "fill_value": None,
                "order": "C",
                "dimension_separator": ".",
            },
            # orbax restores with "data missing is an error", so even all-zero chunks are stored
            "store_data_equal_to_fill_value": True,
        }
        self._leaves[path] = tuple(int(s) for s in shape)
        return ts.open(spec, create=True, context=self._ctx).result()

    def write(self, array: ts.TensorStore, region: tuple, value: np.ndarray) -> None:
        while len(self._pending) >= self._max_inflight:
            self._pending.popleft().result()
        self._pending.append(array[region].write(value).commit)

    def flush(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def finish(self) -> None:
        """Wait for every chunk, then write the metadata that makes this an orbax checkpoint."""
        self.flush()
        tree = {}
        for path, shape in sorted(self._leaves.items()):
            tree[str(path)] = {
                "key_metadata": [{"key": k, "key_type": _KEY_TYPE_DICT} for k in path],
                "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(shape)},
            }
        meta = {
            "tree_metadata": tree,
            "use_ocdbt": False,
            "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        }
        _write_json(os.path.join(self.directory, "_METADATA"), meta)
        step = {
            "item_handlers": STANDARD_HANDLER,
            "metrics": {},
            "performance_metrics": {},
            "init_timestamp_nsecs": self._t0,
            "commit_timestamp_nsecs": time.time_ns(),
            "custom_metadata": {},
        }
        _write_json(os.path.join(self.directory, "_CHECKPOINT_METADATA"), step)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


class CheckpointReader:
    """Leaves of an orbax checkpoint (any orbax layout with zarr arrays), opened lazily."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        path = os.path.join(self.directory, "_METADATA")
        try:
            with open(path) as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.directory} is not an orbax checkpoint (no _METADATA)") from None
        self.use_ocdbt = meta.get("use_ocdbt")
        if self.use_ocdbt is None:
            self.use_ocdbt = os.path.exists(os.path.join(self.directory, "manifest.ocdbt"))
        self.use_zarr3 = bool(meta.get("use_zarr3"))
        self.leaves: dict[tuple[str, ...], str] = {}
        for key, entry in meta["tree_metadata"].items():
            keys = entry.get("key_metadata")
            path_t = tuple(str(k["key"]) for k in keys) if keys else tuple(str(k) for k in ast.literal_eval(key))
            self.leaves[path_t] = ".".join(path_t)
        self._ctx = _context()

    def open(self, path: Sequence[str]) -> ts.TensorStore:
        name = self.leaves[tuple(path)]
        if self.use_ocdbt:
            kv = {"driver": "ocdbt", "base": f"file://{self.directory}/", "path": name}
        else:
            kv = {"driver": "file", "path": os.path.join(self.directory, name)}
        spec = {"driver": "zarr3" if self.use_zarr3 else "zarr", "kvstore": kv}
        return ts.open(spec, open=True, read=True, context=self._ctx).result()

    def read(self, path: Sequence[str], region: Optional[tuple] = None) -> np.ndarray:
        arr = self.open(path)
        return np.asarray((arr if region is None else arr[region]).read().result())
