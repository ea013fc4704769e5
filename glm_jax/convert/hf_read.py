"""Reading a Hugging Face checkpoint's tensors a few rows at a time.

Handles ``pytorch_model.bin`` and ``*.safetensors``, single files or shards with or
without an ``*.index.json``. Nothing is read up front but the tensors' names, shapes and
dtypes; :meth:`HFSource.open` then hands out rows on demand, so the converter's memory
stays near one block rather than one tensor or one shard:

- ``.bin`` shards are opened with ``torch.load(mmap=True, weights_only=True)`` (no code
  from the pickle runs; ``glm_jax.convert.mapped``); each block is a view of the mapping
  whose pages are handed back when the block is done, so a 2 GB shard never becomes
  2 GB of RSS.
- ``.safetensors`` files are read with ``safe_open(framework="pt")``, whose tensors are
  views of a mapping of the file too, and are released the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
from typing import Iterator, Optional

import numpy as np

from glm_jax.convert.errors import ConvertError
from glm_jax.convert.mapped import MappedFile, torch_load
from glm_jax.convert.tensors import dtype_name, np_dtype

_SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "BF16": "bfloat16", "I8": "int8",
                       "U8": "uint8", "I32": "int32", "I64": "int64", "BOOL": "bool"}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    key: str
    file: str
    shape: tuple[int, ...]
    dtype: str  # torch's name: float16, float32, bfloat16, int8, ...

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np_dtype(self.dtype).itemsize


# ---------------------------------------------------------------------------
# Finding the weight files.


def _index_files(directory: str, index_name: str) -> Optional[list[str]]:
    path = os.path.join(directory, index_name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConvertError(f"{path} is not a valid index (needs a 'weight_map' object): {e}") from None
    files = list(dict.fromkeys(weight_map.values()))
    for name in files:
        if not os.path.isfile(os.path.join(directory, name)):
            raise ConvertError(f"{path} lists {name}, which is not in {directory}")
    return [os.path.join(directory, n) for n in files]


def weight_files(directory: str) -> tuple[str, list[str]]:
    """("safetensors" | "bin", files in order). Safetensors win when both are present, as in HF."""
    for fmt, index, pattern in (
        ("safetensors", "model.safetensors.index.json", "*.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        files = _index_files(directory, index)
        if files is None:
            files = sorted(glob.glob(os.path.join(directory, pattern)))
        if files:
            return fmt, files
    raise ConvertError(f"{directory}: no weight files (pytorch_model*.bin or *.safetensors, with or without an index)")


# ---------------------------------------------------------------------------
# Per-format readers.


class _BinFile(MappedFile):
    """A ``.bin`` shard: a state dict of tensors backed by a private, read-only mapping."""

    def __init__(self, path: str):
        import torch

        self.path, self._mapped = path, {}
        obj = torch_load(path)
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ConvertError(f"{path}: expected a state dict of tensors (key -> tensor)")
        self.tensors = obj

    def infos(self) -> list[TensorInfo]:
        return [TensorInfo(k, self.path, tuple(t.shape), dtype_name(t.dtype)) for k, t in self.tensors.items()]

    def _tensor(self, key: str):
        return self.tensors[key]

    def close(self) -> None:
        self.tensors = {}


class _SafetensorsFile(MappedFile):
    """A ``.safetensors`` file through ``safe_open`` (torch views of a mapping of the file)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path, self._mapped = path, {}
        try:
            self._cm = safe_open(path, framework="pt")
            self._f = self._cm.__enter__()
        except Exception as e:
            raise ConvertError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None

    def infos(self) -> list[TensorInfo]:
        out = []
        for k in self._f.keys():
            sl = self._f.get_slice(k)
            name = sl.get_dtype()
            out.append(TensorInfo(k, self.path, tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(name, name)))
        return out

    def _tensor(self, key: str):
        return self._f.get_tensor(key)

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


class HFSource:
    """The tensors of a HF checkpoint directory: names, shapes, dtypes, and rows on demand."""

    def __init__(self, directory: str):
        self.directory = directory
        self.format, self.files = weight_files(directory)
        self.infos: dict[str, TensorInfo] = {}
        for path in self.files:
            with self._open_file(path) as f:
                for info in f.infos():
                    if info.key in self.infos:
                        raise ConvertError(f"{info.key} appears in both {self.infos[info.key].file} and {path}")
                    self.infos[info.key] = info

    def _open_file(self, path: str):
        return contextlib.closing(_BinFile(path) if self.format == "bin" else _SafetensorsFile(path))

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator:
        """A file's reader: ``with reader.block(key, start, stop) as rows`` gives those rows as a
        torch tensor, valid (it may be a view of a mapped file) only inside the block."""
        with self._open_file(path) as f:
            yield f
